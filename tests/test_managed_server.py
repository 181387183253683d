"""The server harness fails fast and gives servers ports nobody else takes
(saw_sglang/bench/server.py), against the fake SGLang server (tests/fakes/).

Each failure test allows a long start timeout: a harness that missed the dead process
or the fatal line would end in "not healthy after ..." instead of naming the cause.
"""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from saw_sglang.bench import server as S
from test_bench_serve import assert_all_gone

FAKE = Path(__file__).parent / "fakes" / "fake_sglang_server.py"


def fake(tmp_path, name, mode="ok", start_timeout_s=300.0, **env):
    port = S.reserve_port()
    env = dict(os.environ, FAKE_MODE=mode, FAKE_PIDFILE=str(tmp_path / f"{name}.pids"),
               **{k: str(v) for k, v in env.items()})
    return S.ManagedServer([sys.executable, str(FAKE), "--port", str(port)], "127.0.0.1", port,
                           str(tmp_path / f"{name}.log"), env=env, start_timeout_s=start_timeout_s,
                           stop_grace_s=2.0)


def free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def test_dead_process_fails_with_the_log_path_and_tail(tmp_path):
    srv = fake(tmp_path, "dies", "exit", FAKE_STARTUP_S=1)
    with pytest.raises(S.ServerStartError) as e:
        with srv:
            pass
    msg = str(e.value)
    assert msg.splitlines()[0].startswith("server dies exited with code 3")
    assert srv.log_path in msg.splitlines()[0]
    assert "failing on purpose" in msg and "not healthy after" not in msg
    assert_all_gone(tmp_path / "dies.pids")


def test_fatal_log_line_fails_while_the_process_lives(tmp_path):
    # uvicorn's bind failed, the scheduler lives on: only the log tells.
    srv = fake(tmp_path, "bind", "bind_failed", FAKE_STARTUP_S=1)
    srv.start()
    try:
        with pytest.raises(S.ServerStartError) as e:
            srv.wait_healthy(poll_s=0.2)
        assert srv.alive()  # it was the log line, not the exit, that ended the wait
    finally:
        srv.stop()
    first = str(e.value).splitlines()[0]
    assert "logged a fatal error while starting" in first and "address already in use" in first
    assert srv.log_path in first and "loading model" in str(e.value)
    assert_all_gone(tmp_path / "bind.pids")


def test_hung_server_times_out_with_the_log(tmp_path):
    srv = fake(tmp_path, "hang", "hang", start_timeout_s=2)
    with pytest.raises(S.ServerStartError, match="server hang not healthy after 2 s") as e:
        with srv:
            pass
    assert srv.log_path in str(e.value) and "loading model" in str(e.value)
    assert_all_gone(tmp_path / "hang.pids")


def test_an_earlier_run_in_the_same_log_is_not_read(tmp_path):
    srv = fake(tmp_path, "again")
    Path(srv.log_path).write_text("old run: address already in use\nold tail\n")
    with srv:
        assert "old" not in srv.log_tail() and "fake server on" in srv.log_tail()
    assert_all_gone(tmp_path / "again.pids")


def test_wait_all_healthy_stops_every_server_at_the_first_failure(tmp_path):
    slow = fake(tmp_path, "slow", FAKE_STARTUP_S=600)  # /health: 503 for 10 minutes
    ok = fake(tmp_path, "ok")
    bad = fake(tmp_path, "bad", "bind_failed")
    servers = {"slow": slow.start(), "ok": ok.start(), "bad": bad.start()}
    try:
        with pytest.raises(S.ServerStartError, match="server bad logged a fatal error"):
            S.wait_all_healthy(servers)
        assert not any(s.alive() for s in servers.values())
    finally:
        for s in servers.values():
            s.stop()
    for name in servers:
        assert_all_gone(tmp_path / f"{name}.pids")


def test_servers_started_together_all_come_up(tmp_path):
    servers = {f"s{i}": fake(tmp_path, f"s{i}").start() for i in range(4)}
    try:
        waits = S.wait_all_healthy(servers)
        assert set(waits) == set(servers)
        assert not set(S._HELD) & {s.port for s in servers.values()}  # released once serving
    finally:
        for s in servers.values():
            s.stop()


def test_reserved_ports_lie_outside_the_ephemeral_range_in_disjoint_blocks():
    lo, hi = S._ephemeral_range()
    ports = [S.reserve_port() for _ in range(8)]
    try:
        assert len(set(ports)) == 8
        for p in ports:
            assert (p - S.PORT_FLOOR) % S.PORT_STRIDE == 0
            assert p + S.PORT_STRIDE <= lo or p > hi  # bind(0) and connect() never pick them
            # held: a plain bind (another reservation, any process) is refused
            with socket.socket() as s, pytest.raises(OSError):
                s.bind(("127.0.0.1", p))
    finally:
        for p in ports:
            S.release_port(p)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[0]))  # released


def test_another_process_skips_a_held_port_and_the_server_still_binds_it(tmp_path):
    held = S.reserve_port()
    spare = next(p for p in S.port_blocks() if p != held and free(p))
    code = textwrap.dedent(f"""
        from saw_sglang.bench import server as S
        S.port_blocks = lambda: [{held}, {spare}]
        print(S.reserve_port())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == spare
    env = dict(os.environ, FAKE_PIDFILE=str(tmp_path / "held.pids"))
    with S.ManagedServer([sys.executable, str(FAKE), "--port", str(held)], "127.0.0.1", held,
                         str(tmp_path / "held.log"), env=env, start_timeout_s=60) as srv:
        assert srv.server_info()["version"] == "fake"
        assert held not in S._HELD
    assert_all_gone(tmp_path / "held.pids")


def test_e2e_script_servers_fail_fast_too(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent / "gpu"))
    import e2e_serve

    cmd = [sys.executable, str(FAKE)]
    with e2e_serve.Server("ok", cmd, tmp_path, S.reserve_port(), 60) as srv:
        assert srv.info()["version"] == "fake"
    os.environ["FAKE_MODE"] = "bind_failed"
    try:
        with pytest.raises(S.ServerStartError, match="server bad logged a fatal error"):
            with e2e_serve.Server("bad", cmd, tmp_path, S.reserve_port(), 300):
                pass
    finally:
        del os.environ["FAKE_MODE"]
