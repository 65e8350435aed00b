#!/usr/bin/env bash
# One device run (2 GPUs) for gradient averaging during the backward (issue 4) and the cold-cache load
# (issue 5). M2 and S2 with the overlap on and off (HASTEN_DDP_OVERLAP=0), Python Accelerate interleaved;
# M's loss curve on 2 GPUs with different data per rank, overlap on against off; train_demo on 2 GPUs;
# then B2 warm and cold with the read-ahead, and what get_max_memory costs.
#   bash bench/run_gpu_overlap.sh BIN_DIR PY_DIR
set -u
B=${1:?binaries folder}
P=${2:?python folder}
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/torch/lib
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
PY=/opt/torch/.venv/bin/python3
launch() { "$B/hasten" launch --main_process_port 0 "$@"; }

echo "== device"; nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
for kind in M S; do
  echo "== $kind on 2 GPUs: overlap on, off, Python"
  for i in 1 2 3; do
    launch --num_processes 2 "$B/bench-train" $kind
    HASTEN_DDP_OVERLAP=0 launch --num_processes 2 "$B/bench-train" $kind
    "$PY" "$P/py_bench.py" $kind 2 2>&1 | grep ANCHOR
  done
done
echo "== M loss curve on 2 GPUs, different data per rank: overlap on, then off"
INIT=/tmp/hasten_m_init.safetensors
"$B/bench-train" M --write-init $INIT
HASTEN_TRACE_DDP=1 launch --num_processes 2 "$B/bench-train" M --init $INIT --warmup 0 --steps 10 --losses --rank-data 2>&1 | grep -E "losses|trace" | sort | uniq -c | head -5
HASTEN_DDP_OVERLAP=0 launch --num_processes 2 "$B/bench-train" M --init $INIT --warmup 0 --steps 10 --losses --rank-data | grep losses
echo "== train_demo on 2 GPUs"
launch --num_processes 2 "$B/train_demo" 2>&1 | tail -4

CKPT=/tmp/bigmodel_ckpt
raw() { local t0 t1; t0=$(date +%s.%N); cat "$CKPT"/*.safetensors > /dev/null; t1=$(date +%s.%N); echo "RAW {\"part\": \"raw_read_$1\", \"s\": $(awk "BEGIN {print $t1 - $t0}")}"; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null && echo "(page cache dropped)" || echo "(cannot drop the page cache here)"; }
hasten() { "$B/bench-bigmodel" "$CKPT" "$1" | grep BENCH; }
python() { "$PY" "$P/py_bigmodel.py" "$CKPT" "$1" 2>&1 | grep ANCHOR; }
echo "== checkpoint (py_bigmodel.py make)"; "$PY" "$P/py_bigmodel.py" "$CKPT" make 2>&1 | grep ANCHOR
echo "== get_max_memory (CUDA up on both GPUs)"; for i in 1 2; do "$B/bench-bigmodel" "$CKPT" maxmem | grep BENCH; done
echo "== B2 warm"; raw warm; raw warm; for i in 1 2; do hasten load; done; python load
echo "== B2 cold"
drop; raw cold
drop; hasten load
drop; raw cold
drop; hasten load
drop; python load
drop; hasten load
