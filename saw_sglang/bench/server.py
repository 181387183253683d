"""A server process that never outlives its owner, fails fast, and gets a port no
other server takes.

The server runs in its own process group (SGLang spawns scheduler and
detokenizer children); stopping it signals the whole group, first SIGTERM,
then SIGKILL. Every started server is also registered for atexit and for
SIGTERM/SIGHUP, so a crash, Ctrl-C or a kill of this process still cleans up.

While it starts, a dead process or a fatal line in its log (FATAL_LINES) ends the
wait within a poll or two, with the log's path and tail; a server whose HTTP bind
failed can keep its scheduler alive and never answer, so the log is the only sign.

Ports (reserve_port): SGLang 0.5.17 without DP attention uses IPC sockets between
its processes and takes its TCP ports (NCCL's, torch.distributed's, Gloo's) from the
kernel's ephemeral range, so a port picked there, as `bind(0)` picks, can be taken
by another server's scheduler before this server binds it, minutes later. So server
ports come from below (or above) the ephemeral range, on a grid of PORT_STRIDE, which
also keeps SGLang's ports derived from --port (+1 for the gRPC sidecar, +13 and
+233.. with DP attention) inside the server's own block; and each is held (bound,
not listening, SO_REUSEADDR) until its server answers, so that no other reservation,
in this process or another, takes it meanwhile, while the server itself can bind it.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Dict, Optional, Sequence

_LIVE: "set[ManagedServer]" = set()
_HANDLERS_INSTALLED = False

# Lower-case fragments of log lines after which an SGLang server never becomes healthy.
FATAL_LINES = (
    "already in use",  # uvicorn's failed HTTP bind ("address already in use"), SGLang's port checks
    "hit an exception",  # a Scheduler / TokenizerManager / DetokenizerManager died
    "received sigquit from a child process",  # the launcher saw a child die
)
PORT_STRIDE = 256
PORT_FLOOR = 10240
_HELD: Dict[int, socket.socket] = {}


class ServerStartError(RuntimeError):
    """The server exited, logged a fatal line, or never became healthy."""


def _ephemeral_range() -> tuple:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = map(int, f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def port_blocks() -> list:
    """First ports of the PORT_STRIDE-wide blocks outside the ephemeral range."""
    lo, hi = _ephemeral_range()
    return [p for p in range(PORT_FLOOR, 65536 - PORT_STRIDE, PORT_STRIDE)
            if p + PORT_STRIDE <= lo or p > hi]


def _hold(host: str, port: int) -> Optional[socket.socket]:
    """Bind `port` without SO_REUSEADDR (fails if anyone holds or serves it), then set
    SO_REUSEADDR so that the server's own bind (uvicorn's sets it too) succeeds."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        return sock
    except OSError:
        sock.close()
        return None


def reserve_port(host: str = "127.0.0.1", below: Optional[int] = None) -> int:
    """A --port for one server, held until release_port(port) (ManagedServer releases
    it once the server is healthy, or stopped). below: the block ends under this port
    (sgl.Runtime looks for a free port only up to 40000)."""
    blocks = [p for p in port_blocks() if below is None or p + PORT_STRIDE <= below]
    random.shuffle(blocks)
    for port in blocks:
        if port not in _HELD:
            sock = _hold(host, port)
            if sock is not None:
                _HELD[port] = sock
                return port
    raise RuntimeError(f"no free port on {host} in {len(blocks)} blocks outside the ephemeral range")


def release_port(port: int) -> None:
    sock = _HELD.pop(port, None)
    if sock is not None:
        sock.close()


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
                 stop_grace_s: float = 20.0, name: Optional[str] = None):
        self.cmd = list(cmd)
        self.host, self.port = host, port
        self.log_path = log_path
        self.env = env
        self.start_timeout_s = start_timeout_s
        self.stop_grace_s = stop_grace_s
        self.name = name or os.path.splitext(os.path.basename(log_path))[0]
        self.proc: Optional[subprocess.Popen] = None
        self._log_start = self._scanned = 0  # this run's part of an appended log

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "ManagedServer":
        if self.proc is not None:
            raise RuntimeError("ManagedServer.start() called twice")
        install_cleanup_handlers()
        os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        log = open(self.log_path, "ab")
        self._log_start = self._scanned = log.tell()
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

    def _read_log(self, start: int) -> bytes:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(start)
                return f.read()
        except OSError:
            return b""

    def log_tail(self, n: int = 40) -> str:
        lines = self._read_log(self._log_start).decode(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def fatal_line(self) -> Optional[str]:
        """The first complete log line since the last call that names a fatal error."""
        new = self._read_log(self._scanned)
        end = new.rfind(b"\n") + 1
        self._scanned += end
        for line in new[:end].decode(errors="replace").splitlines():
            if any(f in line.lower() for f in FATAL_LINES):
                return line.strip()
        return None

    def _start_error(self, what: str) -> ServerStartError:
        return ServerStartError(f"server {self.name} {what}; log {self.log_path}, its last "
                                f"lines:\n{self.log_tail()}")

    def wait_healthy(self, poll_s: float = 1.0) -> float:
        """Block until GET /health answers 200; return seconds waited. Raises
        ServerStartError as soon as the process dies or its log shows a fatal line."""
        t0 = time.monotonic()
        while True:
            if not self.alive():
                rc = self.proc.returncode if self.proc else None
                raise self._start_error(f"exited with code {rc} before it was healthy")
            fatal = self.fatal_line()
            if fatal:
                raise self._start_error(f"logged a fatal error while starting: {fatal[:300]!r}")
            try:
                status, _ = http_json(self.url + "/health", timeout=5.0)
                if status == 200:
                    release_port(self.port)  # the server holds it now
                    return time.monotonic() - t0
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() - t0 > self.start_timeout_s:
                raise self._start_error(f"not healthy after {self.start_timeout_s:.0f} s")
            time.sleep(poll_s)

    def server_info(self) -> dict:
        status, body = http_json(self.url + "/get_server_info", timeout=30.0)
        if status != 200 or not isinstance(body, dict):
            raise RuntimeError(f"/get_server_info answered {status}: {str(body)[:200]}")
        return body

    def stop(self) -> None:
        if self.proc is not None:
            kill_group(self.proc, self.stop_grace_s)
        release_port(self.port)
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


def wait_all_healthy(servers: Dict[str, ManagedServer]) -> Dict[str, float]:
    """Wait for started servers at once: {name: seconds}. The first that fails stops
    them all (the others' waits then end at once) and its error is raised."""
    with ThreadPoolExecutor(max(1, len(servers))) as pool:
        futs = {pool.submit(srv.wait_healthy): name for name, srv in servers.items()}
        try:
            for fut in as_completed(futs):
                fut.result()
        except BaseException:
            for srv in servers.values():
                srv.stop()
            raise
    return {name: fut.result() for fut, name in futs.items()}


def kv_capacity(info: dict) -> Optional[int]:
    """max_total_num_tokens from /get_server_info (top level or per-DP states)."""
    if "max_total_num_tokens" in info:
        return int(info["max_total_num_tokens"])
    for st in info.get("internal_states") or []:
        if isinstance(st, dict) and "max_total_num_tokens" in st:
            return int(st["max_total_num_tokens"])
    return None
