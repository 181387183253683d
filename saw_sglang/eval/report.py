"""Outputs: Markdown tables (stdout), results.json and a PNG plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .stats import BF16, NAIVE, GapTable


def _f(x, fmt):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _pct(g, sd):
    return "n/a" if math.isnan(g) else f"{100 * g:.0f} ±{100 * sd:.0f}"


def gap_markdown(table: GapTable, rows: dict, ppl: dict) -> str:
    """Share of naive INT4's perplexity gap closed (%, ± bootstrap std), per text."""
    head = "| mode | vs BF16 | " + " | ".join(table.texts) + " | mean | worst |"
    lines = [head, "|---|---:|" + "---:|" * (len(table.texts) + 2),
             "| *BF16 perplexity* | | " + " | ".join(f"{ppl[t][BF16]:.2f}" for t in table.texts) + " | | |",
             "| *naive INT4 perplexity* | | " + " | ".join(f"{ppl[t][NAIVE]:.2f}" for t in table.texts) + " | | |"]
    for m in table.modes:
        if m in (BF16, NAIVE):
            continue
        cells = [_pct(*table.per_text[m, t]) for t in table.texts]
        lines.append(f"| {m} | {rows[m]['compression']:.2f}x | " + " | ".join(cells)
                     + f" | **{_pct(*table.mean[m])}** | {_pct(table.worst[m], 0).split(' ')[0]} |")
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    """Pooled over all texts: bytes, perplexity, KL, top-1 agreement per mode."""
    head = ("| mode | engine | KV B/token | vs BF16 | perplexity | ΔPPL vs BF16 | KL to BF16 | top-1 agree |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['engine']} | {_f(r.get('bytes_per_token'), 'd')} | "
            f"{_f(r.get('compression'), '.2f')}{'x' if r.get('compression') else ''} | {r['ppl']:.4f} | "
            f"{_f(r.get('dppl'), '+.4f')} | {_f(r['kl'], '.5f')} | {_f(r['top1_agree'], '.4f')} |"
        )
    return "\n".join(lines)


def write_json(path: Path, meta: dict, rows: list[dict]) -> None:
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]
    path.write_text(json.dumps({"meta": meta, "results": clean}, indent=2))


def plot(path: Path, table: GapTable | None, rows: list[dict], title: str) -> bool:
    """Left: share of naive INT4's gap closed per mode (mean ± noise, one dot per
    text). Right: KL to BF16 (pooled) per mode, with its compression."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sim = [r for r in rows if r["engine"] == "sim"]
    if not sim:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(15, 0.42 * max(len(sim), 6) + 1.8))
    labels = [f"{r['label']} ({r['compression']:.2f}x)" for r in sim]
    y = list(range(len(sim)))
    ax = axes[0]
    if table is not None:
        means = [100 * table.mean[r["spec"]][0] if r["spec"] in table.mean else 0 for r in sim]
        errs = [100 * table.mean[r["spec"]][1] if r["spec"] in table.mean else 0 for r in sim]
        ax.barh(y, means, xerr=errs, color="tab:blue", alpha=0.7, capsize=3, label="mean over texts ± noise")
        markers = "os^Dvx*"
        for j, t in enumerate(table.texts):
            xs = [100 * table.per_text[r["spec"], t][0] if (r["spec"], t) in table.per_text else math.nan
                  for r in sim]
            ax.scatter(xs, y, s=14, marker=markers[j % len(markers)], zorder=3, label=t)
        for x, style in ((70, "--"), (100, ":")):
            ax.axvline(x, ls=style, lw=1, color="gray")
        ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, frameon=False)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("share of naive INT4's perplexity gap closed (%)")
    ax.grid(axis="x", alpha=0.3)
    ax = axes[1]
    ax.barh(y, [r["kl"] or 0.0 for r in sim], color="tab:orange")
    ax.set_yticks(y, [""] * len(sim))
    ax.invert_yaxis()
    ax.set_xlabel("mean KL to BF16 (nats/token), all texts")
    ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
