"""quantize_and_store / dequantize on CUDA at serving sizes, plus CUDA-graph capture.
Same checks and tolerances as the CPU tests (tests/quantize_checks.py)."""

import os
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/quantize_checks.py

from quantize_checks import (  # noqa: E402
    POISON_BYTE,
    POISON_SCALE,
    assert_slots_match,
    check_dequantize_same_bytes,
    check_round_trip,
    fused_kv,
    poisoned_buffers,
    run_and_compare,
)
from saw_sglang.kernels import reference as ref  # noqa: E402
from saw_sglang.kernels.format import Int4KVFormat  # noqa: E402
from saw_sglang.kernels.quantize import dequantize, quantize_and_store  # noqa: E402

pytestmark = pytest.mark.gpu
DEV = "cuda"


@pytest.fixture(autouse=True)
def _seed():
    """Fresh random inputs each run, replayable: the seed is printed (shown with a
    failure) and SAW_TEST_SEED=<seed> reruns a case on the same inputs."""
    seed = int(os.environ.get("SAW_TEST_SEED") or random.randrange(2**31))
    print(f"SAW_TEST_SEED={seed}")
    torch.manual_seed(seed)


# (T, Hq, Hkv, D, G, B, rotation, rotate_v, dtype)
CASES = [
    (8192, 32, 8, 128, 128, None, "hadamard", False, torch.bfloat16),
    (8192, 32, 8, 128, 32, 16, "hadamard", True, torch.bfloat16),
    (8192, 32, 8, 128, 128, None, "none", False, torch.bfloat16),
    (8192, 32, 8, 128, 128, None, "hadamard", True, torch.float16),
    (4096, 32, 32, 64, 32, None, "hadamard", True, torch.float16),
    (3000, 16, 8, 256, 64, None, "hadamard", True, torch.bfloat16),
    (2048, 16, 8, 256, 256, 256, "hadamard", False, torch.bfloat16),
    (2048, 16, 8, 256, 64, 256, "hadamard", True, torch.float16),
    (1, 32, 8, 128, 128, None, "hadamard", False, torch.bfloat16),  # one decode token
    (77, 32, 8, 128, 64, 4, "hadamard", True, torch.float16),
]


def _fmt(d, g, b, rotation, rotate_v):
    return Int4KVFormat(head_dim=d, group_size=g, block_size=b, rotation=rotation, rotate_v=rotate_v)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}-H{c[2]}-D{c[3]}-G{c[4]}-B{c[5]}-{c[6]}{'+V' if c[7] else ''}")
def test_matches_reference_at_serving_sizes(case):
    t, hq, hkv, d, g, b, rot, rv, dtype = case
    fmt = _fmt(d, g, b, rot, rv)
    rows = 3 * t + 5
    _, k, v = fused_kv(t, hq, hkv, d, dtype, DEV)
    loc = torch.randperm(rows, device=DEV)[:t]
    run_and_compare(k, v, loc, fmt, rows, exact=False, device=DEV)
    check_round_trip(k, v, loc, fmt, rows, DEV)


@pytest.mark.parametrize("d, g, b", [(128, 128, 128), (64, 32, 64), (256, 64, 128), (256, 64, 256),
                                     (128, 32, 8)])
@pytest.mark.parametrize("rotated", [False, True])
def test_dequantize_same_bytes_at_serving_sizes(d, g, b, rotated):
    fmt = Int4KVFormat(head_dim=d, group_size=g, block_size=b)
    check_dequantize_same_bytes(fmt, rows=20000, heads=8, t=8192, rotated=rotated, device=DEV)


