#!/usr/bin/env bash
# D2 on the GPU machine: an iterable dataset read through the Accelerator on 2 GPUs, dispatched from
# process 0 (Accelerate's default) and sharded (dispatch_batches=false), hasten and Python Accelerate
# interleaved. Run from the repository root with the release binaries in .device/bin and the Python
# files in .device/py.
set -u
B=.device/bin; P=.device/py
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/torch/lib
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
PY=/opt/torch/.venv/bin/python3
for round in 1 2; do
  for mode in dispatch shard; do
    echo "== round $round: $mode"
    $B/hasten launch --num_processes 2 --main_process_port 0 $B/bench-dispatch $mode --epochs 3 2>&1 | grep BENCH
    "$PY" -m accelerate.commands.launch --num_processes 2 --main_process_port 29517 "$P/py_dispatch.py" $mode 3 2>&1 | grep BENCH
  done
done
