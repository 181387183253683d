"""Tensor-parallel serving check on two GPUs: SAW-INT4 at --tp 2 vs BF16 and vs TP=1.

    python dev/gpu/tp2_serve.py --model SMOLLM2_DIR --dummy-model QWEN3_8B_SHAPED_DIR \
        --out /tmp/tp2

SmolLM2-135M's 9 query / 3 KV heads do not split over two ranks, so --model is padded
first to 12/4 heads with zero output columns for the new heads (same function; written
to OUT/smollm2-q12kv4 unless --padded-model names an existing folder). Then, one server
after the other (health-waited, always killed, logs in --out):

  bf16-tp1 / bf16-tp2     python -m sglang.launch_server, BF16 KV, triton backend
  int4-tp1 / int4-tp2     python -m saw_sglang.launch_server --kv-cache-dtype int4
                          (Hadamard, default backend)
  int4-tp2-triton         int4 at --tp 2 with the triton backend and --page-size 16
  dummy-int4-tp2          the Qwen3-8B-shaped config, --load-format dummy, int4, --tp 2

Each server runs the e2e_serve.py checks (32 greedy prompts, chat, a chunked long
prompt, a radix-cache hit). Compared token by token: int4-tp2 vs bf16-tp2 and int4-tp2
vs int4-tp1. Bitwise equality is not expected (the all-reduce order changes BF16
rounding), so TP=2 passes when it moves INT4 outputs no more than it moves BF16 outputs
(bf16-tp2 vs bf16-tp1), and INT4 agrees with BF16 at TP=2 about as well as at TP=1,
each within --margin of mean matching-prefix fraction. The per-rank capacity line
("saw_int4" in /get_server_info) must count the rank's KV heads (total / 2) and show
>= --min-capacity-ratio x BF16; the measured int4/bf16 token capacity at TP=2 too.

Each mode's result is saved as OUT/<mode>.json as soon as it finishes and the summary is
built from every such file, so --modes can split the run over several calls (each call
under ten minutes); --rerun repeats modes already saved. NVLink multicast (NVLS) stays
off: NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 are set
for every server. Not collected by pytest (needs two GPUs and minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_serve import ALONE, Server, agreement, first_checks  # noqa: E402
from e2e_serve import COMMON as E2E_COMMON  # noqa: E402

COMMON = E2E_COMMON + ALONE  # each server alone on its GPUs

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                "NVSHMEM_DISABLE_NVLS": "1"}
MODES = ["bf16-tp1", "bf16-tp2", "int4-tp1", "int4-tp2", "int4-tp2-triton", "dummy-int4-tp2"]


def mode_commands(model: str, dummy: str | None) -> dict[str, list[str]]:
    py = sys.executable
    stock = [py, "-m", "sglang.launch_server", "--model-path", model, "--attention-backend", "triton"]
    ours = [py, "-m", "saw_sglang.launch_server", "--kv-cache-dtype", "int4"]
    cmds = {
        "bf16-tp1": stock + ["--tp", "1"],
        "bf16-tp2": stock + ["--tp", "2"],
        "int4-tp1": ours + ["--model-path", model, "--tp", "1"],
        "int4-tp2": ours + ["--model-path", model, "--tp", "2"],
        "int4-tp2-triton": ours + ["--model-path", model, "--tp", "2", "--attention-backend",
                                   "triton", "--page-size", "16"],
    }
    if dummy:
        cmds["dummy-int4-tp2"] = ours + ["--model-path", dummy, "--load-format", "dummy", "--tp", "2"]
    return cmds


def rank_bytes_per_token(model_dir: str, tp: int) -> int:
    """INT4 K+V bytes per token that one rank's pool must report (default format)."""
    from saw_sglang.config import SawConfig

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    return SawConfig().fmt(head_dim).bytes_per_token(max(1, kv // tp), cfg["num_hidden_layers"])


def run_mode(name, cmd, out: Path, port: int, timeout: float, model_dir: str, min_ratio: float) -> dict:
    tp = int(cmd[cmd.index("--tp") + 1])
    res = {"cmd": " ".join(cmd + COMMON), "tp": tp}
    try:
        with Server(name, cmd + COMMON, out, port, timeout) as srv:
            checks = first_checks(srv, name, res)
            if "int4" in name:
                rep = res.get("saw_int4") or {}
                want = rank_bytes_per_token(model_dir, tp)
                res["expected_rank_bytes_per_token"] = want
                checks["capacity_line"] = bool(rep)
                checks["capacity_counts_rank_heads"] = rep.get("bytes_per_token") == want
                checks[f"capacity_vs_bf16>={min_ratio}"] = rep.get("capacity_vs_bf16", 0) >= min_ratio
            res["checks"] = checks
            res["ok"] = all(checks.values())
    except Exception as e:  # noqa: BLE001 - record it; the other modes still run
        res["ok"], res["error"] = False, f"{type(e).__name__}: {e}"
    return res


def compare(results: dict, margin: float, min_ratio: float) -> dict:
    """Cross-mode checks over whatever modes have results."""
    out, checks = {}, {}

    def agree(a, b):
        if all(m in results and "outputs" in results[m] for m in (a, b)):
            exact, prefix = agreement(results[a]["outputs"], results[b]["outputs"])
            out[f"{b} vs {a}"] = {"exact": round(exact, 3), "prefix": round(prefix, 3)}
            return prefix
        return None

    tp_bf16 = agree("bf16-tp1", "bf16-tp2")  # how much TP alone moves greedy outputs
    tp_int4 = agree("int4-tp1", "int4-tp2")
    q_tp1 = agree("bf16-tp1", "int4-tp1")
    q_tp2 = agree("bf16-tp2", "int4-tp2")
    agree("bf16-tp2", "int4-tp2-triton")
    agree("int4-tp2", "int4-tp2-triton")
    if tp_int4 is not None and tp_bf16 is not None:
        checks["int4: tp2 vs tp1 within margin of bf16's"] = tp_int4 >= tp_bf16 - margin
    if q_tp1 is not None and q_tp2 is not None:
        checks["int4 vs bf16 at tp2 within margin of tp1"] = q_tp2 >= q_tp1 - margin
    for mode in ("int4-tp2", "int4-tp2-triton"):
        ref = results.get("bf16-tp2", {}).get("max_total_num_tokens")
        got = results.get(mode, {}).get("max_total_num_tokens")
        if ref and got:
            out[f"{mode} tokens / bf16-tp2 tokens"] = round(got / ref, 3)
            checks[f"{mode} measured capacity>={min_ratio}"] = got / ref >= min_ratio
    return {"agreement": out, "checks": checks, "ok": all(checks.values())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="SmolLM2-135M-Instruct BF16 HF folder (padded to 12/4 here)")
    ap.add_argument("--padded-model", help="an already padded folder (skips padding)")
    ap.add_argument("--dummy-model", help="Qwen3-8B-shaped config folder (--load-format dummy)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--modes", default=",".join(MODES), help="comma list (default: all)")
    ap.add_argument("--rerun", action="store_true", help="run modes that already have a result")
    ap.add_argument("--port", type=int, default=32000)
    ap.add_argument("--start-timeout", type=float, default=420)
    ap.add_argument("--min-capacity-ratio", type=float, default=3.5)
    ap.add_argument("--margin", type=float, default=0.15,
                    help="allowed drop in mean matching-prefix fraction (default 0.15)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.update(NO_MULTICAST)  # Server passes os.environ to every server

    import torch

    gpus = torch.cuda.device_count()
    model = a.padded_model
    if model is None:
        if not a.model:
            ap.error("give --model (padded here) or --padded-model")
        model = str(out / "smollm2-q12kv4")
        if not (Path(model) / "config.json").exists():
            from saw_sglang.tools.pad_heads import pad_checkpoint

            print(f"padding {a.model} -> {model}: {pad_checkpoint(Path(a.model), Path(model), 12, 4)['heads']}")
    cmds = mode_commands(model, a.dummy_model)
    wanted = [m for m in a.modes.split(",") if m]
    unknown = [m for m in wanted if m not in cmds]
    if unknown:
        ap.error(f"unknown or unavailable modes {unknown}; choose from {list(cmds)}")

    t_all = time.time()
    for i, name in enumerate(m for m in MODES if m in wanted):
        path = out / f"{name}.json"
        if path.exists() and not a.rerun:
            print(f"[{name}] result already in {path} (--rerun repeats it)")
            continue
        tp = int(cmds[name][cmds[name].index("--tp") + 1])
        if tp > gpus:
            res = {"ok": False, "error": f"needs {tp} GPUs, {gpus} visible"}
        else:
            model_dir = a.dummy_model if name.startswith("dummy") else model
            res = run_mode(name, cmds[name], out, a.port + i, a.start_timeout, model_dir,
                           a.min_capacity_ratio)
        path.write_text(json.dumps(res, indent=2, default=str))
        print(f"[{name}] ok={res['ok']} {res.get('error', '')}", flush=True)

    results = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))
               if p.stem in MODES}
    cross = compare(results, a.margin, a.min_capacity_ratio)
    slim = {k: {kk: vv for kk, vv in v.items() if kk not in ("outputs", "long")} for k, v in results.items()}
    summary = {"env": NO_MULTICAST, "gpus": gpus, "model": model, "modes": slim, "cross": cross,
               "missing_modes": [m for m in cmds if m not in results],
               "this_call_s": round(time.time() - t_all, 1)}
    summary["ok"] = (all(r["ok"] for r in results.values()) and cross["ok"]
                     and not summary["missing_modes"])
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))

    print(f"\n{'mode':<16} {'ok':<5} {'start s':>7} {'tokens':>9} {'B/token':>8} {'x BF16':>7}  failed")
    for name in MODES:
        r = slim.get(name)
        if r is None:
            print(f"{name:<16} (not run)")
            continue
        rep = r.get("saw_int4") or {}
        failed = [k for k, v in (r.get("checks") or {}).items() if not v] or ([r["error"]] if "error" in r else [])
        print(f"{name:<16} {str(r['ok']):<5} {r.get('startup_s', ''):>7} {r.get('max_total_num_tokens') or '':>9} "
              f"{rep.get('bytes_per_token', ''):>8} {rep.get('capacity_vs_bf16', ''):>7}  {', '.join(failed)}")
    for pair, v in cross["agreement"].items():
        print(f"  {pair}: {v}")
    for k, v in cross["checks"].items():
        print(f"  [{'ok' if v else 'FAIL'}] {k}")
    print(f"overall ok={summary['ok']}; summary: {out / 'summary.json'}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
