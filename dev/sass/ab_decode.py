"""A/B timing of decode_attention knobs on a CUDA GPU at the benchmark shape (32 q / 8 kv
heads, D=128, K rotated, random slots): each variant against the first, same inputs,
timed as CUDA-graph replays (saw_sglang.bench.kernels.time_fns) with a preallocated
output and split workspace, so the figures are kernel time, not Python launch time
(run 8's plain-loop timing was launch-bound below ~0.2 ms).
usage: python dev/sass/ab_decode.py [--batch 16 64] [--ctx 8192] [--page 1 16]
       [--variants "block_h=16" "block_h=8" "block_h=4"]"""
import argparse

import torch

from saw_sglang.bench.kernels import time_fns
from saw_sglang.kernels import reference as ref
from saw_sglang.kernels.decode import alloc_workspace, decode_attention, plan_splits
from saw_sglang.kernels.testing import make_case

ap = argparse.ArgumentParser()
ap.add_argument("--batch", type=int, nargs="+", default=[16, 64])
ap.add_argument("--ctx", type=int, default=8192)
ap.add_argument("--page", type=int, nargs="+", default=[1, 16])
ap.add_argument("--variants", nargs="+", default=["block_h=16", "block_h=8", "block_h=4"])
ap.add_argument("--iters", type=int, default=50)
a = ap.parse_args()


def parse(v):
    return {k: int(x) for k, x in (kv.split("=") for kv in v.split(","))} if v else {}


def graphable(case, sm, knobs):
    """One decode call that allocates nothing (capturable): fixed splits, workspace, out."""
    b, hq, d = case["q"].shape
    splits = plan_splits(b, case["k_data"].shape[1], case["fmt"], "cuda", a.ctx)
    ws = alloc_workspace(b, hq, d, splits, "cuda")
    out = torch.empty_like(case["q"])
    return lambda: decode_attention(sm_scale=sm, out=out, workspace=ws, num_splits=splits, **case, **knobs)


for page in a.page:
    for b in a.batch:
        case = make_case([a.ctx] * b, 32, 8, 128, page=page, dtype=torch.bfloat16, device="cuda", seed=b)
        sm = ref.default_sm_scale(128)
        nbytes = sum(case[k].numel() * case[k].element_size() for k in ("k_data", "k_scales", "v_data", "v_scales"))
        row = []
        for v in a.variants:
            ms = time_fns([graphable(case, sm, parse(v))], min_launches=a.iters)
            row.append(f"{v or 'default'} {ms:.4f} ms")
        print(f"page {page} batch {b} ctx {a.ctx} (pool {nbytes / 2**20:.0f} MiB): " + " | ".join(row), flush=True)
