"""Orchestration of `python -m saw_sglang.bench serve` against a fake server and client.

The fake server (tests/fakes/fake_sglang_server.py) takes SGLang's flags and spawns
a child, as SGLang does; every test checks that no process of it survives.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from saw_sglang.bench import serve
from saw_sglang.bench.server import ManagedServer, ServerStartError, reserve_port

FAKES = Path(__file__).parent / "fakes"
sys.path.insert(0, str(FAKES))  # synthetic_trace
FAKE_SERVER = f"{sys.executable} {FAKES / 'fake_sglang_server.py'}"
FAKE_CLIENT = f"{sys.executable} {FAKES / 'fake_bench_client.py'}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by init) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def pids(pidfile: Path):
    return [int(x) for x in pidfile.read_text().split()] if pidfile.exists() else []


def assert_all_gone(pidfile: Path, timeout=10.0):
    found = pids(pidfile)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(pid_alive(p) for p in found):
        time.sleep(0.1)
    assert found, "fake server never started"
    assert not [p for p in found if pid_alive(p)], "server processes left running"


def argv(tmp_path, *extra, server_env="", modes="bf16,fp8,int4:rotation=none:scale-fit=minmax,int4",
         scenario=("s:16:8:2,4:2", "l:64:8:1:1")):
    pidfile = tmp_path / "pids"
    a = ["--model-path", "/nonexistent/model", "--out", str(tmp_path / "out"), "--modes", modes,
         "--stock-launcher", f"env FAKE_PIDFILE={pidfile} {FAKE_SERVER}",
         "--saw-launcher", f"env FAKE_PIDFILE={pidfile} {server_env} {FAKE_SERVER}",
         "--bench-cmd", FAKE_CLIENT, "--start-timeout", "20", "--load-format", "dummy"]
    for s in scenario:
        a += ["--scenario", s]
    return a + list(extra), pidfile


@pytest.mark.parametrize("spec,want", [
    ("short:256:1024:32,64", ("short", 256, 1024, [32, 64], 1.0)),
    ("x:1:2:3:2.5", ("x", 1, 2, [3], 2.5)),
])
def test_scenario_parse(spec, want):
    s = serve.Scenario.parse(spec)
    assert (s.name, s.input_len, s.output_len, s.concurrencies, s.prompts_per_concurrency) == want


@pytest.mark.parametrize("bad", ["short:256:1024", "a:b:1:2", "a:1:1:", "a:1:1:0", "a:1:1:2:3:4"])
def test_scenario_parse_rejects(bad):
    with pytest.raises(Exception):
        serve.Scenario.parse(bad)


def test_budget_preset_trims_points_and_prompts():
    args = serve.build_parser().parse_args(["--model-path", "m", "--budget"])
    todo = serve.plan(args)
    full = serve.plan(serve.build_parser().parse_args(["--model-path", "m"]))
    assert len(todo) < len(full) and len(todo) == 4 * 3
    n = {(sc.name, c): sc.num_prompts(c, 1) for _, sc, c in todo}
    assert n[("short", 32)] == 64 and n[("long", 64)] == 64


def test_server_cmd_carries_flags_and_mode_args(tmp_path):
    a, _ = argv(tmp_path, "--max-total-tokens", "5000", "--attention-backend", "triton",
                "--disable-piecewise-cuda-graph", "--mode-args", "int4:rotation=none:scale-fit=minmax=--kv-cache-dtype int4 --x y")
    args = serve.build_parser().parse_args(a)
    cmd = serve.server_cmd(args, "int4:rotation=none:scale-fit=minmax", 1234)
    s = " ".join(cmd)
    for part in ("--port 1234", "--max-total-tokens 5000", "--attention-backend triton",
                 "--disable-piecewise-cuda-graph", "--load-format dummy", "--kv-cache-dtype int4 --x y",
                 "--mem-fraction-static 0.5", "--model-path /nonexistent/model"):
        assert part in s
    assert "--saw-rotation" not in s
    assert "--kv-cache-dtype fp8_e4m3" in " ".join(serve.server_cmd(args, "fp8", 1))


def test_full_sweep_writes_results_and_stops_servers(tmp_path, capsys):
    a, pidfile = argv(tmp_path)
    os.environ["FAKE_BENCH_ARGV"] = str(tmp_path / "client-argv")
    try:
        rc = serve.main(a)
    finally:
        del os.environ["FAKE_BENCH_ARGV"]
    assert rc == 0
    out = tmp_path / "out"
    res = json.loads((out / "results.json").read_text())
    pts = res["points"]
    assert len(pts) == 4 * 3 and not any(p["error"] for p in pts)
    by = {(p["mode"], p["scenario"], p["concurrency"]): p for p in pts}
    # The fake client's throughput encodes which server answered.
    assert by[("bf16", "s", 4)]["output_tok_s"] == 40.0
    assert by[("fp8", "s", 4)]["output_tok_s"] == 60.0
    assert by[("int4", "s", 4)]["output_tok_s"] == 80.0
    assert by[("int4", "s", 2)]["num_prompts"] == 4 and by[("bf16", "l", 1)]["num_prompts"] == 1
    assert by[("bf16", "s", 2)]["kv_tokens"] == 50000 and by[("int4", "s", 2)]["kv_tokens"] == 200000
    assert by[("bf16", "s", 2)]["completed"] == 4
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == len(pts) and set(serve.CSV_FIELDS) <= set(rows[0])
    assert (out / "throughput.png").stat().st_size > 1000
    assert len(res["servers"]) == 4 and all(s["kv_tokens"] for s in res["servers"].values())
    printed = capsys.readouterr().out
    assert "2.00x" in printed and "1.00x" in printed  # int4/bf16, int4/naive
    assert "server start to ready: " in printed and all(f"{m} " in printed.split("ready: ")[1]
                                                         for m in res["servers"])
    calls = [json.loads(x) for x in (tmp_path / "client-argv").read_text().splitlines()]
    assert len(calls) == 12
    c0 = " ".join(calls[0])
    for part in ("--dataset-name random-ids", "--random-range-ratio 1", "--random-input-len 16",
                 "--random-output-len 8", "--num-prompts 4", "--max-concurrency 2", "--backend sglang",
                 "--warmup-requests 2"):
        assert part in c0
    assert len(pids(pidfile)) == 8  # 4 servers, each with a child
    assert_all_gone(pidfile)


def test_failed_start_is_recorded_and_other_modes_run(tmp_path):
    a, pidfile = argv(tmp_path, server_env="FAKE_MODE=exit", modes="bf16,int4")
    rc = serve.main(a)
    assert rc == 1
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    saw = [p for p in res["points"] if p["mode"] == "int4"]
    bf = [p for p in res["points"] if p["mode"] == "bf16"]
    log = tmp_path / "out" / "server-int4.log"
    assert len(saw) == 3 and all(p["error"] == f"server failed to start (log {log})" for p in saw)
    assert all(p["output_tok_s"] for p in bf)
    assert "exited with code 3" in res["servers"]["int4"]["error"]
    assert_all_gone(pidfile)


def test_no_server_starts_log_shown_and_no_plot(tmp_path, capsys):
    a, pidfile = argv(tmp_path, server_env="FAKE_MODE=exit", modes="int4")
    assert serve.main(a) == 1
    err = capsys.readouterr().err
    log = tmp_path / "out" / "server-int4.log"
    assert f"log {log}" in err and "fake server: failing on purpose" in err  # path and tail
    assert not (tmp_path / "out" / "throughput.png").exists()  # nothing measured, no empty plot
    assert_all_gone(pidfile)


def test_never_healthy_times_out_and_is_killed(tmp_path):
    a, pidfile = argv(tmp_path, "--start-timeout", "2", server_env="FAKE_MODE=never_healthy",
                      modes="int4")
    t0 = time.monotonic()
    assert serve.main(a) == 1
    assert time.monotonic() - t0 < 30
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "not healthy after 2 s" in res["servers"]["int4"]["error"]
    assert_all_gone(pidfile)


def test_failed_and_hung_bench_points(tmp_path):
    a, pidfile = argv(tmp_path, "--point-timeout", "3", modes="bf16", scenario=("s:16:8:2,4,8:1",))
    os.environ.update(FAKE_BENCH_FAIL_AT="4", FAKE_BENCH_HANG_AT="8")
    try:
        assert serve.main(a) == 1
    finally:
        del os.environ["FAKE_BENCH_FAIL_AT"], os.environ["FAKE_BENCH_HANG_AT"]
    pts = {p["concurrency"]: p for p in json.loads((tmp_path / "out" / "results.json").read_text())["points"]}
    assert pts[2]["output_tok_s"] == 20.0
    assert pts[4]["error"] == "bench client exited 1"
    assert "timed out after 3 s" in pts[8]["error"]
    assert_all_gone(pidfile)
    assert not [ln for ln in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True)
                .stdout.splitlines() if "fake_bench_client" in ln and "--max-concurrency 8" in ln]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_sweep_stops_server(tmp_path, sig):
    a, pidfile = argv(tmp_path, modes="bf16,int4", scenario=("s:16:8:2,4:1",))
    started = tmp_path / "client-argv"  # the fake client writes its argv, then hangs at c=4
    env = dict(os.environ, FAKE_BENCH_HANG_AT="4", FAKE_BENCH_ARGV=str(started))
    # SIGINT back to its default in the child: a suite started in the background (`make
    # test &`) inherits it ignored, and Python then never raises KeyboardInterrupt.
    proc = subprocess.Popen([sys.executable, "-m", "saw_sglang.bench", "serve", *a], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60

    def hanging():
        return started.exists() and '"--max-concurrency", "4"' in started.read_text()
    while time.monotonic() < deadline and not hanging():
        time.sleep(0.2)
    assert hanging(), "sweep never reached the hanging point"
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == (130 if sig == signal.SIGINT else 128 + sig), out
    assert_all_gone(pidfile)
    assert len(pids(pidfile)) == 2  # the second mode never started
    pts = json.loads((tmp_path / "out" / "results.json").read_text())["points"]
    assert [p["concurrency"] for p in pts] == [2]


def test_managed_server_escalates_to_sigkill(tmp_path):
    pidfile = tmp_path / "pids"
    port = reserve_port()
    env = dict(os.environ, FAKE_PIDFILE=str(pidfile), FAKE_IGNORE_SIGTERM="1")
    srv = ManagedServer([sys.executable, str(FAKES / "fake_sglang_server.py"), "--port", str(port)],
                        "127.0.0.1", port, str(tmp_path / "log"), env=env, stop_grace_s=1.0)
    with srv:
        assert srv.server_info()["max_total_num_tokens"] == 90000
    assert_all_gone(pidfile)


def test_managed_server_exception_inside_context(tmp_path):
    pidfile = tmp_path / "pids"
    port = reserve_port()
    env = dict(os.environ, FAKE_PIDFILE=str(pidfile))
    with pytest.raises(ZeroDivisionError):
        with ManagedServer([sys.executable, str(FAKES / "fake_sglang_server.py"), "--port", str(port)],
                           "127.0.0.1", port, str(tmp_path / "log"), env=env):
            1 / 0
    assert_all_gone(pidfile)


def test_start_failure_raises_with_log_tail(tmp_path):
    port = reserve_port()
    env = dict(os.environ, FAKE_MODE="exit")
    srv = ManagedServer([sys.executable, str(FAKES / "fake_sglang_server.py"), "--port", str(port)],
                        "127.0.0.1", port, str(tmp_path / "log"), env=env)
    with pytest.raises(ServerStartError, match="failing on purpose"):
        with srv:
            pass
    assert not srv.alive()


def test_dispatcher_help_and_unknown():
    from saw_sglang.bench.__main__ import main
    assert main(["--help"]) == 0
    assert main(["nope"]) == 2


def profile_argv(tmp_path, *extra, scenario=("s:16:16:4:1",), server_env=""):
    """Both launchers slow enough (50 ms a token) that the client's requests are seen running."""
    pidfile = tmp_path / "pids"
    env = f"env FAKE_PIDFILE={pidfile} FAKE_TOKEN_S=0.05 FAKE_PROFILE_LOG={tmp_path / 'prof.log'} {server_env}"
    a = ["--model-path", "/nonexistent/model", "--out", str(tmp_path / "out"), "--modes", "bf16,int4",
         "--stock-launcher", f"{env} {FAKE_SERVER}", "--saw-launcher", f"{env} {FAKE_SERVER}",
         "--bench-cmd", FAKE_CLIENT, "--start-timeout", "20", "--profile"]
    for s in scenario:
        a += ["--scenario", s]
    return a + list(extra), pidfile


