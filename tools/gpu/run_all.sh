#!/usr/bin/env bash
# The GPU-host run, from the repository root of a host without network:
#
#   tools/gpu/run_all.sh OUT_DIR [--only STEP[,STEP...]] [--together] [--pack]
#
# Steps, in order (each with its own timeout and log OUT_DIR/logs/STEP.log):
#   install  reassemble + install the offline bundle from $PARTS into $SITE (skipped when
#            already installed) and our package from this working tree into $SELF_SITE
#   models   build the GPU-test models into $MODELS (skipped when present)
#   pytest   pytest -m gpu -q tests/gpu (all but test_frontends_gpu.py, which is faces)
#   bench    python -m saw_sglang.bench.kernels --out OUT_DIR/bench
#   e2e      python tests/gpu/e2e_serve.py --model ... --dummy-model ... --out OUT_DIR/e2e
#   faces    pytest tests/gpu/test_frontends_gpu.py: frontend programs, offline Engine and
#            OpenAI client on SmolLM2 (INT4 and BF16 servers); OUT_DIR/faces/summary.json
#   eval     python tests/gpu/eval_servers.py: eval --server through one server per KV mode
#   reliability  python tests/gpu/reliability.py --duration $SOAK_S (default 900)
#   serve    python -m saw_sglang.bench serve on the Qwen3-8B-shaped dummy model, $SERVE_ARGS
#            (default --budget)
# install..faces run by default; eval, reliability and serve only when named in --only.
# --together starts e2e, faces, eval and reliability at once (their servers cap their pools and
# share the GPU: run 6 ran all three in 565 s); bench and serve wait for them.
# A short summary table (also OUT_DIR/summary.txt) comes last. --pack tars OUT_DIR into
# OUT_DIR/all.tar.gz (keeping summary.txt beside it), for transports that take few files.
# Settings (environment): PARTS=/tmp/parts SITE=/tmp/site SELF_SITE=/tmp/site-self
# MODELS=/tmp/models PYTHON=python3, timeouts in seconds T_INSTALL=420 T_MODELS=420
# T_PYTEST=540 T_BENCH=540 T_E2E=540 T_FACES=420 T_EVAL=540 T_RELIABILITY=1500 T_SERVE=1500,
# PYTEST_ARGS (extra pytest arguments), BENCH_ARGS (e.g. --quick), REL_ARGS (extra
# reliability.py arguments, e.g. --mem-fraction-static 0.85 beside other GPU jobs).
set -uo pipefail
[ $# -ge 1 ] || { sed -n '2,28p' "$0"; exit 2; }
OUT="$(mkdir -p "$1" && cd "$1" && pwd)"; shift
ONLY="install,models,pytest,bench,e2e,faces"; PACK=0; TOGETHER=0
while [ $# -gt 0 ]; do
  case "$1" in
    --only) ONLY="$2"; shift 2 ;;
    --pack) PACK=1; shift ;;
    --together) TOGETHER=1; shift ;;
    *) echo "unknown argument: $1"; exit 2 ;;
  esac
done
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python3}"
PARTS="${PARTS:-/tmp/parts}"; SITE="${SITE:-/tmp/site}"; SELF_SITE="${SELF_SITE:-/tmp/site-self}"
MODELS="${MODELS:-/tmp/models}"
mkdir -p "$OUT/logs"

# Our package first, then the bundle (its transformers 5.12.1 / tokenizers 0.22.2 must
# shadow the host's 5.17, which breaks `import sglang`), then the host's own packages.
# PYTHONSAFEPATH keeps the repository root (cwd) off sys.path: its saw_sglang/ folder
# lacks kernels/ and patches/, which only the installed copy maps inside the package.
export PYTHONPATH="$SELF_SITE:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

SUMMARY="$OUT/summary.txt"
: > "$SUMMARY.tmp"
record() { printf '%-8s %-7s %6ss  %s\n' "$1" "$2" "$3" "$4" >> "$SUMMARY.tmp"; }

# run_step NAME TIMEOUT CMD...: run with a timeout, log to OUT/logs/NAME.log.
run_step() {
  local name="$1" limit="$2"; shift 2
  local log="$OUT/logs/$name.log" t0=$SECONDS rc
  echo "=== $name (timeout ${limit}s): $*" | tee "$log"
  timeout --kill-after=30 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  local dt=$((SECONDS - t0)) status=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status=timeout; elif [ $rc -eq 99 ]; then status=skipped; elif [ $rc -ne 0 ]; then status="rc=$rc"; fi
  tail -n 15 "$log"
  record "$name" "$status" "$dt" "logs/$name.log"
  return $rc
}

