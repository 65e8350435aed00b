#!/usr/bin/env bash
# hasten against Python Accelerate on the GPU machine, side by side in one run, every workload of
# shared/bench/WORKLOADS.md but F1/F2. Usage, from the repository root on the GPU machine:
#   bash bench/run_gpu.sh BIN_DIR PY_DIR PART...
# BIN_DIR: hasten's release binaries (hasten, bench-*, hasten-test-*, train_demo); PY_DIR: bench/*.py and
# shared/bench/*.py. PART: probe, checks, launch, collectives, train, dispatch, bigmodel. REPS (default 3):
# runs of each side for train, dispatch and bigmodel.
# Every figure is one JSON line: `BENCH` for hasten, `ANCHOR` for Python; each run prints its own line,
# and the tables in RESULTS.md are built from these lines, all of them.
set -u
B=${1:?binaries folder}
P=${2:?python folder}
shift 2
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/torch/lib
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
PY=/opt/torch/.venv/bin/python3
launch() { "$B/hasten" launch --main_process_port 0 "$@"; }
# The shell's clock just before a launcher starts, for L2 (both sides read it).
t0() { date +%s.%N; }
gpus=$(nvidia-smi -L | wc -l)
# Repetitions of each run (each side), REPS=3 unless set.
R=$(seq "${REPS:-3}")

device() {
  echo "== device: $gpus GPU(s) on this host"
  nvidia-smi --query-gpu=index,name,memory.total,driver_version,pci.bus_id --format=csv,noheader
  "$PY" -c "import torch, accelerate; print('torch', torch.__version__, 'accelerate', accelerate.__version__, 'nccl', torch.cuda.nccl.version())"
  nvidia-smi --query-gpu=index,persistence_mode --format=csv,noheader
  nproc; free -g | head -2
}

probe() {
  echo "== CUDA's start-up alone (driver API, no torch): cuInit, then the first context, N processes at once"
  "$PY" "$P/cuda_init_probe.py"
  echo "== where hasten's launch time goes (HASTEN_TRACE_INIT=1, L3)"
  for n in 2 "$gpus"; do HASTEN_TRACE_INIT=1 "$B/bench-l3" "$n" 2>&1 | grep -E "BENCH|trace"; done
}

checks() {
  "$B/hasten" env --check
  echo "== NCCL correctness (the checks CI runs on CPUs), each rank bound to its GPU (the default)"
  launch --num_processes 2 "$B/hasten-test-worker" --ops
  launch --num_processes 2 --debug "$B/hasten-test-worker" --ops
  launch --num_processes "$gpus" "$B/hasten-test-worker" --ops
  echo "-- the same, every rank seeing every GPU (HASTEN_GPU_BINDING=0)"
  HASTEN_GPU_BINDING=0 launch --num_processes 2 "$B/hasten-test-worker" --ops
  HASTEN_GPU_BINDING=0 launch --num_processes "$gpus" "$B/hasten-test-worker" --ops
  echo "-- notebook_launcher"
  "$B/hasten-test-notebook" ops 2
  "$B/hasten-test-notebook" ops "$gpus"
  "$B/hasten-test-notebook" value 2
  "$B/hasten-test-notebook" refuse-cuda
  echo "-- train_demo on 2 GPUs, fp32 and bf16"
  launch --num_processes 2 "$B/train_demo" 2>&1 | tail -3
  launch --num_processes 2 --mixed_precision bf16 "$B/train_demo" 2>&1 | tail -2
  echo "-- under torchrun (the environment contract alone; every rank sees every GPU)"
  /opt/torch/.venv/bin/torchrun --nproc_per_node 2 --no-python "$B/hasten-test-worker" --ops 2>&1 |
    grep -E "ops checks|FAILED|rror|computes on"
  echo "torchrun exit status: ${PIPESTATUS[0]}"
}

latency() {
  echo "== L1: notebook_launcher to the first all-reduce, then the return"
  for n in 2 "$gpus"; do
    for i in 1 2 3 4 5; do "$B/bench-l1" "$n" | grep BENCH; done
    for i in 1 2 3; do HASTEN_GPU_BINDING=0 "$B/bench-l1" "$n" | sed 's/BENCH/BENCH unbound/' | grep BENCH; done
    for i in 1 2 3; do "$PY" "$P/py_bench.py" l1 "$n" 2>&1 | grep ANCHOR; done
  done
  HASTEN_TRACE_INIT=1 "$B/bench-l1" 2 2>&1 | grep -E "BENCH|trace"
  echo "== L2: the CLI launcher to the first all-reduce on rank 0"
  for n in 2 "$gpus"; do
    for i in 1 2 3 4 5; do HASTEN_BENCH_T0=$(t0) launch --num_processes "$n" "$B/bench-l2" | grep BENCH; done
    for i in 1 2 3; do HASTEN_BENCH_T0=$(t0) HASTEN_GPU_BINDING=0 launch --num_processes "$n" "$B/bench-l2" | sed 's/BENCH/BENCH unbound/' | grep BENCH; done
    for i in 1 2 3; do
      HASTEN_BENCH_T0=$(t0) "$PY" -m accelerate.commands.launch --multi_gpu --num_processes "$n" --main_process_port 29517 "$P/py_l2.py" 2>&1 | grep ANCHOR
    done
  done
  echo "== L3: notebook_launcher to the end of every rank's first DDP step of S (gradients over NCCL)"
  for n in 2 "$gpus"; do
    for i in 1 2 3 4 5; do "$B/bench-l3" "$n" | grep BENCH; done
    for i in 1 2 3; do HASTEN_GPU_BINDING=0 "$B/bench-l3" "$n" | sed 's/BENCH/BENCH unbound/' | grep BENCH; done
    for i in 1 2 3; do "$PY" "$P/py_l3.py" "$n" 2>&1 | grep ANCHOR; done
  done
}

