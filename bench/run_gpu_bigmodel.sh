#!/usr/bin/env bash
# One device run for big-model inference (issue 5): B1, B2 (warm and cold) and B3 for hasten and Python
# Accelerate side by side, on a machine with 2 GPUs. Python writes the checkpoint both sides read.
#   bash bench/run_gpu_bigmodel.sh BIN_DIR PY_DIR     (PY_DIR holds py_bigmodel.py)
set -u
B=${1:?binaries folder}
P=${2:?python folder}
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/torch/lib
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
PY=/opt/torch/.venv/bin/python3
CKPT=/tmp/bigmodel_ckpt
raw() { local t0 t1; t0=$(date +%s.%N); cat "$CKPT"/*.safetensors > /dev/null; t1=$(date +%s.%N); echo "RAW {\"part\": \"raw_read_$1\", \"s\": $(awk "BEGIN {print $t1 - $t0}")}"; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null && echo "(page cache dropped)" || echo "(cannot drop the page cache here)"; }
hasten() { "$B/bench-bigmodel" "$CKPT" "$1" | grep BENCH; }
python() { "$PY" "$P/py_bigmodel.py" "$CKPT" "$1" 2>&1 | grep ANCHOR; }

echo "== device"; nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader; nproc; free -g | head -2
echo "== checkpoint (py_bigmodel.py make)"; "$PY" "$P/py_bigmodel.py" "$CKPT" make 2>&1 | grep ANCHOR; ls -la "$CKPT"
raw warm; raw warm
echo "== host to GPU bandwidth"; "$B/bench-bigmodel" "$CKPT" h2d
echo "== B1: 1 GPU, warm page cache"
for i in 1 2; do CUDA_VISIBLE_DEVICES=0 hasten load; CUDA_VISIBLE_DEVICES=0 python load; done
echo "== B2: 2 GPUs, warm"
for i in 1 2; do hasten load; python load; done
echo "== B2: 2 GPUs, cold"
drop; raw cold
drop; hasten load
drop; python load
drop; hasten load
echo "== B3: 3 GiB on GPU 0, 3 GiB on the CPU, the rest on disk"
raw warm
for i in 1 2 3; do CUDA_VISIBLE_DEVICES=0 hasten offload; CUDA_VISIBLE_DEVICES=0 python offload; done
