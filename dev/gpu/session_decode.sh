#!/usr/bin/env bash
# One device call for decode kernel work: stash the carried bundle part(s), install,
# compile FlashInfer's BF16 decode for the probe's head dims in the background, run the
# decode GPU tests, then dev/gpu/decode_probe.py (split counts x PDL beside FlashInfer
# BF16) and dev/gpu/quantize_speed.py. Everything lands in $OUT/check.tgz.
# With BUILD_MODELS=1 the test models are built into /tmp/models in the background (CPU
# work), for a later call on the same warm machine (faces, serving).
# usage: [GPU_TESTS=...] [T_TESTS=240] [T_PROBE=300] [PROBE_ARGS="--shapes ..."] [QSPEED=1] [EXTRA="cmd"]
#        [BUILD_MODELS=1]
#        dev/gpu/session_decode.sh
set -o pipefail
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
dev/gpu/stash_part.sh .gpu-carry /tmp/parts > "$OUT/stash.log" 2>&1; el "stash rc=$?"
dev/gpu/run_all.sh "$OUT/run" --only install > "$OUT/install.log" 2>&1 || { el "install failed"; tail -30 "$OUT/install.log"; exit 1; }
el installed
export PYTHONPATH=/tmp/site-self:/tmp/site PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 dev/gpu/decode_dev.py --warm-fi "${WARM_FI:-128,64}" > "$OUT/fi_warm.log" 2>&1 &
WARM=$!
if [ "${BUILD_MODELS:-0}" = 1 ]; then dev/gpu/run_all.sh "$OUT/run" --only models > "$OUT/models.log" 2>&1 & fi
if [ -n "${GPU_TESTS-tests/gpu/test_decode_gpu.py}" ]; then
  timeout ${T_TESTS:-240} python3 -m pytest -m gpu -q --maxfail=3 -p no:cacheprovider ${GPU_TESTS:-tests/gpu/test_decode_gpu.py} > "$OUT/tests.log" 2>&1
  el "tests rc=$?"; tail -n 8 "$OUT/tests.log"
fi
wait $WARM; el "flashinfer warm"; tail -3 "$OUT/fi_warm.log"
timeout ${T_PROBE:-300} python3 dev/gpu/decode_probe.py --out "$OUT/probe.csv" $PROBE_ARGS > "$OUT/probe.log" 2> "$OUT/probe.err"
el "probe rc=$?"; cat "$OUT/probe.log"; tail -5 "$OUT/probe.err"
if [ "${QSPEED:-0}" = 1 ]; then
  timeout ${T_QSPEED:-120} python3 dev/gpu/quantize_speed.py > "$OUT/qspeed.log" 2>&1; el "qspeed rc=$?"; tail -25 "$OUT/qspeed.log"
fi
if [ -n "$EXTRA" ]; then eval "$EXTRA" > "$OUT/extra.log" 2>&1; el "extra rc=$?"; grep -v "it/s\]" "$OUT/extra.log" | tail -n 40; fi
wait
( cd "$OUT" && tar czf /tmp/check.tgz . && find . -mindepth 1 -delete && mv /tmp/check.tgz check.tgz )
