"""Python Accelerate's side of L2: run by `accelerate launch --multi_gpu --num_processes 2`; joins the
group and does one all-reduce on its GPU. HASTEN_BENCH_T0 is the shell's time just before the launcher."""
import json
import os
import time

import torch
from accelerate import Accelerator

t0 = float(os.environ["HASTEN_BENCH_T0"])
acc = Accelerator()
x = torch.ones(1, device=acc.device)
y = acc.reduce(x, "sum")
s = y.item()
if acc.is_main_process:
    print("ANCHOR " + json.dumps({"part": "launch_cli_first_collective_s", "value": time.time() - t0, "sum": s}), flush=True)
