"""The kernel benchmark's pure-Python parts (no GPU needed)."""

import subprocess
import sys

from saw_sglang.bench import kernels as bk


def test_help_runs_without_a_gpu():
    r = subprocess.run([sys.executable, "-m", "saw_sglang.bench.kernels", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--heads" in r.stdout and "--quick" in r.stdout


def test_matrix_fits_the_budget_and_covers_the_issue_shapes():
    rows = bk.shapes()
    heads = {h for h, _, _, _ in rows}
    assert heads == set(bk.HEADS)
    for b, c in [(16, 8192), (64, 8192), (64, 32768), (256, 2048), (1, 131072), (4, 131072), (1, 2048)]:
        for p in (1, 16):
            assert ((32, 8, 128), p, b, c) in rows
    assert ((32, 8, 128), 1, 16, 131072) not in rows  # 128k only for batch <= 4
    assert all(b * c * bk.pool_bytes_per_token(h[1], h[2]) <= bk.BUDGET_BYTES for h, _, b, c in rows)
    quick = bk.shapes(quick=True, heads=((32, 8, 128),), pages=(1,))
    assert len(quick) == len(bk.QUICK) and len(quick) < len(rows)


def test_byte_counts():
    # 16 x 8192 tokens, 8 kv heads, D 128: 68 B per token-head for K and for V, 4 B index per
    # token (per page at page 16), q read + out written in bf16
    tokens, qo = 16 * 8192, 2 * 16 * 32 * 128 * 2
    assert bk.bytes_read("int4", 16, 8192, 32, 8, 128) == tokens * 8 * 136 + 4 * tokens + qo
    assert bk.bytes_read("bf16", 16, 8192, 32, 8, 128) == tokens * 8 * 512 + 4 * tokens + qo
    assert bk.bytes_read("fp8", 16, 8192, 32, 8, 128, page=16) == tokens * 8 * 256 + 4 * tokens // 16 + qo
    assert bk.per_token_head("int4", 64) == 2 * 36
    assert bk.n_rotations(1 << 40) == 1 and bk.n_rotations(1 << 20) == 16


def test_table_formatting():
    r = dict(hq=32, hkv=8, d=128, page=1, batch=16, ctx=8192, int4_ms=0.05, bf16_ms=0.15, fp8_ms=None,
             int4_gbs=2900.0, bf16_gbs=4000.0)
    t = bk.decode_table([r]).splitlines()
    assert t[0].startswith("| q/kv heads") and len(t) == 3 and t[1].count("|") == t[0].count("|")
    assert "| 32/8/128 | 1 | 16 x 8k | 0.0500 | 0.1500 | - | 3.00x | - | 2900 | 4000 | 72% |" == t[2]
    e = dict(prefix=8192, new=8192, reqs=1, int4_ms=2.0, dequant_ms=0.1, k_unrotated=True, other_basis_ms=2.4,
             prefix_kernel_ms=3.6, prefix_decode_ms=0.9, bf16_ms=1.8)
    no_prefix = dict(prefix=0, new=256, reqs=32, int4_ms=0.2, dequant_ms=0.05, k_unrotated=False,
                     other_basis_ms=0.125, prefix_kernel_ms=None, bf16_ms=0.1)
    t = bk.extend_table([e, no_prefix]).splitlines()
    assert t[2] == ("| 8192 + 8192 x 1 | 2.0000 (0.1000) | K un-rotated | 2.4000 | 3.6000 | 1.8000 | 0.90x "
                    "| 0.50x | 0.9000 | 2.00x |")
    assert t[3] == "| 0 + 256 x 32 | 0.2000 (0.0500) | q rotated | 0.1250 | - | 0.1000 | 0.50x | - | - | - |"
    assert t[0].count("|") == t[2].count("|") == t[3].count("|")


def test_csv_has_one_row_per_shape(tmp_path):
    rows = [dict(hq=32, hkv=8, d=128, page=1, batch=b, ctx=8192, int4_ms=0.1, bf16_ms=None) for b in (1, 2)]
    bk.write_csv(rows, tmp_path / "d.csv")
    lines = (tmp_path / "d.csv").read_text().splitlines()
    assert lines[0].startswith("hq,hkv,d,page,batch,ctx") and len(lines) == 3


def test_copy_ceiling_kernel_copies_every_element():
    """The SM copy kernel behind the bench's bandwidth ceiling (interpreter on the CPU)."""
    import torch

    from saw_sglang.bench.kernels import _sm_copy

    a = torch.randint(-2**31, 2**31 - 1, (3 * 1024 + 5,), dtype=torch.int32)
    b = torch.zeros_like(a)
    _sm_copy()(a, b, block=1024)
    assert torch.equal(a, b)
