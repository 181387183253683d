#!/usr/bin/env bash
# One device call after session_check.sh on the same warm machine: the serving sweep,
# BF16 vs SAW-INT4, Qwen3-8B-shaped dummy model, SGLang's bench_serving (bench serve).
# usage: dev/gpu/session_serve.sh [extra bench serve args]
set -o pipefail
export PYTHONPATH=/tmp/site-self:/tmp/site PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
  TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m saw_sglang.bench serve --model-path /tmp/models/qwen3-8b-shape --load-format dummy \
  --modes "${MODES:-bf16,int4}" --disable-piecewise-cuda-graph --mem-fraction-static 0.5 \
  --server-args "--cuda-graph-max-bs 64" --start-timeout 300 --point-timeout 240 \
  --out "$OUT/serve" "$@" 2>&1 | grep -v "it/s\]" | tee "$OUT/serve.log" | tail -n 60
