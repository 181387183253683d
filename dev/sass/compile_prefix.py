"""Compile the INT4 prefix-attention kernel for sm_90 on a machine without a GPU (Triton's
bundled ptxas) and print its instruction mix, shared memory and registers, like
compile_decode.py does for the decode kernel. Defaults = the shipped head_dim-128 launch
(128 rows = 32 query tokens x GQA 4, BLOCK_N 64, 8 warps, 2 stages, K rotated, page 1).
usage: python dev/sass/compile_prefix.py [--rows 128] [--block-n 64] [--warps 8]
       [--stages 2] [--gqa 4] [--group 128] [--page 1] [--dump | python dev/sass/loop_stats.py]"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sm90 import report  # noqa: E402
from saw_sglang.kernels import prefix as pre  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--rows", type=int, default=128)
ap.add_argument("--block-n", type=int, default=64)
ap.add_argument("--warps", type=int, default=8)
ap.add_argument("--stages", type=int, default=2)
ap.add_argument("--gqa", type=int, default=4)
ap.add_argument("--group", type=int, default=128)
ap.add_argument("--page", type=int, default=1)
ap.add_argument("--dump", action="store_true")
a = ap.parse_args()

fn = pre._prefix_attn_kernel
ptrs = {"Q": "*bf16", "O": "*bf16", "LSE": "*fp32", "QO_INDPTR": "*i32", "KV_INDPTR": "*i32",
        "KV_INDICES": "*i32", "KV_LENS": "*i32", "KD": "*u8", "KS": "*fp16", "VD": "*u8", "VS": "*fp16"}
floats = {"q_scale", "o_scale", "logit_cap"}
gqa_pad = 1 << max(0, (a.gqa - 1).bit_length())
const = dict(GQA=a.gqa, GQA_PAD=gqa_pad, BLOCK_M=a.rows // gqa_pad, BLOCK_N=a.block_n, D=128,
             G=a.group, NG=128 // a.group, PAGE=a.page, ROT_K=True, ROT_V=False, B=128, LOG2B=7,
             KC=64, USE_CAP=False)
report(fn, const, ptrs, floats, a.warps, a.stages, a.dump,
       aligned=lambda n: n.startswith("stride") and not n.endswith(("ksg", "vsg")))
