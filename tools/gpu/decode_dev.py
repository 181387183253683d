"""Decode kernel development on the GPU host, in one process: correctness of the
tensor-core (Gluon) kernel against the fp32 reference at many shapes (and CUDA-graph
replay), then timing of kernel variants against the portable Triton kernel and
FlashInfer BF16 (median of CUDA-graph replays, bench.kernels.time_fns).

usage: python tools/gpu/decode_dev.py [--check] [--time] [--variants JSON] [--shapes ...]
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests"))
from decode_cases import errors, make_case  # noqa: E402
from saw_sglang.kernels import reference as ref  # noqa: E402
from saw_sglang.kernels.decode import alloc_workspace, decode_attention  # noqa: E402
from saw_sglang.bench.kernels import time_fns  # noqa: E402


def check(variants):
    rows, bad = [], 0
    cases = [  # lens, hq, hkv, d, page, rotation, rotate_v, cap
        ([1, 100, 1000, 0, 4097], 32, 8, 128, 1, "hadamard", False, 0.0),
        ([1, 100, 1000, 0, 4097], 32, 8, 128, 16, "hadamard", False, 0.0),
        ([70, 3000], 32, 8, 128, 1, "none", False, 0.0),
        ([70, 3000], 32, 8, 128, 1, "hadamard", True, 0.0),
        ([500, 8192], 32, 8, 128, 1, "hadamard", False, 30.0),
        ([33, 2049, 5000], 9, 3, 64, 1, "hadamard", False, 0.0),
        ([33, 2049, 5000], 9, 3, 64, 16, "hadamard", True, 0.0),
        ([33, 2049, 5000], 16, 8, 256, 1, "hadamard", False, 0.0),
        ([33, 2049, 5000], 16, 8, 256, 16, "none", False, 0.0),
        ([64, 3000], 32, 32, 128, 1, "hadamard", False, 0.0),
        ([64, 3000], 64, 8, 128, 1, "hadamard", False, 0.0),
        ([64, 3000], 32, 2, 128, 1, "hadamard", False, 0.0),
        ([20000], 32, 8, 128, 1, "hadamard", False, 0.0),
    ]
    for i, (lens, hq, hkv, d, page, rot, rv, cap) in enumerate(cases):
        case = make_case(lens, hq, hkv, d, page=page, rotation=rot, rotate_v=rv, dtype=torch.bfloat16,
                         device="cuda", seed=i)
        sm = ref.default_sm_scale(d)
        expect = ref.decode_attention_ref(sm_scale=sm, logit_cap=cap, **case)
        for splits, kw in [(None, {}), (1, {}), (5, {})] + [(3, v) for v in variants.values() if v]:
            try:
                out = decode_attention(sm_scale=sm, logit_cap=cap, num_splits=splits, impl="mma", **case, **kw)
                torch.cuda.synchronize()
                mx, rel = errors(out, expect)
                ok = mx <= 4e-2 and rel <= 1e-2 and torch.isfinite(out).all().item()
            except Exception as exc:  # noqa: BLE001
                mx, rel, ok = float("nan"), float("nan"), False
                print(f"case {i} splits {splits}: {type(exc).__name__}: {str(exc)[:400]}")
            bad += not ok
            rows.append((i, f"{hq}/{hkv}/{d} p{page} {rot}{'+v' if rv else ''} cap{cap} lens{lens} {kw}", splits, mx, rel, ok))
    # CUDA-graph replay with fresh data in the same buffers
    case = make_case([300, 4000, 1], 32, 8, 128, dtype=torch.bfloat16, device="cuda", seed=99)
    sm = ref.default_sm_scale(128)
    ws = alloc_workspace(3, 32, 128, 16, "cuda")
    out = torch.empty_like(case["q"])
    call = dict(sm_scale=sm, out=out, workspace=ws, num_splits=16, impl="mma", **case)
    decode_attention(**call)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        decode_attention(**call)
    case["q"].copy_(torch.randn_like(case["q"]))
    g.replay()
    torch.cuda.synchronize()
    mx, rel = errors(out, ref.decode_attention_ref(sm_scale=sm, **case))
    ok = mx <= 4e-2 and rel <= 1e-2
    bad += not ok
    rows.append(("graph", "32/8/128 replay", 16, mx, rel, ok))
    print("| case | shape | splits | max abs | rel | ok |\n|---|---|---:|---:|---:|---|")
    for r in (rows if bad else rows[:3] + rows[-3:]):
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2e} | {r[4]:.2e} | {'ok' if r[5] else 'FAIL'} |")
    print(f"check: {len(rows) - bad} ok, {bad} failed")
    return bad


def bf16_fn(q, k16, v16, indptr, ent, ctx, page, hq, hkv, d):
    import flashinfer
    ws = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True)
    last = torch.full((q.shape[0],), (ctx - 1) % page + 1, dtype=torch.int32, device="cuda")
    w.plan(indptr, ent, last, hq, hkv, d, page, data_type=torch.bfloat16, q_data_type=torch.bfloat16)
    k, v = k16.view(-1, page, hkv, d), v16.view(-1, page, hkv, d)
    out = torch.empty_like(q)
    return lambda: w.run(q, (k, v), out=out)


def timing(shapes, variants, with_fi=True):
    from saw_sglang.kernels.format import Int4KVFormat
    gen = torch.Generator(device="cuda").manual_seed(0)
    print("| shape | variant | ms | vs triton | vs BF16 | GB/s |\n|---|---|---:|---:|---:|---:|")
    for (hq, hkv, d, b, ctx, page) in shapes:
        rows = (b * ctx // page + 64) * page
        fmt = Int4KVFormat(d)
        kd = torch.randint(0, 256, (rows, hkv, d // 2), dtype=torch.uint8, device="cuda", generator=gen)
        vd = torch.randint(0, 256, (rows, hkv, d // 2), dtype=torch.uint8, device="cuda", generator=gen)
        sc = torch.rand(rows, hkv, 1, 2, device="cuda", generator=gen) * 0.1
        sc[..., 1] -= 0.75
        ks, vs = sc.half(), (sc * 0.9).half()
        need = b * (-(-ctx // page))
        ent = (torch.randperm(rows // page - 1, device="cuda", generator=gen)[:need] + 1).to(torch.int32)
        indptr = torch.arange(0, b + 1, device="cuda", dtype=torch.int32) * (need // b)
        lens = torch.full((b,), ctx, device="cuda", dtype=torch.int32)
        q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        nbytes = b * ctx * hkv * 2 * (d // 2 + 4)
        res = {}

        def ours(**kw):
            out = torch.empty_like(q)
            return lambda: decode_attention(q, kd, ks, vd, vs, indptr, ent, lens, fmt, d ** -0.5,
                                            page_size=page, out=out, max_kv_len=ctx, **kw)
        base = time_fns([ours(impl="triton")])
        bf = None
        if with_fi:
            try:
                k16 = torch.randn(rows, hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen)
                v16 = torch.randn_like(k16)
                bf = time_fns([bf16_fn(q, k16, v16, indptr, ent, ctx, page, hq, hkv, d)])
                del k16, v16
            except Exception as exc:  # noqa: BLE001
                print(f"flashinfer failed: {exc}")
        res["triton"] = base
        for name, kw in variants.items():
            try:
                res[name] = time_fns([ours(impl="mma", **kw)])
            except Exception as exc:  # noqa: BLE001
                print(f"{name} failed: {type(exc).__name__}: {str(exc)[:300]}")
        shape = f"{hq}/{hkv}/{d} {b}x{ctx} p{page}"
        if bf:
            print(f"| {shape} | flashinfer bf16 | {bf:.4f} | | 1.00x | {4 * b * ctx * hkv * d / bf / 1e6:.0f} |")
        for name, ms in res.items():
            print(f"| {shape} | {name} | {ms:.4f} | {base / ms:.2f}x | "
                  f"{(bf / ms) if bf else float('nan'):.2f}x | {nbytes / ms / 1e6:.0f} |")
        sys.stdout.flush()
        del kd, vd, ks, vs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--time", action="store_true")
    ap.add_argument("--no-fi", action="store_true")
    ap.add_argument("--warm-fi", default="", help="only compile FlashInfer BF16 decode for these head dims")
    ap.add_argument("--variants", default='{"mma": {}}')
    ap.add_argument("--shapes", default="32/8/128:16:8192:1,32/8/128:64:8192:1,32/8/128:64:8192:16,"
                    "32/8/128:1:32768:1,32/8/128:256:2048:1,9/3/64:64:8192:1,16/8/256:32:8192:1")
    a = ap.parse_args()
    t0 = time.time()
    if a.warm_fi:
        for d in map(int, a.warm_fi.split(",")):
            q = torch.randn(2, 8, d, device="cuda", dtype=torch.bfloat16)
            kv = torch.randn(64, 2, d, device="cuda", dtype=torch.bfloat16)
            ent = torch.arange(32, dtype=torch.int32, device="cuda")
            ip = torch.tensor([0, 16, 32], dtype=torch.int32, device="cuda")
            bf16_fn(q, kv, kv, ip, ent, 16, 1, 8, 2, d)()
            torch.cuda.synchronize()
            print(f"flashinfer bf16 D={d} ready at {time.time() - t0:.0f}s", flush=True)
        return
    bad = check(json.loads(a.variants)) if a.check else 0
    print(f"check took {time.time() - t0:.0f}s")
    if a.time:
        shapes = []
        for s in a.shapes.split(","):
            heads, b, ctx, page = s.split(":")
            hq, hkv, d = map(int, heads.split("/"))
            shapes.append((hq, hkv, d, int(b), int(ctx), int(page)))
        timing(shapes, json.loads(a.variants), not a.no_fi)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
