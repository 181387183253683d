"""The published decode figures are the benchmark's data: docs/results.md holds
`bench.kernels.decode_table` of the committed CSV, and the README's headline ratios are
that CSV's."""

import csv
import pathlib
import re

from saw_sglang.bench.kernels import decode_table

ROOT = pathlib.Path(__file__).resolve().parents[1]
CSV = ROOT / "docs" / "data" / "decode-h200-2026-12-04.csv"
INTS = ("hq", "hkv", "d", "page", "batch", "ctx", "rotations")


def _rows():
    with open(CSV, newline="") as f:
        return [{k: int(v) if k in INTS else float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def test_results_page_holds_the_benchmark_table():
    assert decode_table(_rows()) in (ROOT / "docs" / "results.md").read_text()


def test_readme_headline_ratios_are_the_csv():
    readme = (ROOT / "README.md").read_text()
    for page in (1, 16):
        ratios = ", ".join(f"{r['bf16_ms'] / r['int4_ms']:.2f}x" for r in _rows() if r["page"] == page)
        line = re.search(rf"^\| decode attention, page {page}\b.*$", readme, re.M)
        assert line and ratios in line.group(0), (page, ratios)
