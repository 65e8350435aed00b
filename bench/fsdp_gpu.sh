#!/usr/bin/env bash
# F1/F2 of shared/bench/WORKLOADS.md (sharded training), hasten's bench-fsdp against py_fsdp.py (Python
# Accelerate's FSDP2) side by side in one run. Usage, from the repository root on the GPU machine:
#   bash bench/fsdp_gpu.sh BIN_DIR PY_DIR PART...
# PART: f1 (4 GPUs, REPS runs of each side, plus DDP), f1x2 (2 GPUs), losses (F8, first 13 losses, FSDP
# against DDP), f2 (48 blocks), start (F2 built whole, then under init_empty_weights), ctas (F2 with
# NCCL_MAX_CTAS 8 and 16, hasten only), phases (peak memory and time of each phase of warm-up step 1, both sides; BLOCKS=8 and N=4 ranks by default), ac (activation checkpointing, both sides), offload (CPU offload), quick (F8 under each option, hasten alone, on N ranks, default 4), demo (README's loop under --use_fsdp on 2 GPUs against DDP), hybrid (HYBRID_SHARD as 2 machines × 2 GPUs on this host, both sides), ci (CI's FSDP training checks
# on the GPUs, 4, 3 and 2 ranks).
set -u
B=${1:?binaries folder}
P=${2:?python folder}
shift 2
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/torch/lib
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
PY=/opt/torch/.venv/bin/python3
launch() { "$B/hasten" launch --main_process_port 0 "$@"; }
pylaunch() { "$PY" -m accelerate.commands.launch --multi_gpu --main_process_port 29531 "$@"; }
# hasten, then Python, on N ranks: MODE BLOCKS STEPS (one line each).
both() {
  local n=$1; shift
  launch --num_processes "$n" "$B/bench-fsdp" "$@" 2>&1 | grep -E "BENCH|rror|panick"
  pylaunch --num_processes "$n" "$P/py_fsdp.py" "$@" 2>&1 | grep -E "ANCHOR|rror"
}
# A copy of py_fsdp.py (to $2) whose plugin also sets $1 (e.g. "cpu_offload=True,").
py_with() {
  "$PY" - "$P/py_fsdp.py" "$2" "$1" <<'PYEOF'
import sys
src = open(sys.argv[1]).read()
old = "reshard_after_forward=True,"
assert old in src
open(sys.argv[2], "w").write(src.replace(old, old + " " + sys.argv[3]))
PYEOF
}
gpus=$(nvidia-smi -L | wc -l)
R=$(seq "${REPS:-3}")
echo "== device: $gpus GPU(s) on this host"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch, accelerate; print('torch', torch.__version__, 'accelerate', accelerate.__version__)"

for part in "$@"; do
  case $part in
    f1)
      echo "== F1: F8 (1.09 B parameters), 4 ranks, FSDP FULL_SHARD per block, 3 + 10 steps"
      for i in $R; do both 4 fsdp 8 10; done
      echo "-- DDP, for scale (one run each)"
      both 4 ddp 8 10
      ;;
    f1x2)
      echo "== F1 on 2 GPUs"
      for i in $R; do both 2 fsdp 8 10; done
      ;;
    losses)
      echo "== F8's losses, FSDP against DDP (4 ranks, the same seed and data)"
      launch --num_processes 4 "$B/bench-fsdp" fsdp 8 10 --losses 2>&1 | grep -E "BENCH|rror|panick"
      launch --num_processes 4 "$B/bench-fsdp" ddp 8 10 --losses 2>&1 | grep -E "BENCH|rror|panick"
      ;;
    f2)
      echo "== F2: F48 (6.46 B parameters), 4 ranks, 3 + 5 steps"
      for i in $R; do both 4 fsdp 48 5; done
      ;;
    start)
      echo "== F2's start: the model built whole on each GPU, then under init_empty_weights (each rank"
      echo "   materialising its shard only); peaks of GPU memory and host resident set per rank"
      launch --num_processes 4 "$B/bench-fsdp" fsdp 48 5 2>&1 | grep -E "BENCH|rror|panick"
      launch --num_processes 4 "$B/bench-fsdp" fsdp 48 5 --empty 2>&1 | grep -E "BENCH|rror|panick"
      ;;
    ctas)
      echo "== F2 with NCCL's CTAs per collective capped (hasten only): fewer SMs taken from the GEMMs"
      for c in 8 16; do
        echo "-- NCCL_MAX_CTAS=$c"
        NCCL_MAX_CTAS=$c launch --num_processes 4 "$B/bench-fsdp" fsdp 48 5 2>&1 | grep -E "BENCH|rror|panick"
      done
      ;;
    phases)
      pb=${BLOCKS:-8}
      echo "== Where F$pb's peak is (warm-up step 1, rank 0): peak GPU memory and time (GPU drained at"
      echo "   each phase's end) of each phase, both sides"
      # A copy of py_fsdp.py that reports the same phases (not a figure: it synchronises in that step).
      "$PY" - "$P/py_fsdp.py" /tmp/py_phases.py <<'PYEOF'
