"""Capture N scheduler steps of a loaded SGLang server with its own torch profiler.

While the bench client runs, a thread polls /v1/loads until the traffic is in
steady decode (all `want` requests running, or the running count unchanged for
`settle_s`: a KV pool too small for all of them), then POSTs /start_profile with
num_steps=N. The scheduler profiles its next N forward batches, stops by itself
and writes one Chrome trace per TP rank into output_dir. After the client ends,
/stop_profile is sent: the scheduler answers it only between batches, so by then
the traces are complete; a 200 answer means the N steps were not reached and the
profile was cut short (the step count then comes from the traces' CUDA-graph
launches, see profile.resolve_steps).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from typing import Callable, Optional, Tuple

from saw_sglang.bench import profile
from saw_sglang.bench.server import http_json

POLL_S = 0.2


def running_reqs(url: str) -> Tuple[int, int]:
    """(running, waiting) requests summed over the DP ranks of /v1/loads."""
    status, body = http_json(url + "/v1/loads?include=core", timeout=10.0)
    if status != 200 or not isinstance(body, dict):
        raise RuntimeError(f"/v1/loads answered {status}")
    loads = body.get("loads") or []
    return (sum(int(x.get("num_running_reqs", 0)) for x in loads),
            sum(int(x.get("num_waiting_reqs", 0)) for x in loads))


def wait_steady(get_running: Callable[[], int], want: int, settle_s: float, stop: threading.Event,
                poll_s: float = POLL_S, clock=time.monotonic) -> Optional[int]:
    """Running count once it reaches `want` or holds (> 0) for settle_s; None if stopped first."""
    last, since = None, clock()
    while not stop.is_set():
        n = get_running()
        if n >= want:
            return n
        if n != last:
            last, since = n, clock()
        elif n > 0 and clock() - since >= settle_s:
            return n
        stop.wait(poll_s)
    return None


def start_request(out_dir: str, steps: int, profile_id: str) -> dict:
    """The /start_profile body (fields of SGLang's ProfileReq)."""
    return {"output_dir": os.path.abspath(out_dir), "num_steps": steps,
            "activities": ["CPU", "GPU"],  # CPU: cudaGraphLaunch calls, the step cross-check
            "with_stack": False, "record_shapes": False,  # small traces, short export
            "profile_id": profile_id}


class ProfileCapture:
    """One capture in a background thread: start() before the client, finish() after."""

    def __init__(self, url: str, out_dir: str, steps: int, want_running: int, profile_id: str,
                 settle_s: float = 3.0, stop_timeout_s: float = 300.0):
        self.url, self.out_dir, self.steps = url, out_dir, steps
        self.want, self.profile_id = want_running, profile_id
        self.settle_s, self.stop_timeout_s = settle_s, stop_timeout_s
        self.batch: Optional[int] = None
        self.started = False
        self.error: Optional[str] = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "ProfileCapture":
        shutil.rmtree(self.out_dir, ignore_errors=True)
        os.makedirs(self.out_dir)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self.batch = wait_steady(lambda: running_reqs(self.url)[0], self.want,
                                     self.settle_s, self._done)
            if self.batch is None:
                self.error = "traffic ended before steady state"
                return
            body = start_request(self.out_dir, self.steps, self.profile_id)
            status, text = http_json(self.url + "/start_profile", body, timeout=120.0)
            if status != 200:
                self.error = f"/start_profile answered {status}: {str(text)[:200]}"
                return
            self.started = True
            while not self._done.is_set() and not profile.find_traces([self.out_dir]):
                self._done.wait(POLL_S)
        except (OSError, RuntimeError, ValueError) as e:
            self.error = f"profile: {e}"

    def cancel(self) -> None:
        """Stop waiting without asking the server for anything (Ctrl-C, dead server)."""
        self._done.set()
        self._thread.join(timeout=5.0)

    def finish(self) -> Optional[profile.Breakdown]:
        """Stop waiting, make the server flush, summarise; None (and .error) on failure."""
        self._done.set()
        self._thread.join()
        if not self.started:
            return None
        try:
            status, _ = http_json(self.url + "/stop_profile", {}, timeout=self.stop_timeout_s)
        except OSError as e:
            self.error = f"/stop_profile: {e}"
            return None
        complete = status != 200  # 200: it was still running, we cut it short
        with open(os.path.join(self.out_dir, profile.META_FILE), "w") as f:
            json.dump({"num_steps": self.steps, "complete": complete, "running_reqs": self.batch,
                       "profile_id": self.profile_id}, f)
        files = profile.find_traces([self.out_dir])
        if not files:
            self.error = f"no trace files in {self.out_dir}"
            return None
        try:
            b = profile.summarize(files)
        except (OSError, ValueError) as e:
            self.error = f"trace unreadable: {e}"
            return None
        if not b.steps:
            self.error = "profile cut short before its steps and no CUDA-graph launches to count"
        return b
