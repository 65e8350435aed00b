"""Python Accelerate's loss curve for M (bf16, AdamW 1e-4, 1 GPU) from the weights and batch in a
safetensors file written by `bench-train M --write-init FILE`: `python py_train_losses.py FILE STEPS`."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import py_anchor as p  # noqa: E402

path, steps = sys.argv[1], int(sys.argv[2])
loaded = load_file(path)
acc = Accelerator(mixed_precision="bf16")
model = p.model_m()
model.load_state_dict({k: v for k, v in loaded.items() if not k.startswith("data.")})
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
model, opt = acc.prepare(model, opt)
x, y = loaded["data.x"].to(acc.device), loaded["data.y"].to(acc.device)
losses = []
for _ in range(steps):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    acc.backward(loss)
    opt.step()
    losses.append(loss.item())
print("ANCHOR " + json.dumps({"part": "losses_M_np1", "losses": losses}), flush=True)