collectives() {
  echo "== C1, C2 on 2 GPUs: all-reduce bandwidth, small gather; bound, unbound, Python"
  for i in 1 2 3; do
    launch --num_processes 2 "$B/bench-collectives" | grep BENCH
    HASTEN_GPU_BINDING=0 launch --num_processes 2 "$B/bench-collectives" | sed 's/BENCH/BENCH unbound/' | grep BENCH
    "$PY" "$P/py_bench.py" c 2 2>&1 | grep ANCHOR
  done
  echo "== CPU collectives: hasten's TCP + shared memory against gloo, 2 processes"
  for i in 1 2 3; do
    launch --num_processes 2 --cpu "$B/bench-collectives" | grep allreduce
    CUDA_VISIBLE_DEVICES= "$PY" "$P/py_cpu_allreduce.py" 2 2>&1 | grep ANCHOR
  done
}

train() {
  for kind in S M; do
    for n in 1 2; do
      echo "== $kind on $n GPU(s)"
      for i in $R; do
        launch --num_processes $n "$B/bench-train" $kind | grep BENCH
        "$PY" "$P/py_bench.py" $kind $n 2>&1 | grep ANCHOR
      done
    done
  done
  echo "== loss curve of M on one GPU from the same weights and batch"
  local init=/tmp/hasten_m_init.safetensors
  "$B/bench-train" M --write-init $init
  launch --num_processes 1 "$B/bench-train" M --init $init --warmup 0 --steps 10 --losses | grep losses
  "$PY" "$P/py_train_losses.py" $init 10 2>&1 | grep ANCHOR
}

dispatch() {
  echo "== D2: an iterable dataset through the Accelerator on 2 GPUs, dispatched and sharded"
  for round in $R; do
    for mode in dispatch shard; do
      launch --num_processes 2 "$B/bench-dispatch" $mode --epochs 3 2>&1 | grep BENCH
      "$PY" -m accelerate.commands.launch --num_processes 2 --main_process_port 29517 "$P/py_dispatch.py" $mode 3 2>&1 | grep BENCH
    done
  done
}

bigmodel() {
  local ckpt=/tmp/bigmodel_ckpt
  raw() { local a b; a=$(date +%s.%N); cat "$ckpt"/*.safetensors > /dev/null; b=$(date +%s.%N); echo "RAW {\"part\": \"raw_read_$1\", \"s\": $(awk "BEGIN {print $b - $a}")}"; }
  drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || echo "(cannot drop the page cache here)"; }
  h() { "$B/bench-bigmodel" "$ckpt" "$1" | grep BENCH; }
  p() { "$PY" "$P/py_bigmodel.py" "$ckpt" "$1" 2>&1 | grep ANCHOR; }
  echo "== checkpoint (py_bigmodel.py make)"; "$PY" "$P/py_bigmodel.py" "$ckpt" make 2>&1 | grep ANCHOR
  echo "== B1: 1 GPU visible, warm page cache (clocks start before any CUDA call, dispatch included)"
  raw warm; raw warm
  for i in $R; do CUDA_VISIBLE_DEVICES=0 h load; CUDA_VISIBLE_DEVICES=0 p load; done
  raw warm
  echo "== B2: 2 GPUs visible, warm"
  for i in $R; do CUDA_VISIBLE_DEVICES=0,1 h load; CUDA_VISIBLE_DEVICES=0,1 p load; done
  raw warm
  echo "== B2: 2 GPUs visible, cold (each load after dropping the page cache; a cold cat before each hasten load)"
  for i in $R; do
    drop; raw cold
    drop; CUDA_VISIBLE_DEVICES=0,1 h load
  done
  drop; CUDA_VISIBLE_DEVICES=0,1 p load
  drop; CUDA_VISIBLE_DEVICES=0,1 p load
  echo "== B3: 3 GiB on GPU 0, 3 GiB on the CPU, the rest on disk"
  raw warm
  for i in $R; do CUDA_VISIBLE_DEVICES=0 h offload; CUDA_VISIBLE_DEVICES=0 p offload; done
}

device
for part in "$@"; do
  echo "######## $part"
  case $part in
    probe) probe ;;
    checks) checks ;;
    launch) latency ;;
    collectives) collectives ;;
    train) train ;;
    dispatch) dispatch ;;
    bigmodel) bigmodel ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
done
