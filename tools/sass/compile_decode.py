"""Compile the portable Triton decode split kernel (kernels/decode_triton.py) for sm_90 on
a machine without a GPU (Triton's bundled ptxas) and print its instruction mix and
registers. The tensor-core kernel has its own: compile_decode_mma.py.
usage: python tools/sass/compile_decode.py [--asm 0|1] [--prefetch 0|1] [--block-n N]
       [--warps N] [--stages N] [--qk-int8 0|1] [--dump | python tools/sass/loop_stats.py]"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sm90 import report  # noqa: E402
from saw_sglang.kernels import decode_triton as dec  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--asm", type=int, default=1)
ap.add_argument("--block-n", type=int, default=128)
ap.add_argument("--warps", type=int, default=4)
ap.add_argument("--stages", type=int, default=3)
ap.add_argument("--dump", action="store_true")
ap.add_argument("--prefetch", type=int, default=0)
ap.add_argument("--block-h", type=int, default=8)
ap.add_argument("--page", type=int, default=1)
ap.add_argument("--group", type=int, default=128)
ap.add_argument("--qk-int8", type=int, default=0)
a = ap.parse_args()

fn = dec._decode_split_kernel
ptrs = {"q_ptr": "*bf16", "kd_ptr": "*u8", "ks_ptr": "*fp16", "vd_ptr": "*u8", "vs_ptr": "*fp16",
        "indptr_ptr": "*i32", "indices_ptr": "*i32", "lens_ptr": "*i32", "out_ptr": "*bf16",
        "mid_o_ptr": "*fp32", "mid_lse_ptr": "*fp32"}
floats = {"sm_scale", "logit_cap", "inv_sqrt_bs"}
const = dict(GQA=4, BLOCK_H=a.block_h, D=128, GS=a.group, NG=128 // a.group, BS=128, LOG_BS=7, CH=64, PAGE=a.page,
             BLOCK_N=a.block_n, ROT_K=True, ROT_V=False, CAP=False, DIRECT=False, USE_ASM=bool(a.asm),
             PREFETCH=bool(a.prefetch), QK_INT8=bool(a.qk_int8))
report(fn, const, ptrs, floats, a.warps, a.stages, a.dump)
