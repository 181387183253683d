"""Share of naive INT4's perplexity gap a mode closes, per text and averaged over the
texts, with the noise of the text sample: a bootstrap over windows (each text's
windows resampled with replacement, the same draw for every mode, so differences
between modes are paired), and the recommendation drawn from it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from saw_sglang.kv_modes import parse

BF16 = "bf16"
NAIVE = "int4:rotation=none:scale-fit=minmax"  # naive INT4: no rotation, min-max scales
DRAWS = 1000
LEVEL = 95  # % interval for "is it a tie"


def _ppl(t, idx):
    nll, n = np.asarray(t.nll), np.asarray(t.n)
    return np.exp(nll[idx].sum(-1) / n[idx].sum(-1))


def gap_closed(tallies: dict, mode: str, idx) -> np.ndarray:
    """(PPL_naive - PPL_mode) / (PPL_naive - PPL_bf16) over windows idx [..., W]."""
    pb, pn, pm = (_ppl(tallies[m], idx) for m in (BF16, NAIVE, mode))
    with np.errstate(divide="ignore", invalid="ignore"):
        return (pn - pm) / (pn - pb)


@dataclass
class GapTable:
    texts: list  # text names
    modes: list  # mode names
    per_text: dict  # (mode, text) -> (gap, bootstrap std)
    mean: dict  # mode -> (mean over texts, bootstrap std)
    draws: dict  # mode -> [DRAWS] bootstrap means over texts
    worst: dict  # mode -> lowest per-text gap

    def tie_interval(self, a: str, b: str) -> tuple[float, float]:
        """LEVEL% interval of mean gap(a) - mean gap(b) (paired draws)."""
        d = self.draws[a] - self.draws[b]
        return tuple(np.percentile(d, [(100 - LEVEL) / 2, (100 + LEVEL) / 2]))

    def tied(self, a: str, b: str) -> bool:
        lo, hi = self.tie_interval(a, b)
        return lo <= 0 <= hi


def gap_table(results: dict, modes: list[str], seed: int = 0) -> GapTable:
    """results: text -> mode -> Tally (BF16 and NAIVE included)."""
    rng = np.random.default_rng(seed)
    per_text, draws = {}, {m: [] for m in modes}
    for text, tallies in results.items():
        w = len(tallies[BF16].n)
        full = np.arange(w)
        idx = rng.integers(0, w, (DRAWS, w))
        for m in modes:
            g, gb = float(gap_closed(tallies, m, full)), gap_closed(tallies, m, idx)
            per_text[m, text] = (g, float(np.nanstd(gb)))
            draws[m].append(gb)
    texts = list(results)
    draws = {m: np.nanmean(np.stack(d), 0) for m, d in draws.items()}
    mean = {m: (float(np.mean([per_text[m, t][0] for t in texts])), float(np.std(draws[m]))) for m in modes}
    worst = {m: min(per_text[m, t][0] for t in texts) for m in modes}
    return GapTable(texts, modes, per_text, mean, draws, worst)


def recommend(table: GapTable, rows: dict, model: str, served, flags) -> str:
    """ONE line: the INT4 mode to run, why, and its server flags (`flags(spec)`).
    Candidates are modes a server runs (`served(spec)`); modes within the noise of the
    best are ties, and of those the smallest cache, then the fewest options, wins."""
    int4 = [m for m in table.modes if parse(m).kind == "int4" and m != NAIVE
            and not math.isnan(table.mean[m][0])]
    cands = [m for m in int4 if served(parse(m))]
    if not cands:
        return f"Recommendation for {model}: no servable INT4 mode was measured (add int4 to --modes)."
    best = max(cands, key=lambda m: table.mean[m][0])
    ties = [m for m in cands if m == best or table.tied(best, m)]
    pick = min(ties, key=lambda m: (rows[m]["bytes_per_token"], len(parse(m).saw), m))
    g, sd = table.mean[pick]
    others = [m for m in ties if m != pick]
    why = (f"closes {100 * g:.0f}% (+-{100 * sd:.0f}) of naive INT4's perplexity gap on average "
           f"(worst text {100 * table.worst[pick]:.0f}%) at {rows[pick]['compression']:.2f}x smaller than BF16")
    if others:
        why += f"; {', '.join(others)} tie within the noise and cost as much or more"
    elif best == pick and len(cands) > 1:
        why += "; better than the other servable modes beyond the noise"
    better = [m for m in int4 if m not in cands and table.mean[m][0] > g and not table.tied(m, pick)]
    if better:
        b = max(better, key=lambda m: table.mean[m][0])
        why += f" ({b}, simulation only here, would close {100 * table.mean[b][0]:.0f}%)"
    return f"Recommendation for {model}: {pick} -- {why}. Server flags: {flags(parse(pick))}"
