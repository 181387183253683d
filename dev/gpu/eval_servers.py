"""Accuracy through the real serving path on a GPU: one server per KV mode, scored by
`python -m saw_sglang.eval --server` on the same windows as the simulated modes.

    python dev/gpu/eval_servers.py --model /tmp/models/smollm2-135m-instruct --out /tmp/eval-gpu

Starts the servers together (each with a capped pool, so they share the GPU), waits
for all to be healthy, runs the evaluation (simulated modes on the GPU + every server
at --server-step 1, the decode-like view; see docs/eval.md), stops every server (also
on errors or Ctrl-C). Server logs go to --out. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from saw_sglang.bench.server import ManagedServer, reserve_port, wait_all_healthy
from saw_sglang.kv_modes import parse

STOCK = "{python} -m sglang.launch_server"
OURS = "{python} -m saw_sglang.launch_server"
# Modes in the shared grammar (saw_sglang.kv_modes), each also the server's label; bf16
# is the eval's reference. int4:scale-fit=minmax is the write before least squares.
MODES = ["bf16", "fp8", "int4:rotation=none:scale-fit=minmax", "int4:scale-fit=minmax", "int4", "int4:rotate-v"]
SHARED = "--mem-fraction-static 0.85 --max-total-tokens 100000 --disable-piecewise-cuda-graph"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face model folder")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of modes (saw_sglang.kv_modes)")
    p.add_argument("--attention-backend", default="flashinfer")
    p.add_argument("--tokens", type=int, default=512, help="scored tokens per text (eval --tokens)")
    p.add_argument("--ctx", type=int, default=256, help="window length (eval --ctx)")
    p.add_argument("--server-step", type=int, default=1)
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    py = shlex.quote(sys.executable)
    servers = {}
    for label in a.modes.split(","):
        port = reserve_port()
        spec = parse(label)
        launcher = (STOCK if spec.stock else OURS).replace("{python}", py)
        cmd = shlex.split(launcher) + spec.server_args() + [
            "--model-path", a.model, "--port", str(port), "--attention-backend", a.attention_backend,
        ] + shlex.split(SHARED)
        servers[label] = ManagedServer(cmd, "127.0.0.1", port, str(out / f"server-{label}.log"),
                                       start_timeout_s=a.start_timeout)
    try:
        for srv in servers.values():
            srv.start()
        waits = wait_all_healthy(servers)  # the first failure stops them all, with its log
        print("servers up: " + ", ".join(f"{k} {v:.0f} s" for k, v in waits.items()), flush=True)
        cmd = [sys.executable, "-m", "saw_sglang.eval", "--model", a.model, "--device", "cuda",
               "--tokens", str(a.tokens), "--ctx", str(a.ctx), "--server-step", str(a.server_step),
               "--modes", ",".join(m for m in a.modes.split(",") if parse(m).servable),
               "--out", str(out)]
        for label, srv in servers.items():
            cmd += ["--server", f"{label}={srv.url}"]
        print(" ".join(cmd), flush=True)
        return subprocess.call(cmd)
    finally:
        for srv in servers.values():
            srv.stop()


if __name__ == "__main__":
    sys.exit(main())