@pytest.mark.parametrize("rotate_v", [False, True])
def test_nonfinite_and_huge_values_at_scale(rotate_v):
    fmt = Int4KVFormat(head_dim=128, rotate_v=rotate_v, group_size=64)
    t, rows = 4096, 10000
    _, k, v = fused_kv(t, 32, 8, 128, torch.bfloat16, DEV)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 6e4], device=DEV)
    for x in (k, v):
        hit = torch.rand(x.shape, device=DEV) < 0.002
        x[hit] = specials[torch.randint(0, len(specials), (int(hit.sum()),), device=DEV)].bfloat16()
        x[::97] = 3.0  # constant rows
    loc = torch.randperm(rows, device=DEV)[:t]
    bufs = run_and_compare(k, v, loc, fmt, rows, exact=False, device=DEV)
    for sc in (bufs[1], bufs[3]):
        assert torch.isfinite(sc[loc].float()).all()


def test_repeated_padding_slot_at_scale():
    fmt = Int4KVFormat(head_dim=128, rotate_v=True)
    t, rows = 8192, 20000
    _, k, v = fused_kv(t, 32, 8, 128, torch.bfloat16, DEV)
    loc = torch.randperm(rows - 1, device=DEV)[:t] + 1
    loc[torch.rand(t, device=DEV) < 0.25] = 0
    bufs = poisoned_buffers(fmt, rows, 8, DEV)
    refs = [b.clone() for b in bufs]
    quantize_and_store(k, v, loc, *bufs, fmt)
    real = loc != 0
    ref.quantize_and_store_ref(k[real], v[real], loc[real], *refs, fmt)
    others = torch.arange(1, rows, device=DEV)
    assert_slots_match(bufs[0:2], refs[0:2], fmt, others, exact=False)
    assert_slots_match(bufs[2:4], refs[2:4], fmt, others, exact=False)
    for sc in (bufs[1], bufs[3]):
        assert torch.isfinite(sc[0].float()).all()


def test_one_kernel_launch_and_no_allocation():
    fmt = Int4KVFormat(head_dim=128, rotate_v=True)
    t, rows = 512, 2048
    _, k, v = fused_kv(t, 32, 8, 128, torch.bfloat16, DEV)
    loc = torch.randperm(rows, device=DEV)[:t]
    bufs = poisoned_buffers(fmt, rows, 8, DEV)
    quantize_and_store(k, v, loc, *bufs, fmt)  # compile
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        quantize_and_store(k, v, loc, *bufs, fmt)
        torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    names = {e.name for e in kernels}
    assert len(kernels) == 1 and any("_quantize_kv_kernel" in n for n in names), names


@pytest.mark.parametrize("rotation", ["hadamard", "none"])
def test_cuda_graph_capture_and_replay(rotation):
    fmt = Int4KVFormat(head_dim=128, group_size=64, rotation=rotation, rotate_v=True)
    t, hq, hkv, rows = 64, 32, 8, 4096
    qkv, k, v = fused_kv(t, hq, hkv, 128, torch.bfloat16, DEV)
    loc = torch.randperm(rows, device=DEV)[:t]
    bufs = poisoned_buffers(fmt, rows, hkv, DEV)
    quantize_and_store(k, v, loc, *bufs, fmt)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        quantize_and_store(k, v, loc, *bufs, fmt)
    for _ in range(3):  # fresh inputs in the captured buffers, then replay
        for b in bufs:
            b.fill_(POISON_BYTE if b.dtype == torch.uint8 else POISON_SCALE)
        qkv.copy_(torch.randn_like(qkv))
        loc.copy_(torch.randperm(rows, device=DEV)[:t])
        refs = [b.clone() for b in bufs]
        graph.replay()
        torch.cuda.synchronize()
        ref.quantize_and_store_ref(k, v, loc, *refs, fmt)
        written = torch.zeros(rows, dtype=torch.bool, device=DEV)
        written[loc] = True
        for i in range(4):
            assert torch.equal(bufs[i][~written], refs[i][~written])
        slots = written.nonzero().squeeze(1)
        assert_slots_match(bufs[0:2], refs[0:2], fmt, slots, exact=False)
        assert_slots_match(bufs[2:4], refs[2:4], fmt, slots, exact=False)
    out = dequantize(bufs[0], bufs[1], loc, fmt, fmt.k_rotated)
    assert out.shape == (t, hkv, 128) and torch.isfinite(out.float()).all()
