"""The --tp 2 GPU script's CPU-side logic (dev/gpu/tp2_serve.py): expected per-rank
capacity figures, cross-mode checks, and a dry run that starts no server without GPUs."""

import json
import subprocess
import sys

import pytest
import tp2_serve

from saw_sglang.tools import models


def _cfg(folder, **cfg):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    return str(folder)


def test_rank_bytes_per_token(tmp_path):
    qwen = _cfg(tmp_path / "q", **models.QWEN3_8B)
    # 8 KV heads / 2 ranks, 36 layers, head_dim 128 -> (64 data + 4 scale) B per token-head
    assert tp2_serve.rank_bytes_per_token(qwen, 2) == 2 * 36 * 4 * 68
    smol = _cfg(tmp_path / "s", hidden_size=576, num_attention_heads=12, num_key_value_heads=4,
                head_dim=64, num_hidden_layers=30)
    assert tp2_serve.rank_bytes_per_token(smol, 2) == 2 * 30 * 2 * 36
    assert tp2_serve.rank_bytes_per_token(smol, 1) == 2 * tp2_serve.rank_bytes_per_token(smol, 2)


def _res(outs, tokens=None):
    return {"ok": True, "outputs": [{"output_ids": o} for o in outs], "max_total_num_tokens": tokens}


def test_compare_margins():
    base = [[1, 2, 3, 4], [5, 6, 7, 8]]
    half = [[1, 2, 9, 9], [5, 6, 9, 9]]
    results = {"bf16-tp1": _res(base), "bf16-tp2": _res(base, 1000),
               "int4-tp1": _res(base), "int4-tp2": _res(base, 3600)}
    cross = tp2_serve.compare(results, margin=0.15, min_ratio=3.5)
    assert cross["ok"] and cross["agreement"]["int4-tp2 vs int4-tp1"]["exact"] == 1.0
    # TP moving INT4 outputs far more than BF16's fails; so does a low measured capacity
    results["int4-tp2"] = _res(half, 3000)
    cross = tp2_serve.compare(results, margin=0.15, min_ratio=3.5)
    assert not cross["checks"]["int4: tp2 vs tp1 within margin of bf16's"]
    assert not cross["checks"]["int4 vs bf16 at tp2 within margin of tp1"]
    assert not cross["checks"]["int4-tp2 measured capacity>=3.5"]
    # ... unless BF16 moves as much under TP (the noise floor)
    results["bf16-tp2"] = _res(half, 1000)
    results["int4-tp2"] = _res(half, 3600)
    cross = tp2_serve.compare(results, margin=0.15, min_ratio=3.5)
    assert cross["checks"]["int4: tp2 vs tp1 within margin of bf16's"]


def test_modes_use_tp_and_our_launcher():
    cmds = tp2_serve.mode_commands("/m", "/d")
    assert list(cmds) == tp2_serve.MODES
    for name, cmd in cmds.items():
        assert cmd[cmd.index("--tp") + 1] == name.split("tp")[-1][0]
        assert ("saw_sglang.launch_server" in cmd) == ("int4" in name)
        assert ("--kv-cache-dtype" in cmd) == ("int4" in name)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="dry run is for machines without GPUs")
def test_dry_run_without_gpus_starts_nothing(tmp_path):
    model = _cfg(tmp_path / "m", hidden_size=576, num_attention_heads=12, num_key_value_heads=4,
                 head_dim=64, num_hidden_layers=30)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, tp2_serve.__file__, "--padded-model", model,
                        "--out", str(out), "--modes", "int4-tp1,int4-tp2"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["env"]["NCCL_NVLS_ENABLE"] == "0" and not summary["ok"]
    assert summary["modes"]["int4-tp2"]["error"] == "needs 2 GPUs, 0 visible"
    assert "bf16-tp2" in summary["missing_modes"]
    assert not list(out.glob("*.log"))  # no server was started
