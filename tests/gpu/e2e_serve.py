"""End-to-end serving check on a GPU: stock SGLang (BF16 KV) vs saw-sglang int4.

    python tests/gpu/e2e_serve.py --model SMOLLM2_DIR --dummy-model QWEN3_8B_SHAPED_DIR \
        --out /tmp/e2e

Starts (each health-waited, always killed, logs in --out):
  bf16        python -m sglang.launch_server, BF16 KV, triton backend, page 1
  int4-had    python -m saw_sglang.launch_server --kv-cache-dtype int4 (Hadamard,
              default backend = our flashinfer), page 1
  int4-none   int4 with --saw-rotation none, triton backend, page 1
  int4-p16    int4 Hadamard, triton backend, --page-size 16
  dummy-int4  the Qwen3-8B-shaped config with --load-format dummy, int4
All with CUDA graphs on (--cuda-graph-max-bs 32, piecewise prefill graphs off) and
--chunked-prefill-size 256. By default the servers start together, each with a capped
pool (--max-total-tokens), which saves minutes of start-up and lets other GPU jobs run
beside; the capacity check is then the startup capacity line. --sequential runs each
server alone at --mem-fraction-static 0.3 and also compares the pools' measured sizes. Checks: greedy /generate outputs on 32 prompts vs BF16
token by token (agreement reported per mode), the OpenAI chat endpoint, a long
shared prefix served twice (radix cache hit, same answer), a prompt longer than the
chunked-prefill size, finite prompt logprobs of tokens appended to the cached prefix
(read back through the INT4 cache; mean |logprob - BF16's| reported), and the token capacity vs BF16 at the same memory fraction
(from /get_server_info, >= 3.5x). Prints a table last and writes summary.json.
Not collected by pytest (needs a GPU and minutes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from saw_sglang.bench.server import ManagedServer

PROMPTS = [
    "The capital of France is", "Write a haiku about the sea.", "What is 12 times 7?",
    "List three primary colors.", "Explain gravity in one sentence.",
    "Translate 'good morning' into Spanish.", "Who wrote Romeo and Juliet?",
    "Name a planet larger than Earth.", "What is the boiling point of water in Celsius?",
    "Give me a synonym for 'happy'.", "Describe a cat in five words.",
    "What is the square root of 81?", "Complete the sentence: The quick brown fox",
    "What language is spoken in Brazil?", "Why is the sky blue?",
    "Suggest a name for a pet dog.", "What is photosynthesis?",
    "How many days are in a leap year?", "Tell me a fun fact about octopuses.",
    "What is the largest ocean on Earth?", "Write one sentence about autumn.",
    "What does CPU stand for?", "Name two fruits that are red.",
    "What is the opposite of 'cold'?", "Summarize the plot of Cinderella in one line.",
    "What year did the first person land on the Moon?", "Count from one to five.",
    "What is the chemical symbol for gold?", "Give a tip for staying focused.",
    "What is the tallest mountain in the world?", "Define the word 'algorithm'.",
    "Which animal is known as the king of the jungle?",
]
FILLER = (
    "Paris is a large city on the Seine with museums, bridges, cafes and parks. "
    "Its streets are busy in spring and quiet on winter mornings. "
)
LONG_PREFIX = FILLER * 40  # ~1000 tokens, longer than --chunked-prefill-size 256
RADIX_Q = LONG_PREFIX + "\nQuestion: The capital of France is"
# Appended to the cached RADIX_Q: these tokens' queries read the whole prefix back
# through the INT4 cache (prefix attention of an extend), and their prompt logprobs
# must be finite (a broken prefix kernel gave NaN, i.e. JSON null, in run 7).
RADIX_TAIL = " Paris.\nQuestion: The largest ocean on Earth is the"
COMMON = ["--cuda-graph-max-bs", "32", "--disable-piecewise-cuda-graph",
          "--chunked-prefill-size", "256", "--log-level", "info"]
ALONE = ["--mem-fraction-static", "0.3"]
# Servers that share the GPU: SGLang sizes the pool from the free memory minus
# (1 - fraction) x total, so a fixed cap (and a high fraction) keeps one server's
# allocation from starving the next one's profile.
SHARED = ["--mem-fraction-static", "0.85", "--max-total-tokens", "200000"]


def post(url, payload, timeout=300):
    req = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def get(url, timeout=30):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


class Server:
    """One server as a context manager: started, health-waited (ManagedServer: a dead
    process or a fatal log line ends the wait at once, with the log), one generation
    answered, and stopped with its process group."""

    def __init__(self, name, cmd, out: Path, port: int, timeout: float):
        self.name, self.cmd, self.port, self.timeout = name, cmd, port, timeout
        self.url = f"http://127.0.0.1:{port}"
        self.log = out / f"{name}.log"
        self.srv = None

    def __enter__(self):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        print(f"[{self.name}] {' '.join(self.cmd)}", flush=True)
        self.srv = ManagedServer(self.cmd + ["--port", str(self.port)], "127.0.0.1", self.port,
                                 str(self.log), env=env, start_timeout_s=self.timeout, name=self.name)
        self.srv.start()
        try:
            self.startup_s = self.srv.wait_healthy(poll_s=2.0)
            urllib.request.urlopen(self.url + "/health_generate", timeout=60)
        except BaseException:
            self.srv.stop()
            raise
        print(f"[{self.name}] up in {self.startup_s:.0f} s", flush=True)
        return self

    def __exit__(self, *exc):
        if self.srv is not None:
            self.srv.stop()

    def generate(self, texts, max_new=32):
        r = post(self.url + "/generate", {
            "text": texts, "sampling_params": {"temperature": 0, "max_new_tokens": max_new}})
        return r if isinstance(r, list) else [r]

    def chat(self, content):
        r = post(self.url + "/v1/chat/completions", {
            "model": "default", "messages": [{"role": "user", "content": content}],
            "temperature": 0, "max_tokens": 16})
        return r["choices"][0]["message"]["content"]

    def info(self):
        return get(self.url + "/get_server_info")

    def prompt_logprobs(self, text, start):
        """(logprobs of the prompt tokens after `start`, cached prompt tokens)."""
        r = post(self.url + "/generate", {
            "text": text, "return_logprob": True, "logprob_start_len": start,
            "sampling_params": {"temperature": 0, "max_new_tokens": 1}})
        meta = (r[0] if isinstance(r, list) else r)["meta_info"]
        return [x[0] for x in meta["input_token_logprobs"][1:]], meta.get("cached_tokens")


def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def tokens(out):
    return out.get("output_ids") or out["text"]


def agreement(ref, got):
    """(exact-match fraction, mean matching-prefix fraction) over prompts."""
    exact, prefix = 0, 0.0
    for a, b in zip(ref, got):
        a, b = tokens(a), tokens(b)
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        exact += a == b
        prefix += n / max(len(a), 1)
    return exact / len(ref), prefix / len(ref)


def serve_checks(srv, result):
    outs = srv.generate(PROMPTS)
    result["chat"] = srv.chat("What is the capital of France?")
    long_out = srv.generate([RADIX_Q], max_new=8)[0]
    again = srv.generate([RADIX_Q], max_new=8)[0]
    meta = again.get("meta_info", {})
    result["long_prompt_tokens"] = long_out.get("meta_info", {}).get("prompt_tokens")
    result["long_answer"] = long_out["text"]
    result["radix_cached_tokens"] = meta.get("cached_tokens")
    result["radix_same_answer"] = tokens(again) == tokens(long_out)
    # SGLang reuses the radix prefix only up to logprob_start_len: ask from the last
    # prompt token on, so the hit covers RADIX_Q and the tail is scored over it.
    lps, cached = srv.prompt_logprobs(RADIX_Q + RADIX_TAIL, max((result["long_prompt_tokens"] or 1) - 1, 0))
    result["hit_logprobs"], result["hit_cached_tokens"] = lps, cached
    info = srv.info()
    result["max_total_num_tokens"] = info.get("max_total_num_tokens")
    result["saw_int4"] = info.get("saw_int4")
    checks = {
        "chat_answers": bool(result["chat"].strip()),
        "long_prompt_chunked": (result["long_prompt_tokens"] or 0) > 256 and bool(long_out["text"].strip()),
        # A radix hit reads the whole prefix from the INT4 cache, while the first request
        # attended its last chunk in BF16: a lossy cache may change the answer, so the
        # check is the hit and a real answer; sameness is reported.
        "radix_hit_answers": (result["radix_cached_tokens"] or 0) > 0 and bool(again["text"].strip()),
        "radix_hit_logprobs_finite": (cached or 0) > 0 and bool(lps) and all(finite(x) for x in lps),
    }
    result["outputs"], result["long"] = outs, long_out
    return checks


_SUMMARY_LOCK = threading.Lock()


def _write_summary(out: Path, summary: dict) -> dict:
    with _SUMMARY_LOCK:
        return _write_summary_locked(out, summary)


def _write_summary_locked(out: Path, summary: dict) -> dict:
    slim = {k: ({kk: vv for kk, vv in v.items() if kk not in ("outputs", "long")}
                if isinstance(v, dict) else v) for k, v in summary.items()}
    (out / "summary.json").write_text(json.dumps(slim, indent=2, default=str))
    return slim


def first_checks(srv, name, res):
    """Start-up time, then the serving checks (a dummy-weights model: only that it serves)."""
    res["startup_s"] = round(srv.startup_s, 1)
    if name.startswith("dummy"):
        outs = srv.generate(PROMPTS[:4], max_new=16)
        res["saw_int4"] = srv.info().get("saw_int4")
        return {"serves": all("text" in o for o in outs)}
    return serve_checks(srv, res)


def run_mode(name, cmd, out, port, a, summary):
    """Start one server, run its checks, record the result in summary[name]."""
    ref = summary.get("bf16") if a.sequential else None  # measured capacity: pools alone
    res = summary[name] = {"cmd": " ".join(cmd)}
    try:
        with Server(name, cmd, out, port, a.start_timeout) as srv:
            checks = first_checks(srv, name, res)
            if name != "bf16":
                rep = res.get("saw_int4") or {}
                ratio = rep.get("capacity_vs_bf16", 0)
                checks["capacity_line"] = bool(rep)
                checks["capacity_vs_bf16>=%.1f" % a.min_capacity_ratio] = ratio >= a.min_capacity_ratio
                if ref and ref.get("max_total_num_tokens") and not name.startswith("dummy"):
                    measured = res["max_total_num_tokens"] / ref["max_total_num_tokens"]
                    res["measured_capacity_ratio"] = round(measured, 3)
                    checks["measured_capacity>=%.1f" % a.min_capacity_ratio] = measured >= a.min_capacity_ratio
            res["checks"] = checks
            res["ok"] = all(checks.values())
    except Exception as e:  # noqa: BLE001 - record and go on to the next server
        res["ok"], res["error"] = False, f"{type(e).__name__}: {e}"
    failed = [k for k, v in (res.get("checks") or {}).items() if not v]
    print(f"[{name}] ok={res['ok']} failed={failed} {res.get('error', '')}", flush=True)
    _write_summary(out, summary)  # after every server: a later timeout loses nothing


def add_agreement(summary):
    """Greedy outputs of every int4 mode vs BF16, token by token."""
    ref = summary.get("bf16") or {}
    if "outputs" not in ref:
        return
    for name, res in summary.items():
        if name == "bf16" or not isinstance(res, dict) or "outputs" not in res:
            continue
        res["agree_exact"], res["agree_prefix"] = agreement(ref["outputs"], res["outputs"])
        res["long_same_as_bf16"] = tokens(res["long"]) == tokens(ref["long"])
        a, b = ref.get("hit_logprobs") or [], res.get("hit_logprobs") or []
        if a and len(a) == len(b) and all(finite(x) for x in a + b):
            res["hit_dlogprob"] = sum(abs(x - y) for x, y in zip(a, b)) / len(a)  # reported


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="SmolLM2-135M-Instruct BF16 HF folder")
    ap.add_argument("--dummy-model", help="Qwen3-8B-shaped config folder (--load-format dummy)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--port", type=int, default=31000)
    ap.add_argument("--start-timeout", type=float, default=420)
    ap.add_argument("--min-capacity-ratio", type=float, default=3.5)
    ap.add_argument("--sequential", action="store_true",
                    help="each server alone at --mem-fraction-static 0.3, pools compared (slower)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    stock = [py, "-m", "sglang.launch_server"]
    ours = [py, "-m", "saw_sglang.launch_server", "--kv-cache-dtype", "int4"]
    m = ["--model-path", a.model]
    modes = [
        ("bf16", stock + m + ["--attention-backend", "triton"]),
        ("int4-had", ours + m),
        ("int4-none", ours + m + ["--saw-rotation", "none", "--attention-backend", "triton"]),
        ("int4-p16", ours + m + ["--attention-backend", "triton", "--page-size", "16"]),
    ]
    if a.dummy_model:
        modes.append(("dummy-int4", ours + ["--model-path", a.dummy_model, "--load-format", "dummy"]))

    summary, t_all = {}, time.time()
    jobs = [(name, cmd + COMMON + (ALONE if a.sequential else SHARED), a.port + i)
            for i, (name, cmd) in enumerate(modes)]
    with ThreadPoolExecutor(1 if a.sequential else len(jobs)) as pool:
        list(pool.map(lambda j: run_mode(j[0], j[1], out, j[2], a, summary), jobs))
    add_agreement(summary)

    summary["total_s"] = round(time.time() - t_all, 1)
    slim = _write_summary(out, summary)
    print(f"\n{'mode':<11} {'ok':<5} {'start s':>7} {'exact':>6} {'prefix':>6} {'hit dlp':>7} "
          f"{'tokens':>9} {'x BF16':>7}  failed checks")
    for name, _ in modes:
        r = slim[name]
        rep = r.get("saw_int4") or {}
        ratio = r.get("measured_capacity_ratio", rep.get("capacity_vs_bf16", ""))
        failed = [k for k, v in (r.get("checks") or {}).items() if not v] or ([r["error"]] if "error" in r else [])
        fmt = lambda x: f"{x:.2f}" if isinstance(x, float) else str(x if x is not None else "")  # noqa: E731
        print(f"{name:<11} {str(r['ok']):<5} {fmt(r.get('startup_s')):>7} {fmt(r.get('agree_exact')):>6} "
              f"{fmt(r.get('agree_prefix')):>6} {fmt(r.get('hit_dlogprob')):>7} {fmt(r.get('max_total_num_tokens')):>9} "
              f"{fmt(ratio):>7}  {', '.join(failed)}")
    print(f"total {summary['total_s']} s; summary: {out / 'summary.json'}")
    sys.exit(0 if all(slim[n]["ok"] for n, _ in modes) else 1)


if __name__ == "__main__":
    main()
