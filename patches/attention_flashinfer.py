"""INT4 variant of SGLang 0.5.17's `flashinfer` attention backend.

Decode: write the new token (pool.set_kv_buffer -> our quantize_and_store), then our
INT4 split-KV decode kernel over kv_indptr / kv_indices / kv_lens built from
req_to_token (token slots at page_size 1, page ids at page_size > 1). FlashInfer's paged
decode wrapper is never planned on the INT4 pool and the pool is never dequantised.

Extend: write the new chunk, then (up to int4_attention.DEQUANT_MAX_TOKENS tokens of
prefix + chunk in the batch) dequantise every request's prefix and chunk from the pool
into a BF16 workspace (in their stored basis, the query rotated to match) and attend
them in one causal pass of FlashInfer's ragged prefill wrapper, so a prompt sees the
same quantised values on a radix-cache miss as on a hit. Larger batches
attend the chunk causally on its fresh BF16 k/v (ragged wrapper, with lse), the cached
INT4 prefix with our prefix kernel, and merge with FlashInfer's merge_state (base-2 lse:
ours is converted).

CUDA graphs (decode): preallocated indptr / indices / lens buffers refreshed outside
the graph, a split count fixed per captured batch size and one shared split workspace.
Speculative decoding, prefill CUDA graphs, sliding-window and cross-attention layers
are refused with a clear error.
"""

from __future__ import annotations

import functools
import logging

from . import int4_attention as ia

logger = logging.getLogger(__name__)

BACKEND = "flashinfer"


