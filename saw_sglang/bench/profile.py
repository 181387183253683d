"""GPU kernel time per decode step from torch-profiler traces of an SGLang server.

    python -m saw_sglang.bench profile-summary TRACE_DIR_OR_FILES... [--steps N]

Reads the Chrome-trace files the scheduler writes on /stop_profile (one per TP
rank, `<profile_id>-TP-<rank>.trace.json.gz`), sums the GPU kernel, memcpy and
memset durations, sorts each kernel into a category by the first matching
pattern of CATEGORIES (else "other") and divides by the number of scheduler
steps the traces cover. Ranks are averaged. Prints a Markdown table and the top
kernels, so that a kernel in the wrong bucket is visible.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import re
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

# Ordered: the first pattern that matches a kernel name (re.search, any case) wins.
# The traces come from decode windows, so attention kernels that serve both phases
# (FlashInfer's paged prefill kernel, which is its tensor-core decode for GQA; other
# backends' flash/fmha kernels) count as decode.
CATEGORIES: Tuple[Tuple[str, str, str], ...] = (
    ("attn_decode", "attn decode",
     r"_decode_\w*kernel"                      # ours: _decode_split_kernel, _decode_reduce_kernel
     r"|_fwd_(grouped_)?kernel_stage[12]"      # SGLang triton backend decode
     r"|BatchDecode|BatchPrefillWithPagedKVCache"  # FlashInfer decode
     r"|VariableLengthMergeStates"             # FlashInfer split-KV merge of a decode
     r"|flash_fwd|FlashAttn|fmha"),            # fa3 / trtllm backends
    ("attn_prefill", "attn prefill",
     r"_prefix_attn_kernel"                    # ours: INT4 prefix attention of an extend
     r"|^_fwd_kernel(_unified)?$"              # SGLang triton backend extend
     r"|BatchPrefillWithRaggedKVCache|SinglePrefill|merge_?states?|merge_attn_states"),
    ("kv_write", "KV write",
     r"_quantize_kv_kernel|store_kvcache|store_cache|set_kv_buffer|reshape_and_cache"),
    ("gemm", "GEMM", r"gemm|nvjet|cutlass|cublas|xmma|s16816|wgmma|matmul|fused_moe"),
    ("comm", "comm", r"nccl|all_?reduce|cross_device_reduce|all_?gather|reduce_?scatter"),
)
OTHER = "other"
KEYS = [k for k, _, _ in CATEGORIES] + [OTHER]
LABELS = dict([(k, lab) for k, lab, _ in CATEGORIES] + [(OTHER, "other")])
ATTENTION = ("attn_decode", "attn_prefill")
_COMPILED = [(k, re.compile(p, re.IGNORECASE)) for k, _, p in CATEGORIES]
GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
GRAPH_LAUNCH = "cudaGraphLaunch"  # one per CUDA-graph decode step
META_FILE = "profile-meta.json"  # written by `bench serve --profile` next to the traces
TRACE_GLOBS = ("*.trace.json.gz", "*.trace.json", "*.pt.trace.json.gz", "*.pt.trace.json")


def classify(name: str) -> str:
    for key, rx in _COMPILED:
        if rx.search(name):
            return key
    return OTHER


def read_events(path: str) -> List[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data.get("traceEvents", []) if isinstance(data, dict) else list(data)


def find_traces(paths: Iterable[str]) -> List[str]:
    """Expand directories to the trace files in them; keep files as given."""
    out: List[str] = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted({f for g in TRACE_GLOBS for f in glob.glob(os.path.join(p, g))})
            out += found
        elif os.path.exists(p):
            out.append(p)
        else:
            raise FileNotFoundError(p)
    return out


@dataclass
class TraceStats:
    """Raw totals of one trace file (one TP rank), in microseconds."""
    path: str
    by_kernel: Dict[str, float] = field(default_factory=dict)
    calls: Dict[str, int] = field(default_factory=dict)
    wall_us: float = 0.0
    graph_launches: int = 0

    @classmethod
    def load(cls, path: str) -> "TraceStats":
        st = cls(path)
        by, calls = defaultdict(float), defaultdict(int)
        t0, t1 = float("inf"), float("-inf")
        for ev in read_events(path):
            if ev.get("ph") != "X":
                continue
            if str(ev.get("cat", "")).lower() in GPU_CATS:
                ts, dur = float(ev["ts"]), float(ev.get("dur", 0.0))
                by[ev["name"]] += dur
                calls[ev["name"]] += 1
                t0, t1 = min(t0, ts), max(t1, ts + dur)
            elif ev.get("name") == GRAPH_LAUNCH:
                st.graph_launches += 1
        st.by_kernel, st.calls = dict(by), dict(calls)
        st.wall_us = t1 - t0 if by else 0.0
        return st


@dataclass
class Breakdown:
    """Per-step GPU time (ms), averaged over the TP ranks' traces."""
    files: List[str]
    steps: Optional[float]
    steps_source: str
    kernel_ms: float = 0.0
    wall_ms: float = 0.0
    ms: Dict[str, float] = field(default_factory=dict)
    attn_share: float = 0.0
    graph_launches: int = 0
    top: List[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_steps(files: Sequence[str], stats: Sequence[TraceStats],
                  steps: Optional[float]) -> Tuple[Optional[float], str]:
    """Steps the traces cover: given > the capture's meta file > CUDA-graph launches."""
    if steps:
        return float(steps), "given"
    for d in dict.fromkeys(os.path.dirname(os.path.abspath(f)) for f in files):
        try:
            with open(os.path.join(d, META_FILE)) as fh:
                meta = json.load(fh)
        except (OSError, ValueError):
            continue
        if meta.get("complete") and meta.get("num_steps"):
            return float(meta["num_steps"]), "requested"
    launches = [s.graph_launches for s in stats]
    if launches and min(launches) > 0:
        return sum(launches) / len(launches), "graph launches"
    return None, "unknown"


def summarize(files: Sequence[str], steps: Optional[float] = None, top: int = 15) -> Breakdown:
    if not files:
        raise ValueError("no trace files")
    stats = [TraceStats.load(f) for f in files]
    n_steps, source = resolve_steps(files, stats, steps)
    div = (n_steps or 1.0) * len(stats) * 1000.0  # us summed over ranks -> ms per step per rank
    by, calls = defaultdict(float), defaultdict(int)
    for st in stats:
        for name, us in st.by_kernel.items():
            by[name] += us
            calls[name] += st.calls[name]
    ms = {k: 0.0 for k in KEYS}
    for name, us in by.items():
        ms[classify(name)] += us / div
    total = sum(ms.values())
    ranked = sorted(by.items(), key=lambda kv: -kv[1])[:top]
    return Breakdown(
        files=list(files), steps=n_steps, steps_source=source, kernel_ms=total,
        wall_ms=sum(s.wall_us for s in stats) / div, ms=ms,
        attn_share=sum(ms[k] for k in ATTENTION) / total if total else 0.0,
        graph_launches=sum(s.graph_launches for s in stats) // len(stats),
        top=[{"name": n, "category": classify(n), "ms": us / div,
              "calls": calls[n] / ((n_steps or 1.0) * len(stats))} for n, us in ranked])


def markdown_table(rows: Sequence[Tuple[str, str, Breakdown]]) -> str:
    """rows: (mode, point, breakdown); ms per step unless the step count is unknown."""
    head = ["mode", "point", "steps", "kernel ms/step", "wall ms/step"] + \
        [LABELS[k] for k in KEYS] + ["attn share"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for mode, point, b in rows:
        steps = f"{b.steps:g}" if b.steps else "? (totals)"
        cells = [mode, point, steps, f"{b.kernel_ms:.3f}", f"{b.wall_ms:.3f}"] + \
            [f"{b.ms[k]:.3f}" for k in KEYS] + [f"{100 * b.attn_share:.1f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def top_kernels_text(b: Breakdown, n: int = 10, name_width: int = 90) -> str:
    out = []
    for t in b.top[:n]:
        name = t["name"] if len(t["name"]) <= name_width else t["name"][:name_width - 3] + "..."
        out.append(f"  {t['ms']:9.4f} ms  {t['calls']:7.2f}x  {t['category']:12s} {name}")
    return "\n".join(out)


def plot(rows: Sequence[Tuple[str, str, Breakdown]], path: str) -> Optional[str]:
    """Stacked bars: ms per step by category, one bar per (mode, point)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(rows) + 2), 4.5))
    x = list(range(len(rows)))
    bottom = [0.0] * len(rows)
    for k in KEYS:
        h = [b.ms[k] for _, _, b in rows]
        ax.bar(x, h, bottom=bottom, label=LABELS[k])
        bottom = [a + c for a, c in zip(bottom, h)]
    for xi, (_, _, b) in zip(x, rows):
        ax.text(xi, bottom[xi], f"{100 * b.attn_share:.0f}%", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [f"{m}\n" + p.replace(" (", "\n(") for m, p, _ in rows], fontsize=8)
    unit = "ms per step" if all(b.steps for _, _, b in rows) else "ms (per step where known)"
    ax.set(ylabel=f"GPU kernel {unit}", title="GPU time per decode step (label: attention share)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m saw_sglang.bench profile-summary",
        description=__doc__.split("\n\n")[0] + " " + " ".join(__doc__.split("\n\n")[2].split()),
        epilog="Categories (first match wins): " + "; ".join(f"{k}: /{pat}/" for k, _, pat in CATEGORIES)
               + "; else other. Steps: --steps, else profile-meta.json of `bench serve --profile`, "
               "else the number of cudaGraphLaunch calls per trace, else totals.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="TRACE_DIR_OR_FILE",
                   help="a directory summarises the *.trace.json[.gz] files in it (one row per directory)")
    p.add_argument("--steps", type=float, default=None, help="scheduler steps the traces cover")
    p.add_argument("--top", type=int, default=15, help="kernels to list per row")
    p.add_argument("--json", default=None, help="write the breakdowns here")
    p.add_argument("--png", default=None, help="write a stacked-bar plot here")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    groups: Dict[str, List[str]] = {}
    try:
        for p in args.paths:
            files = find_traces([p])
            if not files:
                print(f"{p}: no trace files", file=sys.stderr)
                continue
            key = p if os.path.isdir(p) else os.path.dirname(os.path.abspath(p))
            groups.setdefault(key, []).extend(files)
    except FileNotFoundError as e:
        print(f"not found: {e}", file=sys.stderr)
        return 2
    if not groups:
        return 1
    rows = [("-", os.path.basename(os.path.normpath(k)) or k, summarize(f, args.steps, args.top))
            for k, f in groups.items()]
    print(markdown_table(rows))
    for _, point, b in rows:
        print(f"\n{point}: {len(b.files)} trace(s), steps {b.steps or '?'} ({b.steps_source}), "
              f"top kernels (ms per step, calls per step, category):")
        print(top_kernels_text(b, args.top))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"point": p, **b.to_dict()} for _, p, b in rows], f, indent=1)
    if args.png:
        plot(rows, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
