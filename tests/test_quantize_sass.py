"""Machine-code checks of the cache-write (and read-back) kernels, compiled offline for sm_90 (H100/H200)
with the Triton wheel's own ptxas: no GPU needed. They guard the properties the
kernel's speed rests on, which the interpreter tests cannot see:
  * no register spills and at most 32 KB of shared memory per program at the default
    launch (any head dim, rotation on or off), so occupancy is set by registers (the
    dense-dot rotation before needed 69 KB and ran 1.27x slower than no rotation);
  * the rotation's butterflies stay in registers and the rotated path does little
    extra per element: with K rotated and V not, the two tile loops together have at
    most 5% more instructions than two unrotated loops (the target for the K-rotated
    write: within 1.05x of the no-rotation write), at each head dim's default format;
  * at Hadamard block 256, the K+V-rotated write and the rotated dequantize fit the
    H200's shared memory per block (a dense fp32 256x256 matrix did not, on the H200).
Skipped where the wheel has no NVIDIA backend tools. The compile runs in a child
process without TRITON_INTERPRET (which the CPU test session sets)."""

import json
import os
import re
import subprocess
import sys
import tempfile

import pytest
import triton

from saw_sglang.kernels.format import CLAMP
from saw_sglang.kernels.quantize import (
    DEQUANT_BLOCK_T,
    DOT_K,
    _block_t,
    _dequantize_kernel,
    _quantize_kv_kernel,
    _unpack_kernel,
    _unrotate_kernel,
)

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(BIN, "cuobjdump")),
                                reason="no NVIDIA backend tools in this Triton wheel")


