"""Topic 4 addendum: use_seedable_sampler=True WITHOUT set_seed/data_seed, with independent processes
(torch.distributed.run, like `accelerate launch`), not forked ones. Run:
  python -m torch.distributed.run --nproc_per_node 2 --master_port 29531 oracle_data_5_torchrun_noseed.py
Each rank prints its initial seed and its batches (n=10, bs=2)."""
import torch
from torch.utils.data import DataLoader
from accelerate import Accelerator, DataLoaderConfiguration

acc = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
p = acc.prepare(DataLoader(list(range(10)), batch_size=2, shuffle=True))
mine = [b.tolist() for b in p]
allb = acc.gather_for_metrics(torch.tensor(sum(mine, [])), use_gather_object=False)
print(f"rank {acc.process_index}: initial_seed={p.batch_sampler.batch_sampler.sampler.initial_seed} batches={mine}", flush=True)
acc.wait_for_everyone()
if acc.is_main_process:
    flat = sorted(allb.tolist())
    print("all indices seen in epoch 0 (sorted):", flat, "| distinct:", len(set(flat)), "of 10", flush=True)