import sys
src = open(sys.argv[1]).read()
old = """            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x).float(), y)
            acc.backward(loss)
            opt.step()
"""
new = """            ph = []
            def mark(name):
                if i == 1:
                    torch.cuda.synchronize()
                    now = time.time()
                    ph.append((name, torch.cuda.max_memory_allocated() / 1e9,
                               (now - mark.t) * 1e3 if hasattr(mark, "t") else 0.0))
                    mark.t = now
                    torch.cuda.reset_peak_memory_stats()
            mark("before")
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x).float(), y)
            mark("forward")
            acc.backward(loss)
            mark("backward")
            opt.step()
            mark("step")
            if i == 1 and acc.is_main_process:
                print("PHASES", ph, flush=True)
"""
assert old in src
open(sys.argv[2], "w").write(src.replace(old, new))
PYEOF
      launch --num_processes "${N:-4}" "$B/bench-fsdp" fsdp "$pb" 5 2>&1 | grep -E "BENCH|rror|panick"
      pylaunch --num_processes "${N:-4}" /tmp/py_phases.py fsdp "$pb" 5 2>&1 | grep -E "PHASES|ANCHOR|rror"
      ;;
    ac)
      echo "== Activation checkpointing per block, both sides (Python: a copy of py_fsdp.py whose plugin"
      echo "   sets activation_checkpointing=True), F8 then F48 on 4 ranks"
      py_with "activation_checkpointing=True," /tmp/py_ac.py
      for blocks in 8 48; do
        launch --num_processes 4 "$B/bench-fsdp" fsdp $blocks 10 --ac 2>&1 | grep -E "BENCH|rror|panick"
        pylaunch --num_processes 4 /tmp/py_ac.py fsdp $blocks 10 2>&1 | grep -E "ANCHOR|rror"
      done
      ;;
    offload)
      echo "== CPU offload (shards, gradients and the optimizer on the host), F8 on 4 ranks, both sides"
      echo "   (Python: a copy of py_fsdp.py whose plugin sets cpu_offload=True), then F48 hasten alone"
      py_with "cpu_offload=True," /tmp/py_offload.py
      launch --num_processes 4 "$B/bench-fsdp" fsdp 8 10 --offload 2>&1 | grep -E "BENCH|rror|panick"
      pylaunch --num_processes 4 /tmp/py_offload.py fsdp 8 10 2>&1 | grep -E "ANCHOR|rror"
      launch --num_processes 4 "$B/bench-fsdp" fsdp 48 3 --offload 2>&1 | grep -E "BENCH|rror|panick"
      ;;
    quick)
      echo "== hasten alone, ${N:-4} ranks: F8 plain, with activation checkpointing, offloaded, from empty weights"
      for extra in "" --ac --offload --empty; do
        launch --num_processes "${N:-4}" "$B/bench-fsdp" fsdp 8 10 $extra 2>&1 | grep -E "BENCH|rror|panick"
      done
      ;;
    hybrid)
      echo "== HYBRID_SHARD, F8, as 2 machines x 2 GPUs on this host (one launch per machine: GPUs 0,1"
      echo "   and 2,3; sharded within a machine, replicated across). Python: a copy of py_fsdp.py whose"
      echo "   Accelerator gets ParallelismConfig(dp_replicate_size=2, dp_shard_size=2) (FSDP2's HSDP)."
      "$PY" - "$P/py_fsdp.py" /tmp/py_hsdp.py <<'PYEOF'
import sys
src = open(sys.argv[1]).read()
old = 'acc = Accelerator(mixed_precision="bf16", fsdp_plugin=plugin)'
assert old in src
new = ('from accelerate.parallelism_config import ParallelismConfig\n'
       '        acc = Accelerator(mixed_precision="bf16", fsdp_plugin=plugin, '
       'parallelism_config=ParallelismConfig(dp_replicate_size=2, dp_shard_size=2))')