def _compile(fn, sig, consts, aligned):
    """Compile fn for sm_90 -> (stack bytes, shared memory bytes, SASS text)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(sig, **{k: "constexpr" for k in consts})
    # what the launcher specialises at serving sizes: 16-aligned pointers and strides
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs={(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        usage = subprocess.run([f"{BIN}/cuobjdump", "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([f"{BIN}/cuobjdump", "-sass", f.name],
                              capture_output=True, text=True, check=True).stdout
    return int(re.search(r"STACK:(\d+)", usage).group(1)), ck.metadata.shared, sass


def _compile_sm90(d, g, b, rot_k, rot_v, lsq=False, k_affine=False):
    fn = _quantize_kv_kernel
    sig = {"k_ptr": "*bf16", "k_st": "i32", "k_sh": "i32", "v_ptr": "*bf16", "v_st": "i32",
           "v_sh": "i32", "loc_ptr": "*i64", "kd_ptr": "*u8", "ks_ptr": "*fp16", "vd_ptr": "*u8",
           "vs_ptr": "*fp16", "kmul_ptr": "*fp32", "kadd_ptr": "*fp32", "T": "i32", "H": "i32",
           "inv_sqrt_b": "fp32"}
    consts = dict(D=d, G=g, B=b, W=max(b, 16), BLOCK_T=_block_t(d, b, rot_k or rot_v),
                  ROT_K=rot_k, ROT_V=rot_v, CLAMP_V=CLAMP, DOT_K=DOT_K, STAGES=1,
                  K_AFFINE=k_affine, LSQ=lsq)
    aligned = [n for n in fn.arg_names
               if n.endswith("_ptr") or n in ("k_st", "k_sh", "v_st", "v_sh", "T")]
    stack, smem, sass = _compile(fn, sig, consts, aligned)
    return stack, smem, _loop_bodies(sass)


def _compile_dequantize_sm90(d, g, b, fn=_dequantize_kernel):
    sig = {"data_ptr": "*u8", "scale_ptr": "*fp16", "loc_ptr": "*i64", "out_ptr": "*bf16",
           "o_st": "i32", "o_sh": "i32", "T": "i32", "H": "i32", "inv_sqrt_b": "fp32"}
    consts = dict(D=d, G=g, B=b, W=max(b, 16), BLOCK_T=DEQUANT_BLOCK_T)
    aligned = [n for n in fn.arg_names if n.endswith("_ptr") or n in ("o_st", "o_sh", "T")]
    stack, smem, sass = _compile(fn, sig, consts, aligned)
    return stack, smem, len(_ops(sass))


def _ops(sass):
    return re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", sass, re.M)


def _compile_unpack_sm90(d, g):
    fn = _unpack_kernel
    sig = {"data_ptr": "*u8", "scale_ptr": "*fp16", "loc_ptr": "*i64", "out_ptr": "*bf16",
           "o_st": "i32", "o_sh": "i32", "T": "i32", "H": "i32"}
    aligned = [n for n in fn.arg_names if n.endswith("_ptr") or n in ("o_st", "o_sh", "T")]
    stack, _, sass = _compile(fn, sig, dict(D=d, G=g, BLOCK_T=DEQUANT_BLOCK_T), aligned)
    ops = _ops(sass)
    return stack, len(ops), sum(op == "LDG.E.U16" for op in ops)


def _loop_bodies(sass):
    """Instruction counts of the loops (backward branches) in SASS order: the K-tile
    loop, then the V-tile loop."""
    ins = [int(m.group(1), 16) for m in re.finditer(r"^\s+/\*([0-9a-f]{4,})\*/\s+\S", sass, re.M)]
    out = []
    for m in re.finditer(r"^\s+/\*([0-9a-f]{4,})\*/.*?BRA (?:!?P\d, )?0x([0-9a-f]+)", sass, re.M):
        at, tgt = int(m.group(1), 16), int(m.group(2), 16)
        if tgt < at:
            out.append(sum(1 for a in ins if tgt <= a <= at))
    return out


@pytest.mark.parametrize("d, g, b", [(128, 128, 128), (64, 64, 64), (256, 256, 128)])
def test_no_spills_and_rotation_costs_few_instructions(d, g, b):
    stack, smem, loops = _in_child("write", d, g, b)
    assert stack == 0, f"register spills: {stack} bytes of stack"
    assert smem <= 32 * 1024, f"{smem} bytes of shared memory per program"
    rot_loop, plain_loop = loops  # K rotated, V not
    assert plain_loop < rot_loop and rot_loop + plain_loop <= 1.05 * 2 * plain_loop, (rot_loop, plain_loop)


# The H200's shared memory per block (227 KiB): the limit a dense fp32 256x256
# Hadamard in dequantize exceeded on the GPU (294,912 bytes).
H200_SMEM = 232448


@pytest.mark.parametrize("kind, d, g, b", [
    ("dequantize", 256, 64, 256), ("dequantize", 128, 128, 128),
    ("write_kv", 256, 64, 256), ("write_kv", 128, 128, 128),
])
def test_fits_the_h200_shared_memory(kind, d, g, b):
    """Rotated dequantize and the K+V-rotated write at the largest Hadamard block
    compile for sm_90 within the per-block shared memory; the write without spills
    (dequantize's fp32 "ieee" dots spill at BLOCK_T 32: a fallback path, not timed)."""
    stack, smem, _ = _in_child(kind, d, g, b)
    assert smem <= H200_SMEM, f"{smem} bytes of shared memory per program"
    assert kind == "dequantize" or stack == 0, f"register spills: {stack} bytes of stack"


@pytest.mark.parametrize("d, g, b", [(128, 128, 128), (64, 64, 64), (256, 256, 128)])
def test_calibrated_write_has_no_spills(d, g, b):
    """The calibrated write (K shifted before the rotation, least-squares pairs): no
    register spills, and the extra work stated (docs/eval.md) is the instruction count
    of these loops: printed, not bounded (its time is for the GPU to say)."""
    base = _in_child("count", d, g, b)
    cal = _in_child("count-lsq-affine", d, g, b)
    assert cal[0] == 0, f"register spills: {cal[0]} bytes of stack"
    print(f"D={d}: loops {base[2]} min-max -> {cal[2]} calibrated least squares")


def _in_child(kind, d, g, b):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, __file__, kind, str(d), str(g), str(b)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.parametrize("d, g", [(128, 128), (64, 64), (128, 64), (256, 256), (64, 32)])
def test_unpack_is_light_per_element(d, g):
    """The serving read (stored basis): no spills, each group's (scale, min) loaded once
    per thread and group rather than per channel, and at most 10 instructions per output
    element and thread (the per-channel version of this read took 17-21, spilling at
    head_dim 128 with groups of 64)."""
    stack, n_ins, scale_loads = _in_child("unpack", d, g, 0)
    per_elem = n_ins / (DEQUANT_BLOCK_T * d / 128)  # 128 threads per program
    assert stack == 0, f"register spills: {stack} bytes of stack"
    assert scale_loads <= 8 * (d // g), f"{scale_loads} 2-byte scale/min loads per thread"
    assert per_elem <= 10, f"{per_elem:.1f} instructions per element"


@pytest.mark.parametrize("d, b", [(128, 128), (64, 64), (256, 128), (256, 256)])
def test_unrotate_is_far_lighter_than_the_fp32_dot_kernel(d, b):
    """The original-basis read of the default formats (a block inside one group): codes
    rotated on fp16 tensor cores, then scaled. No spills, within the H200's shared
    memory, and at most half the instructions of the fp32 FMA-dot kernel it
    replaces for these formats (which spilled and took 3.6-27.7 ms for 8k-66k rows on
    the H200). Its cost against the plain unpack is printed: the GPU A/B decides."""
    stack, smem, n_ins = _in_child("unrotate", d, d, b)
    _, _, fp32_ins = _in_child("dequantize", d, d, b)
    _, unpack_ins, _ = _in_child("unpack", d, d, 0)
    assert stack == 0, f"register spills: {stack} bytes of stack"
    assert smem <= H200_SMEM, f"{smem} bytes of shared memory per program"
    assert n_ins <= fp32_ins / 2, (n_ins, fp32_ins)
    print(f"D={d} B={b}: {n_ins} instructions (fp32-dot kernel {fp32_ins}, unpack {unpack_ins}), {smem} B shared")


if __name__ == "__main__":
    kind, (d, g, b) = sys.argv[1], map(int, sys.argv[2:5])
    if kind == "unpack":
        res = _compile_unpack_sm90(d, g)
    elif kind == "unrotate":
        res = _compile_dequantize_sm90(d, g, b, _unrotate_kernel)
    elif kind == "dequantize":
        res = _compile_dequantize_sm90(d, g, b)
    elif kind.startswith("count"):  # "count[-lsq][-affine]": K rotated, V not, one variant
        res = _compile_sm90(d, g, b, rot_k=True, rot_v=False, lsq="lsq" in kind,
                            k_affine="affine" in kind)
    else:  # "write": K rotated, V not (the loop comparison); "write_kv": both rotated
        res = _compile_sm90(d, g, b, rot_k=True, rot_v=kind == "write_kv")
    print(json.dumps(res))
