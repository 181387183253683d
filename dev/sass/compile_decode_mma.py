"""Compile the tensor-core decode kernel (kernels/decode_mma.py, Gluon) for sm_90 on a
machine without a GPU and print its shared memory, registers and instruction mix; with
--dump the SASS goes to stdout for loop_stats.py (the main loop = one block of BLOCK_N
tokens per warp; "per token" = loop / BLOCK_N).
usage: python dev/sass/compile_decode_mma.py [--d 128] [--gqa 4] [--page 1] [--block-n 32]
       [--stages 3] [--heads 4] [--cap 0] [--direct 0] [--pdl 1] [--pad 0] [--dump | python dev/sass/loop_stats.py]"""
import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource

from saw_sglang.kernels import decode as dec
from saw_sglang.kernels.decode_mma import decode_split_kernel

ap = argparse.ArgumentParser()
ap.add_argument("--d", type=int, default=128)
ap.add_argument("--gqa", type=int, default=4)
ap.add_argument("--page", type=int, default=1)
ap.add_argument("--block-n", type=int, default=None)
ap.add_argument("--stages", type=int, default=None)
ap.add_argument("--heads", type=int, default=None)
ap.add_argument("--cap", type=int, default=0)
ap.add_argument("--direct", type=int, default=0)
ap.add_argument("--pdl", type=int, default=1)
ap.add_argument("--pad", type=int, default=0, help="HG does not divide the KV heads (masked warps)")
ap.add_argument("--dump", action="store_true")
a = ap.parse_args()
cfg = dec.MMA_CONFIGS[a.d]
const = dict(HG=a.heads or cfg["heads"], GQA=a.gqa, NH=max(8, triton.next_power_of_2(a.gqa)), D=a.d,
             PAGE=a.page, BLOCK_N=a.block_n or cfg["block_n"], CAP=bool(a.cap), OFF64=False,
             MIN_BLOCKS=cfg["min_blocks"], STAGES=a.stages or cfg["stages"], SWZ_VEC=cfg["swizzle"][0],
             SWZ_PHASES=cfg["swizzle"][1], DIRECT=bool(a.direct), PDL=bool(a.pdl), PAD=bool(a.pad))
ptrs = {"qp_ptr": "*fp16", "qs_ptr": "*fp32", "kd_ptr": "*u8", "ks_ptr": "*fp16", "vd_ptr": "*u8",
        "vs_ptr": "*fp16", "indptr_ptr": "*i32", "indices_ptr": "*i32", "lens_ptr": "*i32",
        "mid_o_ptr": "*bf16" if a.direct else "*fp32", "mid_lse_ptr": "*fp32"}
names = decode_split_kernel.arg_names
sig, attrs = {}, {}
for i, n in enumerate(names):
    if n in const:
        sig[n] = "constexpr"
    elif n in ptrs:
        sig[n], attrs[(i,)] = ptrs[n], [["tt.divisibility", 16]]
    elif n == "logit_cap":
        sig[n] = "fp32"
    else:
        sig[n] = "i32"
        if n.startswith("stride") and not n.startswith(("stride_mo", "stride_ml")):
            attrs[(i,)] = [["tt.divisibility", 16]]
src = GluonASTSource(fn=decode_split_kernel, signature=sig, attrs=attrs,
                     constexprs={(names.index(k),): v for k, v in const.items()})
k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=const["HG"], launch_pdl=bool(a.pdl)))
bindir = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
    f.write(k.asm["cubin"])
sass = subprocess.run([os.path.join(bindir, "nvdisasm"), "-c", f.name], capture_output=True, text=True).stdout
res = subprocess.run([os.path.join(bindir, "cuobjdump"), "--dump-resource-usage", f.name],
                     capture_output=True, text=True).stdout
os.unlink(f.name)
if a.dump:
    print(sass)
else:
    ops = collections.Counter(m.group(1).split(".")[0] for m in (
        re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", line) for line in sass.splitlines()) if m)
    print(f"{const}\nshared {k.metadata.shared} B, total {sum(ops.values())} instructions")
    print(", ".join(f"{o} {c}" for o, c in ops.most_common(24)))
    print([line.strip() for line in res.splitlines() if "REG" in line])
