"""Compile the INT4 prefix-attention kernel for sm_90 on a machine without a GPU (Triton's
bundled ptxas) and print its instruction mix, shared memory and registers, like
compile_decode.py does for the decode kernel. Defaults = the shipped head_dim-128 launch
(128 rows = 32 query tokens x GQA 4, BLOCK_N 64, 8 warps, 2 stages, K rotated, page 1).
usage: python tools/sass/compile_prefix.py [--rows 128] [--block-n 64] [--warps 8]
       [--stages 2] [--gqa 4] [--group 128] [--page 1] [--dump | python tools/sass/loop_stats.py]"""
import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from saw_sglang.kernels import prefix as pre

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
names = fn.arg_names
ptrs = {"Q": "*bf16", "O": "*bf16", "LSE": "*fp32", "QO_INDPTR": "*i32", "KV_INDPTR": "*i32",
        "KV_INDICES": "*i32", "KV_LENS": "*i32", "KD": "*u8", "KS": "*fp16", "VD": "*u8", "VS": "*fp16"}
floats = {"q_scale", "o_scale", "logit_cap"}
gqa_pad = 1 << max(0, (a.gqa - 1).bit_length())
const = dict(GQA=a.gqa, GQA_PAD=gqa_pad, BLOCK_M=a.rows // gqa_pad, BLOCK_N=a.block_n, D=128,
             G=a.group, NG=128 // a.group, PAGE=a.page, ROT_K=True, ROT_V=False, B=128, LOG2B=7,
             KC=64, USE_CAP=False)
sig, attrs = {}, {}
for i, n in enumerate(names):
    if n in const:
        sig[n] = "constexpr"
    elif n in ptrs:
        sig[n] = ptrs[n]
        attrs[(i,)] = [["tt.divisibility", 16]]
    elif n in floats:
        sig[n] = "fp32"
    else:
        sig[n] = "i32"
        if n.startswith("stride") and not n.endswith(("ksg", "vsg")):
            attrs[(i,)] = [["tt.divisibility", 16]]
src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=a.warps, num_stages=a.stages))
print("shared", k.metadata.shared)
bindir = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
    f.write(k.asm["cubin"])
sass = subprocess.run([os.path.join(bindir, "nvdisasm"), "-c", f.name], capture_output=True, text=True).stdout
ops = collections.Counter()
for line in sass.splitlines():
    m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", line)
    if m:
        ops[m.group(1).split(".")[0]] += 1
print("total instructions", sum(ops.values()))
print(", ".join(f"{o} {c}" for o, c in ops.most_common(30)))
if a.dump:
    print(sass)
res = subprocess.run([os.path.join(bindir, "cuobjdump"), "--dump-resource-usage", f.name],
                     capture_output=True, text=True).stdout
print([line.strip() for line in res.splitlines() if "REG" in line])
