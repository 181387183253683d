"""Kernel benchmark: INT4 decode attention vs FlashInfer BF16 / FP8 paged decode, and the
INT4 write vs a BF16 slot store, on one GPU in one process.

    python -m saw_sglang.bench.kernels [--out DIR] [--quick] [--tune]

Every time is the median over CUDA-graph replays (>= 50 launches in all, after warm-up);
small shapes cycle through several disjoint slot sets so L2 (60 MB) does not flatter them.
Slots are a random permutation of the pool (one contiguous row for reference).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

HQ, HKV, D = 32, 8, 128
INT4_BYTES = 68  # per token-head per K or V at D=128 (64 data + fp16 scale and min)
L2_BYTES = 60 << 20
BUDGET_BYTES = 20 << 30
BATCHES, CTXS, PAGES = (1, 16, 64, 256), (2048, 8192, 32768), (1, 16)
MODES = ("none", "k", "kv")


# ---------------------------------------------------------------- pure-Python parts
def pool_bytes_per_token(hkv=HKV, d=D):
    """BF16 + FP8 + INT4 K+V bytes per token (all three pools live at once)."""
    return hkv * (2 * 2 * d + 2 * d + 2 * (d // 2 + 4))


def shapes(quick=False, budget=BUDGET_BYTES):
    """(page, batch, ctx, slots) rows that fit the memory budget; plus one contiguous row."""
    batches, ctxs = ((16, 64), (8192,)) if quick else (BATCHES, CTXS)
    rows = [(p, b, c, "random") for p in PAGES for b in batches for c in ctxs
            if b * c * pool_bytes_per_token() <= budget]
    rows.append((1, 16, 8192, "contiguous"))
    return rows


def bytes_read(kind, batch, ctx, page=1, hq=HQ, hkv=HKV, d=D):
    """Bytes a decode step reads (K+V, scales, indices) plus q read and out written."""
    tokens = batch * ctx
    per = {"int4": 2 * (d // 2 + 4), "bf16": 2 * 2 * d, "fp8": 2 * d}[kind]
    idx = 4 * (tokens if page == 1 else -(-ctx // page) * batch)
    return tokens * hkv * per + idx + 2 * batch * hq * d * 2


def int4_floor_ms(batch, ctx, copy_gbs, hkv=HKV):
    return batch * ctx * hkv * 2 * INT4_BYTES / (copy_gbs * 1e9) * 1e3


def fmt_ms(x):
    return "-" if x is None else f"{x:.4f}"


def table(results):
    head = ("| page | batch | ctx | slots | INT4 ms (none / K / K+V) | BF16 ms | FP8 ms | "
            "INT4 floor ms | INT4-K GB/s | % copy | x BF16 (K) | x FP8 (K) |")
    lines = [head, "|" + "---:|" * 4 + "---|" + "---:|" * 7]
    for r in results:
        ours = " / ".join(fmt_ms(r["ours_ms"].get(m)) for m in MODES)
        k = r["ours_ms"].get("k")
        sp = lambda base: "-" if (k is None or base is None) else f"{base / k:.2f}x"  # noqa: E731
        gbs = "-" if k is None else str(round(r["gbs"]))
        pct = "-" if k is None else f"{r['pct_copy']:.0f}%"
        lines.append(
            f"| {r['page']} | {r['batch']} | {r['ctx']} | {r['slots']} | {ours} | {fmt_ms(r['bf16_ms'])} | "
            f"{fmt_ms(r['fp8_ms'])} | {fmt_ms(r['floor_ms'])} | "
            f"{gbs} | {pct} | "
            f"{sp(r['bf16_ms'])} | {sp(r['fp8_ms'])} |")
    return "\n".join(lines)


def n_rotations(working_set_bytes, cap=16):
    """Disjoint input sets to cycle through so that the set in use is not L2-resident."""
    return int(max(1, min(cap, math.ceil(3 * L2_BYTES / max(1, working_set_bytes)))))


# ---------------------------------------------------------------- GPU parts
def _progress(it, desc):
    try:
        from tqdm import tqdm
        return tqdm(it, desc=desc, file=sys.stderr)
    except ImportError:
        return it


def time_fns(fns, min_launches=50):
    """Median ms per call over CUDA-graph replays of `fns` (called in turn); falls back to
    event timing of a Python loop if capture fails."""
    import torch
    for f in fns:
        f()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    s.record()
    for f in fns:
        f()
    e.record()
    torch.cuda.synchronize()
    est = max(s.elapsed_time(e) / len(fns), 1e-3)
    inner = max(1, min(64, int(2.0 / est) // len(fns)))
    calls = inner * len(fns)
    replays = max(10, math.ceil(min_launches / calls))
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(inner):
                for f in fns:
                    f()
        run = g.replay
    except Exception as exc:  # noqa: BLE001
        print(f"  (graph capture failed: {type(exc).__name__}; timing a launch loop)", file=sys.stderr)
        torch.cuda.synchronize()

        def run():
            for _ in range(inner):
                for f in fns:
                    f()
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        s.record()
        run()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / calls)
    times.sort()
    return times[len(times) // 2]


def _sm_copy():
    """A plain Triton copy kernel: the ceiling is what the SMs can stream. `copy_` of a
    contiguous tensor is a memcpy, which inside a CUDA graph may run on a copy engine
    (run 6 read 2711 GB/s from it against 4284 GB/s in targets.md)."""
    import triton
    import triton.language as tl

    @triton.jit
    def copy_kernel(src, dst, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        tl.store(dst + offs, tl.load(src + offs, mask=m), mask=m)

    def run(a, b, block=8192):
        copy_kernel[(triton.cdiv(a.numel(), block),)](a, b, a.numel(), BLOCK=block, num_warps=8)
    return run


def copy_bandwidth_gbs(nbytes=2 << 30):
    """Bytes read + written per second by the faster of a Triton copy kernel and
    `copy_` (2 GiB each way, after a second of warm-up)."""
    import torch
    a = torch.empty(nbytes // 4, dtype=torch.int32, device="cuda")
    b = torch.empty_like(a)
    sm_copy = _sm_copy()
    t0 = time.time()
    while time.time() - t0 < 1.0:  # bring the clocks up from idle before timing
        sm_copy(a, b)
        torch.cuda.synchronize()
    best = min(time_fns([lambda: sm_copy(a, b)], min_launches=20),
               time_fns([lambda: b.copy_(a)], min_launches=20))
    return 2 * nbytes / (best * 1e-3) / 1e9


class Pools:
    """One pool per dtype, sized for the largest shape, filled with random bytes."""

    def __init__(self, tokens):
        import torch
        from saw_sglang.kernels.format import Int4KVFormat
        self.rows = (tokens // 16 + 2) * 16
        g = torch.Generator(device="cuda").manual_seed(0)
        self.fmt = {m: Int4KVFormat(D, rotation="none" if m == "none" else "hadamard", rotate_v=m == "kv")
                    for m in MODES}
        f = self.fmt["k"]
        self.kd = torch.randint(0, 256, f.data_shape(self.rows, HKV), dtype=torch.uint8, device="cuda", generator=g)
        self.vd = torch.randint(0, 256, f.data_shape(self.rows, HKV), dtype=torch.uint8, device="cuda", generator=g)
        sc = torch.rand(f.scale_shape(self.rows, HKV), device="cuda", generator=g) * 0.1
        sc[..., 1] -= 0.75
        self.ks, self.vs = sc.half(), (sc * 0.9).half()
        self.k16 = torch.randn(self.rows, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g)
        self.v16 = torch.randn(self.rows, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g)
        self.k8 = self.k16.to(torch.float8_e4m3fn)
        self.v8 = self.v16.to(torch.float8_e4m3fn)


def make_inputs(batch, ctx, page, slots, rows, gen):
    import torch
    n_pages = rows // page
    need = batch * (-(-ctx // page))
    if slots == "contiguous":
        ent = torch.arange(1, need + 1, device="cuda", dtype=torch.int32)
    else:
        ent = (torch.randperm(n_pages - 1, device="cuda", generator=gen)[:need] + 1).to(torch.int32)
    indptr = torch.arange(0, batch + 1, device="cuda", dtype=torch.int32) * (need // batch)
    lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    q = torch.randn(batch, HQ, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    return q, indptr, ent, lens


def flashinfer_fn(pools, kind, q, indptr, ent, ctx, page):
    import flashinfer
    import torch
    ws = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True)
    last = torch.full((q.shape[0],), (ctx - 1) % page + 1, dtype=torch.int32, device="cuda")
    dt = torch.bfloat16 if kind == "bf16" else torch.float8_e4m3fn
    w.plan(indptr, ent, last, HQ, HKV, D, page, data_type=dt, q_data_type=torch.bfloat16)
    k, v = (pools.k16, pools.v16) if kind == "bf16" else (pools.k8, pools.v8)
    k, v = k.view(-1, page, HKV, D), v.view(-1, page, HKV, D)
    out = torch.empty_like(q)
    return lambda: w.run(q, (k, v), out=out)


def ours_fn(pools, mode, q, indptr, ent, lens, ctx, page, **knobs):
    from saw_sglang.kernels.decode import alloc_workspace, choose_num_splits, decode_attention, num_sms
    from saw_sglang.kernels.decode import get_config
    cfg = {**get_config(D, D), **{k: v for k, v in knobs.items() if v is not None}}
    s = choose_num_splits(q.shape[0], HKV, num_sms("cuda"), cfg["waves"], ctx, cfg["block_n"])
    ws = alloc_workspace(q.shape[0], HQ, D, max(s, 1), "cuda")
    import torch
    out = torch.empty_like(q)
    kw = dict(fmt=pools.fmt[mode], sm_scale=D ** -0.5, page_size=page, out=out, workspace=ws,
              num_splits=s, block_n=cfg["block_n"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
              prefetch=cfg.get("prefetch"))
    return lambda: decode_attention(q, pools.kd, pools.ks, pools.vd, pools.vs, indptr, ent, lens, **kw)


def bench_decode(args, copy_gbs):
    import torch
    rows = shapes(args.quick)
    pools = Pools(max(b * c for _, b, c, _ in rows) + 16 * 256)
    gen = torch.Generator(device="cuda").manual_seed(1)
    try:
        import flashinfer  # noqa: F401
        have_fi = True
    except ImportError:
        have_fi = False
        print("note: flashinfer not importable; BF16/FP8 columns empty", file=sys.stderr)
    if have_fi:  # warm FlashInfer's JIT before any timing
        t0 = time.time()
        for kind in ("bf16", "fp8"):
            for page in PAGES:
                q, ip, ent, _ = make_inputs(2, 256, page, "random", pools.rows, gen)
                try:
                    flashinfer_fn(pools, kind, q, ip, ent, 256, page)()
                except Exception as exc:  # noqa: BLE001
                    print(f"note: flashinfer {kind} page {page} failed: {exc}", file=sys.stderr)
        torch.cuda.synchronize()
        print(f"flashinfer warm-up {time.time() - t0:.1f}s", file=sys.stderr)
    results = []
    for page, batch, ctx, slots in _progress(rows, "decode"):
        n_rot = n_rotations(bytes_read("int4", batch, ctx, page))
        sets = [make_inputs(batch, ctx, page, slots, pools.rows, gen) for _ in range(n_rot if slots == "random" else 1)]
        r = dict(page=page, batch=batch, ctx=ctx, slots=slots, rotations=len(sets), ours_ms={})
        for mode in MODES:
            r["ours_ms"][mode] = time_fns([ours_fn(pools, mode, q, ip, e, ln, ctx, page) for q, ip, e, ln in sets])
        for kind in ("bf16", "fp8"):
            ms = None
            if have_fi:
                try:
                    ms = time_fns([flashinfer_fn(pools, kind, q, ip, e, ctx, page) for q, ip, e, _ in sets])
                except Exception as exc:  # noqa: BLE001
                    print(f"note: flashinfer {kind} failed at {batch}x{ctx} page {page}: {exc}", file=sys.stderr)
            r[f"{kind}_ms"] = ms
        nbytes = bytes_read("int4", batch, ctx, page)
        k = r["ours_ms"]["k"]
        r.update(bytes=nbytes, floor_ms=int4_floor_ms(batch, ctx, copy_gbs),
                 gbs=nbytes / (k * 1e-3) / 1e9, bf16_gbs=None if r["bf16_ms"] is None else
                 bytes_read("bf16", batch, ctx, page) / (r["bf16_ms"] * 1e-3) / 1e9)
        r["pct_copy"] = 100 * r["gbs"] / copy_gbs
        results.append(r)
        del sets
    return results, pools


def bench_write(pools):
    import torch
    try:
        from saw_sglang.kernels.quantize import quantize_and_store
    except ImportError as exc:
        print(f"note: write benchmark skipped (saw_sglang.kernels.quantize not available: {exc})", file=sys.stderr)
        return None
    t = 8192
    gen = torch.Generator(device="cuda").manual_seed(2)
    k = torch.randn(t, HKV, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(t, HKV, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    loc = (torch.randperm(pools.rows - 1, device="cuda", generator=gen)[:t] + 1).to(torch.int64)
    res = {}
    for mode in MODES:
        f = pools.fmt[mode]
        res[mode] = time_fns([lambda f=f: quantize_and_store(k, v, loc, pools.kd, pools.ks, pools.vd, pools.vs, f)])
    res["bf16_store"] = time_fns([lambda: (pools.k16.index_copy_(0, loc, k), pools.v16.index_copy_(0, loc, v))])
    return res


TUNE_SHAPES = ((1, 16, 8192), (1, 64, 8192))


def tune(pools, budget_s=70.0):
    import itertools
    import torch
    gen = torch.Generator(device="cuda").manual_seed(3)
    grid = list(itertools.product((64, 128), (4,), (2, 3), (2, 4, 8), (False, True)))
    best = {}
    for page, batch, ctx in TUNE_SHAPES:
        t0 = time.time()
        sets = [make_inputs(batch, ctx, page, "random", pools.rows, gen)
                for _ in range(n_rotations(bytes_read("int4", batch, ctx, page)))]
        trials = []
        for bn, nw, ns, wv, pf in _progress(grid, f"tune p{page} {batch}x{ctx}"):
            if time.time() - t0 > budget_s / len(TUNE_SHAPES):
                print("note: tuning time budget reached; remaining configs skipped", file=sys.stderr)
                break
            try:
                ms = time_fns([ours_fn(pools, "k", q, ip, e, ln, ctx, page, block_n=bn, num_warps=nw,
                                       num_stages=ns, waves=wv, prefetch=pf) for q, ip, e, ln in sets])
            except Exception as exc:  # noqa: BLE001 (e.g. out of shared memory)
                print(f"  skip bn={bn} w={nw} s={ns}: {type(exc).__name__}", file=sys.stderr)
                continue
            trials.append(dict(block_n=bn, num_warps=nw, num_stages=ns, waves=wv, prefetch=pf, ms=ms))
        trials.sort(key=lambda x: x["ms"])
        best[f"page{page}_b{batch}_ctx{ctx}"] = trials[:5]
    return best


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in results if r["bf16_ms"]]
    if not rows:
        return
    labels = [f"p{r['page']} {r['batch']}x{r['ctx'] // 1024}k{'' if r['slots'] == 'random' else ' contig'}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.6), 4.5))
    w = 0.2
    for i, m in enumerate(MODES):
        ax.bar([j + (i - 1.5) * w for j in range(len(rows))], [r["bf16_ms"] / r["ours_ms"][m] for r in rows], w,
               label=f"INT4 rot {m}")
    ax.bar([j + 1.5 * w for j in range(len(rows))], [r["bf16_ms"] / r["fp8_ms"] if r["fp8_ms"] else 0 for r in rows],
           w, label="FlashInfer FP8")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(3.0, color="g", lw=0.8, ls="--", label="goal 3x")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("speed-up vs FlashInfer BF16")
    ax.set_title(f"decode attention, {HQ} q / {HKV} kv heads, D={D}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m saw_sglang.bench.kernels", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/bench-kernels", help="folder for JSON and PNG (default %(default)s)")
    ap.add_argument("--quick", action="store_true", help="a few shapes only")
    ap.add_argument("--tune", action="store_true", help="also sweep decode configs (about 4 more minutes)")
    ap.add_argument("--tune-only", action="store_true", help="only the decode config sweep")
    args = ap.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    os.makedirs(args.out, exist_ok=True)
    copy_gbs = copy_bandwidth_gbs()
    print(f"device {torch.cuda.get_device_name()}; copy bandwidth {copy_gbs:.0f} GB/s (read + write)", file=sys.stderr)
    if args.tune_only:
        results, write = [], None
        pools = Pools(max(b * c for _, b, c in TUNE_SHAPES) + 16 * 256)
    else:
        results, pools = bench_decode(args, copy_gbs)
        write = bench_write(pools)
    tuned = tune(pools) if (args.tune or args.tune_only) else None
    doc = dict(device=torch.cuda.get_device_name(), copy_gbs=copy_gbs, torch=torch.__version__,
               decode=results, write_ms=write, tune=tuned)
    with open(os.path.join(args.out, "kernels.json"), "w") as f:
        json.dump(doc, f, indent=1)
    plot(results, os.path.join(args.out, "decode_speedup.png"))
    if tuned:
        print("\n## tuning (best 5 per shape, rotation K)")
        for shape, trials in tuned.items():
            print(f"- {shape}: " + "; ".join(
                f"bn={t['block_n']} w={t['num_warps']} s={t['num_stages']} waves={t['waves']} "
                f"prefetch={t['prefetch']}: {t['ms']:.4f} ms"
                for t in trials))
    if write:
        base = write["none"]
        print("\n## write, 8192 tokens x 8 heads x 128 (ms)")
        print("| none | K | K+V | BF16 index_copy_ | K / none | K+V / none |\n|---:|---:|---:|---:|---:|---:|")
        print(f"| {base:.4f} | {write['k']:.4f} | {write['kv']:.4f} | {write['bf16_store']:.4f} | "
              f"{write['k'] / base:.2f}x | {write['kv'] / base:.2f}x |")
    print(f"\n## decode attention, {HQ} q / {HKV} kv heads, D={D} (copy {copy_gbs:.0f} GB/s)")
    print(table(results))
    print(f"\nJSON and PNG in {args.out}")


if __name__ == "__main__":
    main()
