#!/usr/bin/env bash
# One device call: stash the carried bundle part(s), install, warm FlashInfer's JIT (and,
# with BUILD_MODELS=1, build the test models) in the background, run the GPU tests, then the
# kernel benchmark. Output under $OUT (logs + bench JSON/CSV/PNG).
# usage: [GPU_TESTS="TEST_FILE ..."] [BUILD_MODELS=1] dev/gpu/session_check.sh [BENCH_ARGS...]
set -o pipefail
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
dev/gpu/stash_part.sh .gpu-carry /tmp/parts > "$OUT/stash.log" 2>&1; el "stash rc=$?"
if [ -d .gpu-carry/models ]; then mkdir -p /tmp/models && cp -r .gpu-carry/models/* /tmp/models/; fi
dev/gpu/run_all.sh "$OUT/run" --only install > "$OUT/install.log" 2>&1 || { el "install failed"; tail -30 "$OUT/install.log"; exit 1; }
el installed
export PYTHONPATH=/tmp/site-self:/tmp/site PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 - > "$OUT/fi_warm.log" 2>&1 <<'PY' &
import time, torch, flashinfer
t0 = time.time()
ws = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
for dt in (torch.bfloat16, torch.float8_e4m3fn):
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True)
    ip = torch.tensor([0, 4], dtype=torch.int32, device="cuda"); ent = torch.arange(4, dtype=torch.int32, device="cuda")
    w.plan(ip, ent, torch.tensor([1], dtype=torch.int32, device="cuda"), 32, 8, 128, 1, data_type=dt, q_data_type=torch.bfloat16)
    kv = torch.randn(8, 1, 8, 128, device="cuda").to(dt)
    w.run(torch.randn(1, 32, 128, device="cuda", dtype=torch.bfloat16), (kv, kv)); torch.cuda.synchronize()
    print("decode", dt, time.time() - t0, flush=True)
r = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD")
qo = torch.tensor([0, 16], dtype=torch.int32, device="cuda")
r.plan(qo, qo * 2, 32, 8, 128, causal=True, q_data_type=torch.bfloat16)
k = torch.randn(32, 8, 128, device="cuda", dtype=torch.bfloat16)
r.run(torch.randn(16, 32, 128, device="cuda", dtype=torch.bfloat16), k, k); torch.cuda.synchronize()
print("ragged", time.time() - t0, flush=True)
PY
WARM=$!
if [ "${BUILD_MODELS:-0}" = 1 ]; then dev/gpu/run_all.sh "$OUT/run" --only models > "$OUT/models.log" 2>&1 & fi
for t in ${GPU_TESTS:-tests/gpu/test_decode_gpu.py tests/gpu/test_backends_gpu.py}; do
  name=$(basename "$t" .py)
  timeout ${T_TESTS:-240} python3 -m pytest -m gpu -q --maxfail=3 -p no:cacheprovider "$t" > "$OUT/$name.log" 2>&1
  el "$name rc=$?"; tail -n 8 "$OUT/$name.log"
  [ -n "$WARM" ] && { wait $WARM; el "flashinfer warm"; tail -3 "$OUT/fi_warm.log"; WARM=; }
done
timeout ${T_BENCH:-200} python3 -m saw_sglang.bench.kernels --out "$OUT/bench" "$@" > "$OUT/bench.log" 2>&1
el "bench rc=$?"; grep -v "it/s\]" "$OUT/bench.log" | tail -n 40
# At most 8 files come back from a device call: fold everything into one archive.
wait
( cd "$OUT" && tar czf /tmp/check.tgz . && find . -mindepth 1 -delete && mv /tmp/check.tgz check.tgz )
