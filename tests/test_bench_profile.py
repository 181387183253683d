"""Trace summary of `bench serve --profile` / `bench profile-summary` on synthetic Chrome traces."""

import json
import sys
import threading
from pathlib import Path

import pytest

from saw_sglang.bench import profile
from saw_sglang.bench.capture import start_request, wait_steady

sys.path.insert(0, str(Path(__file__).parent / "fakes"))
from synthetic_trace import STEP_KERNELS, step_us, write_trace  # noqa: E402


def expected_ms(kernels=STEP_KERNELS, scale=1.0):
    ms = {k: 0.0 for k in profile.KEYS}
    for _, d, cat in kernels:
        ms[cat] += d * scale / 1000.0
    return ms


@pytest.mark.parametrize("name,cat", [(n, c) for n, _, c in STEP_KERNELS] + [
    ("_fwd_kernel", "attn_prefill"),                 # SGLang triton extend
    ("_fwd_kernel_stage2", "attn_decode"),           # SGLang triton decode reduce
    ("BatchPrefillWithRaggedKVCacheKernel", "attn_prefill"),
    ("void flashinfer::PersistentVariableLengthMergeStatesKernel<8u>", "attn_decode"),
    ("TopKTopPSamplingFromProbKernel", "other"),
    ("_dequantize_kernel", "other"),                 # a fallback: must stand out, not hide
    ("ncclKernel_AllGather_RING_LL_Sum_int8_t", "comm"),
])
def test_classify(name, cat):
    assert profile.classify(name) == cat


def test_categories_are_ordered_first_match():
    # "cutlass" in a FlashInfer attention name must not make it a GEMM.
    assert profile.classify("flashinfer::BatchPrefillWithPagedKVCacheKernel<cutlass::bfloat16_t>") == "attn_decode"
    assert profile.KEYS[-1] == profile.OTHER and len(profile.KEYS) == len(set(profile.KEYS))


def test_gzipped_trace_per_step_from_graph_launches(tmp_path):
    path = str(tmp_path / "run-TP-0.trace.json.gz")
    write_trace(path, steps=4, gap_us=10.0)
    b = profile.summarize(profile.find_traces([str(tmp_path)]))
    assert (b.steps, b.steps_source, b.graph_launches) == (4.0, "graph launches", 4)
    want = expected_ms()
    for k in profile.KEYS:
        assert b.ms[k] == pytest.approx(want[k], abs=1e-12), k
    assert b.kernel_ms == pytest.approx(step_us() / 1000.0)
    # first kernel start to last kernel end: 4 steps back to back, 3 gaps of (10 + 5) us
    assert b.wall_ms == pytest.approx((4 * step_us() + 3 * 15.0) / 4 / 1000.0)
    attn = want["attn_decode"] + want["attn_prefill"]
    assert b.attn_share == pytest.approx(attn / (step_us() / 1000.0))
    assert b.top[0]["name"].startswith("nvjet") and b.top[0]["calls"] == 1.0
    assert b.top[0]["ms"] == pytest.approx(0.05)


def test_plain_json_list_without_launches_needs_steps(tmp_path):
    path = str(tmp_path / "x.trace.json")
    write_trace(path, steps=5, graph_launch=False, as_list=True)
    totals = profile.summarize([path])
    assert totals.steps is None and totals.steps_source == "unknown"
    assert totals.kernel_ms == pytest.approx(5 * step_us() / 1000.0)
    per = profile.summarize([path], steps=5)
    assert per.steps_source == "given" and per.kernel_ms == pytest.approx(step_us() / 1000.0)
    assert "? (totals)" in profile.markdown_table([("m", "p", totals)])


def test_ranks_are_averaged(tmp_path):
    write_trace(str(tmp_path / "id-TP-0.trace.json.gz"), steps=2)
    slow = [(n, 3.0 * d, c) for n, d, c in STEP_KERNELS]
    write_trace(str(tmp_path / "id-TP-1.trace.json.gz"), steps=2, kernels=slow)
    b = profile.summarize(profile.find_traces([str(tmp_path)]))
    assert len(b.files) == 2 and b.steps == 2.0
    assert b.ms["gemm"] == pytest.approx(expected_ms(scale=2.0)["gemm"])
    assert b.kernel_ms == pytest.approx(2.0 * step_us() / 1000.0)


