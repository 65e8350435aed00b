#!/usr/bin/env bash
# One device run for the distributed core (issue 3): NCCL correctness, then L1, L2, C1 and C2 for hasten
# and Python Accelerate side by side on the same GPUs. Usage, from the repository root on the GPU machine:
#   bash bench/run_gpu.sh BIN_DIR PY_DIR      (BIN_DIR: release binaries; PY_DIR: bench/*.py + py_anchor.py)
set -u
B=${1:?binaries folder}
P=${2:?python folder}
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/torch/lib
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
PY=/opt/torch/.venv/bin/python3
launch() { "$B/hasten" launch --main_process_port 0 "$@"; }

echo "== device"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch, accelerate; print('torch', torch.__version__, 'accelerate', accelerate.__version__, 'nccl', torch.cuda.nccl.version())"

"$B/hasten" env --check

echo "== NCCL correctness (the same checks CI runs on CPUs)"
launch --num_processes 2 "$B/hasten-test-worker" --ops
launch --num_processes 2 --debug "$B/hasten-test-worker" --ops
"$B/hasten-test-notebook" ops 2
"$B/hasten-test-notebook" value 2
"$B/hasten-test-notebook" refuse-cuda
launch --num_processes 2 "$B/train_demo"
echo "-- the same checks under torchrun (the environment contract alone)"
/opt/torch/.venv/bin/torchrun --nproc_per_node 2 --no-python "$B/hasten-test-worker" --ops 2>&1 | grep -vE "check [a-z_]+: ok"

echo "== L1: notebook_launcher to the first all-reduce"
for i in 1 2 3; do "$B/bench-l1" 2; done
HASTEN_TRACE_INIT=1 "$B/bench-l1" 2
for i in 1 2 3; do "$PY" "$P/py_bench.py" l1 2 2>&1 | grep ANCHOR; done

echo "== L2: CLI launcher to the first all-reduce"
for i in 1 2 3; do HASTEN_BENCH_T0=$(date +%s.%N) launch --num_processes 2 "$B/bench-l2"; done
for i in 1 2; do
  HASTEN_BENCH_T0=$(date +%s.%N) "$PY" -m accelerate.commands.launch --multi_gpu --num_processes 2 "$P/py_l2.py" 2>&1 | grep ANCHOR
done

echo "== C1, C2: all-reduce bandwidth, small gather"
for i in 1 2; do launch --num_processes 2 "$B/bench-collectives"; done
for i in 1 2; do "$PY" "$P/py_bench.py" c 2 2>&1 | grep ANCHOR; done

echo "== CPU collectives: hasten's TCP + shared memory against gloo"
for i in 1 2; do
  launch --num_processes 2 --cpu "$B/bench-collectives" | grep allreduce
  CUDA_VISIBLE_DEVICES= "$PY" "$P/py_cpu_allreduce.py" 2 2>&1 | grep ANCHOR
done
