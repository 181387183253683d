"""Kernel benchmark on one GPU, in one process, against FlashInfer:

* decode: SAW-INT4 decode attention (K rotated) vs FlashInfer BF16 and FP8 paged decode
  (`use_tensor_cores=True`, as SGLang runs it) over the matrix batch {1, 4, 16, 64, 256}
  x context {2k, 8k, 32k, 128k (batch <= 4)} x heads {32/8/128, 64/8/128, 32/32/128,
  9/3/64, 16/8/256} x page {1, 16}, random scattered slots;
* extend: a chunk over a cached prefix through the INT4 pool (dequantise prefix and
  chunk, then FlashInfer's ragged prefill) vs FlashInfer's ragged prefill on BF16 K/V;
* write: the fused rotate + quantize + pack write (none / K / K+V) vs a BF16 slot store.

    python -m saw_sglang.bench.kernels [--out DIR] [--quick] [--heads 32/8/128,...] [--pages 1,16]

Every time is the median over CUDA-graph replays (>= 50 launches in all, after warm-up);
small shapes cycle through several disjoint input sets so L2 (60 MB) does not flatter
them. GB/s counts the bytes a step must read (K+V, scales, indices, q) and write. Writes
kernels.json, decode.csv, extend.csv and decode_speedup.png into --out; the markdown
tables are printed last.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time

L2_BYTES = 60 << 20
BUDGET_BYTES = 24 << 30  # BF16 + FP8 + INT4 pools of the largest shape live at once
BATCHES, CTXS, LONG_CTX = (1, 4, 16, 64, 256), (2048, 8192, 32768), 131072
HEADS = ((32, 8, 128), (64, 8, 128), (32, 32, 128), (9, 3, 64), (16, 8, 256))
PAGES = (1, 16)
QUICK = [(1, 32768), (4, 32768), (16, 8192), (64, 8192), (256, 2048)]
# (prefix tokens, new tokens, requests): chunked prefill, long prefixes, radix hits
EXTEND_SHAPES = ((8192, 8192, 1), (16384, 2048, 1), (0, 256, 32), (1024, 32, 8), (4096, 32, 8),
                 (16384, 32, 4), (16384, 8, 4), (16384, 1, 8))
MODES = ("none", "k", "kv")


# ---------------------------------------------------------------- pure-Python parts
def per_token_head(kind, d):
    """K+V bytes of one token and KV head."""
    return {"int4": 2 * (d // 2 + 4), "bf16": 2 * 2 * d, "fp8": 2 * d}[kind]


def pool_bytes_per_token(hkv, d):
    return hkv * sum(per_token_head(k, d) for k in ("int4", "bf16", "fp8"))


def shapes(quick=False, heads=HEADS, pages=PAGES, budget=BUDGET_BYTES):
    """(heads, page, batch, ctx) rows of the matrix that fit the memory budget."""
    bc = QUICK if quick else [(b, c) for b in BATCHES for c in CTXS] + [(b, LONG_CTX) for b in BATCHES if b <= 4]
    return [(h, p, b, c) for h in heads for p in pages for b, c in bc
            if b * c * pool_bytes_per_token(h[1], h[2]) <= budget]


def bytes_read(kind, batch, ctx, hq, hkv, d, page=1):
    """Bytes a decode step moves: K+V (+ scales), indices, q read and out written."""
    tokens = batch * ctx
    idx = 4 * (tokens if page == 1 else -(-ctx // page) * batch)
    return tokens * hkv * per_token_head(kind, d) + idx + 2 * batch * hq * d * 2


def n_rotations(working_set_bytes, cap=16):
    """Disjoint input sets to cycle through so that the set in use is not L2-resident."""
    return int(max(1, min(cap, math.ceil(3 * L2_BYTES / max(1, working_set_bytes)))))


def fmt_x(a, b):
    return "-" if not a or not b else f"{a / b:.2f}x"


def decode_table(rows):
    head = ("| q/kv heads, D | page | batch x ctx | SAW-INT4 ms | BF16 ms | FP8 ms | INT4 vs BF16 | "
            "FP8 vs BF16 | INT4 GB/s | BF16 GB/s | INT4 rate / BF16 rate |")
    lines = [head, "|---|---:|---|" + "---:|" * 8]
    for r in rows:
        rate = "-" if not r.get("bf16_gbs") else f"{100 * r['int4_gbs'] / r['bf16_gbs']:.0f}%"
        lines.append(
            f"| {r['hq']}/{r['hkv']}/{r['d']} | {r['page']} | {r['batch']} x {r['ctx'] // 1024}k | "
            f"{r['int4_ms']:.4f} | {_ms(r.get('bf16_ms'))} | {_ms(r.get('fp8_ms'))} | "
            f"{fmt_x(r.get('bf16_ms'), r['int4_ms'])} | {fmt_x(r.get('bf16_ms'), r.get('fp8_ms'))} | "
            f"{r['int4_gbs']:.0f} | {_gbs(r.get('bf16_gbs'))} | {rate} |")
    return "\n".join(lines)


def extend_table(rows):
    lines = ["| prefix + new x requests | through the pool ms (of it dequant) | served with "
             "| the other basis ms | prefix kernel + merge ms | BF16 ms | through the pool vs BF16 "
             "| prefix kernel vs BF16 | prefix via decode kernel ms | vs BF16 |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        split = r.get("prefix_kernel_ms")
        pd = r.get("prefix_decode_ms")
        lines.append(f"| {r['prefix']} + {r['new']} x {r['reqs']} | {r['int4_ms']:.4f} ({r['dequant_ms']:.4f}) "
                     f"| {'K un-rotated' if r['k_unrotated'] else 'q rotated'} | {_ms(r['other_basis_ms'])} "
                     f"| {_ms(split)} | {r['bf16_ms']:.4f} | {fmt_x(r['bf16_ms'], r['int4_ms'])} "
                     f"| {'-' if split is None else fmt_x(r['bf16_ms'], split)} "
                     f"| {_ms(pd)} | {'-' if pd is None else fmt_x(r['bf16_ms'], pd)} |")
    return "\n".join(lines)


def _ms(x):
    return "-" if x is None else f"{x:.4f}"


def _gbs(x):
    return "-" if not x else f"{x:.0f}"


def write_csv(rows, path):
    if not rows:
        return
    keys = [k for k in rows[0] if not isinstance(rows[0][k], (dict, list))]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


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
    """A plain Triton copy kernel (`copy_` inside a CUDA graph may run on a copy engine)."""
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
    """Bytes read + written per second by the faster of a Triton copy and `copy_`."""
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
    """BF16, FP8 and INT4 pools of one head layout, filled with random data."""

    def __init__(self, tokens, hkv, d, gen):
        import torch
        from saw_sglang.kernels.format import Int4KVFormat
        self.rows = (tokens // 16 + 4) * 16
        self.fmt = Int4KVFormat(d)
        f = self.fmt
        self.kd = torch.randint(0, 256, f.data_shape(self.rows, hkv), dtype=torch.uint8, device="cuda", generator=gen)
        self.vd = torch.randint(0, 256, f.data_shape(self.rows, hkv), dtype=torch.uint8, device="cuda", generator=gen)
        sc = torch.rand(f.scale_shape(self.rows, hkv), device="cuda", generator=gen) * 0.1
        sc[..., 1] -= 0.75
        self.ks, self.vs = sc.half(), (sc * 0.9).half()
        self.k16 = torch.randn(self.rows, hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        self.v16 = torch.randn(self.rows, hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        self.k8, self.v8 = self.k16.to(torch.float8_e4m3fn), self.v16.to(torch.float8_e4m3fn)


def make_inputs(batch, ctx, page, rows, hq, d, gen):
    import torch
    need = batch * (-(-ctx // page))
    ent = (torch.randperm(rows // page - 1, device="cuda", generator=gen)[:need] + 1).to(torch.int32)
    indptr = torch.arange(0, batch + 1, device="cuda", dtype=torch.int32) * (need // batch)
    lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    q = torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    return q, indptr, ent, lens


def flashinfer_decode_fn(pools, kind, q, indptr, ent, ctx, page, hkv):
    import flashinfer
    import torch
    hq, d = q.shape[1], q.shape[2]
    ws = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True)
    last = torch.full((q.shape[0],), (ctx - 1) % page + 1, dtype=torch.int32, device="cuda")
    dt = torch.bfloat16 if kind == "bf16" else torch.float8_e4m3fn
    w.plan(indptr, ent, last, hq, hkv, d, page, data_type=dt, q_data_type=torch.bfloat16)
    k, v = (pools.k16, pools.v16) if kind == "bf16" else (pools.k8, pools.v8)
    k, v = k.view(-1, page, hkv, d), v.view(-1, page, hkv, d)
    out = torch.empty_like(q)
    return lambda: w.run(q, (k, v), out=out)


def int4_decode_fn(pools, q, indptr, ent, lens, ctx, page, fmt=None):
    import torch
    from saw_sglang.kernels.decode import DecodePlan
    hq, hkv = q.shape[1], pools.kd.shape[1]
    plan = DecodePlan(fmt or pools.fmt, hq, hkv, "cuda", page_size=page)
    plan.plan(q.shape[0], max_kv_len=ctx)
    out = torch.empty_like(q)
    sm = q.shape[2] ** -0.5
    return lambda: plan.run(q, pools.kd, pools.ks, pools.vd, pools.vs, indptr, ent, lens, sm, out=out)


def _have_flashinfer():
    try:
        import flashinfer  # noqa: F401
        return True
    except ImportError:
        print("note: flashinfer not importable; BF16/FP8 columns empty", file=sys.stderr)
        return False


def bench_decode(rows):
    import torch
    gen = torch.Generator(device="cuda").manual_seed(0)
    have_fi = _have_flashinfer()
    results = []
    by_heads = {}
    for h, p, b, c in rows:
        by_heads.setdefault(h, []).append((p, b, c))
    for (hq, hkv, d), items in by_heads.items():
        pools = Pools(max(b * c for _, b, c in items) + 16 * 256, hkv, d, gen)
        for page, batch, ctx in _progress(items, f"decode {hq}/{hkv}/{d}"):
            n_rot = n_rotations(bytes_read("int4", batch, ctx, hq, hkv, d, page))
            sets = [make_inputs(batch, ctx, page, pools.rows, hq, d, gen) for _ in range(n_rot)]
            r = dict(hq=hq, hkv=hkv, d=d, page=page, batch=batch, ctx=ctx, rotations=len(sets))
            r["int4_ms"] = time_fns([int4_decode_fn(pools, q, ip, e, ln, ctx, page) for q, ip, e, ln in sets])
            r["int4_gbs"] = bytes_read("int4", batch, ctx, hq, hkv, d, page) / (r["int4_ms"] * 1e6)
            for kind in ("bf16", "fp8"):
                ms = None
                if have_fi:
                    try:
                        ms = time_fns([flashinfer_decode_fn(pools, kind, q, ip, e, ctx, page, hkv)
                                       for q, ip, e, _ in sets])
                    except Exception as exc:  # noqa: BLE001
                        print(f"note: flashinfer {kind} failed at {batch}x{ctx}: {exc}", file=sys.stderr)
                r[f"{kind}_ms"] = ms
                r[f"{kind}_gbs"] = None if ms is None else bytes_read(kind, batch, ctx, hq, hkv, d, page) / (ms * 1e6)
            results.append(r)
            del sets
        del pools
        torch.cuda.empty_cache()
    return results


def bench_extend(hq=32, hkv=8, d=128):
    """A chunk of `new` tokens over `prefix` cached tokens per request, the two INT4
    designs side by side with FlashInfer's BF16 ragged prefill over the same rows
    (SGLang's BF16 path also reads its prefix from a paged pool):
    (a) through the pool, as served: dequantise prefix and chunk in their stored basis
        into a workspace, rotate q (or un-rotate K where the queries outweigh the keys), one
        causal ragged prefill (kernels.pool_read); the other basis choice is timed beside;
    (b) the chunk causally on its fresh BF16 k/v (ragged prefill with lse), the prefix
        through our prefix kernel, merged with FlashInfer's merge_state;
    (c) the chunk read back from the pool (ragged prefill with lse), the prefix through the
        decode kernels (kernels.prefix_decode: tokens packed into query heads), merged."""
    import flashinfer
    import torch
    from saw_sglang.kernels.pool_read import PoolReadWorkspace, attend_through_pool, unrotate_k_pays
    from saw_sglang.kernels.prefix import prefix_attention
    from saw_sglang.kernels.prefix_decode import prefix_attention as prefix_via_decode
    from saw_sglang.kernels.pool_read import stored_basis_query
    from saw_sglang.kernels.quantize import dequantize
    gen = torch.Generator(device="cuda").manual_seed(3)
    pools = Pools(max((p + n) * r for p, n, r in EXTEND_SHAPES) + 4096, hkv, d, gen)
    fmt = pools.fmt
    sm = d ** -0.5
    ws_fi = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    ws_chunk = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    results = []
    for prefix, new, reqs in _progress(EXTEND_SHAPES, "extend"):
        total = (prefix + new) * reqs
        slots = (torch.randperm(pools.rows - 1, device="cuda", generator=gen)[:total] + 1)
        q = torch.randn(new * reqs, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        qo = torch.arange(reqs + 1, device="cuda", dtype=torch.int32) * new
        kvo = torch.arange(reqs + 1, device="cuda", dtype=torch.int32) * (prefix + new)
        w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws_fi, "NHD")
        w.plan(qo, kvo, hq, hkv, d, causal=True, q_data_type=torch.bfloat16)
        k16, v16 = pools.k16[slots], pools.v16[slots]
        ws = PoolReadWorkspace(total, hkv, d, torch.bfloat16, "cuda")
        out = torch.empty_like(q)

        def through_pool(unrotate_k=None):  # None: as served (pool_read.unrotate_k_pays)
            return attend_through_pool(q, pools.kd, pools.ks, pools.vd, pools.vs, slots, fmt,
                                       lambda q3, k, v: w.run(q3, k, v, out=out), ws, unrotate_k=unrotate_k)
        k_unrotated = unrotate_k_pays(fmt, new * reqs, hq, total, hkv)

        def dq():
            dequantize(pools.kd, pools.ks, slots, fmt, k_unrotated, out=ws.k[:total])
            dequantize(pools.vd, pools.vs, slots, fmt, False, out=ws.v[:total])
        pool_ms = time_fns([through_pool])
        other_ms = time_fns([lambda: through_pool(not k_unrotated)])  # the choice's A/B
        dq_ms = time_fns([dq])
        bf16_ms = time_fns([lambda: w.run(q, k16, v16, out=out)])
        split_ms = decode_ms = None
        if prefix:  # (b): chunk on fresh k/v + prefix kernel + merge
            chunk = torch.cat([torch.arange(i * (prefix + new) + prefix, (i + 1) * (prefix + new))
                               for i in range(reqs)]).cuda()
            kc, vc = k16[chunk], v16[chunk]
            wc = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws_chunk, "NHD")
            wc.plan(qo, qo, hq, hkv, d, causal=True, q_data_type=torch.bfloat16)
            pre_slots = slots.view(reqs, prefix + new)[:, :prefix].reshape(-1).to(torch.int32)
            pind = torch.arange(reqs + 1, device="cuda", dtype=torch.int32) * prefix
            plen = torch.full((reqs,), prefix, device="cuda", dtype=torch.int32)

            def split():
                o1, s1 = wc.run(q, kc, vc, return_lse=True)
                o2, s2 = prefix_attention(q, qo, pools.kd, pools.ks, pools.vd, pools.vs, pind, pre_slots,
                                          plen, fmt, sm, max_q_len=new)
                return flashinfer.merge_state(o1, s1, o2.to(o1.dtype), s2 / math.log(2.0))
            split_ms = time_fns([split])
            chunk_slots = slots.view(reqs, prefix + new)[:, prefix:].reshape(-1)

            def via_decode():  # (c): the chunk through the pool, the prefix through decode
                kr = dequantize(pools.kd, pools.ks, chunk_slots, fmt, False, out=ws.k[:new * reqs])
                vr = dequantize(pools.vd, pools.vs, chunk_slots, fmt, False, out=ws.v[:new * reqs])
                o1, s1 = wc.run(stored_basis_query(q, fmt), kr, vr, return_lse=True)
                o2, s2 = prefix_via_decode(q, qo, pools.kd, pools.ks, pools.vd, pools.vs, pind, pre_slots,
                                           plen, fmt, sm, max_q_len=new, max_kv_len=prefix)
                return flashinfer.merge_state(o1, s1, o2.to(o1.dtype), s2 / math.log(2.0))
            try:
                decode_ms = time_fns([via_decode])
            except Exception as exc:  # noqa: BLE001
                print(f"note: prefix via decode failed at {prefix}+{new}x{reqs}: {exc}", file=sys.stderr)
            del kc, vc
        results.append(dict(prefix=prefix, new=new, reqs=reqs, hq=hq, hkv=hkv, d=d, int4_ms=pool_ms,
                            dequant_ms=dq_ms, k_unrotated=k_unrotated, other_basis_ms=other_ms,
                            prefix_kernel_ms=split_ms, prefix_decode_ms=decode_ms, bf16_ms=bf16_ms))
        del k16, v16, ws
    return results


def bench_write(hkv=8, d=128, t=8192):
    import torch
    from saw_sglang.kernels.format import Int4KVFormat
    from saw_sglang.kernels.quantize import quantize_and_store
    gen = torch.Generator(device="cuda").manual_seed(2)
    pools = Pools(4 * t, hkv, d, gen)
    k = torch.randn(t, hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(t, hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    loc = (torch.randperm(pools.rows - 1, device="cuda", generator=gen)[:t] + 1).to(torch.int64)
    fmts = {m: Int4KVFormat(d, rotation="none" if m == "none" else "hadamard", rotate_v=m == "kv") for m in MODES}
    res = {m: time_fns([lambda f=f: quantize_and_store(k, v, loc, pools.kd, pools.ks, pools.vd, pools.vs, f)])
           for m, f in fmts.items()}
    res["bf16_store"] = time_fns([lambda: (pools.k16.index_copy_(0, loc, k), pools.v16.index_copy_(0, loc, v))])
    return res


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in results if r.get("bf16_ms")]
    if not rows:
        return
    labels = [f"{r['hq']}/{r['hkv']}/{r['d']} p{r['page']} {r['batch']}x{r['ctx'] // 1024}k" for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.35), 4.8))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["bf16_ms"] / r["int4_ms"] for r in rows], 0.4, label="SAW-INT4 (K rotated)")
    ax.bar([i + 0.2 for i in x], [r["bf16_ms"] / r["fp8_ms"] if r.get("fp8_ms") else 0 for r in rows], 0.4,
           label="FlashInfer FP8")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("speed-up vs FlashInfer BF16 decode")
    ax.set_title("decode attention, one step, random scattered slots")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _parse_heads(text):
    return tuple(tuple(int(x) for x in h.split("/")) for h in text.split(","))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m saw_sglang.bench.kernels", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/bench-kernels", help="folder for JSON, CSV and PNG (default %(default)s)")
    ap.add_argument("--quick", action="store_true", help=f"batch x ctx {QUICK} only")
    ap.add_argument("--heads", type=_parse_heads, default=HEADS, metavar="HQ/HKV/D,...",
                    help="head layouts (default: the five of the matrix)")
    ap.add_argument("--pages", type=lambda t: tuple(int(x) for x in t.split(",")), default=PAGES,
                    help="page sizes (default 1,16)")
    ap.add_argument("--sections", default="decode,extend,write",
                    help="which of decode, extend, write to run (default all)")
    args = ap.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    os.makedirs(args.out, exist_ok=True)
    sections = set(args.sections.split(","))
    copy_gbs = copy_bandwidth_gbs()
    print(f"device {torch.cuda.get_device_name()}; copy {copy_gbs:.0f} GB/s (read + write)", file=sys.stderr)
    doc = dict(device=torch.cuda.get_device_name(), copy_gbs=copy_gbs, torch=torch.__version__,
               date=time.strftime("%Y-%m-%d"))
    if "decode" in sections:
        doc["decode"] = bench_decode(shapes(args.quick, args.heads, args.pages))
        write_csv(doc["decode"], os.path.join(args.out, "decode.csv"))
        plot(doc["decode"], os.path.join(args.out, "decode_speedup.png"))
    if "extend" in sections and _have_flashinfer():
        doc["extend"] = bench_extend()
        write_csv(doc["extend"], os.path.join(args.out, "extend.csv"))
    if "write" in sections:
        doc["write_ms"] = bench_write()
    with open(os.path.join(args.out, "kernels.json"), "w") as f:
        json.dump(doc, f, indent=1)
    if doc.get("write_ms"):
        w = doc["write_ms"]
        print("\n## write, 8192 tokens x 8 heads x 128 (ms)\n| none | K | K+V | BF16 index_copy_ | K / none | K+V / none |")
        print("|---:|---:|---:|---:|---:|---:|")
        print(f"| {w['none']:.4f} | {w['k']:.4f} | {w['kv']:.4f} | {w['bf16_store']:.4f} | "
              f"{w['k'] / w['none']:.2f}x | {w['kv'] / w['none']:.2f}x |")
    if doc.get("extend"):
        print("\n## extend over a cached prefix, 32/8/128\n" + extend_table(doc["extend"]))
    if doc.get("decode"):
        print(f"\n## decode attention (copy {copy_gbs:.0f} GB/s)\n" + decode_table(doc["decode"]))


if __name__ == "__main__":
    main()
