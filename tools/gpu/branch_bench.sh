#!/usr/bin/env bash
# Benchmark an unmerged kernel branch on the GPU host beside main's installed copy.
#   here:  git archive BRANCH | gzip > .gpu-carry/br/BRANCH.tgz   (carry .gpu-carry/br)
#   there: tools/gpu/branch_bench.sh TGZ OUT_DIR [AB_ARGS...]
# Installs the branch into /tmp/site-br (the bundle in $SITE stays), then from the
# branch's tree: its decode GPU tests, the kernel benchmark (--quick; ratios vs FlashInfer
# BF16 in that process) and, when the branch has it, tools/sass/ab_decode.py AB_ARGS.
set -uo pipefail
TGZ="$1" OUT="$2"; shift 2
SITE="${SITE:-/tmp/site}" PY="${PYTHON:-python3}"
SRC=/tmp/br-src; BR_SITE=/tmp/site-br
rm -rf "$SRC" "$BR_SITE"; mkdir -p "$SRC" "$BR_SITE" "$OUT"
tar -xzf "$TGZ" -C "$SRC"
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$BR_SITE" "$SRC" || exit 4
cd "$SRC"
export PYTHONPATH="$BR_SITE:$SITE" PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1
rc=0
timeout 300 "$PY" -m pytest -m gpu -q tests/gpu/test_decode_gpu.py 2>&1 | tail -n 15 | tee "$OUT/pytest_decode.txt" || rc=1
timeout 300 "$PY" -m saw_sglang.bench.kernels --quick --out "$OUT/bench" 2>&1 | tail -n 40 | tee "$OUT/bench.txt" || rc=1
if [ -f tools/sass/ab_decode.py ] && [ $# -gt 0 ]; then
  timeout 300 "$PY" tools/sass/ab_decode.py "$@" 2>&1 | tee "$OUT/ab_decode.txt" || rc=1
fi
exit $rc
