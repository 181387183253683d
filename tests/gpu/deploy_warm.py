"""The image's entry point and readiness check on a GPU, without Docker:

    python tests/gpu/deploy_warm.py --model QWEN3_8B_SHAPED_DIR --load-format dummy --out /tmp/deploy

Starts `python -m saw_sglang.deploy.entrypoint --model-path MODEL ...` (what the image
runs) with fresh kernel caches under OUT/.cache (TRITON_CACHE_DIR, FlashInfer's
workspace, XDG_CACHE_HOME, as in the image), then runs `python -m saw_sglang.deploy.ready`
(the Docker HEALTHCHECK / Kubernetes startup probe) every 5 s until it exits 0. Then it
sends traffic the warm-up did not (24 prompts of other lengths, each then hit in the
radix cache with a new suffix, and a batch of all of them), and counts the kernels
compiled after "ready" (new Triton cache entries and FlashInfer modules: ideally 0).
Then the same again on the same caches (a pod restart with its volume): the warm-up
should compile nothing. Asserts: the entry point's defaults are live (int4 KV, host
0.0.0.0), the check turns ready, the warm-up hit the radix cache; prints the rest and
writes OUT/summary.json. Not collected by pytest (needs a GPU and minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from saw_sglang.bench.server import ManagedServer, http_json, reserve_port


def kernel_files(cache: Path) -> int:
    """Compiled kernels on disk: Triton cache entries and FlashInfer .so modules."""
    triton = cache / "triton"
    n = sum(1 for d in triton.iterdir() if d.is_dir()) if triton.exists() else 0
    return n + sum(1 for _ in (cache / "flashinfer").rglob("*.so"))


def wait_ready(env: dict, server: ManagedServer, timeout: float) -> tuple[float, list[str]]:
    t0, lines = time.monotonic(), []
    while time.monotonic() - t0 < timeout:
        if not server.alive():
            raise SystemExit(f"server exited; log {server.log_path}:\n{server.log_tail()}")
        r = subprocess.run([sys.executable, "-m", "saw_sglang.deploy.ready", "--timeout", "540"],
                           capture_output=True, text=True, env=env)
        lines.append(r.stdout.strip())
        if r.returncode == 0:
            return time.monotonic() - t0, lines
        time.sleep(5)
    raise SystemExit(f"not ready after {timeout:.0f} s; last: {lines[-1:]}")


def new_traffic(url: str, seed: int) -> float:
    """Prompts of lengths the warm-up did not send, their radix hits, and one batch;
    returns the slowest single call's seconds."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(1000, 5000) for _ in range(rng.randrange(40, 3000))] for _ in range(24)]
    worst = 0.0
    for p in prompts:
        for ids in (p, p + [rng.randrange(1000, 5000) for _ in range(rng.randrange(1, 200))]):
            t = time.monotonic()
            status, body = http_json(url + "/generate", {"input_ids": ids, "sampling_params": {
                "max_new_tokens": 4, "temperature": 0.0, "ignore_eos": True}}, timeout=300)
            assert status == 200, body
            worst = max(worst, time.monotonic() - t)
    status, body = http_json(url + "/generate", {"input_ids": prompts, "sampling_params": {
        "max_new_tokens": 16, "temperature": 0.0, "ignore_eos": True}}, timeout=300)
    assert status == 200, body
    return worst


def one_start(name: str, a, out: Path, env: dict) -> dict:
    port = reserve_port()  # held until the server is healthy (ManagedServer releases it)
    cmd = [sys.executable, "-m", "saw_sglang.deploy.entrypoint", "--model-path", a.model,
           "--port", str(port), "--mem-fraction-static", str(a.mem_fraction), *a.extra]
    if a.load_format:
        cmd += ["--load-format", a.load_format]
    srv = ManagedServer(cmd, "127.0.0.1", port, str(out / f"{name}.log"), env=env,
                        start_timeout_s=a.timeout)
    srv.start()
    try:
        healthy_s = srv.wait_healthy()
        at_health = kernel_files(Path(env["XDG_CACHE_HOME"]))
        ready_s, lines = wait_ready(env, srv, a.timeout)
        at_ready = kernel_files(Path(env["XDG_CACHE_HOME"]))
        status, info = http_json(srv.url + "/server_info", timeout=30)
        assert status == 200 and info["kv_cache_dtype"] == "int4", "the entry point's int4 default"
        assert info["host"] == "0.0.0.0", "the entry point's host default"
        worst = new_traffic(srv.url, seed=len(name))
        after = kernel_files(Path(env["XDG_CACHE_HOME"]))
    finally:
        srv.stop()
    return {"healthy_s": round(healthy_s, 1), "ready_after_healthy_s": round(ready_s, 1),
            "ready_line": lines[-1], "kernels_at_health": at_health,
            "compiled_by_warmup": at_ready - at_health, "compiled_after_ready": after - at_ready,
            "slowest_call_after_ready_s": round(worst, 2)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--load-format", default=None, help="e.g. dummy for a shaped config")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--mem-fraction", type=float, default=0.5)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("extra", nargs="*", help="more server flags (after --)")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    cache = a.out / ".cache"  # the image's layout: XDG_CACHE_HOME = FLASHINFER_WORKSPACE_BASE/.cache
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "TRITON_CACHE_DIR": str(cache / "triton"),
           "FLASHINFER_WORKSPACE_BASE": str(a.out), "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
           "SAW_STATE_DIR": str(a.out / "state"), "HF_HUB_OFFLINE": "1"}
    summary = {"cold": one_start("cold", a, a.out, env), "restart": one_start("restart", a, a.out, env)}
    (a.out / "summary.json").write_text(json.dumps(summary, indent=1))
    for k, v in summary.items():
        print(f"{k:8s} {v}")
    cold_line = summary["cold"]["ready_line"]
    assert cold_line.startswith("ready: warmed up") and " 0 of them from the radix" not in cold_line, cold_line


if __name__ == "__main__":
    main()
