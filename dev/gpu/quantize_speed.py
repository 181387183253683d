"""Time the INT4 cache write: rotation on (K, K+V) vs off vs a BF16 slot store.

    python dev/gpu/quantize_speed.py [--sweep]

Prints microseconds per layer write (CUDA-graph timed), the achieved bandwidth and
the rotation overhead (target: K-rotation <= 1.05x the no-rotation kernel), then the
K-rotated write with least-squares scales, with a K calibration and with both, against
the min-max one (target <= 1.05x); "K dense"
is the same kernel with one dense B-deep rotation dot instead of the Kronecker
split (dot + butterflies), for comparison. --sweep, at the largest T and for each
of --head-dims, first times the rotation's dot depth (dot_k 16..128) at the default
launch, then tile sizes / warps / program counts / loop pipelining stages, and
prints the best launch per mode. Numbers are printed, not asserted. The sweep
takes about 3 minutes per head dim (compiles included).
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton.testing

from saw_sglang.kernels.format import Int4KVFormat
from saw_sglang.kernels.quantize import _launch_quantize, quantize_and_store


def _inputs(t, hq, hkv, d, rows):
    qkv = torch.randn(t, (hq + 2 * hkv) * d, device="cuda", dtype=torch.bfloat16)
    k = qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
    v = qkv[:, (hq + hkv) * d :].view(t, hkv, d)
    loc = torch.randperm(rows, device="cuda")[:t]
    return k, v, loc


def _time(fn):
    fn()
    return triton.testing.do_bench_cudagraph(fn, rep=200) * 1e3  # us


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,64,512,2048,8192")
    ap.add_argument("--head-dims", default="128,64,256")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    hq = 4 * args.kv_heads
    print(f"{'D':>4} {'T':>6} {'bf16 store':>11} {'int4 none':>10} {'int4 K':>8} {'int4 K+V':>9} "
          f"{'K dense':>8} {'K/none':>7} {'KV/none':>8} {'Kdense/none':>12} {'GB/s none':>10} {'GB/s K':>8}")
    extra = []
    for d in map(int, args.head_dims.split(",")):
        for t in map(int, args.tokens.split(",")):
            rows = max(4 * t, 4096)
            k, v, loc = _inputs(t, hq, args.kv_heads, d, rows)
            kb = torch.empty(rows, args.kv_heads, d, device="cuda", dtype=torch.bfloat16)
            vb = torch.empty_like(kb)

            def bf16_store():
                kb[loc] = k
                vb[loc] = v

            res = {"bf16": _time(bf16_store)}
            for name, fmt in (
                ("none", Int4KVFormat(head_dim=d, rotation="none")),
                ("k", Int4KVFormat(head_dim=d)),
                ("kv", Int4KVFormat(head_dim=d, rotate_v=True)),
            ):
                bufs = fmt.alloc(rows, args.kv_heads, "cuda") + fmt.alloc(rows, args.kv_heads, "cuda")
                res[name] = _time(lambda: quantize_and_store(k, v, loc, *bufs, fmt))
            fmt = Int4KVFormat(head_dim=d)
            bufs = fmt.alloc(rows, args.kv_heads, "cuda") + fmt.alloc(rows, args.kv_heads, "cuda")
            res["dense"] = _time(lambda: _launch_quantize(k, v, loc, *bufs, fmt, dot_k=fmt.block_size))
            # the calibrated write: K shifted (and scaled) before the rotation, with and
            # without the least-squares (scale, min) it defaults to
            affine = (torch.rand(args.kv_heads, d, device="cuda") + 0.5, torch.randn(args.kv_heads, d, device="cuda"))
            for name, fit in (("cal", "minmax"), ("cal_lsq", "lsq"), ("lsq", "lsq")):
                f = Int4KVFormat(head_dim=d, scale_fit=fit)
                b = f.alloc(rows, args.kv_heads, "cuda") + f.alloc(rows, args.kv_heads, "cuda")
                aff = None if name == "lsq" else affine
                res[name] = _time(lambda: quantize_and_store(k, v, loc, *b, f, k_affine=aff))
            extra.append(f"{d:>4} {t:>6} {res['k']:>8.2f} {res['lsq']:>8.2f} {res['cal']:>8.2f} "
                         f"{res['cal_lsq']:>8.2f} {res['lsq'] / res['k']:>7.3f} {res['cal'] / res['k']:>7.3f} "
                         f"{res['cal_lsq'] / res['k']:>9.3f}")
            moved = 2 * t * args.kv_heads * (2 * d + fmt.bytes_per_token_head)  # read + write
            print(f"{d:>4} {t:>6} {res['bf16']:>11.2f} {res['none']:>10.2f} {res['k']:>8.2f} "
                  f"{res['kv']:>9.2f} {res['dense']:>8.2f} {res['k'] / res['none']:>7.3f} "
                  f"{res['kv'] / res['none']:>8.3f} {res['dense'] / res['none']:>12.3f} "
                  f"{moved / res['none'] / 1e3:>10.0f} {moved / res['k'] / 1e3:>8.0f}")
    print(f"\nK rotated: min-max vs least squares (lsq), K calibration (cal), both (cal_lsq); "
          f"target <= 1.05x the min-max write\n{'D':>4} {'T':>6} {'K':>8} {'K lsq':>8} {'K cal':>8} "
          f"{'cal+lsq':>8} {'lsq/K':>7} {'cal/K':>7} {'calLsq/K':>9}")
    print("\n".join(extra))
    if args.sweep:
        _sweep(hq, args.kv_heads, int(args.tokens.split(",")[-1]), map(int, args.head_dims.split(",")))


def _time_launch(fmt, k, v, loc, rows, **knobs):
    bufs = fmt.alloc(rows, k.shape[1], "cuda") + fmt.alloc(rows, k.shape[1], "cuda")
    return _time(lambda: _launch_quantize(k, v, loc, *bufs, fmt, **knobs))


def _sweep(hq, hkv, t, head_dims):
    print(f"\nsweep at T={t}, Hkv={hkv} (us; programs 16384 = one tile per program)")
    for d in head_dims:
        rows = 4 * t
        k, v, loc = _inputs(t, hq, hkv, d, rows)
        modes = (("none", Int4KVFormat(head_dim=d, rotation="none")),
                 ("k", Int4KVFormat(head_dim=d)),
                 ("kv", Int4KVFormat(head_dim=d, rotate_v=True)))
        for dk in (16, 32, 64, 128):
            k_us, kv_us = (_time_launch(f, k, v, loc, rows, dot_k=dk) for _, f in modes[1:])
            print(f"  D={d} default launch, dot_k={dk:>3}: K {k_us:.2f}  K+V {kv_us:.2f}")
        best = {}
        for bt, nw, progs, stages in itertools.product((32, 64, 128, 256), (4, 8), (1056, 16384), (1, 2)):
            # 4K..16K elements per tile. (Rotated tiles with < 16 Hadamard blocks per
            # warp are correct but shuffle registers: expect them slow.)
            if not 4096 <= bt * d <= 16384:
                continue
            line = []
            for name, fmt in modes:
                us = _time_launch(fmt, k, v, loc, rows, block_t=bt, num_warps=nw, programs=progs,
                                  stages=stages)
                line.append(us)
                if us < best.get(name, (float("inf"),))[0]:
                    best[name] = (us, bt, nw, progs, stages)
            print(f"  D={d} bt={bt:>3} warps={nw} programs={progs:>5} stages={stages}: "
                  + " / ".join(f"{x:.2f}" for x in line) + "  (none / K / K+V)")
        print(f"  best D={d}: " + ", ".join(
            f"{n} {b[0]:.2f}us (bt={b[1]}, warps={b[2]}, programs={b[3]}, stages={b[4]})"
            for n, b in best.items()))


if __name__ == "__main__":
    main()