def _build_class():
    from sglang.srt.layers.attention import flashinfer_backend as fb_mod
    from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend
    from sglang.srt.layers.radix_attention import AttentionType
    from sglang.srt.runtime_context import get_parallel

    class Int4FlashInferAttnBackend(FlashInferAttnBackend):
        """FlashInfer backend whose KV-cache reads go to the SAW-INT4 kernels."""

        def __init__(self, model_runner, skip_prefill: bool = False, init_new_workspace: bool = False, **kw):
            fmt = ia.pool_format(model_runner.token_to_kv_pool)
            super().__init__(model_runner, skip_prefill=skip_prefill,
                             init_new_workspace=init_new_workspace, **kw)
            if self.num_wrappers != 1 or self.use_sliding_window_kv_pool:
                raise NotImplementedError(
                    "INT4 KV cache with the flashinfer backend supports full-attention "
                    "decoder models only (no sliding window, no cross-attention)."
                )
            mc = model_runner.model_config
            tp = get_parallel().attn_tp_size
            self.int4_fmt = fmt
            self.int4_page_size = int(model_runner.page_size or 1)
            self.int4_num_q_heads = mc.get_max_num_attention_heads() // tp
            self.int4_num_kv_heads = mc.get_num_kv_heads(tp)
            self.int4_head_dim = mc.head_dim
            self.int4_q_dtype = model_runner.dtype
            self.int4_device = model_runner.device
            self.int4_graph = None
            self.forward_metadata = None
            self.int4_pool_read = ia.pool_read_workspace(self.int4_num_kv_heads, mc.head_dim,
                                                         model_runner.dtype, model_runner.device)
            logger.info("INT4 KV: flashinfer backend uses SAW-INT4 kernels (%s)", fmt.describe())
            ia.warm_up_kernels(model_runner, model_runner.token_to_kv_pool, self.int4_num_q_heads,
                               self.int4_num_kv_heads)

        # -- metadata ------------------------------------------------------------
        def init_forward_metadata(self, forward_batch):
            ia.check_batch(forward_batch)
            P = self.int4_page_size
            if forward_batch.forward_mode.is_decode_or_idle():
                lens_cpu = forward_batch.seq_lens_cpu
                kv = ia.build_kv_index(
                    self.req_to_token_pool.req_to_token, forward_batch.req_pool_indices,
                    forward_batch.seq_lens, P, total=ia.host_total(lens_cpu, P, forward_batch.seq_lens_sum),
                )
                self.forward_metadata = ia.eager_decode_meta(
                    self.token_to_kv_pool, kv, lens_cpu, self.int4_num_q_heads, self.int4_num_kv_heads,
                    self.int4_device)
                return
            self.forward_metadata = self._extend_metadata(forward_batch)

        def _extend_metadata(self, fb):
            P = self.int4_page_size
            prefix_cpu = fb.extend_prefix_lens_cpu
            has_prefix = ia.has_prefix(fb)
            qo_indptr = ia.qo_indptr_from(fb.extend_seq_lens)
            prefix = rows = None
            kv_indptr = qo_indptr
            total = fb.seq_lens_sum
            if ia.through_pool_fits(self.int4_pool_read, total):
                # prefix + chunk through the pool (a prompt attends the same quantised values
                # on a radix miss as on a hit): their token slots (req_to_token holds token
                # slots at any page size) and one causal pass over them
                seq = ia.build_kv_index(self.req_to_token_pool.req_to_token, fb.req_pool_indices,
                                        fb.seq_lens, 1, total=int(total))
                rows, kv_indptr = seq.kv_indices, seq.kv_indptr
            elif has_prefix:
                prefix = ia.build_kv_index(
                    self.req_to_token_pool.req_to_token, fb.req_pool_indices,
                    fb.extend_prefix_lens, P, total=ia.host_total(prefix_cpu, P),
                )
            self.prefill_wrapper_ragged.begin_forward(
                qo_indptr, kv_indptr, self.int4_num_q_heads, self.int4_num_kv_heads,
                self.int4_head_dim, q_data_type=self.int4_q_dtype,
            )
            seq_cpu = fb.extend_seq_lens_cpu
            max_q = max(seq_cpu) if seq_cpu else None
            return ia.Int4Meta(qo_indptr=qo_indptr, prefix=prefix, max_q_len=max_q, rows=rows,
                               has_prefix=has_prefix)

        # -- CUDA graphs (decode only) ---------------------------------------------
        def init_cuda_graph_state(self, max_bs, max_num_tokens, kv_indices_buf=None):
            self.int4_graph = ia.DecodeGraphState(
                max_bs, self.max_context_len, self.int4_page_size, self.int4_num_q_heads,
                self.int4_num_kv_heads, ia.pool_format(self.token_to_kv_pool), self.int4_device,
            )

        def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
            ia.check_graph_batch(forward_batch)
            bs = forward_batch.batch_size
            g = self.int4_graph
            g.prepare(bs)
            lens_cpu = forward_batch.seq_lens_cpu
            g.fill(
                self.req_to_token_pool.req_to_token, forward_batch.req_pool_indices,
                forward_batch.seq_lens, bs,
                total=ia.host_total(None if lens_cpu is None else lens_cpu[:bs],
                                    g.page_size, forward_batch.seq_lens_sum),
            )
            self.forward_metadata = g.meta(bs, g.view(bs))

        def init_forward_metadata_in_graph(self, forward_batch):
            """Nothing to record: the index buffers and lens are refreshed in place out of
            the graph (init_forward_metadata_out_graph), which is all a replay reads."""

        def get_cuda_graph_seq_len_fill_value(self):
            return 1

        # -- forward ----------------------------------------------------------------
        def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
            if k is not None and save_kv_cache:
                self.token_to_kv_pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v)
            return ia.decode_forward(q, self.token_to_kv_pool, layer, self.forward_metadata)

        def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
            ia.refuse_mode(forward_batch.forward_mode)
            if k is None or v is None:
                raise NotImplementedError("INT4 KV cache: extend without fresh k/v is not supported")
            encoder_only = layer.attn_type == AttentionType.ENCODER_ONLY
            if save_kv_cache and not encoder_only:
                self.token_to_kv_pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v)
            m = self.forward_metadata
            ragged = self.prefill_wrapper_ragged
            cap = float(layer.logit_cap or 0.0)

            if ia.attends_through_pool(m, save_kv_cache, encoder_only):
                return ia.extend_through_pool(
                    q, self.token_to_kv_pool, layer, m.rows,
                    lambda q3, k3, v3: ragged.forward(q3.contiguous(), k3, v3, causal=True,
                                                      sm_scale=layer.scaling, logits_soft_cap=cap),
                    self.int4_pool_read)

            def new_chunk(q3, k3, v3, need_lse):
                call = ragged.forward_return_lse if need_lse else ragged.forward
                return call(q3.contiguous(), k3.contiguous(), v3.contiguous(), causal=not encoder_only,
                            sm_scale=layer.scaling, logits_soft_cap=cap)

            return ia.extend_forward(
                q, k, v, self.token_to_kv_pool, layer, m.qo_indptr, m.prefix, new_chunk,
                _merge(fb_mod), lse_base2=True, max_q_len=m.max_q_len,
            )

    return Int4FlashInferAttnBackend


def _merge(fb_mod):
    # FlashInfer's merge_state (base-2 lse); SGLang guards its head-count limit.
    merge = getattr(fb_mod, "_safe_merge_state", None)
    if merge is None:
        raise RuntimeError("flashinfer is not importable: the INT4 flashinfer backend needs it")
    return merge


@functools.cache
def backend_class():
    """The INT4 subclass, built once on first use (its base imports SGLang's backend)."""
    return _build_class()


def create_int4_backend(runner):
    if getattr(runner, "use_mla_backend", False):
        raise NotImplementedError("INT4 KV cache does not support MLA models")
    return backend_class()(runner, init_new_workspace=getattr(runner, "init_new_workspace", False))


def register():
    """Route `--attention-backend flashinfer` to the INT4 variant for int4 runs. Idempotent."""
    return ia.wrap_backend_factory(BACKEND, create_int4_backend)
