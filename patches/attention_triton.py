"""INT4 variant of SGLang 0.5.17's `triton` attention backend.

Metadata is the triton backend's own (kv_indptr / kv_indices hold token slots, also
inside its CUDA-graph buffers); we add kv_lens and, for graphs, a split count fixed per
captured batch size and a shared split workspace.

Decode: write the new token (pool.set_kv_buffer -> our quantize_and_store), then our
INT4 decode kernel. Extend: write the new chunk; then (up to
int4_attention.DEQUANT_MAX_TOKENS tokens of prefix + chunk) dequantise the prefixes and
the chunk from the pool into a BF16 workspace (in their stored basis, the query rotated
to match) and run SGLang's own Triton extend kernel over them
(prefix rows by index, the chunk as its new k/v), so a prompt sees the same quantised
values on a radix-cache miss as on a hit. Larger batches attend the chunk causally on its
fresh BF16 k/v (the extend kernel with `skip_prefix=True` and `lse_extend`), the cached
INT4 prefix with our prefix kernel, and merge with SGLang's Triton merge_state.

`TritonAttnBackend.__init__` reads `get_value_buffer(0).shape[-1]` as v_head_dim; on the
packed pool that is the byte width (head_dim / 2), so our constructor sets the logical
head_dim right after it (the buffers sized from v_head_dim are allocated later).
"""

from __future__ import annotations

import functools
import logging

import torch

from . import int4_attention as ia

logger = logging.getLogger(__name__)

BACKEND = "triton"


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
            super().__init__(model_runner, skip_prefill=skip_prefill, kv_indptr_buf=kv_indptr_buf)
            self.v_head_dim = fmt.head_dim  # the parent read the packed byte width
            if self.use_mla or self.dcp_size > 1 or (self.sliding_window_size or 0) > 0:
                raise NotImplementedError(
                    "INT4 KV cache with the triton backend supports full-attention MHA/GQA "
                    "models without decode context parallelism (no MLA, no sliding window)."
                )
            mc = model_runner.model_config
            self.int4_fmt = fmt
            self.int4_num_kv_heads = mc.get_num_kv_heads(get_parallel().attn_tp_size)
            self.int4_head_dim = fmt.head_dim
            self.int4_graph = None
            self.int4_meta = None
            self.int4_pool_read = ia.pool_read_workspace(self.int4_num_kv_heads, fmt.head_dim,
                                                         model_runner.dtype, self.device)
            self._merge_state = merge_state_triton
            self._encoder_only = AttentionType.ENCODER_ONLY
            self._KVWriteLoc = KVWriteLoc
            logger.info("INT4 KV: triton backend uses SAW-INT4 kernels (%s)", fmt.describe())
            ia.warm_up_kernels(model_runner, pool, self.num_head, self.int4_num_kv_heads)

        # -- metadata ------------------------------------------------------------
        def init_forward_metadata(self, forward_batch):
            ia.check_batch(forward_batch)
            super().init_forward_metadata(forward_batch)
            md = self.forward_metadata
            if forward_batch.forward_mode.is_decode_or_idle():
                kv = ia.KVIndex(md.kv_indptr, md.kv_indices, forward_batch.seq_lens.to(torch.int32), 1)
                self.int4_meta = ia.eager_decode_meta(self.token_to_kv_pool, kv, forward_batch.seq_lens_cpu,
                                                      self.num_head, self.int4_num_kv_heads, self.device)
                return
            prefix_cpu = forward_batch.extend_prefix_lens_cpu
            has_prefix = ia.has_prefix(forward_batch)
            prefix = None
            if has_prefix:
                prefix = ia.KVIndex(md.kv_indptr, md.kv_indices,
                                    forward_batch.extend_prefix_lens.to(torch.int32), 1)
            meta = ia.Int4Meta(qo_indptr=md.qo_indptr, prefix=prefix, max_q_len=md.max_extend_len,
                               has_prefix=has_prefix)
            n_prefix = sum(prefix_cpu) if prefix_cpu is not None else None
            n_new = forward_batch.extend_num_tokens
            if n_prefix is not None and n_new is not None and ia.through_pool_fits(
                    self.int4_pool_read, n_prefix + n_new):
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
            ia.check_graph_batch(forward_batch)
            super().init_forward_metadata_out_graph(forward_batch, in_capture=in_capture)
            bs = forward_batch.batch_size
            g = self.int4_graph
            g.prepare(bs)
            g.kv_lens[:bs].copy_(forward_batch.seq_lens[:bs])
            kv = ia.KVIndex(self.kv_indptr[: bs + 1], self.cuda_graph_kv_indices, g.kv_lens[:bs], 1)
            self.int4_meta = g.meta(bs, kv)

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
            return ia.decode_forward(q, self.token_to_kv_pool, layer, self.int4_meta)

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
            if ia.attends_through_pool(m, save_kv_cache, encoder_only):
                p = m.prefix_rows

                def attend(q3, k_all, v_all):
                    o = torch.empty_like(q3)
                    self.extend_attention_fwd(
                        q3, k_all[p:], v_all[p:], o, k_all, v_all, md.qo_indptr, md.kv_indptr,
                        m.ws_indices, None, True, None, m.max_q_len, 1.0, 1.0, layer.scaling,
                        logit_cap=cap,
                    )
                    return o

                return ia.extend_through_pool(q, self.token_to_kv_pool, layer, m.rows, attend,
                                              self.int4_pool_read)

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
