"""A server process that never outlives its owner.

The server runs in its own process group (SGLang spawns scheduler and
detokenizer children); stopping it signals the whole group, first SIGTERM,
then SIGKILL. Every started server is also registered for atexit and for
SIGTERM/SIGHUP, so a crash, Ctrl-C or a kill of this process still cleans up.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from typing import Optional, Sequence

_LIVE: "set[ManagedServer]" = set()
_HANDLERS_INSTALLED = False


class ServerStartError(RuntimeError):
    """The server exited or never became healthy."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def http_json(url: str, payload=None, timeout: float = 10.0, method: Optional[str] = None,
              headers: Optional[dict] = None, context=None):
    """GET (or POST a JSON payload) and return (status, parsed body or text).
    `context`: an ssl.SSLContext for https URLs."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as r:
            status, body = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    text = body.decode(errors="replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def kill_group(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM the process group, wait up to grace_s, then SIGKILL what is left."""
    pgid = proc.pid  # start_new_session: the leader's pid is the group id
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader so it does not linger as a zombie
            if proc.returncode is not None and not _group_alive(pgid):
                return
            time.sleep(0.05)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _cleanup_all() -> None:
    for srv in list(_LIVE):
        srv.stop()


def _on_signal(signum, frame):
    # Turn SIGTERM/SIGHUP into an exception so `finally` blocks and context
    # managers run; atexit then catches anything still registered.
    _cleanup_all()
    raise SystemExit(128 + signum)


def install_cleanup_handlers() -> None:
    global _HANDLERS_INSTALLED
    if _HANDLERS_INSTALLED:
        return
    atexit.register(_cleanup_all)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            signal.signal(sig, _on_signal)
        except ValueError:  # not the main thread
            pass
    _HANDLERS_INSTALLED = True


class ManagedServer:
    """Start `cmd` (which must listen on host:port), wait for /health, stop it."""

    def __init__(self, cmd: Sequence[str], host: str, port: int, log_path: str,
                 env: Optional[dict] = None, start_timeout_s: float = 900.0,
                 stop_grace_s: float = 20.0):
        self.cmd = list(cmd)
        self.host, self.port = host, port
        self.log_path = log_path
        self.env = env
        self.start_timeout_s = start_timeout_s
        self.stop_grace_s = stop_grace_s
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "ManagedServer":
        if self.proc is not None:
            raise RuntimeError("ManagedServer.start() called twice")
        install_cleanup_handlers()
        os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env,
                                         start_new_session=True)
        finally:
            log.close()
        _LIVE.add(self)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def wait_healthy(self, poll_s: float = 1.0) -> float:
        """Block until GET /health answers 200; return seconds waited."""
        t0 = time.monotonic()
        while True:
            if not self.alive():
                rc = self.proc.returncode if self.proc else None
                raise ServerStartError(f"server exited with code {rc} before it was healthy; "
                                       f"log {self.log_path}:\n{self.log_tail()}")
            try:
                status, _ = http_json(self.url + "/health", timeout=5.0)
                if status == 200:
                    return time.monotonic() - t0
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() - t0 > self.start_timeout_s:
                raise ServerStartError(f"server not healthy after {self.start_timeout_s:.0f} s; "
                                       f"log {self.log_path}:\n{self.log_tail()}")
            time.sleep(poll_s)

    def server_info(self) -> dict:
        status, body = http_json(self.url + "/get_server_info", timeout=30.0)
        if status != 200 or not isinstance(body, dict):
            raise RuntimeError(f"/get_server_info answered {status}: {str(body)[:200]}")
        return body

    def stop(self) -> None:
        if self.proc is not None:
            kill_group(self.proc, self.stop_grace_s)
        _LIVE.discard(self)

    def __enter__(self) -> "ManagedServer":
        self.start()
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def kv_capacity(info: dict) -> Optional[int]:
    """max_total_num_tokens from /get_server_info (top level or per-DP states)."""
    if "max_total_num_tokens" in info:
        return int(info["max_total_num_tokens"])
    for st in info.get("internal_states") or []:
        if isinstance(st, dict) and "max_total_num_tokens" in st:
            return int(st["max_total_num_tokens"])
    return None
