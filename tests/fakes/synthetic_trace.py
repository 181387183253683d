"""Synthetic torch-profiler Chrome traces: kernels of known names and durations per step.

Used by the trace-summary tests and by fake_sglang_server.py's /start_profile.
"""

import gzip
import json

# One decode step of a 2-layer model: (kernel name, duration us, category it must land in).
STEP_KERNELS = [
    ("_decode_split_kernel", 40.0, "attn_decode"),
    ("_decode_reduce_kernel", 5.0, "attn_decode"),
    ("void flashinfer::BatchDecodeWithPagedKVCacheKernel<128u, 4u>(Params)", 20.0, "attn_decode"),
    ("void flashinfer::BatchPrefillWithPagedKVCacheKernel<KernelTraits>(Params)", 10.0, "attn_decode"),
    ("_fwd_grouped_kernel_stage1", 3.0, "attn_decode"),
    ("_prefix_attn_kernel", 7.0, "attn_prefill"),
    ("void flashinfer::MergeStateKernel<8u>(half*, float*)", 2.0, "attn_prefill"),
    ("_quantize_kv_kernel", 6.0, "kv_write"),
    ("void (anonymous namespace)::store_kvcache<2048ll, true>(StoreKVCacheParams)", 1.5, "kv_write"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", 50.0, "gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", 30.0, "gemm"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16>(Params)", 4.0, "gemm"),
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevComm*)", 8.0, "comm"),
    ("cross_device_reduce_1stage<__nv_bfloat16, 2>", 2.5, "comm"),
    ("void flashinfer::norm::FusedAddRMSNormKernel<8u, __nv_bfloat16>(...)", 4.0, "other"),
    ("void at::native::elementwise_kernel<128, 2>(int, rope_fn)", 1.0, "other"),
    ("Memcpy DtoD (Device -> Device)", 0.5, "other"),
]


def step_events(step: int, t0: float, kernels=STEP_KERNELS, graph_launch=True):
    """Chrome-trace events of one step starting at t0 (us), kernels back to back."""
    evs = []
    if graph_launch:
        evs.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch",
                    "ts": t0, "dur": 3.0, "pid": 100, "tid": 100, "args": {"correlation": step}})
    t = t0 + 5.0
    for name, dur, _ in kernels:
        cat = "gpu_memcpy" if name.startswith("Memcpy") else "kernel"
        evs.append({"ph": "X", "cat": cat, "name": name, "ts": t, "dur": dur, "pid": 0, "tid": 7,
                    "args": {"device": 0, "stream": 7, "correlation": step}})
        t += dur
    # Events that must not count: a CPU op, a flow event, a GPU annotation.
    evs.append({"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": t0, "dur": 999.0, "pid": 1, "tid": 1})
    evs.append({"ph": "f", "cat": "ac2g", "name": "ac2g", "ts": t0, "id": step, "pid": 0, "tid": 7})
    evs.append({"ph": "X", "cat": "gpu_user_annotation", "name": "decode", "ts": t0, "dur": 999.0,
                "pid": 0, "tid": 8})
    return evs, t


def step_us(kernels=STEP_KERNELS):
    return sum(d for _, d, _ in kernels)


def write_trace(path, steps, kernels=STEP_KERNELS, gap_us=10.0, graph_launch=True, as_list=False):
    """Write `steps` steps to path (gzipped if it ends in .gz); return the event list."""
    events, t = [], 1000.0
    for s in range(steps):
        evs, t = step_events(s, t, kernels, graph_launch)
        events += evs
        t += gap_us
    data = events if as_list else {"schemaVersion": 1, "traceEvents": events}
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wt") as f:
        json.dump(data, f)
    return events
