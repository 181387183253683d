"""CPU tests of the reliability suite (dev/gpu/reliability.py): traffic generator,
response checks, the k_proj scaling helper, and a short end-to-end run against the
fake server (tests/fakes/fake_sglang_server.py)."""

import json
import os
import sys
from pathlib import Path

import pytest
import reliability as rel
import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).parent

FAKE = f"{sys.executable} {HERE / 'fakes' / 'fake_sglang_server.py'}"


def test_traffic_is_seeded_mixed_and_in_range():
    mix = rel.TrafficMix()
    a = [rel.Traffic(mix, seed=3).next() for _ in range(1)]
    t1, t2 = rel.Traffic(mix, seed=3), rel.Traffic(mix, seed=3)
    r1 = [t1.next() for _ in range(300)]
    r2 = [t2.next() for _ in range(300)]
    assert r1 == r2 and r1[0] == a[0]
    assert r1 != [rel.Traffic(mix, seed=4).next() for _ in range(300)]
    kinds = {r["kind"] for r in r1}
    assert kinds == set(mix.weights)
    for r in r1:
        n, out = len(r["input_ids"]), r["sampling_params"]["max_new_tokens"]
        assert all(mix.id_lo <= i < mix.id_hi for i in r["input_ids"])
        assert r["stream"] == (r["kind"] == "stream")
        if r["kind"] == "long":
            assert mix.long_in[0] <= n <= mix.long_in[1] and mix.long_out[0] <= out <= mix.long_out[1]
        elif r["kind"] == "shared":
            assert r["input_ids"][:mix.prefix_len] in t1.prefixes
            assert mix.prefix_len + mix.suffix_in[0] <= n <= mix.prefix_len + mix.suffix_in[1]
        else:
            assert mix.short_in[0] <= n <= mix.short_in[1]
    # shared prefixes are reused (radix-cache hits), not fresh each time
    shared = [tuple(r["input_ids"][:mix.prefix_len]) for r in r1 if r["kind"] == "shared"]
    assert len(set(shared)) <= mix.n_prefixes < len(shared)


def test_probe_requests_fixed_and_greedy():
    a, b = rel.probe_requests(4), rel.probe_requests(4)
    assert a == b and all(p["sampling_params"]["temperature"] == 0.0 for p in a)
    assert len(a[1]["input_ids"]) >= 600 > len(a[0]["input_ids"])


@pytest.mark.parametrize("status,body,want", [
    (200, {"text": "x", "meta_info": {"finish_reason": {"type": "length", "length": 4}}}, "ok"),
    (200, {"text": "x", "meta_info": {"finish_reason": {"type": "stop"}}}, "ok"),
    (200, {"text": "", "meta_info": {"finish_reason": {"type": "abort", "message": "m"}}}, "aborted"),
    (200, {"text": "x", "meta_info": {}}, "server_error"),
    (400, {"error": {"message": "too long"}}, "client_error"),
    (422, "bad json", "client_error"),
    (500, {"error": {"message": "boom"}}, "server_error"),
    (503, "", "server_error"),
])
def test_classify(status, body, want):
    assert rel.classify(status, body)[0] == want


def test_compare_and_numerics_compare():
    ref = [{"ids": [1, 2, 3], "logprobs": [-0.1, -0.2, -0.3]}, {"ids": [4, 5], "logprobs": [-1.0, -2.0]}]
    same = rel.compare(ref, ref)
    assert same == {"identical": 2, "of": 2, "min_common_prefix": 2}
    other = [{"ids": [1, 9, 3], "logprobs": [-0.2, float("nan"), -0.3]}, ref[1]]
    c = rel.compare(ref, other)
    assert c["identical"] == 1 and c["min_common_prefix"] == 1
    n = rel.numerics_compare(other, ref)
    assert n["finite"] is False and n["token_agreement"] == pytest.approx(4 / 5)
    assert n["mean_abs_logprob_diff_common_prefix"] == pytest.approx((0.1 + 0 + 0) / 3)
    ok = rel.numerics_compare(ref, ref)
    assert ok["finite"] and ok["mean_abs_logprob_diff_common_prefix"] == 0.0
    assert rel.numerics_compare([{"ids": [], "logprobs": []}], [{"ids": [], "logprobs": []}])["finite"] is False


