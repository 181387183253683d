"""Probes behind the serving figures (docs/gpu-runs.md, runs 8 and 9), printed, not asserted:

1. The per-step decode metadata (`patches.int4_attention.build_kv_index` into the CUDA-graph
   buffers, what every graph replay runs first): does it synchronise with the device
   (torch's sync debug mode raises if it does), and how much host time does it take
   against SGLang's own one-kernel index builder that the stock FlashInfer path uses.
2. The chunked-prefill prefix read: `prefix_attention` of an 8192-token chunk over its
   8192-token INT4 prefix (the long scenario's second chunk) vs torch SDPA over a BF16
   copy of the same prefix.

3. With --prefix-sweep, the prefix kernel's launch configurations (rows, BLOCK_N, warps,
   stages) at that shape, each against the shipped default.

usage: python dev/gpu/probe_step.py [--bs 32 128] [--iters 200] [--prefix-sweep]
"""
import argparse
import time

import torch

from saw_sglang.kernels.format import Int4KVFormat
from saw_sglang.kernels.prefix import prefix_attention
from saw_sglang.kernels.testing import make_cache, make_queries
from saw_sglang.patches import int4_attention as ia


def host_us(fn, iters):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    host = (time.perf_counter() - t0) / iters * 1e6
    torch.cuda.synchronize()
    return host


def probe_metadata(bs, iters):
    dev = "cuda"
    max_len = 4096
    r2t = torch.randint(1, 1 << 20, (512, max_len), dtype=torch.int32, device=dev)
    rpi = torch.randperm(512, device=dev)[:bs].to(torch.int64)
    lens = torch.randint(300, 1300, (bs,), device=dev)
    total = int(lens.sum())
    ip = torch.zeros(bs + 1, dtype=torch.int32, device=dev)
    ind = torch.zeros(bs * max_len, dtype=torch.int32, device=dev)
    kl = torch.zeros(bs, dtype=torch.int32, device=dev)

    def ours():
        return ia.build_kv_index(r2t, rpi, lens, 1, total=total, indptr_out=ip, indices_out=ind, lens_out=kl)

    ours()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ours()
        sync = "no device sync"
    except RuntimeError as e:
        sync = f"SYNCS: {str(e).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    print(f"build_kv_index (bs {bs}, {total} slots): {sync}; host {host_us(ours, iters):.1f} us/call")
    try:
        from sglang.kernels.ops.attention.utils import create_flashinfer_kv_indices_triton as ckv
    except ImportError as e:
        print(f"SGLang's index kernel not importable: {e}")
        return

    def stock():
        ip[1:] = torch.cumsum(lens, 0)
        ckv[(bs,)](r2t, rpi, lens, ip, None, ind, r2t.shape[1])

    stock()
    print(f"SGLang create_flashinfer_kv_indices_triton + cumsum: host {host_us(stock, iters):.1f} us/call")
    ours()
    ref = ind[:total].clone()
    stock()
    print(f"  same indices: {bool(torch.equal(ref, ind[:total]))}")


SWEEP = [(128, 64, 8, 3), (128, 32, 8, 3), (128, 32, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2),
         (128, 64, 4, 2), (256, 32, 8, 2)]


def probe_prefix(sweep=False):
    from triton.testing import do_bench

    gen = torch.Generator().manual_seed(0)
    hq, hkv, d, n = 32, 8, 128, 8192
    fmt = Int4KVFormat(head_dim=d)
    cache, dk, dv = make_cache(fmt, hkv, [n], 1, gen, spare_pages=64, device="cuda")
    q, qo = make_queries([n], hq, d, gen, device="cuda")
    sm = d ** -0.5

    def run(**kw):
        return prefix_attention(q, qo, *cache, fmt, sm, page_size=1, max_q_len=n, **kw)

    ms = do_bench(run)
    kb = torch.stack(dk).to("cuda", torch.bfloat16).transpose(1, 2)
    vb = torch.stack(dv).to("cuda", torch.bfloat16).transpose(1, 2)
    qs = q.view(1, n, hq, d).transpose(1, 2)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    ms_ref = do_bench(lambda: sdpa(qs, kb, vb, scale=sm, enable_gqa=True))
    flops = 4 * n * n * hq * d
    print(f"prefix_attention {n} q over {n} INT4 prefix ({hq}/{hkv} heads, D {d}): {ms:.3f} ms "
          f"({flops / ms / 1e9:.0f} TFLOP/s); SDPA over a BF16 copy {ms_ref:.3f} ms "
          f"({flops / ms_ref / 1e9:.0f} TFLOP/s): {ms / ms_ref:.2f}x; x 36 layers: "
          f"{36 * ms:.1f} vs {36 * ms_ref:.1f} ms per chunk")
    if not sweep:
        return
    o_ref, _ = run()
    for rows, bn, warps, stages in SWEEP:
        kw = dict(block_rows=rows, block_n=bn, num_warps=warps, num_stages=stages)
        try:
            o, _ = run(**kw)
            err = (o.float() - o_ref.float()).abs().max().item()
            t = do_bench(lambda: run(**kw))
            print(f"  rows {rows} block_n {bn} warps {warps} stages {stages}: {t:.3f} ms "
                  f"({ms / t:.2f}x the default), max |o - default| {err:.2e}")
        except Exception as e:  # out of shared memory / registers: report, go on
            print(f"  rows {rows} block_n {bn} warps {warps} stages {stages}: failed: {str(e)[:120]}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bs", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--prefix-sweep", action="store_true")
    a = ap.parse_args()
    print(torch.cuda.get_device_name())
    for bs in a.bs:
        probe_metadata(bs, a.iters)
    probe_prefix(a.prefix_sweep)