step_install() {
  if [ ! -f "$PARTS/install.sh" ]; then
    echo "no $PARTS/install.sh: stash the parts first (tools/gpu/stash_part.sh)"; return 3
  fi
  bash "$PARTS/install.sh" "$SITE" || return $?
  # Our package from this working tree (always fresh); the carried wheel if that fails.
  rm -rf "$SELF_SITE"; mkdir -p "$SELF_SITE"
  if ! "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
       --target "$SELF_SITE" "$REPO"; then
    echo "building from the working tree failed; installing the carried wheel"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SELF_SITE" \
      "$PARTS"/saw_sglang-*.whl || return 4
  fi
  "$PY" - <<'EOF'
import importlib, importlib.metadata as md
for dist in ("sglang", "sglang-kernel", "flashinfer-python", "transformers", "tokenizers", "saw-sglang"):
    print(f"{dist:18s} {md.version(dist)}")
for mod in ("sglang", "sgl_kernel", "flashinfer", "saw_sglang.kernels", "saw_sglang.patches"):
    m = importlib.import_module(mod)
    print(f"import {mod:20s} ok  {m.__file__}")
assert md.version("transformers") == "5.12.1", "the bundle's transformers must come first"
EOF
}

step_models() {
  "$PY" -m saw_sglang.tools.models --out "$MODELS" --check
}

step_pytest() {
  "$PY" -m pytest -m gpu -q -rs tests/gpu --ignore=tests/gpu/test_frontends_gpu.py ${PYTEST_ARGS:-}
}

step_bench() {
  if ! "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("saw_sglang.bench.kernels") is None)' 2>/dev/null; then
    echo "saw_sglang.bench.kernels is not in this tree: skipped"; return 99
  fi
  "$PY" -m saw_sglang.bench.kernels --out "$OUT/bench" ${BENCH_ARGS:-}
}

step_e2e() {
  if [ ! -f tests/gpu/e2e_serve.py ]; then
    echo "tests/gpu/e2e_serve.py is not in this tree: skipped"; return 99
  fi
  "$PY" tests/gpu/e2e_serve.py --model "$MODELS/smollm2-135m-instruct" \
    --dummy-model "$MODELS/qwen3-8b-shape" --out "$OUT/e2e"
}

step_faces() {
  SAW_FACES_OUT="$OUT/faces" SAW_TEST_MODEL="$MODELS/smollm2-135m-instruct" \
    "$PY" -m pytest -m gpu -q -rs -s tests/gpu/test_frontends_gpu.py
}

step_eval() {
  "$PY" tests/gpu/eval_servers.py --model "$MODELS/smollm2-135m-instruct" --out "$OUT/eval"
}

step_reliability() {
  "$PY" tests/gpu/reliability.py --model "$MODELS/smollm2-135m-instruct" --duration "${SOAK_S:-900}" \
    --out "$OUT/reliability/reliability.json" --log-dir "$OUT/reliability/logs" ${REL_ARGS:-}
}

step_serve() {
  "$PY" -m saw_sglang.bench serve --model-path "$MODELS/qwen3-8b-shape" --load-format dummy \
    --out "$OUT/serve" ${SERVE_ARGS:---budget}
}

export -f step_install step_models step_pytest step_bench step_e2e step_faces step_eval step_reliability step_serve
export PY PARTS SITE SELF_SITE MODELS REPO OUT

declare -A LIMIT=([install]=${T_INSTALL:-420} [models]=${T_MODELS:-420} [pytest]=${T_PYTEST:-540}
                  [bench]=${T_BENCH:-540} [e2e]=${T_E2E:-540} [faces]=${T_FACES:-420} [eval]=${T_EVAL:-540}
                  [reliability]=${T_RELIABILITY:-1500} [serve]=${T_SERVE:-1500})
failed=0
pids=()
wait_together() {
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  pids=()
}
for step in install models pytest bench e2e faces eval reliability serve; do
  case ",$ONLY," in *",$step,"*) ;; *) continue ;; esac
  if [ "$TOGETHER" = 1 ]; then
    case "$step" in
      e2e|faces|eval|reliability)
        run_step "$step" "${LIMIT[$step]}" bash -c "step_$step" > "$OUT/logs/$step.out" 2>&1 &
        pids+=($!); continue ;;
      bench|serve) wait_together ;;  # timings want the GPU to themselves
    esac
  fi
  run_step "$step" "${LIMIT[$step]}" bash -c "step_$step"
  rc=$?
  if [ $rc -ne 0 ] && [ $rc -ne 99 ]; then
    failed=1
    # Later steps need the install and the models.
    if [ "$step" = install ] || [ "$step" = models ]; then
      echo "$step failed: stopping"; break
    fi
  fi
done

wait_together

{
  echo "step     status    time  log"
  cat "$SUMMARY.tmp"
  echo "host: $(hostname) $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1) $(date -u +%FT%TZ)"
} > "$SUMMARY"
rm -f "$SUMMARY.tmp"
if [ "$PACK" = 1 ]; then
  tar -czf /tmp/saw-run-all.tar.gz -C "$OUT" --exclude=summary.txt . && \
    find "$OUT" -mindepth 1 -maxdepth 1 ! -name summary.txt -exec rm -rf {} + && \
    mv /tmp/saw-run-all.tar.gz "$OUT/all.tar.gz"
fi
echo
cat "$SUMMARY"
exit $failed
