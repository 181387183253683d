"""A/B of the through-pool extend's two ways to meet the rotated keys (one GPU, torch and
triton only): (a) unpack K in its stored basis and rotate q (the default), (b) un-rotate K
while unpacking it (`_unrotate_kernel`) and leave q as it is. Times only the part that
differs (K's read-back and q's rotation), per layer, 32 query / 8 KV heads.

    python dev/gpu/unrotate_ab.py            (after installing the package)
"""
import torch
import triton.testing

from saw_sglang.kernels.format import Int4KVFormat
from saw_sglang.kernels.pool_read import rotate_blocks
from saw_sglang.kernels.quantize import dequantize, quantize_and_store

HQ, HKV = 32, 8
# (label, key rows, query rows): the extend bench's shapes
SHAPES = [("0 + 256 x 32", 8192, 8192), ("8192 + 8192 x 1", 16384, 8192),
          ("16384 + 2048 x 1", 18432, 2048), ("16384 + 32 x 4", 65664, 128)]

for d in (128, 64, 256):
    fmt = Int4KVFormat(d)
    rows = max(k for _, k, _ in SHAPES) + 1
    kd, ks = fmt.alloc(rows, HKV, device="cuda")
    vd, vs = fmt.alloc(rows, HKV, device="cuda")
    x = torch.randn(rows, HKV, d, device="cuda", dtype=torch.bfloat16)
    quantize_and_store(x, x, torch.arange(rows, device="cuda"), kd, ks, vd, vs, fmt)
    for label, k_rows, q_rows in SHAPES:
        slots = torch.randperm(rows, device="cuda")[:k_rows]
        q = torch.randn(q_rows, HQ, d, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(k_rows, HKV, d, device="cuda", dtype=torch.bfloat16)
        a = triton.testing.do_bench(lambda: (dequantize(kd, ks, slots, fmt, False, out=out),
                                             rotate_blocks(q, fmt.block_size)), warmup=50, rep=200)
        b = triton.testing.do_bench(lambda: dequantize(kd, ks, slots, fmt, True, out=out), warmup=50, rep=200)
        u = triton.testing.do_bench(lambda: dequantize(kd, ks, slots, fmt, False, out=out), warmup=50, rep=200)
        print(f"D={d} {label:18s} unpack+rotate q {a * 1e3:8.1f} us | unrotate K {b * 1e3:8.1f} us "
              f"| unpack alone {u * 1e3:7.1f} us | unrotate/(unpack+rotate q) {b / a:5.2f}", flush=True)