def test_profile_captures_steps_at_steady_traffic(tmp_path, capsys, monkeypatch):
    from synthetic_trace import STEP_KERNELS, step_us
    monkeypatch.setenv("FAKE_BENCH_GENERATE", "1")
    a, pidfile = profile_argv(tmp_path, "--profile-steps", "5")
    assert serve.main(a) == 0
    out = tmp_path / "out"
    pts = {p["mode"]: p for p in json.loads((out / "results.json").read_text())["points"]}
    attn_bf16 = sum(d for _, d, c in STEP_KERNELS if c == "attn_decode") / 1000.0
    for mode, attn in (("bf16", attn_bf16), ("int4", attn_bf16 / 2)):  # fake INT4: half the time
        prof = pts[mode]["profile"]
        assert prof["error"] is None and prof["running_reqs"] == 4
        b = prof["breakdown"]
        assert (b["steps"], b["steps_source"]) == (5.0, "requested")
        assert b["ms"]["attn_decode"] == pytest.approx(attn)
        assert b["kernel_ms"] == pytest.approx(step_us() / 1000.0 - attn_bf16 + attn)
        assert Path(prof["dir"]) == out / "profile" / f"{mode}-s-c4"
    rows = {r["mode"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert float(rows["int4"]["profile_attn_decode_ms"]) == pytest.approx(attn_bf16 / 2)
    assert rows["bf16"]["profile_steps"] == "5.0"
    assert (out / "profile.png").stat().st_size > 1000
    reqs = [json.loads(x) for x in (tmp_path / "prof.log").read_text().splitlines()]
    assert len(reqs) == 2
    assert reqs[0]["output_dir"] == str(out / "profile" / "bf16-s-c4") and reqs[0]["num_steps"] == 5
    assert reqs[0]["with_stack"] is False and reqs[0]["record_shapes"] is False
    printed = capsys.readouterr().out
    assert "| bf16 | s c4 | 5 | " in printed and "_decode_split_kernel" in printed
    assert_all_gone(pidfile)


def test_profile_cut_short_and_selected_points(tmp_path, monkeypatch):
    # The profile never ends by itself: /stop_profile cuts it at 3 steps, counted from the
    # trace's CUDA-graph launches. Only s:4 is profiled; s:2 is not.
    monkeypatch.setenv("FAKE_BENCH_GENERATE", "1")
    a, pidfile = profile_argv(tmp_path, "--modes", "bf16", "--profile-points", "s:4",
                              scenario=("s:16:16:2,4:1",),
                              server_env="FAKE_PROFILE_S=never FAKE_PARTIAL_STEPS=3")
    assert serve.main(a) == 0
    pts = {p["concurrency"]: p for p in json.loads((tmp_path / "out" / "results.json").read_text())["points"]}
    assert pts[2]["profile"] is None
    b = pts[4]["profile"]["breakdown"]
    assert (b["steps"], b["steps_source"], b["graph_launches"]) == (3.0, "graph launches", 3)
    meta = json.loads((tmp_path / "out" / "profile" / "bf16-s-c4" / "profile-meta.json").read_text())
    assert meta["complete"] is False
    assert_all_gone(pidfile)


def test_profile_without_traffic_records_why(tmp_path):
    # The default fake client sends no requests: nothing ever runs, so no capture starts.
    a, pidfile = profile_argv(tmp_path, "--modes", "bf16", scenario=("s:16:8:2:1",))
    assert serve.main(a) == 0  # a missed profile is reported, the point itself succeeded
    pt = json.loads((tmp_path / "out" / "results.json").read_text())["points"][0]
    assert pt["output_tok_s"] == 20.0
    assert pt["profile"]["error"] == "traffic ended before steady state"
    assert not (tmp_path / "prof.log").exists()
    assert_all_gone(pidfile)


def test_profile_points_must_name_planned_points():
    args = serve.build_parser().parse_args(["--model-path", "m", "--budget", "--profile",
                                            "--profile-points", "long:64,short:99"])
    with pytest.raises(SystemExit, match="short:99"):
        serve.plan(args)
    args.profile_points = "long:64"
    todo = serve.plan(args)
    assert [(m, sc.name, c) for m, sc, c in todo if serve.profiled(args, sc, c)] == \
        [(m, "long", 64) for m in serve.MODES]


def test_warmup_requests_follow_concurrency_unless_disabled_or_given():
    short, long = serve.Scenario("s", 256, 1024, [32]), serve.Scenario("l", 16384, 1024, [64])
    a = serve.build_parser().parse_args(["--model-path", "m"])
    assert serve.warmup_args(a, short, 16) == ["--warmup-requests", "16"]
    assert serve.warmup_args(a, short, 128) == ["--warmup-requests", "32"]  # 32 x 256 = 8192
    assert serve.warmup_args(a, long, 64) == ["--warmup-requests", "1"]
    a = serve.build_parser().parse_args(["--model-path", "m", "--no-warmup"])
    assert serve.warmup_args(a, short, 64) == []
    a = serve.build_parser().parse_args(["--model-path", "m", "--bench-args", "--warmup-requests 3"])
    assert serve.warmup_args(a, short, 64) == []


def test_startup_line_puts_each_mode_beside_the_first():
    line = serve.startup_line({"bf16": {"start_s": 40.0}, "int4": {"start_s": 50.0},
                               "fp8": {"error": "server failed to start"}})
    assert line == "server start to ready: bf16 40.0 s, int4 50.0 s (1.25x)"