@pytest.mark.parametrize("complete,steps,source", [(True, 2.0, "requested"), (False, 6.0, "graph launches")])
def test_meta_file_gives_steps_only_when_complete(tmp_path, complete, steps, source):
    write_trace(str(tmp_path / "a-TP-0.trace.json.gz"), steps=6)
    (tmp_path / profile.META_FILE).write_text(json.dumps({"num_steps": 2, "complete": complete}))
    b = profile.summarize(profile.find_traces([str(tmp_path)]))
    assert (b.steps, b.steps_source) == (steps, source)


def test_markdown_table_rows():
    b = profile.Breakdown(files=["f"], steps=10.0, steps_source="given", kernel_ms=2.0, wall_ms=2.5,
                          ms={"attn_decode": 0.5, "attn_prefill": 0.0, "kv_write": 0.125, "gemm": 1.0,
                              "comm": 0.0, "other": 0.375}, attn_share=0.25)
    lines = profile.markdown_table([("saw-int4", "long c64", b)]).splitlines()
    assert lines[0] == ("| mode | point | steps | kernel ms/step | wall ms/step | attn decode | attn prefill "
                        "| KV write | GEMM | comm | other | attn share |")
    assert lines[2] == "| saw-int4 | long c64 | 10 | 2.000 | 2.500 | 0.500 | 0.000 | 0.125 | 1.000 | 0.000 | 0.375 | 25.0% |"


def test_profile_summary_cli(tmp_path, capsys):
    d1, d2 = tmp_path / "bf16", tmp_path / "int4"
    d1.mkdir(), d2.mkdir()
    write_trace(str(d1 / "p-TP-0.trace.json.gz"), steps=3)
    write_trace(str(d2 / "p-TP-0.trace.json"), steps=3, graph_launch=False)
    out_json, png = tmp_path / "s.json", tmp_path / "s.png"
    rc = profile.main([str(d1), str(d2 / "p-TP-0.trace.json"), "--steps", "3", "--top", "4",
                       "--json", str(out_json), "--png", str(png)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| - | bf16 | 3 | " in text and "| - | int4 | 3 | " in text
    assert "nvjet_tst" in text and "_decode_split_kernel" in text
    rows = json.loads(out_json.read_text())
    assert [r["point"] for r in rows] == ["bf16", "int4"]
    assert rows[1]["kernel_ms"] == pytest.approx(step_us() / 1000.0) and len(rows[0]["top"]) == 4
    assert png.stat().st_size > 1000
    assert profile.main([str(tmp_path / "missing")]) == 2


def test_profile_summary_help_via_dispatcher(capsys):
    from saw_sglang.bench.__main__ import main
    with pytest.raises(SystemExit) as e:
        main(["profile-summary", "--help"])
    assert e.value.code == 0 and "first match wins" in capsys.readouterr().out


def test_wait_steady_reaches_want_or_settles():
    t = [0.0]
    stop = threading.Event()

    def script(values):
        it = iter(values)

        def get():
            t[0] += 1.0
            return next(it)
        return get
    assert wait_steady(script([0, 2, 4, 8]), 8, 3.0, stop, poll_s=0, clock=lambda: t[0]) == 8
    # capped below want (KV pool full): accepted once it held for settle_s
    assert wait_steady(script([0, 3, 5, 5, 5, 5, 5]), 8, 3.0, stop, poll_s=0, clock=lambda: t[0]) == 5
    # zero never settles; a stop ends the wait
    stop.set()
    assert wait_steady(script([0] * 100), 8, 0.0, stop, poll_s=0, clock=lambda: t[0]) is None


def test_start_request_fields(tmp_path):
    # Parsed as the HTTP server does: FastAPI validates the JSON body into SGLang's ProfileReq
    # through pydantic (unknown keys would be dropped silently, so each field is checked).
    import pydantic
    from sglang.srt.managers.io_struct import ProfileReq
    body = start_request(str(tmp_path / "p"), 7, "tag")
    req = pydantic.TypeAdapter(ProfileReq).validate_json(json.dumps(body))
    assert req.num_steps == 7 and req.output_dir == str(tmp_path / "p") and req.profile_id == "tag"
    assert req.with_stack is False and req.record_shapes is False and req.activities == ["CPU", "GPU"]
