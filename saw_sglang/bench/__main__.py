"""`python -m saw_sglang.bench {serve,kernels,profile-summary} [args]`: the benchmark tools."""

import importlib
import sys

COMMANDS = {
    "serve": ("saw_sglang.bench.serve", "serving sweep: throughput/latency per KV mode"),
    "kernels": ("saw_sglang.bench.kernels", "kernel microbenchmarks"),
    "profile-summary": ("saw_sglang.bench.profile", "GPU time per decode step from profiler traces"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: python -m saw_sglang.bench {" + ",".join(COMMANDS) + "} [--help]\n")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:16s} {text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    mod = importlib.import_module(COMMANDS[argv[0]][0])
    rc = mod.main(argv[1:])
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
