#!/usr/bin/env bash
# Issue 15: a rank stuck after NCCL is up (an endless loop, or SIGSTOP) on 2 GPUs. The other rank's
# NCCL all-reduce must time out (HASTEN_COLLECTIVE_TIMEOUT=5), name rank 1, and the launcher must end
# the job with no process left. The waiting rank must print nothing computed after the timeout (no
# "all_reduce sum" line from rank 0). Run from the repository root on the GPU machine with the stripped
# release binaries `hasten` and `hasten-test-worker` in $BIN (default .device/stuck).
set -u
BIN=${BIN:-.device/stuck}
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/torch/lib
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi -L
for mode in hang stop hang stop hang stop; do
  echo "=== rank 1 fails with '$mode' after the NCCL warm-up; HASTEN_COLLECTIVE_TIMEOUT=5"
  start=$(date +%s%N)
  HASTEN_COLLECTIVE_TIMEOUT=5 timeout 120 "$BIN/hasten" launch --num_processes 2 --main_process_port 0 \
    "$BIN/hasten-test-worker" --fail "1:$mode" --cuda-elems 1048576
  rc=$?
  end=$(date +%s%N)
  echo "exit code $rc (124 = the 120 s guard fired: a hang), wall $(( (end - start) / 1000000 )) ms"
  sleep 1
  if pgrep -f hasten-test-worker >/dev/null; then echo "LEFT BEHIND:"; pgrep -fa hasten-test-worker; else echo "no worker process left"; fi
  echo "processes on the GPUs: [$(nvidia-smi --query-compute-apps=pid --format=csv,noheader | tr '\n' ' ')]"
done
