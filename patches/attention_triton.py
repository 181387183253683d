"""INT4 variant of SGLang 0.5.17's `triton` attention backend.

Metadata is the triton backend's own (kv_indptr / kv_indices hold token slots, also
inside its CUDA-graph buffers); we add kv_lens and, for graphs, a split count fixed per
captured batch size and a shared split workspace.

Decode: write the new token (pool.set_kv_buffer -> our quantize_and_store), then our
INT4 decode kernel. Extend: write the new chunk; then (up to
int4_attention.DEQUANT_MAX_TOKENS tokens of prefix + chunk) dequantise the prefixes and
the chunk from the pool into BF16 and run SGLang's own Triton extend kernel over them
(prefix rows by index, the chunk as its new k/v), so a prompt sees the same quantised
values on a radix-cache miss as on a hit. Larger batches attend the chunk causally on its
fresh BF16 k/v (the extend kernel with `skip_prefix=True` and `lse_extend`), the cached
INT4 prefix with our prefix kernel, and merge with SGLang's Triton merge_state.

`TritonAttnBackend.__init__` reads `get_value_buffer(0).shape[-1]` as v_head_dim; on the
packed pool that is the byte width (or a whole-layer dequantisation), so the
constructor runs with a probe that reports the logical head_dim instead.
"""

from __future__ import annotations

import functools
import logging

import torch

from . import int4_attention as ia

logger = logging.getLogger(__name__)

BACKEND = "triton"


class _Int4Meta:
    """`rows`: token slots of every prefix (request order) then of the whole chunk, when
    the extend is attended through the pool; `prefix_rows` of them are prefix rows, which
    `ws_indices` (0..prefix_rows-1) index for SGLang's extend kernel."""

    def __init__(self, kv=None, workspace=None, num_splits=None, max_kv_len=None,
                 qo_indptr=None, prefix=None, max_q_len=None, rows=None, prefix_rows=0,
                 ws_indices=None):
        self.kv, self.workspace, self.num_splits, self.max_kv_len = kv, workspace, num_splits, max_kv_len
        self.qo_indptr, self.prefix, self.max_q_len = qo_indptr, prefix, max_q_len
        self.rows, self.prefix_rows, self.ws_indices = rows, prefix_rows, ws_indices


def _logical_value_buffer(head_dim):
    probe = torch.empty((0, 1, head_dim), device="meta")
    return lambda layer_id: probe


