"""The image's entry point (saw_sglang.deploy.entrypoint): `docker run IMAGE ARGS` keeps
the launcher's defaults (--host 0.0.0.0, --port 30000, --kv-cache-dtype int4) and lets
ARGS add to them or override them one by one; checked on docker-run-style argument
lists, by the merge itself and by SGLang's own parser on the merged command line."""

import argparse
import json
import os
import stat
import subprocess
import sys

import pytest

from saw_sglang.deploy import entrypoint as ep
from saw_sglang.patches import apply_all

apply_all()

from sglang.srt.server_args import ServerArgs  # noqa: E402
from sglang.srt.server_args_config_parser import ConfigArgumentMerger  # noqa: E402

DEFAULTS = ["--host", "0.0.0.0", "--port", "30000", "--kv-cache-dtype", "int4"]


def sglang_parse(argv):
    """What `python -m saw_sglang.launch_server ARGV` parses ARGV into (SGLang's parser
    with our flags, --config merged as SGLang merges it)."""
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    if "--config" in argv:
        argv = ConfigArgumentMerger(parser).merge_config_with_args(argv)
    return parser.parse_args(argv)


# (docker run arguments, the launcher's arguments, what the server then uses)
CASES = [
    (["--model-path", "Qwen/Qwen3-8B"],
     DEFAULTS + ["--model-path", "Qwen/Qwen3-8B"],
     dict(host="0.0.0.0", port=30000, kv_cache_dtype="int4")),
    (["--model-path", "X", "--kv-cache-dtype", "bf16"],
     ["--host", "0.0.0.0", "--port", "30000", "--model-path", "X", "--kv-cache-dtype", "bf16"],
     dict(host="0.0.0.0", port=30000, kv_cache_dtype="bf16")),
    (["--model-path=X", "--port=8000"],
     ["--host", "0.0.0.0", "--kv-cache-dtype", "int4", "--model-path=X", "--port=8000"],
     dict(host="0.0.0.0", port=8000, kv_cache_dtype="int4")),
    (["--model", "X", "--host", "127.0.0.1", "--port", "1234", "--kv-cache-dtype=fp8_e4m3"],
     ["--model", "X", "--host", "127.0.0.1", "--port", "1234", "--kv-cache-dtype=fp8_e4m3"],
     dict(host="127.0.0.1", port=1234, kv_cache_dtype="fp8_e4m3")),
    (["--model-path", "X", "--saw-rotation", "none", "--tp", "2", "--enable-metrics"],
     DEFAULTS + ["--model-path", "X", "--saw-rotation", "none", "--tp", "2", "--enable-metrics"],
     dict(host="0.0.0.0", port=30000, kv_cache_dtype="int4", saw_rotation="none", tp_size=2)),
    # A spelling the merge does not know (an abbreviation) still wins: it comes last.
    (["--model-path", "X", "--kv-cache-dt", "bf16"],
     DEFAULTS + ["--model-path", "X", "--kv-cache-dt", "bf16"],
     dict(kv_cache_dtype="bf16", port=30000)),
]


@pytest.mark.parametrize("args, launcher, parsed", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_docker_run_args_add_to_or_override_the_defaults(args, launcher, parsed):
    assert ep.server_args(args) == launcher
    ns = sglang_parse(ep.server_args(args))
    assert {k: getattr(ns, k) for k in parsed} == parsed


def test_without_the_entry_point_the_defaults_would_be_lost():
    """The bug this fixes: ARGS replacing the whole command leave SGLang's own defaults
    (localhost, auto KV cache). The parse check above can tell the two apart."""
    ns = sglang_parse(["--model-path", "X"])
    assert (ns.host, ns.kv_cache_dtype) == ("127.0.0.1", "auto")


def test_config_file_options_count_as_given(tmp_path):
    """SGLang ranks --config below the command line: a default left on the command line
    would silently override the file."""
    cfg = tmp_path / "server.yaml"
    cfg.write_text("model-path: X\nport: 8000\nkv-cache-dtype: bf16\n")
    args = ["--config", str(cfg)]
    assert ep.server_args(args) == ["--host", "0.0.0.0", *args]
    ns = sglang_parse(ep.server_args(args))
    assert (ns.host, ns.port, ns.kv_cache_dtype, ns.model_path) == ("0.0.0.0", 8000, "bf16", "X")
    assert ep.option_value(ep.server_args(args), "--port") == "8000"


@pytest.mark.parametrize("content", [None, "port: [8000\n", "- a list\n", "\xff\xfe"])
def test_unreadable_config_is_left_to_sglang(tmp_path, content):
    cfg = tmp_path / "server.yaml"
    if content is not None:
        cfg.write_bytes(content.encode("latin-1"))
    args = ["--config", str(cfg)]
    assert ep.server_args(args) == DEFAULTS + args


@pytest.mark.parametrize("args, url", [
    (DEFAULTS, "http://127.0.0.1:30000"),
    (DEFAULTS + ["--port=8001"], "http://127.0.0.1:8001"),
    (["--host", "::", "--port", "9"], "http://[::1]:9"),
    (["--host", "10.1.2.3", "--ssl-certfile", "/c.pem"], "https://10.1.2.3:30000"),
])
def test_server_url_is_where_the_container_reaches_the_server(args, url):
    assert ep.server_url(args) == url


def test_main_execs_the_launcher_and_leaves_state_for_the_check(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setenv(ep.STATE_DIR_ENV, str(tmp_path / "state"))
    monkeypatch.setattr(os, "execv", lambda path, argv: calls.append((path, argv)))
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "warm").write_text("from the previous start\n")
    ep.main(["--model-path", "X", "--api-key", "k", "--port", "8000"])
    (path, argv), = calls
    assert path == sys.executable
    assert argv == [sys.executable, "-m", "saw_sglang.launch_server", "--host", "0.0.0.0",
                    "--kv-cache-dtype", "int4", "--model-path", "X", "--api-key", "k",
                    "--port", "8000"]
    state_file = tmp_path / "state" / "server.json"
    assert json.loads(state_file.read_text()) == {"url": "http://127.0.0.1:8000", "api_key": "k"}
    assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
    assert not (tmp_path / "state" / "warm").exists(), "a new start is not warm yet"


def test_main_still_starts_when_state_cannot_be_written(tmp_path, monkeypatch, capsys):
    calls = []
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv(ep.STATE_DIR_ENV, str(blocker / "state"))
    monkeypatch.setattr(os, "execv", lambda path, argv: calls.append(argv))
    ep.main(["--model-path", "X"])
    assert len(calls) == 1 and "not written" in capsys.readouterr().err


def test_no_arguments_is_a_one_line_error_naming_the_fix():
    with pytest.raises(SystemExit) as e:
        ep.main([])
    assert "--model-path" in str(e.value.code) and "\n" not in str(e.value.code)


def test_a_command_instead_of_options_runs_as_is(tmp_path):
    """`docker run IMAGE python -c ...` (or bash) runs that command, not the server."""
    out = subprocess.run(
        [sys.executable, "-m", "saw_sglang.deploy.entrypoint", sys.executable, "-c",
         "import sys; print(sys.argv[1:])", "--kv-cache-dtype", "bf16"],
        capture_output=True, text=True, env={**os.environ, ep.STATE_DIR_ENV: str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['--kv-cache-dtype', 'bf16']"
    assert not (tmp_path / "server.json").exists()
    missing = subprocess.run([sys.executable, "-m", "saw_sglang.deploy.entrypoint",
                              "no-such-command-here"], capture_output=True, text=True)
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        "saw-sglang: cannot run 'no-such-command-here': No such file or directory"]
