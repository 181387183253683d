"""A stand-in for `sglang.launch_server` in CPU tests: same flags, same endpoints.

Answers /health, /get_server_info, /v1/loads, /generate (plain and streamed),
/abort_request, /flush_cache, /start_profile and /stop_profile on --host/--port.
Outputs are a deterministic function of the input ids. Behaviour knobs come from
the environment: FAKE_MODE=exit (exits with code 3, after FAKE_STARTUP_S) |
never_healthy (/health answers 503) | bind_failed (logs uvicorn's "address already in
use" line and stays up without listening, as an SGLang server whose HTTP bind failed
while its scheduler lives on) | hang (never listens, never logs), FAKE_STARTUP_S, FAKE_PIDFILE (append
own and a child's pid), FAKE_IGNORE_SIGTERM=1, FAKE_LEAK_ON_DISCONNECT=1, FAKE_TOKEN_S,
FAKE_CONTEXT_LEN. Profiling, like SGLang's scheduler: /start_profile with num_steps
writes a synthetic trace of num_steps steps (tests/fakes/synthetic_trace.py) after
FAKE_PROFILE_S seconds ("never": only /stop_profile ends it, with FAKE_PARTIAL_STEPS
steps); /stop_profile answers 500 when no profile runs; FAKE_PROFILE_LOG appends
each /start_profile body as a JSON line.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from synthetic_trace import STEP_KERNELS, write_trace

CONTEXT_LEN = int(os.environ.get("FAKE_CONTEXT_LEN", "8192"))


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--max-total-tokens", type=int, default=None)
    p.add_argument("--mem-fraction-static", type=float, default=0.9)
    args, _ = p.parse_known_args()
    return args


ARGS = parse()
MODE = os.environ.get("FAKE_MODE", "ok")
TOKEN_S = float(os.environ.get("FAKE_TOKEN_S", "0.0005"))
CAPACITY = ARGS.max_total_tokens or int(100000 * ARGS.mem_fraction_static) * (
    4 if ARGS.kv_cache_dtype == "int4" else 2 if ARGS.kv_cache_dtype.startswith("fp8") else 1)
STATE = {"ready_at": time.monotonic() + float(os.environ.get("FAKE_STARTUP_S", "0")),
         "used": 0, "running": 0, "aborted": set(), "lock": threading.Lock(), "profile": None}


def write_profile(req, steps):
    """One trace (TP rank 0) of `steps` steps; INT4 decode attention runs in half the time."""
    out = req.get("output_dir") or os.environ.get("SGLANG_TORCH_PROFILER_DIR", "/tmp")
    os.makedirs(out, exist_ok=True)
    fast = 0.5 if ARGS.kv_cache_dtype == "int4" else 1.0
    kernels = [(n, d * (fast if c == "attn_decode" else 1.0), c) for n, d, c in STEP_KERNELS]
    write_trace(os.path.join(out, f"{req.get('profile_id') or time.time()}-TP-0.trace.json.gz"),
                steps, kernels)


def start_profile(req):
    with STATE["lock"]:
        if STATE["profile"] is not None:
            return 500, "Profiling is already in progress. Call /stop_profile first."
        STATE["profile"] = req
    if os.environ.get("FAKE_PROFILE_LOG"):
        with open(os.environ["FAKE_PROFILE_LOG"], "a") as f:
            f.write(json.dumps(req) + "\n")
    delay = os.environ.get("FAKE_PROFILE_S", "0.1")
    if req.get("num_steps") and delay != "never":
        def done():
            time.sleep(float(delay))
            with STATE["lock"]:
                if STATE["profile"] is req:
                    write_profile(req, int(req["num_steps"]))
                    STATE["profile"] = None
        threading.Thread(target=done, daemon=True).start()
    return 200, "Start profiling.\n"


def stop_profile():
    with STATE["lock"]:
        req, STATE["profile"] = STATE["profile"], None
        if req is None:
            return 500, "Profiling is not in progress. Call /start_profile first."
        write_profile(req, int(os.environ.get("FAKE_PARTIAL_STEPS", "3")))
    return 200, "Stop profiling. This will take some time.\n"


def tokenize(req):
    if req.get("input_ids") is not None:
        return list(req["input_ids"])
    text = req.get("text")
    return [sum(map(ord, w)) % 1000 for w in (text or "").split()]


def check(req, ids):
    sp = req.get("sampling_params") or {}
    if not ids:
        return "The input is empty."
    if len(ids) >= CONTEXT_LEN:
        return f"The input ({len(ids)} tokens) is longer than the model's context length ({CONTEXT_LEN} tokens)."
    if sp.get("temperature", 1.0) < 0:
        return "temperature must be non-negative"
    if not 0 < sp.get("top_p", 1.0) <= 1:
        return "top_p must be in (0, 1]"
    return None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def _json(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(n) or b"{}")

    def do_GET(self):
        if self.path.startswith("/health"):
            ok = MODE != "never_healthy" and time.monotonic() >= STATE["ready_at"]
            return self._json(200 if ok else 503, {})
        if self.path.startswith("/get_server_info") or self.path.startswith("/server_info"):
            return self._json(200, {"kv_cache_dtype": ARGS.kv_cache_dtype, "max_total_num_tokens": CAPACITY,
                                    "context_length": CONTEXT_LEN, "version": "fake"})
        if self.path.startswith("/v1/loads"):
            with STATE["lock"]:
                load = {"dp_rank": 0, "num_running_reqs": STATE["running"], "num_waiting_reqs": 0,
                        "num_used_tokens": STATE["used"], "max_total_num_tokens": CAPACITY}
            return self._json(200, {"loads": [load]})
        if self.path.startswith("/flush_cache"):
            return self._json(200, {})
        self._json(404, {"detail": "not found"})

    def _text(self, code, text):
        body = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        if self.path.startswith("/start_profile"):
            return self._text(*start_profile(self._body()))
        if self.path.startswith("/stop_profile"):
            self._body()
            return self._text(*stop_profile())
        if self.path.startswith("/abort_request"):
            STATE["aborted"].add(self._body().get("rid"))
            return self._json(200, {})
        if self.path.startswith("/flush_cache"):
            return self._json(200, {})
        if not self.path.startswith("/generate"):
            return self._json(404, {"detail": "not found"})
        req = self._body()
        ids = tokenize(req)
        err = check(req, ids)
        if err:
            return self._json(400, {"error": {"message": err}})
        self.generate(req, ids)

    def generate(self, req, ids):
        sp = req.get("sampling_params") or {}
        n = int(sp.get("max_new_tokens", 16))
        rid = req.get("rid") or f"r{time.monotonic_ns()}"
        seed = sum(ids) + len(ids)
        out = [(seed * 31 + i * 7) % 1000 for i in range(n)]
        with STATE["lock"]:
            STATE["used"] += len(ids) + n
            STATE["running"] += 1
        released = False

        def release():
            nonlocal released
            if not released:
                released = True
                with STATE["lock"]:
                    STATE["used"] -= len(ids) + n
                    STATE["running"] -= 1

        produced, reason = [], {"type": "length", "length": n}
        try:
            stream = bool(req.get("stream"))
            if stream:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
            for tok in out:
                if rid in STATE["aborted"]:
                    reason = {"type": "abort", "message": "Abort request " + rid}
                    break
                time.sleep(TOKEN_S)
                produced.append(tok)
                if stream:
                    self.wfile.write(b"data: " + json.dumps(self.payload(rid, produced, None, req)).encode() + b"\n\n")
                    self.wfile.flush()
            final = self.payload(rid, produced, reason, req)
            if stream:
                self.wfile.write(b"data: " + json.dumps(final).encode() + b"\n\ndata: [DONE]\n\n")
                self.wfile.flush()
                self.close_connection = True
            else:
                self._json(200, final)
            release()
        except (BrokenPipeError, ConnectionResetError):
            if os.environ.get("FAKE_LEAK_ON_DISCONNECT") == "1":
                with STATE["lock"]:  # the request ends but its tokens stay "used"
                    STATE["running"] -= 1
                    released = True
            release()

    @staticmethod
    def payload(rid, produced, reason, req):
        meta = {"id": rid, "finish_reason": reason, "completion_tokens": len(produced)}
        if req.get("return_logprob"):
            meta["output_token_logprobs"] = [[-0.01 * (t % 50), t, None] for t in produced]
        return {"text": " ".join(f"w{t}" for t in produced), "output_ids": list(produced), "meta_info": meta}


def main():
    if os.environ.get("FAKE_PIDFILE"):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        with open(os.environ["FAKE_PIDFILE"], "a") as f:
            f.write(f"{os.getpid()}\n{child.pid}\n")
    if os.environ.get("FAKE_IGNORE_SIGTERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(f"fake server: loading model, kv={ARGS.kv_cache_dtype}", flush=True)
    if MODE == "exit":
        time.sleep(float(os.environ.get("FAKE_STARTUP_S", "0")))
        print("fake server: failing on purpose", flush=True)
        sys.exit(3)
    if MODE == "bind_failed":
        time.sleep(float(os.environ.get("FAKE_STARTUP_S", "0")))
        print(f"ERROR:    [Errno 98] error while attempting to bind on address "
              f"('{ARGS.host}', {ARGS.port}): address already in use", flush=True)
    if MODE in ("bind_failed", "hang"):
        while True:
            time.sleep(60)
    srv = ThreadingHTTPServer((ARGS.host, ARGS.port), Handler)
    srv.daemon_threads = True
    print(f"fake server on {ARGS.host}:{ARGS.port} kv={ARGS.kv_cache_dtype}", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
