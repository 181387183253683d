#!/usr/bin/env bash
# The whole GPU run on a two-GPU host (nvidia-h200-x2), as two background chains that
# outlive one device call; later calls wait on them, the last packs the results.
#
#   tools/gpu/run_x2.sh start        install + models here (foreground), then
#       GPU 0, correctness (shares the GPU): pytest -m gpu and, together with it, the
#              server checks $GPU0_STEPS (default e2e,faces,eval,reliability; SOAK_S, default
#              900 s), plus the prefix-groups fault diagnosis when DIAG=1;
#       GPU 1, timing (has the GPU to itself): the kernel benchmark (--quick), this tree's
#              tools/sass/ab_decode.py $AB_ARGS when AB_ARGS is set and no branch is
#              there, tests/gpu/quantize_speed.py (the write kernel), the serving
#              sweep (SERVE_ARGS), then an unmerged branch's tests/bench/A-B when
#              $BRANCH_TGZ exists (default /tmp/parts/branch.tgz; BR_TESTS, BR_BENCH and
#              BR_EXTRA become branch_bench.sh's TESTS, BENCH, EXTRA), and a write-kernel
#              branch's GPU quantize tests and tests/gpu/quantize_speed.py when $WRITE_TGZ
#              exists (/tmp/parts/writefast.tgz).
#   tools/gpu/run_x2.sh wait SECONDS   wait for both chains (exit 0 when both finished)
#   tools/gpu/run_x2.sh pack OUT       everything as OUT/x2.tar.gz + OUT/summary.txt
# Results: /tmp/x2/{pytest,soak,diag,bench,ab,wspeed,serve,branch,writefast}.
# Parts must be stashed first.
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
RES=/tmp/x2 SNAP=/tmp/x2-repo
BG_SH="$REPO/tools/gpu/bg.sh"
export BG=/tmp/bg
case "${1:-}" in
  start)
    mkdir -p "$RES"
    "$REPO/tools/gpu/run_all.sh" "$RES/setup" --only install,models || exit $?
    bash "$BG_SH" snapshot "$SNAP"
    env_py="export PYTHONPATH=/tmp/site-self:/tmp/site PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0"
    steps0="${GPU0_STEPS:-e2e,faces,eval,reliability}" br="${BRANCH_TGZ:-/tmp/parts/branch.tgz}"
    diag=":"
    [ "${DIAG:-0}" = 1 ] && diag="( $env_py; mkdir -p $RES/diag; timeout 900 python3 tools/gpu/diag_prefix_groups.py > $RES/diag/diag.txt 2>&1 )"
    bash "$BG_SH" start gpu0 0 "cd $SNAP && { \
      T_PYTEST=1200 tools/gpu/run_all.sh $RES/pytest --only pytest > /dev/null 2>&1 & \
      SOAK_S=${SOAK_S:-900} T_E2E=1200 T_EVAL=1200 T_RELIABILITY=1700 \
        tools/gpu/run_all.sh $RES/soak --only $steps0 --together > /dev/null 2>&1 & \
      $diag & \
      wait; }; cat $RES/pytest/summary.txt $RES/soak/summary.txt $RES/diag/diag.txt 2>/dev/null"
    ab=":"
    [ -n "${AB_ARGS:-}" ] && [ ! -f "$br" ] && \
      ab="( $env_py; mkdir -p $RES/ab; timeout 400 python3 tools/sass/ab_decode.py $AB_ARGS > $RES/ab/ab_decode.txt 2>&1 )"
    bash "$BG_SH" start gpu1 1 "cd $SNAP && \
      T_BENCH=400 BENCH_ARGS=--quick tools/gpu/run_all.sh $RES/bench --only bench; \
      $ab; \
      ( $env_py; mkdir -p $RES/wspeed; [ -f tests/gpu/quantize_speed.py ] && \
        timeout 300 python3 tests/gpu/quantize_speed.py > $RES/wspeed/quantize_speed.txt 2>&1 ); \
      T_SERVE=${T_SERVE:-1500} SERVE_ARGS='${SERVE_ARGS:---budget}' tools/gpu/run_all.sh $RES/serve --only serve; \
      if [ -f '$br' ]; then \
        TESTS='${BR_TESTS:-tests/gpu/test_decode_gpu.py}' BENCH=${BR_BENCH:-1} EXTRA='${BR_EXTRA:-}' \
        tools/gpu/branch_bench.sh '$br' $RES/branch ${AB_ARGS:-}; fi; \
      if [ -f '${WRITE_TGZ:-/tmp/parts/writefast.tgz}' ]; then \
        TESTS=tests/gpu/test_quantize_gpu.py BENCH=0 EXTRA=tests/gpu/quantize_speed.py \
        tools/gpu/branch_bench.sh '${WRITE_TGZ:-/tmp/parts/writefast.tgz}' $RES/writefast; fi" ;;
  wait)
    bash "$BG_SH" wait "${2:-560}" gpu0 gpu1 ;;
  pack)
    mkdir -p "$2"
    cat "$RES"/*/summary.txt > "$2/summary.txt" 2>/dev/null
    cp "$BG"/*.log "$RES/" 2>/dev/null
    tar -czf "$2/x2.tar.gz" -C /tmp x2
    ls -la "$2" ;;
  *) sed -n '2,20p' "$0"; exit 2 ;;
esac
