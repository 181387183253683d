"""Compile the decode split kernel for sm_90 on a machine without a GPU (Triton's bundled
ptxas) and print its instruction mix and registers: a cheap check of what the hot loop
costs before spending GPU time.
usage: python tools/sass/compile_decode.py [--asm 0|1] [--prefetch 0|1] [--block-n N]
       [--warps N] [--stages N] [--qk-int8 0|1] [--pv-int8 0|1] [--dump | python tools/sass/loop_stats.py]"""
import argparse
import collections
import re
import subprocess
import tempfile
import os

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from saw_sglang.kernels import decode as dec

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
ap.add_argument("--pv-int8", type=int, default=0)
a = ap.parse_args()

fn = dec._decode_split_kernel
names = fn.arg_names
ptrs = {"q_ptr": "*bf16", "kd_ptr": "*u8", "ks_ptr": "*fp16", "vd_ptr": "*u8", "vs_ptr": "*fp16",
        "indptr_ptr": "*i32", "indices_ptr": "*i32", "lens_ptr": "*i32", "out_ptr": "*bf16",
        "mid_o_ptr": "*fp32", "mid_lse_ptr": "*fp32"}
floats = {"sm_scale", "logit_cap", "inv_sqrt_bs"}
const = dict(GQA=4, BLOCK_H=a.block_h, D=128, GS=a.group, NG=128 // a.group, BS=128, LOG_BS=7, CH=64, PAGE=a.page,
             BLOCK_N=a.block_n, ROT_K=True, ROT_V=False, CAP=False, DIRECT=False, USE_ASM=bool(a.asm),
             PREFETCH=bool(a.prefetch), QK_INT8=bool(a.qk_int8), PV_INT8=bool(a.pv_int8))
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
        if n.startswith("stride"):
            attrs[(i,)] = [["tt.divisibility", 16]]
src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=a.warps, num_stages=a.stages))
print("shared", k.metadata.shared, "regs/spills: see ptxas -v")
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
res = subprocess.run([os.path.join(bindir, "cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
print([l.strip() for l in res.splitlines() if "REG" in l])
