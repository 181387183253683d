"""Decode launch-policy probe on the GPU host: for each shape, the tensor-core decode timed
at several split counts, with and without programmatic dependent launch (PDL), beside
FlashInfer BF16 in the same process (CUDA-graph medians over L2-cold input sets, as
bench.kernels times them); then where a step's time goes (prep / split / merge kernels
from the profiler, and the graph's time around them).

usage: python dev/gpu/decode_probe.py [--shapes HQ/HKV/D:B:CTX:PAGE,...] [--out CSV]
"""
import argparse
import csv
import math
import sys

import torch

from saw_sglang.bench.kernels import (Pools, bytes_read, flashinfer_decode_fn, make_inputs, n_rotations,
                                      time_fns)
from saw_sglang.kernels import decode as dec

SHAPES = ("32/8/128:1:32768:1,32/8/128:1:32768:16,32/8/128:4:32768:1,32/8/128:16:8192:1,"
          "32/8/128:16:8192:16,32/8/128:64:8192:1,32/8/128:256:2048:1,32/8/128:1:131072:1,"
          "64/8/128:32:8192:1,32/32/128:32:8192:1,9/3/64:64:8192:1,9/3/64:1:32768:1,"
          "16/8/256:32:8192:1,16/8/256:1:32768:1")


def candidates(batch, hq, hkv, fmt, ctx):
    cfg = dec.MMA_CONFIGS[fmt.head_dim]
    hg = dec.head_group(hkv, cfg["heads"])
    programs = batch * -(-hkv // hg)
    sms = dec.num_sms("cuda")
    policy = dec.plan_splits(batch, hkv, fmt, "cuda", ctx, hq)
    most = max(1, ctx // (cfg["block_n"] * 2))
    c = {policy, 1}
    for per_sm in (1, 2, 3, 4, 6, 8, 12):
        c.add(max(1, per_sm * sms // programs))
    return policy, sorted(s for s in c if s <= min(most, dec.MAX_SPLITS))


def setup(spec, gen):
    """HQ/HKV/D:B:CTX:PAGE -> the numbers, random pools and L2-cold input sets."""
    heads, b, ctx, page = spec.split(":")
    hq, hkv, d = map(int, heads.split("/"))
    b, ctx, page = int(b), int(ctx), int(page)
    pools = Pools(b * ctx + 16 * 256, hkv, d, gen)
    sets = [make_inputs(b, ctx, page, pools.rows, hq, d, gen)
            for _ in range(n_rotations(bytes_read("int4", b, ctx, hq, hkv, d, page)))]
    return hq, hkv, d, b, ctx, page, pools, sets


def breakdown(fn, n=20):
    """Mean device time per call of each kernel (eager launches, profiler)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    out = {}
    for ev in prof.key_averages():
        if ev.device_type.name == "CUDA" and ev.count >= n:
            out[ev.key.split("(")[0][:40]] = ev.device_time_total / ev.count / 1e3
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=SHAPES)
    ap.add_argument("--out", default=None, help="CSV of every timing")
    ap.add_argument("--min-blocks", type=lambda x: [int(v) for v in x.split(",")], default=None,
                    help="also time these in-kernel least split lengths (blocks) at the graph-mode split count")
    ap.add_argument("--min-blocks-shapes", default="32/8/128:1:2048:1,32/8/128:1:8192:1,32/8/128:1:32768:1,"
                    "32/8/128:16:2048:1,32/8/128:16:8192:1,32/8/128:4:32768:1,32/8/128:64:2048:1")
    a = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    print("| shape | BF16 ms | policy splits | best splits | ours ms (policy, no PDL) | policy + PDL | best + PDL "
          "| vs BF16: policy / +PDL / best |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for spec in a.shapes.split(","):
        hq, hkv, d, b, ctx, page, pools, sets = setup(spec, gen)
        fmt = pools.fmt
        try:
            bf = time_fns([flashinfer_decode_fn(pools, "bf16", q, ip, e, ctx, page, hkv) for q, ip, e, _ in sets])
        except Exception as exc:  # noqa: BLE001
            print(f"flashinfer failed at {spec}: {exc}", file=sys.stderr)
            bf = float("nan")
        ws = dec.alloc_workspace(b, hq, d, dec.MAX_SPLITS, "cuda")
        outs = [torch.empty_like(q) for q, *_ in sets]

        def fn(splits, pdl, **kw):
            def one(i):
                q, ip, e, ln = sets[i]
                return lambda: dec.decode_attention(q, pools.kd, pools.ks, pools.vd, pools.vs, ip, e, ln, fmt,
                                                    d ** -0.5, page, out=outs[i], workspace=ws,
                                                    num_splits=splits, pdl=pdl, **kw)
            return [one(i) for i in range(len(sets))]

        policy, cands = candidates(b, hq, hkv, fmt, ctx)
        res = {}
        for pdl in (False, True):
            for s in cands:
                try:
                    ms = time_fns(fn(s, pdl))
                except Exception as exc:  # noqa: BLE001
                    print(f"{spec} splits {s} pdl {pdl}: {type(exc).__name__}: {str(exc)[:300]}", file=sys.stderr)
                    continue
                res[(s, pdl)] = ms
                rows.append(dict(shape=spec, splits=s, pdl=int(pdl), ms=ms, bf16_ms=bf, policy=policy,
                                 gbs=bytes_read("int4", b, ctx, hq, hkv, d, page) / (ms * 1e6)))
        if hkv % dec.MMA_CONFIGS[d]["heads"]:  # odd head counts: one-warp programs vs padded ones
            s1 = dec.plan_splits(b, hkv, fmt, "cuda", ctx, hq, pad=False)
            try:
                print(f"   unpadded one-warp programs at {s1} splits (PDL): "
                      f"{bf / time_fns(fn(s1, True, pad=False)):.2f}x", flush=True)
            except Exception as exc:  # noqa: BLE001
                print(f"   unpadded failed: {type(exc).__name__}: {str(exc)[:300]}", file=sys.stderr)
        # PDL must not change a single output bit (eager vs graph replay, PDL on vs off)
        q, ip, e, ln = sets[0]
        ref = fn(policy, False)[0]
        ref()
        want = outs[0].clone()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn(policy, True)[0]()
        outs[0].zero_()
        g.replay()
        torch.cuda.synchronize()
        same = torch.equal(outs[0], want)
        best = min((k for k in res if k[1]), key=res.get, default=None)
        pol0, pol1 = res.get((policy, False)), res.get((policy, True))
        bms = res.get(best) if best else None
        r = lambda x: f"{bf / x:.2f}x" if x else "-"  # noqa: E731
        print(f"| {spec} | {bf:.4f} | {policy} | {best[0] if best else '-'} | {pol0 or float('nan'):.4f} | "
              f"{pol1 or float('nan'):.4f} | {bms or float('nan'):.4f} | {r(pol0)} / {r(pol1)} / {r(bms)} |"
              f"{'' if same else ' PDL OUTPUT DIFFERS'}", flush=True)
        print("   splits: " + "  ".join(f"{s}{'p' if p else ''}={bf / ms:.2f}x" for (s, p), ms in sorted(res.items())),
              flush=True)
        if spec in a.shapes.split(",")[:1] or b <= 16:
            for pdl in (False, True):
                parts = breakdown(fn(policy, pdl)[0])
                print(f"   kernels (eager, pdl={int(pdl)}): " + ", ".join(f"{k} {v * 1e3:.1f} us" for k, v in parts.items())
                      + f"; sum {sum(parts.values()) * 1e3:.1f} us vs graph {res.get((policy, pdl), math.nan) * 1e3:.1f} us",
                      flush=True)
        del pools, sets, ws, outs
        torch.cuda.empty_cache()
    if a.min_blocks:
        print("\n| shape (graph mode: no max length) | splits | " + " | ".join(f"min_blocks {m}" for m in a.min_blocks)
              + " |\n|---|---:|" + "---:|" * len(a.min_blocks))
        for spec in a.min_blocks_shapes.split(","):
            hq, hkv, d, b, ctx, page, pools, sets = setup(spec, gen)
            fmt = pools.fmt
            bf = time_fns([flashinfer_decode_fn(pools, "bf16", q, ip, e, ctx, page, hkv) for q, ip, e, _ in sets])
            s = dec.plan_splits(b, hkv, fmt, "cuda", None, hq)
            ws = dec.alloc_workspace(b, hq, d, dec.MAX_SPLITS, "cuda")
            out = torch.empty_like(sets[0][0])
            cells = []
            for m in a.min_blocks:
                fns = [(lambda q=q, ip=ip, e=e, ln=ln, m=m: dec.decode_attention(
                    q, pools.kd, pools.ks, pools.vd, pools.vs, ip, e, ln, fmt, d ** -0.5, page, out=out,
                    workspace=ws, num_splits=s, min_blocks=m, pdl=False)) for q, ip, e, ln in sets]
                cells.append(f"{bf / time_fns(fns):.2f}x")
            print(f"| {spec} | {s} | " + " | ".join(cells) + " |", flush=True)
            del pools, sets, ws
            torch.cuda.empty_cache()
    if a.out and rows:
        with open(a.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
