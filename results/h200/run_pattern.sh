#!/bin/bash
# One throughput pattern on one lent H200 (results/h200/NEXT_RUN.md): `bash results/h200/run_pattern.sh TAG ARGS...`
# runs `pytest -m benchmark ARGS` once, with every file under /tmp/r and one tarball in $OUT (a device call returns
# at most 8 files). CODE: the workstation's `git rev-parse HEAD` (the device copy's git metadata is stale).
# BUDGET / LIMIT: seconds before no new case starts / before the run is interrupted (keep LIMIT under the call's).
TAG=$1; shift
R=/tmp/r
# A machine keeps /tmp between calls, and $OUT can be the same path in every call (2026-12-02: earlier calls' runs
# came back in a tarball): the first run of a call, the one that finds no tarball in the call's empty $OUT yet,
# starts from an empty folder.
if [ ! -e "$OUT/run.tgz" ]; then rm -rf "$R"; fi
mkdir -p "$R"
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$R/pip_$TAG.log" 2>&1
export NCCL_NVLS_ENABLE=0 XLA_PYTHON_CLIENT_PREALLOCATE=false TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
echo "${CODE:-unknown}" > "$R/head_$TAG.txt"
date -u > "$R/date_$TAG.txt"
nvidia-smi -L > "$R/device.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$R/device_$TAG.csv"
env | grep -E '^(NCCL|XLA|TORCH_SYMM|NVSHMEM|QMOE|CUDA_VIS)' > "$R/env_$TAG.txt"
t0=$(date +%s)
timeout -s INT -k 15 "${LIMIT:-555}" python3 -m pytest suite/benchmarks/test_throughput.py -m benchmark -p no:cacheprovider \
  -rs --device cuda --bench-session-budget-s "${BUDGET:-500}" "$@" \
  --benchmark-json="$R/$TAG.json" --bench-jsonl "$R/$TAG.jsonl" > "$R/$TAG.log" 2>&1
echo "$TAG rc=$? $(( $(date +%s) - t0 ))s" >> "$R/times.txt"
tar czf "$OUT/run.tgz" -C "$R" .
