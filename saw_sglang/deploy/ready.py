"""`python -m saw_sglang.deploy.ready`: exit 0 once the server is healthy and warm.

Healthy: /health answers 200 (SGLang answers 503 until its own first generate has
gone through). Warm: three real /generate calls have gone through on this server
start: a prompt; the same prompt with more tokens, a radix-cache hit whose prefill
attends the prompt through the INT4 cache; and a batch of eight prompts with cached
prefixes of different lengths, decoded together. Triton and FlashInfer compile
kernels on their first use; after these calls the kernels of those paths are built
(and kept in TRITON_CACHE_DIR and FlashInfer's cache for the next start), so no
request after the check waits for a compile.

After the image's entry point (saw_sglang.deploy.entrypoint) started the server, the
URL and API key come from its server.json and a marker beside it makes the warm-up
run once per server start; with --url, every call warms up. Exit status 0: ready;
1: not (one line says why). Kubernetes runs it as the startupProbe (exec), Docker as
the image's HEALTHCHECK.
"""

from __future__ import annotations

import argparse
import fcntl
import http.client
import json
import os
import ssl
import sys
import time
import urllib.parse

from saw_sglang.bench.server import http_json
from saw_sglang.deploy.entrypoint import DEFAULT_STATE_DIR, STATE_DIR_ENV

DEFAULT_URL = "http://127.0.0.1:30000"
PROMPT_TOKENS = 1024  # the first prompt, capped by the server's longest input
BATCH = 8
LOOPBACK = ("127.0.0.1", "::1", "localhost")


class NotReady(Exception):
    """The one-line reason the check fails."""


def prompt_ids(n: int, seed: int) -> list[int]:
    """n token ids in [1000, 5000): clear of special tokens in common vocabularies, the
    same on every call, different per seed."""
    return [1000 + (seed * 7907 + i * 7919) % 4000 for i in range(n)]


def warmup_requests(max_input: int) -> list[dict]:
    """The /generate bodies, in order. Every prompt is at most max_input - 64 tokens."""
    n = min(PROMPT_TOKENS, max_input - 128)
    if n < 64:
        raise NotReady(f"the server takes at most {max_input} input tokens: too few to warm up")
    prompt = prompt_ids(n, 0)

    def body(ids, new_tokens):
        return {"input_ids": ids, "sampling_params":
                {"max_new_tokens": new_tokens, "temperature": 0.0, "ignore_eos": True}}

    batch = [prompt[: n * k // BATCH] + prompt_ids(8 + 8 * k, 2 + k) for k in range(BATCH)]
    return [body(prompt, 8), body(prompt + prompt_ids(64, 1), 8), body(batch, 16)]


def _call(url, path, deadline, headers, payload=None):
    left = deadline - time.monotonic()
    if left <= 0:
        raise NotReady(f"out of time before {path} (--timeout)")
    ctx = None
    if url.startswith("https:") and urllib.parse.urlsplit(url).hostname in LOOPBACK:
        ctx = ssl.create_default_context()  # its own container: a self-signed cert is fine
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    try:
        return http_json(url + path, payload, timeout=left, headers=headers, context=ctx)
    except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out
        reason = getattr(e, "reason", e)
        raise NotReady(f"{url}{path}: {getattr(reason, 'strerror', None) or reason}") from None


def warm_up(url: str, headers: dict, deadline: float) -> str:
    """Send the warm-up requests; return a one-line summary, raise NotReady on failure."""
    status, info = _call(url, "/model_info", deadline, headers)
    if status == 200 and isinstance(info, dict) and info.get("is_generation") is False:
        return "ready (not a generation model: no warm-up)"
    status, server = _call(url, "/server_info", deadline, headers)
    ok = status == 200 and isinstance(server, dict) and server.get("max_req_input_len")
    requests = warmup_requests(int(server["max_req_input_len"]) if ok else 4096)
    t0, prompt, cached = time.monotonic(), 0, 0
    for payload in requests:
        status, out = _call(url, "/generate", deadline, headers, payload)
        if status != 200:
            raise NotReady(f"warm-up /generate answered {status}: {str(out)[:200]}")
        for o in out if isinstance(out, list) else [out]:
            meta = o.get("meta_info", {}) if isinstance(o, dict) else {}
            prompt += int(meta.get("prompt_tokens", 0))
            cached += int(meta.get("cached_tokens", 0))
    return (f"ready: warmed up with {len(requests)} /generate calls ({prompt} prompt "
            f"tokens, {cached} of them from the radix cache) in {time.monotonic() - t0:.1f} s")


def check(url: str, api_key: str | None, warmup: bool, marker: str | None, timeout: float) -> str:
    """The one-line verdict; raises NotReady."""
    deadline = time.monotonic() + timeout
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    status, _ = _call(url, "/health", min(deadline, time.monotonic() + 10.0), headers)
    if status != 200:
        raise NotReady(f"{url}/health answered {status} (still starting, or unhealthy)")
    if not warmup:
        return "ready (healthy; warm-up skipped)"
    if marker is None:
        return warm_up(url, headers, deadline)
    with open(marker + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one warm-up at a time; released if killed
        if os.path.exists(marker):
            return "ready (warmed up earlier in this server start)"
        line = warm_up(url, headers, deadline)
        with open(marker, "w") as f:
            f.write(line + "\n")
        return line


def main(argv: list[str] | None = None) -> int:
    state_dir = os.environ.get(STATE_DIR_ENV, DEFAULT_STATE_DIR)
    p = argparse.ArgumentParser(
        prog="python -m saw_sglang.deploy.ready",
        description="Exit 0 once the server answers /health and a warm-up of real "
                    "/generate calls has gone through on this server start.")
    p.add_argument("--url", help=f"the server (default: the entry point's, from "
                   f"${STATE_DIR_ENV}/server.json, else {DEFAULT_URL})")
    p.add_argument("--api-key", help="the server's --api-key (default: the entry point's)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="only check /health")
    p.add_argument("--timeout", type=float, default=540.0,
                   help="seconds for the whole check (default 540: keep the probe's "
                        "timeoutSeconds above it)")
    args = p.parse_args(argv)
    url, api_key, marker = args.url, args.api_key, None
    state_file = os.path.join(state_dir, "server.json")
    if url is None and os.path.exists(state_file):
        with open(state_file) as f:
            state = json.load(f)
        url, api_key = state["url"], api_key or state.get("api_key")
        marker = os.path.join(state_dir, "warm")
    try:
        print(check((url or DEFAULT_URL).rstrip("/"), api_key, args.warmup, marker, args.timeout))
        return 0
    except NotReady as e:
        print(f"not ready: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
