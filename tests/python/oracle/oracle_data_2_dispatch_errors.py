"""Topic 2 (single-process part): prepare-time checks of prepare_data_loader with dispatch/split.
num_processes/process_index are passed explicitly; no process group is needed for these checks."""
import os
import sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
from torch.utils.data import DataLoader
from accelerate.data_loader import prepare_data_loader, BatchSamplerShard, IterableDatasetShard
from oracle_data_common import Stream, real_class

def attempt(label, fn):
    try:
        r = fn()
        print(f"| {label} | OK -> {real_class(r)} |")
    except Exception as e:
        print(f"| {label} | {type(e).__name__}: {e} |")

print("| call | result |")
print("|---|---|")
for bs in [3, 1, 4]:
    dl = DataLoader(list(range(10)), batch_size=bs)
    attempt(f"map bs={bs}, P=2, dispatch=True, split=True, put_on_device=True",
            lambda: prepare_data_loader(dl, torch.device("cpu"), num_processes=2, process_index=0,
                                        dispatch_batches=True, split_batches=True, put_on_device=True))
dl = DataLoader(list(range(10)), batch_size=3)
attempt("map bs=3, P=2, dispatch=True, split=True, put_on_device=False (default)",
        lambda: prepare_data_loader(dl, num_processes=2, process_index=0, dispatch_batches=True, split_batches=True))
attempt("map bs=4, P=2, dispatch=True, split=False, put_on_device=False (default)",
        lambda: prepare_data_loader(DataLoader(list(range(10)), batch_size=4), num_processes=2, process_index=0, dispatch_batches=True))
attempt("map bs=3, P=2, dispatch=False, split=True",
        lambda: prepare_data_loader(dl, num_processes=2, process_index=0, split_batches=True))
attempt("iterable bs=3, P=2, dispatch=True, split=True, put_on_device=True",
        lambda: prepare_data_loader(DataLoader(Stream(10), batch_size=3), torch.device("cpu"), num_processes=2, process_index=0,
                                    dispatch_batches=True, split_batches=True, put_on_device=True))
attempt("map bs=3, P=2, dispatch=True, split=False, put_on_device=True (constructed; iteration needs a real group)",
        lambda: prepare_data_loader(dl, torch.device("cpu"), num_processes=2, process_index=0,
                                    dispatch_batches=True, split_batches=False, put_on_device=True))
# Direct class constructors
attempt("BatchSamplerShard(BatchSampler bs=3, P=2, split=True)",
        lambda: BatchSamplerShard(dl.batch_sampler, num_processes=2, process_index=0, split_batches=True))
attempt("IterableDatasetShard(bs=3, P=2, split=True)",
        lambda: IterableDatasetShard(Stream(10), batch_size=3, num_processes=2, process_index=0, split_batches=True))
attempt("IterableDatasetShard(bs=1, P=2, split=True)",
        lambda: IterableDatasetShard(Stream(10), batch_size=1, num_processes=2, process_index=0, split_batches=True))

attempt("map bs=1, P=2, dispatch=False, split=True",
        lambda: prepare_data_loader(DataLoader(list(range(10)), batch_size=1), num_processes=2, process_index=0, split_batches=True))
attempt("iterable bs=1, P=2, dispatch=False, split=True",
        lambda: prepare_data_loader(DataLoader(Stream(10), batch_size=1), num_processes=2, process_index=0, split_batches=True))
attempt("iterable bs=3, P=2, dispatch=False, split=True",
        lambda: prepare_data_loader(DataLoader(Stream(10), batch_size=3), num_processes=2, process_index=0, split_batches=True))

# Dispatcher's num_processes comes from PartialState, not from the argument:
p = prepare_data_loader(DataLoader(list(range(10)), batch_size=2), torch.device("cpu"), num_processes=2, process_index=0,
                        dispatch_batches=True, put_on_device=True)
print()
print("dispatcher built with num_processes=2 in a 1-process run: len =", len(p), "batches =", [b.tolist() for b in p],
      "(its PartialState says num_processes =", p.state.num_processes, ")")
