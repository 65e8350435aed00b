"""CPU all-reduce through Python Accelerate (gloo), the counterpart of `hasten launch --cpu bench-collectives`:
bf16 tensors of 1 MiB, 64 MiB and 1 GiB, 5 warm-up and 20 timed calls, bus bandwidth like C1."""
import json
import sys
import time

import torch
import torch.distributed as dist
from accelerate import Accelerator, notebook_launcher


def cpu_allreduce():
    acc = Accelerator(cpu=True)
    n = acc.num_processes
    for nbytes in (1 << 20, 64 << 20, 1 << 30):
        t = torch.ones(nbytes // 2, dtype=torch.bfloat16)
        for _ in range(5):
            dist.all_reduce(t)
        it = 20
        ts = time.time()
        for _ in range(it):
            dist.all_reduce(t)
        el = (time.time() - ts) / it
        if acc.is_main_process:
            print("ANCHOR " + json.dumps({"part": f"cpu_allreduce_bf16_{nbytes}", "time_us": el * 1e6,
                                          "busbw_GBps": 2 * (n - 1) / n * nbytes / el / 1e9}), flush=True)


if __name__ == "__main__":
    notebook_launcher(cpu_allreduce, (), num_processes=int(sys.argv[1]) if len(sys.argv) > 1 else 2)
