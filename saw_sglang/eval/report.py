"""Outputs: a Markdown table (stdout), results.json and a PNG plot."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _f(x, fmt):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def markdown(rows: list[dict]) -> str:
    head = ("| mode | engine | KV B/token | vs BF16 | perplexity | ΔPPL vs BF16 | KL to BF16 | top-1 agree |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['engine']} | {_f(r.get('bytes_per_token'), 'd')} | "
            f"{_f(r.get('compression'), '.2f')}{'x' if r.get('compression') else ''} | {r['ppl']:.4f} | {_f(r.get('dppl'), '+.4f')} | "
            f"{_f(r['kl'], '.5f')} | {_f(r['top1_agree'], '.4f')} |"
        )
    return "\n".join(lines)


def write_json(path: Path, meta: dict, rows: list[dict]) -> None:
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]
    path.write_text(json.dumps({"meta": meta, "results": clean}, indent=2))


def plot(path: Path, rows: list[dict], title: str) -> bool:
    """KL and ΔPPL per mode (with compression), and KL vs Hadamard block size."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sim = [r for r in rows if r["engine"] == "sim"]
    if not sim:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(17, 0.45 * max(len(sim), 6) + 1.5))
    labels = [f"{r['label']} ({r['compression']:.2f}x)" for r in sim]
    y = range(len(sim))
    for ax, key, name in ((axes[0], "kl", "mean KL to BF16 (nats/token)"),
                          (axes[1], "dppl", "perplexity - BF16 perplexity")):
        ax.barh(list(y), [r[key] or 0.0 for r in sim], color="tab:blue")
        ax.set_yticks(list(y), labels if ax is axes[0] else [""] * len(sim), fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(name)
        ax.grid(axis="x", alpha=0.3)
    ax = axes[2]
    for group in sorted({r["group_size"] for r in sim if r.get("block_size")}):
        for rot_v in (False, True):
            pts = sorted((r["block_size"], r["kl"]) for r in sim if r.get("block_size")
                         and r["group_size"] == group and r["rotate_v"] == rot_v and not r["keep_layers"]
                         and not r.get("q_int8"))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"g{group} {'K+V' if rot_v else 'K'} rotated")
    for r in sim:
        if r.get("rotation") == "none" and not r["keep_layers"] and not r.get("q_int8"):
            ax.axhline(r["kl"], ls="--", lw=1, color="gray")
            ax.text(0.01, r["kl"], f"naive g{r['group_size']}", fontsize=7, va="bottom",
                    transform=ax.get_yaxis_transform())
    ax.set_xscale("log", base=2)
    ax.set_xlabel("Hadamard block size")
    ax.set_ylabel("mean KL to BF16")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
