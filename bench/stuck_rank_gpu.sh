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
# `bash bench/stuck_rank_gpu.sh hybrid`: HYBRID_SHARD as 2 machines x 2 GPUs on this host (one launch per
# machine, GPUs 0,1 and 2,3), the FSDP training check of CI (`hasten-test-training fsdp_blocks`, also in
# $BIN); rank 3 stops in its own code before its second backward. Its machine's partner waits in the
# shard group's reduce-scatter, machine 0 in the replicas' all-reduce (each group its own NCCL
# communicator): all must time out naming rank 3 and both launchers end their jobs.
if [ "${1:-}" = hybrid ]; then
  export ACCELERATE_USE_FSDP=true FSDP_AUTO_WRAP_POLICY=TRANSFORMER_BASED_WRAP FSDP_TRANSFORMER_CLS_TO_WRAP=Block
  export FSDP_SHARDING_STRATEGY=HYBRID_SHARD HASTEN_COLLECTIVE_TIMEOUT=5 HASTEN_TEST_GPU=1
  export HASTEN_RDZV_SECRET=stuck
  machine() {
    timeout 120 "$BIN/hasten" launch --num_processes 4 --num_machines 2 --machine_rank "$1" --gpu_ids "$2" \
      --main_process_ip 127.0.0.1 --main_process_port 29670 "$BIN/hasten-test-training" fsdp_blocks
  }
  echo "=== first without a stuck rank: the CI check itself on the GPUs (fp32, against one process)"
  machine 1 2,3 > /tmp/stuck-m1.log 2>&1 &
  machine 0 0,1 2>&1 | grep -E "training check|rror"
  wait; grep -E "training check|rror" /tmp/stuck-m1.log
  export HASTEN_TEST_HANG_RANK=3
  for i in 1 2 3; do
    echo "=== hybrid run $i"
    start=$(date +%s%N)
    machine 1 2,3 > /tmp/stuck-m1.log 2>&1 &
    machine 0 0,1 > /tmp/stuck-m0.log 2>&1
    rc0=$?; wait $!; rc1=$?
    end=$(date +%s%N)
    echo "machine 0 exit $rc0, machine 1 exit $rc1 (124 = the 120 s guard fired), wall $(( (end - start) / 1000000 )) ms"
    for m in 0 1; do echo "-- machine $m"; grep -E "did not arrive|rror|failed|ending" /tmp/stuck-m$m.log | head -8; done
    sleep 1
    if pgrep -f hasten-test-training >/dev/null; then echo "LEFT BEHIND:"; pgrep -fa hasten-test-training; else echo "no worker process left"; fi
    echo "processes on the GPUs: [$(nvidia-smi --query-compute-apps=pid --format=csv,noheader | tr '\n' ' ')]"
  done
  exit 0
fi
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
