"""A stand-in for `sglang.bench_serving`: reads the server's KV dtype, writes one JSONL line.

output_throughput = 10 x concurrency x (2 for int4, 1.5 for fp8, 1 otherwise), so a
test can tell which server answered. FAKE_BENCH_FAIL_AT=C exits 1 at concurrency C;
FAKE_BENCH_HANG_AT=C sleeps forever there; FAKE_BENCH_ARGV appends argv as JSON;
FAKE_BENCH_GENERATE=1 first sends the prompts to /generate, C at a time, so the
server's /v1/loads shows C running requests while they last.
"""

import argparse
import json
import os
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

p = argparse.ArgumentParser()
for flag in ("--backend", "--host", "--model", "--dataset-name", "--output-file"):
    p.add_argument(flag)
for flag in ("--port", "--random-input-len", "--random-output-len", "--num-prompts", "--max-concurrency"):
    p.add_argument(flag, type=int)
p.add_argument("--random-range-ratio", type=float)
args, _ = p.parse_known_args()
c = args.max_concurrency
if os.environ.get("FAKE_BENCH_ARGV"):
    with open(os.environ["FAKE_BENCH_ARGV"], "a") as f:
        f.write(json.dumps(sys.argv[1:]) + "\n")
if str(c) == os.environ.get("FAKE_BENCH_FAIL_AT"):
    sys.exit(1)
if str(c) == os.environ.get("FAKE_BENCH_HANG_AT"):
    time.sleep(600)


def generate(i):
    body = json.dumps({"input_ids": [1 + i] * args.random_input_len,
                       "sampling_params": {"max_new_tokens": args.random_output_len}}).encode()
    req = urllib.request.Request(f"http://{args.host}:{args.port}/generate", data=body,
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=60).read()


if os.environ.get("FAKE_BENCH_GENERATE") == "1":
    with ThreadPoolExecutor(c) as pool:
        list(pool.map(generate, range(args.num_prompts)))
info = json.load(urllib.request.urlopen(f"http://{args.host}:{args.port}/get_server_info", timeout=10))
kv = info["kv_cache_dtype"]
speed = 2.0 if kv == "int4" else 1.5 if kv.startswith("fp8") else 1.0
res = {"completed": args.num_prompts, "output_throughput": 10.0 * c * speed,
       "mean_ttft_ms": 100.0 / speed, "p90_ttft_ms": 150.0 / speed, "mean_itl_ms": 5.0 / speed,
       "p90_itl_ms": 7.0 / speed, "duration": 1.0, "max_concurrency": c}
with open(args.output_file, "a") as f:
    f.write(json.dumps(res) + "\n")
