"""The kernel benchmark's pure-Python parts (no GPU needed)."""

import subprocess
import sys

from saw_sglang.bench import kernels as bk


def test_help_runs_without_a_gpu():
    r = subprocess.run([sys.executable, "-m", "saw_sglang.bench.kernels", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--tune" in r.stdout and "--quick" in r.stdout


def test_shape_list_fits_the_budget_and_covers_the_targets():
    rows = bk.shapes()
    assert (1, 256, 32768, "random") not in rows  # 8.4M tokens: over 20 GB with three pools
    for shape in [(1, 16, 8192), (1, 64, 8192), (1, 64, 32768), (1, 256, 2048), (16, 64, 8192), (1, 1, 8192)]:
        assert (*shape, "random") in rows
    assert (1, 16, 8192, "contiguous") in rows
    assert all(b * c * bk.pool_bytes_per_token() <= bk.BUDGET_BYTES for _, b, c, s in rows)
    assert len(bk.shapes(quick=True)) < len(rows)


def test_byte_counts():
    # 16 x 8192 tokens, 8 kv heads: 68 B per token-head for K and for V, 4 B index per token,
    # q read + out written in bf16
    tokens = 16 * 8192
    qo = 2 * 16 * 32 * 128 * 2
    assert bk.bytes_read("int4", 16, 8192) == tokens * 8 * 136 + 4 * tokens + qo
    assert bk.bytes_read("bf16", 16, 8192) == tokens * 8 * 512 + 4 * tokens + qo
    assert bk.bytes_read("fp8", 16, 8192, page=16) == tokens * 8 * 256 + 4 * tokens // 16 + qo
    # the targets.md INT4 floor at 4284 GB/s: 0.0333 ms for 16 x 8k
    assert abs(bk.int4_floor_ms(16, 8192, 4284) - 0.0333) < 5e-4
    assert bk.n_rotations(1 << 40) == 1 and bk.n_rotations(1 << 20) == 16


def test_table_formatting():
    r = dict(page=1, batch=16, ctx=8192, slots="random", ours_ms={"none": 0.04, "k": 0.05, "kv": 0.06},
             bf16_ms=0.15, fp8_ms=None, floor_ms=0.0333, gbs=2900.0, pct_copy=67.7)
    t = bk.table([r]).splitlines()
    assert t[0].startswith("| page |") and len(t) == 3
    assert t[1].count("|") == t[0].count("|")
    assert "0.0400 / 0.0500 / 0.0600" in t[2] and "3.00x" in t[2] and "68%" in t[2] and "| - |" in t[2]


def test_copy_ceiling_kernel_copies_every_element():
    """The SM copy kernel behind the bench's bandwidth ceiling (interpreter on the CPU)."""
    import torch

    from saw_sglang.bench.kernels import _sm_copy

    a = torch.randint(-2**31, 2**31 - 1, (3 * 1024 + 5,), dtype=torch.int32)
    b = torch.zeros_like(a)
    _sm_copy()(a, b, block=1024)
    assert torch.equal(a, b)
