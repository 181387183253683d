#!/usr/bin/env bash
set -o pipefail
# One device call of the decode A/B: FlashInfer wheels from .gpu-carry/fi, our package from the
# tree, the correctness check and the timing of $VARIANTS over $SHAPES (dev/gpu/decode_dev.py).
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu-carry/fi/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site-self . > /dev/null 2>&1 || { echo selfinstall failed; exit 1; }
export PYTHONPATH=/tmp/site-self:/tmp/site PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1
echo "installed in $(( $(date +%s) - T0 ))s"; nvidia-smi --query-gpu=name,clocks.sm --format=csv,noheader
python3 dev/gpu/decode_dev.py --warm-fi 128,64,256 > $OUT/warm.log 2>&1 &
python3 dev/gpu/decode_dev.py --check --variants "$VARIANTS" 2>&1 | tee $OUT/check.log
echo "check done at $(( $(date +%s) - T0 ))s"; cat $OUT/warm.log
wait
echo "warm done at $(( $(date +%s) - T0 ))s"
python3 dev/gpu/decode_dev.py --time --variants "$VARIANTS" ${SHAPES:+--shapes $SHAPES} 2>&1 | tee $OUT/time.log
echo "all done at $(( $(date +%s) - T0 ))s"