open(sys.argv[2], "w").write(src.replace(old, new))
PYEOF
      export HASTEN_RDZV_SECRET=bench
      # One machine of the job: MACHINE_RANK GPU_IDS PORT [EXTRA...].
      hyb() {
        "$B/hasten" launch --num_processes 4 --num_machines 2 --machine_rank "$1" --gpu_ids "$2" \
          --main_process_ip 127.0.0.1 --main_process_port "$3" "$B/bench-fsdp" fsdp 8 10 --hybrid "${@:4}"
      }
      pyhyb() {
        "$PY" -m accelerate.commands.launch --multi_gpu --num_processes 4 --num_machines 2 \
          --machine_rank "$1" --gpu_ids "$2" --main_process_ip 127.0.0.1 --main_process_port "$3" \
          /tmp/py_hsdp.py fsdp 8 10
      }
      for i in $R; do
        hyb 1 2,3 $((29640 + i)) >/tmp/hyb1.log 2>&1 &
        hyb 0 0,1 $((29640 + i)) 2>&1 | grep -E "BENCH|rror|panick"
        wait; grep -E "rror|panick" /tmp/hyb1.log
        pyhyb 1 2,3 $((29650 + i)) >/tmp/pyhyb1.log 2>&1 &
        pyhyb 0 0,1 $((29650 + i)) 2>&1 | grep -E "ANCHOR|rror"
        wait; grep -E "rror" /tmp/pyhyb1.log | head -5
      done
      echo "-- the losses: HYBRID_SHARD as 2 x 2, then FULL_SHARD and DDP over the 4 GPUs"
      hyb 1 2,3 29660 --losses >/tmp/hyb1.log 2>&1 &
      hyb 0 0,1 29660 --losses 2>&1 | grep -E "BENCH|rror|panick"
      wait; grep -E "rror|panick" /tmp/hyb1.log
      launch --num_processes 4 "$B/bench-fsdp" fsdp 8 10 --losses 2>&1 | grep -E "BENCH|rror|panick"
      launch --num_processes 4 "$B/bench-fsdp" ddp 8 10 --losses 2>&1 | grep -E "BENCH|rror|panick"
      echo "-- FULL_SHARD over the same 4 GPUs (one launch), for scale"
      both 4 fsdp 8 10
      ;;
    ci)
      echo "== CI's FSDP training checks on the GPUs (HASTEN_TEST_GPU=1; fp32 against one process, bf16"
      echo "   within its tolerance): one unit, per block, bf16, offloaded; 4, 3 (uneven rows) and 2 ranks"
      for n in 4 3 2; do
        # W: per block; bf16: the launcher's --mixed_precision bf16 (it exports the workers' precision).
        for opts in "fsdp" "fsdp_blocks W" "fsdp_blocks W bf16" "fsdp_blocks W FSDP_OFFLOAD_PARAMS=true"; do
          set -- $opts
          mode=$1; shift
          env=(HASTEN_TEST_GPU=1 ACCELERATE_USE_FSDP=true FSDP_VERSION=2)
          flags=()
          for e in "$@"; do
            case $e in
              W) env+=(FSDP_AUTO_WRAP_POLICY=TRANSFORMER_BASED_WRAP FSDP_TRANSFORMER_CLS_TO_WRAP=Block) ;;
              bf16) flags+=(--mixed_precision bf16) ;;
              *) env+=("$e") ;;
            esac
          done
          echo "-- $n ranks: $opts"
          env "${env[@]}" "$B/hasten" launch "${flags[@]}" --num_processes "$n" --main_process_port 0 \
            "$B/hasten-test-training" "$mode" 2>&1 | grep -E "training check|mixed precision|rror|panick" \
            | sed 's/.*mixed precision/mixed precision/' | sort | uniq -c
        done
      done
      ;;
    demo)
      echo "== README's loop (train_demo) on 2 GPUs: DDP, then FSDP by flags alone"
      launch --num_processes 2 "$B/train_demo" 2>&1 | tail -2
      launch --num_processes 2 --use_fsdp --fsdp_version 2 "$B/train_demo" 2>&1 | tail -2
      launch --num_processes 2 --use_fsdp --fsdp_version 2 --mixed_precision bf16 "$B/train_demo" 2>&1 | tail -2
      ;;
  esac
done
