"""Localise the prefix kernel's illegal-address fault (several groups per head, run 6).

Runs the faulting case (head_dim 64, group 32, 9/3 heads, K+V rotated, page 16) and
variants that change one thing each (launch configuration, groups, rotation, GQA), each
in its own process so a fault fails that variant alone, then, when compute-sanitizer is
on the PATH, the faulting case under memcheck. Prints one line per variant.

usage: python dev/gpu/diag_prefix_groups.py [--jobs 4] [--no-sanitizer]
       python dev/gpu/diag_prefix_groups.py --case '{"d": 64, ...}'   (one variant)
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

BASE = dict(d=64, g=32, hq=9, hkv=3, rot="kv")
VARIANTS = [
    ("faulting case", {}),
    ("num_stages=1", dict(num_stages=1)),
    ("block_n=32", dict(block_n=32)),
    ("block_rows=64", dict(block_rows=64)),
    ("num_warps=8", dict(num_warps=8)),
    ("K only rotated", dict(rot="k")),
    ("no rotation", dict(rot="none")),
    ("one group (G=64)", dict(g=64)),
    ("GQA 4, no padded rows", dict(hq=12)),
    ("GQA 1", dict(hq=3)),
    ("head_dim 128, G=32", dict(d=128, hq=32, hkv=8)),
    ("head_dim 128, G=64", dict(d=128, g=64, hq=32, hkv=8)),
]
LAUNCH_KEYS = ("num_stages", "block_n", "block_rows", "num_warps")


def run_case(spec: dict) -> None:
    import torch

    from saw_sglang.kernels.format import Int4KVFormat
    from saw_sglang.kernels.testing import check_prefix, make_cache, make_queries

    fmt = Int4KVFormat(head_dim=spec["d"], group_size=spec["g"],
                       rotation="none" if spec["rot"] == "none" else "hadamard",
                       rotate_v=spec["rot"] == "kv")
    gen = torch.Generator().manual_seed(7)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: TRITON_INTERPRET=1
    cache, _, _ = make_cache(fmt, spec["hkv"], [4096, 1000, 0, 2500], 16, gen,
                             spare_pages=300, device=dev)
    q, qo = make_queries([512, 1, 300, 77], spec["hq"], spec["d"], gen, device=dev)
    kw = {k: spec[k] for k in LAUNCH_KEYS if k in spec}
    check_prefix(q, qo, cache, fmt, 16, **kw)
    if dev == "cuda":
        torch.cuda.synchronize()


def child(spec: dict, prefix=()) -> tuple[bool, str]:
    cmd = [*prefix, sys.executable, os.path.abspath(__file__), "--case", json.dumps(spec)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return False, "timeout"
    text = (r.stdout + r.stderr).strip().splitlines()
    errors = [ln for ln in text if "Error" in ln or "error" in ln or "Invalid" in ln]
    return r.returncode == 0, (errors[-1] if errors else (text[-1] if text else ""))[:200]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", help="run one variant (JSON) in this process")
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--no-sanitizer", action="store_true")
    a = ap.parse_args()
    if a.case:
        run_case(json.loads(a.case))
        print("ok")
        return
    specs = [{**BASE, **change} for _, change in VARIANTS]
    with ThreadPoolExecutor(a.jobs) as pool:
        results = list(pool.map(child, specs))
    for (name, _), spec, (ok, why) in zip(VARIANTS, specs, results):
        print(f"{'ok  ' if ok else 'FAIL'} {name:26s} {json.dumps(spec)}  {'' if ok else why}", flush=True)
    sanitizer = shutil.which("compute-sanitizer") or next(
        (p for p in ("/usr/local/cuda/bin/compute-sanitizer",) if os.path.exists(p)), None)
    if sanitizer and not a.no_sanitizer:
        cmd = [sanitizer, "--tool", "memcheck", "--print-limit", "8"]
        r = subprocess.run([*cmd, sys.executable, os.path.abspath(__file__), "--case",
                            json.dumps(BASE)], capture_output=True, text=True, timeout=900)
        lines = (r.stdout + r.stderr).splitlines()
        keep = [ln for ln in lines if ln.startswith("=========")][:60]
        print(f"compute-sanitizer memcheck (rc {r.returncode}):")
        print("\n".join(keep or lines[-30:]))
    elif not a.no_sanitizer:
        print("compute-sanitizer not on the PATH: skipped")


if __name__ == "__main__":
    main()