def _tiny_checkpoint(d: Path, layers=2, bias=False, shards=1):
    d.mkdir()
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(layers):
        for proj in ("q_proj", "k_proj", "v_proj"):
            tensors[f"model.layers.{i}.self_attn.{proj}.weight"] = torch.randn(8, 16, generator=g).bfloat16()
            if bias:
                tensors[f"model.layers.{i}.self_attn.{proj}.bias"] = torch.randn(8, generator=g).bfloat16()
    tensors["model.embed_tokens.weight"] = torch.randn(32, 16, generator=g).bfloat16()
    keys = sorted(tensors)
    for s in range(shards):
        part = {k: tensors[k] for k in keys[s::shards]}
        save_file(part, str(d / f"model-{s:05d}.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps({"num_hidden_layers": layers}))
    return tensors


@pytest.mark.parametrize("layer,bias,shards", [(0, False, 1), (1, True, 2)])
def test_scale_kproj(tmp_path, layer, bias, shards):
    src, dst = tmp_path / "src", tmp_path / "dst"
    orig = _tiny_checkpoint(src, bias=bias, shards=shards)
    names = rel.scale_kproj(str(src), str(dst), layer, 100.0)
    want = {f"model.layers.{layer}.self_attn.k_proj.weight"} | (
        {f"model.layers.{layer}.self_attn.k_proj.bias"} if bias else set())
    assert set(names) == want
    assert (dst / "config.json").read_text() == (src / "config.json").read_text()
    got = {}
    for f in dst.glob("*.safetensors"):
        got.update(load_file(str(f)))
    assert set(got) == set(orig)
    for k, t in orig.items():
        assert got[k].dtype == t.dtype
        if k in want:
            torch.testing.assert_close(got[k].float(), (t.float() * 100).bfloat16().float())
        else:
            assert torch.equal(got[k], t)
    # the source checkpoint is untouched
    for f in src.glob("*.safetensors"):
        for k, t in load_file(str(f)).items():
            assert torch.equal(t, orig[k])


def test_scale_kproj_missing_layer(tmp_path):
    _tiny_checkpoint(tmp_path / "src")
    with pytest.raises(ValueError, match="k_proj"):
        rel.scale_kproj(str(tmp_path / "src"), str(tmp_path / "dst"), 7, 100.0)


def _run(tmp_path, *extra, env=None):
    model = tmp_path / "model"
    _tiny_checkpoint(model)
    out = tmp_path / "rel.json"
    argv = ["--model", str(model), "--duration", "3", "--concurrency", "4", "--probes", "2",
            "--probe-every", "1", "--saw-launcher", FAKE, "--stock-launcher", FAKE,
            "--start-timeout", "20", "--log-dir", str(tmp_path / "logs"), "--out", str(out),
            "--max-total-tokens", "100000", *extra]
    old = dict(os.environ)
    os.environ.update(env or {})
    try:
        rc = rel.main(argv)
    finally:
        os.environ.clear()
        os.environ.update(old)
    return rc, json.loads(out.read_text())


def test_end_to_end_against_fake_server(tmp_path, capsys):
    rc, rep = _run(tmp_path, "--no-require-queueing")
    printed = capsys.readouterr().out
    checks = {c["name"]: c for c in rep["checks"]}
    assert rc == 0 and rep["passed"], printed
    assert rep["soak"]["requests"] > 4 and rep["soak"]["ok"] == rep["soak"]["requests"]
    assert set(rep["soak"]["by_kind"]) <= {"short", "long", "shared", "stream"}
    assert rep["soak"]["probe_runs"]
    faults = [n for n in checks if n.startswith("fault:")]
    assert len(faults) == 7
    assert "client_error" in checks["fault: invalid sampling params (temperature -1)"]["detail"]
    assert "aborted" in checks["fault: /abort_request of a running request"]["detail"]
    assert rep["numerics"]["finite"] and rep["numerics"]["scaled"] == ["model.layers.0.self_attn.k_proj.weight"]
    assert "PASSED" in printed and "load:" in printed
    assert not (tmp_path / "logs" / "model-kproj-x100-layer0").exists()


def test_end_to_end_detects_leak_and_missing_queueing(tmp_path):
    # The fake leaks the tokens of a request whose client disconnects.
    rc, rep = _run(tmp_path, "--skip-numerics", env={"FAKE_LEAK_ON_DISCONNECT": "1"})
    checks = {c["name"]: c for c in rep["checks"]}
    assert rc == 1
    assert checks["pool: used tokens back to start once idle"]["ok"]
    assert not checks["pool: used tokens back to start after faults"]["ok"]
    assert not checks["soak: pool saturated (requests queued)"]["ok"]  # the fake never queues


def test_server_start_failure_is_reported(tmp_path):
    rc, rep = _run(tmp_path, env={"FAKE_MODE": "exit"})
    assert rc == 1 and rep["checks"][0]["name"] == "server start"
    assert "exited with code 3" in rep["checks"][0]["detail"]


def test_miss_vs_hit_is_held_to_the_stock_servers_agreement():
    """6/6 passes; fewer passes only when the stock BF16 server agrees no more often, and
    never under --strict or without a stock figure."""
    c = lambda n: {"identical": n, "of": 6, "min_common_prefix": 3}
    assert rel.miss_vs_hit_check(c(6), None, strict=True).ok
    assert rel.miss_vs_hit_check(c(4), c(3), strict=False).ok
    assert rel.miss_vs_hit_check(c(4), c(4), strict=False).ok
    assert not rel.miss_vs_hit_check(c(3), c(4), strict=False).ok
    assert not rel.miss_vs_hit_check(c(4), c(3), strict=True).ok
    assert not rel.miss_vs_hit_check(c(4), None, strict=False).ok
    assert "stock BF16 server 3/6" in rel.miss_vs_hit_check(c(4), c(3), strict=False).detail