def _build_class():
    from sglang.kernels.ops.attention.merge_state import merge_state_triton
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend
    from sglang.srt.layers.radix_attention import AttentionType
    from sglang.srt.mem_cache.memory_pool import KVWriteLoc
    from sglang.srt.runtime_context import get_parallel

    class Int4TritonAttnBackend(TritonAttnBackend):
        """Triton backend whose KV-cache reads go to the SAW-INT4 kernels."""

        def __init__(self, model_runner, skip_prefill: bool = False, kv_indptr_buf=None):
            pool = model_runner.token_to_kv_pool
            fmt = ia.pool_format(pool)
            had = "get_value_buffer" in vars(pool)
            saved = vars(pool).get("get_value_buffer")
            pool.get_value_buffer = _logical_value_buffer(fmt.head_dim)
            try:
                super().__init__(model_runner, skip_prefill=skip_prefill, kv_indptr_buf=kv_indptr_buf)
            finally:
                if had:
                    pool.get_value_buffer = saved
                else:
                    del pool.get_value_buffer
            if self.use_mla or self.dcp_size > 1 or (self.sliding_window_size or 0) > 0:
                raise NotImplementedError(
                    "INT4 KV cache with the triton backend supports full-attention MHA/GQA "
                    "models without decode context parallelism (no MLA, no sliding window)."
                )
            if self.v_head_dim != fmt.head_dim:
                raise RuntimeError(f"v_head_dim {self.v_head_dim} != INT4 pool head_dim {fmt.head_dim}")
            mc = model_runner.model_config
            self.int4_fmt = fmt
            self.int4_num_kv_heads = mc.get_num_kv_heads(get_parallel().attn_tp_size)
            self.int4_head_dim = fmt.head_dim
            self.int4_graph = None
            self.int4_meta = None
            self._merge_state = merge_state_triton
            self._encoder_only = AttentionType.ENCODER_ONLY
            self._KVWriteLoc = KVWriteLoc
            logger.info("INT4 KV: triton backend uses SAW-INT4 kernels (%s)", fmt.describe())
            ia.warm_up_kernels(model_runner, pool, self.num_head, self.int4_num_kv_heads)

        # -- metadata ------------------------------------------------------------
        def init_forward_metadata(self, forward_batch):
            mode = forward_batch.forward_mode
            ia.refuse_mode(mode)
            if forward_batch.spec_info is not None:
                raise NotImplementedError("INT4 KV cache does not support speculative decoding")
            super().init_forward_metadata(forward_batch)
            md = self.forward_metadata
            if mode.is_decode_or_idle():
                lens_cpu = forward_batch.seq_lens_cpu
                kv = ia.KVIndex(md.kv_indptr, md.kv_indices, forward_batch.seq_lens.to(torch.int32), 1)
                max_len = int(lens_cpu.max()) if lens_cpu is not None and lens_cpu.numel() else None
                s, ws = ia.eager_decode_plan(self.token_to_kv_pool, kv.kv_lens.shape[0], self.num_head,
                                             self.int4_num_kv_heads, max_len, self.device)
                self.int4_meta = _Int4Meta(kv=kv, max_kv_len=max_len, num_splits=s, workspace=ws)
                return
            prefix_cpu = forward_batch.extend_prefix_lens_cpu
            has_prefix = (any(prefix_cpu) if prefix_cpu is not None
                          else bool(forward_batch.extend_prefix_lens.any()))
            prefix = None
            if has_prefix:
                prefix = ia.KVIndex(md.kv_indptr, md.kv_indices,
                                    forward_batch.extend_prefix_lens.to(torch.int32), 1)
            meta = _Int4Meta(qo_indptr=md.qo_indptr, prefix=prefix, max_q_len=md.max_extend_len)
            n_prefix = sum(prefix_cpu) if prefix_cpu is not None else None
            n_new = forward_batch.extend_num_tokens
            if n_prefix is not None and n_new is not None and n_prefix + n_new <= ia.DEQUANT_MAX_TOKENS:
                # prefix + chunk through the pool (see int4_attention.DEQUANT_MAX_TOKENS):
                # rows = prefix slots then chunk slots; the extend kernel reads the prefix
                # part by index and the chunk part as its "new" k/v
                meta.rows = torch.cat([md.kv_indices[:n_prefix].long(), forward_batch.out_cache_loc.long()])
                meta.prefix_rows = n_prefix
                meta.ws_indices = torch.arange(n_prefix, dtype=md.kv_indices.dtype, device=self.device)
            self.int4_meta = meta

        # -- CUDA graphs (decode only) ---------------------------------------------
        def init_cuda_graph_state(self, max_bs, max_num_tokens, kv_indices_buf=None,
                                  cuda_graph_num_kv_splits_buf=None):
            super().init_cuda_graph_state(max_bs, max_num_tokens, kv_indices_buf=kv_indices_buf,
                                          cuda_graph_num_kv_splits_buf=cuda_graph_num_kv_splits_buf)
            # Index buffers are the parent's (cuda_graph_kv_indices); only lens are ours.
            self.int4_graph = ia.DecodeGraphState(
                max_bs, 0, 1, self.num_head, self.int4_num_kv_heads,
                ia.pool_format(self.token_to_kv_pool), self.device
            )

        def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
            mode = forward_batch.forward_mode
            ia.refuse_mode(mode)
            if not mode.is_decode_or_idle() or forward_batch.spec_info is not None:
                raise NotImplementedError(
                    "INT4 KV cache captures decode CUDA graphs only; run with "
                    "--disable-piecewise-cuda-graph and without prefill CUDA graphs."
                )
            super().init_forward_metadata_out_graph(forward_batch, in_capture=in_capture)
            bs = forward_batch.batch_size
            g = self.int4_graph
            g.prepare(bs)
            g.kv_lens[:bs].copy_(forward_batch.seq_lens[:bs])
            kv = ia.KVIndex(self.kv_indptr[: bs + 1], self.cuda_graph_kv_indices, g.kv_lens[:bs], 1)
            self.int4_meta = _Int4Meta(kv=kv, workspace=g.workspaces[bs], num_splits=g.splits[bs])

        # -- forward ----------------------------------------------------------------
        def _write(self, layer, forward_batch, k, v):
            md = self.forward_metadata
            loc = self._KVWriteLoc(
                forward_batch.out_cache_loc, md.swa_out_cache_loc,
                full_loc=md.out_cache_loc_full_physical,
            )
            self.token_to_kv_pool.set_kv_buffer(layer, loc, k, v)

        def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True,
                           sinks=None, score_mod=None, aux_tensors=None):
            if sinks is not None or score_mod is not None:
                raise NotImplementedError("INT4 KV cache: attention sinks / score_mod are not supported")
            if save_kv_cache:
                self._write(layer, forward_batch, k, v)
            m = self.int4_meta
            return ia.decode_forward(
                q, self.token_to_kv_pool, layer, m.kv, workspace=m.workspace,
                num_splits=m.num_splits, max_kv_len=m.max_kv_len,
            )

        def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True,
                           sinks=None, score_mod=None, aux_tensors=None):
            ia.refuse_mode(forward_batch.forward_mode)
            if sinks is not None or score_mod is not None:
                raise NotImplementedError("INT4 KV cache: attention sinks / score_mod are not supported")
            if k is None or v is None:
                raise NotImplementedError("INT4 KV cache: extend without fresh k/v is not supported")
            encoder_only = layer.attn_type == self._encoder_only
            if save_kv_cache and not encoder_only:
                self._write(layer, forward_batch, k, v)
            m = self.int4_meta
            md = self.forward_metadata
            cap = float(layer.logit_cap or 0.0)
            has_prefix = m.prefix is not None
            if m.rows is not None and (encoder_only or not save_kv_cache) and has_prefix:
                raise NotImplementedError(
                    "INT4 KV cache: an extend over a cached prefix must write its chunk to the cache")
            if m.rows is not None and save_kv_cache and not encoder_only:
                p = m.prefix_rows

                def attend(q3, k_all, v_all):
                    o = torch.empty_like(q3)
                    self.extend_attention_fwd(
                        q3, k_all[p:], v_all[p:], o, k_all, v_all, md.qo_indptr, md.kv_indptr,
                        m.ws_indices, None, True, None, m.max_q_len, 1.0, 1.0, layer.scaling,
                        logit_cap=cap,
                    )
                    return o

                return ia.extend_through_pool(q, self.token_to_kv_pool, layer, m.rows, attend)

            def new_chunk(q3, k3, v3, need_lse):
                k3, v3 = k3.contiguous(), v3.contiguous()
                o = torch.empty_like(q3)
                lse = (torch.empty(q3.shape[:2], dtype=torch.float32, device=q3.device)
                       if need_lse else None)
                # The prefix stage is skipped, so the buffers only lend their strides.
                self.extend_attention_fwd(
                    q3, k3, v3, o, k3, v3, md.qo_indptr, md.kv_indptr, md.kv_indices,
                    None, not encoder_only, None, m.max_q_len, 1.0, 1.0, layer.scaling,
                    logit_cap=cap, lse_extend=lse, skip_prefix=True,
                )
                return (o, lse) if need_lse else o

            return ia.extend_forward(
                q, k, v, self.token_to_kv_pool, layer, m.qo_indptr, m.prefix, new_chunk,
                self._merge_state, lse_base2=False, max_q_len=m.max_q_len,
            )

    return Int4TritonAttnBackend


@functools.cache
def backend_class():
    """The INT4 subclass, built once on first use (its base imports SGLang's backend)."""
    return _build_class()


def create_int4_backend(runner):
    if getattr(runner, "use_mla_backend", False):
        raise NotImplementedError("INT4 KV cache does not support MLA models")
    if runner.model_config.is_encoder_decoder:
        raise NotImplementedError("INT4 KV cache does not support encoder-decoder models")
    return backend_class()(runner)


def register():
    """Route `--attention-backend triton` to the INT4 variant for int4 runs. Idempotent."""
    return ia.wrap_backend_factory(BACKEND, create_int4_backend)
