"""Compile a Triton kernel for sm_90 on a machine without a GPU (Triton's bundled ptxas)
and print its shared memory, instruction mix and registers; shared by compile_decode.py
and compile_prefix.py. loop_stats.py reads the --dump listing."""
import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

OPCODE = re.compile(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)")


def _strides(name):
    return name.startswith("stride")


def signature(names, const, ptrs, floats, aligned=_strides):
    """Triton signature and attributes: pointers and `aligned` ints 16-divisible (what the
    launcher specialises on for real buffers), other ints i32, `floats` fp32."""
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
            if aligned(n):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def report(fn, const, ptrs, floats, warps, stages, dump=False, aligned=_strides):
    names = fn.arg_names
    sig, attrs = signature(names, const, ptrs, floats, aligned)
    src = ASTSource(fn=fn, signature=sig, attrs=attrs,
                    constexprs={(names.index(k),): v for k, v in const.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    print("shared", k.metadata.shared)
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    sass = subprocess.run([os.path.join(bindir, "nvdisasm"), "-c", f.name], capture_output=True, text=True).stdout
    ops = collections.Counter()
    for line in sass.splitlines():
        m = OPCODE.match(line)
        if m:
            ops[m.group(1).split(".")[0]] += 1
    print("total instructions", sum(ops.values()))
    print(", ".join(f"{o} {c}" for o, c in ops.most_common(30)))
    if dump:
        print(sass)
    res = subprocess.run([os.path.join(bindir, "cuobjdump"), "--dump-resource-usage", f.name],
                         capture_output=True, text=True).stdout
    print([line.strip() for line in res.splitlines() if "REG" in line])
    os.unlink(f.name)
