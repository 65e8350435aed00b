#!/usr/bin/env bash
# One device run for the training library (issue 4): S1, S2, M1, M2 for hasten and Python Accelerate, then
# the loss curve of M on one GPU from the same safetensors weights and batch on both sides.
#   bash bench/run_gpu_train.sh BIN_DIR PY_DIR
set -u
B=${1:?binaries folder}
P=${2:?python folder}
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/torch/lib
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
PY=/opt/torch/.venv/bin/python3
launch() { "$B/hasten" launch --main_process_port 0 "$@"; }
for kind in S M; do
  for n in 1 2; do
    echo "== $kind on $n GPU(s)"
    launch --num_processes $n "$B/bench-train" $kind
    "$PY" "$P/py_bench.py" $kind $n 2>&1 | grep ANCHOR
    # the same model from tch's layers and optimizer, for what hasten::layers and the fused SGD bring
    launch --num_processes $n "$B/bench-train" $kind --tch
  done
done
echo "== loss curve of M from the same weights"
INIT=/tmp/hasten_m_init.safetensors
"$B/bench-train" M --write-init $INIT
launch --num_processes 1 "$B/bench-train" M --init $INIT --warmup 0 --steps 10 --losses | grep losses
"$PY" "$P/py_train_losses.py" $INIT 10 2>&1 | grep ANCHOR
