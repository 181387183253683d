#!/usr/bin/env bash
# Test and benchmark an unmerged kernel branch on the GPU host beside main's installed copy.
#   here:  git archive BRANCH | gzip > .gpu-carry/self/NAME.tgz   (stashed into /tmp/parts)
#   there: dev/gpu/branch_bench.sh TGZ OUT_DIR [AB_ARGS...]
# Installs the branch into its own site folder (the bundle in $SITE stays), then from the
# branch's tree: its GPU tests ($TESTS, default the decode tests), the kernel benchmark
# (BENCH=1: --quick, ratios vs FlashInfer BF16 in that process), `python3 $EXTRA` when
# set (e.g. EXTRA=dev/gpu/quantize_speed.py), and, when the branch has it and AB_ARGS
# are given, dev/sass/ab_decode.py AB_ARGS.
set -uo pipefail
[ $# -ge 2 ] || { sed -n '2,9p' "$0"; exit 2; }
TGZ="$1" OUT="$2"; shift 2
SITE="${SITE:-/tmp/site}" PY="${PYTHON:-python3}"
TESTS="${TESTS:-tests/gpu/test_decode_gpu.py}" BENCH="${BENCH:-1}" EXTRA="${EXTRA:-}"
NAME="$(basename "$TGZ" .tgz)"
SRC="/tmp/br-src-$NAME"; BR_SITE="/tmp/site-br-$NAME"
rm -rf "$SRC" "$BR_SITE"; mkdir -p "$SRC" "$BR_SITE" "$OUT"
tar -xzf "$TGZ" -C "$SRC"
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$BR_SITE" "$SRC" || exit 4
cd "$SRC"
export PYTHONPATH="$BR_SITE:$SITE" PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1
rc=0
# -v streams each case's result into the file, so a timeout cannot hide which one failed
timeout 540 "$PY" -m pytest -m gpu -v --tb=short $TESTS > "$OUT/pytest.txt" 2>&1 || rc=1
tail -n 15 "$OUT/pytest.txt"
if [ "$BENCH" = 1 ]; then
  timeout 300 "$PY" -m saw_sglang.bench.kernels --quick --out "$OUT/bench" 2>&1 | tail -n 40 | tee "$OUT/bench.txt" || rc=1
fi
if [ -n "$EXTRA" ]; then
  timeout 300 "$PY" $EXTRA 2>&1 | tail -n 40 | tee "$OUT/extra.txt" || rc=1
fi
if [ -f dev/sass/ab_decode.py ] && [ $# -gt 0 ]; then
  timeout 300 "$PY" dev/sass/ab_decode.py "$@" 2>&1 | tee "$OUT/ab_decode.txt" || rc=1
fi
exit $rc
