"""Topic 1: one process. Accelerator.prepare (and prepare_data_loader) on map-style and iterable datasets."""
import os
import itertools, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
from torch.utils.data import DataLoader
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.state import AcceleratorState, GradientState
from oracle_data_common import Stream, SizedStream, real_class, run_epoch, safe_len

SIZES = [(3, 2), (5, 2), (7, 3)]

def make_acc(split, even, dispatch=None):
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(
        split_batches=split, even_batches=even, dispatch_batches=dispatch))

print("## map-style, Accelerator.prepare, num_processes=1")
print("| n | bs | drop_last | split | even | class | batch_sampler | len | batches (end_of_dataloader, remainder per step) |")
print("|---|---|---|---|---|---|---|---|---|")
for (n, bs), drop, split, even in itertools.product(SIZES, [False, True], [False, True], [True, False]):
    acc = make_acc(split, even)
    dl = DataLoader(list(range(n)), batch_size=bs, drop_last=drop)
    try:
        p = acc.prepare(dl)
    except Exception as e:
        print(f"| {n} | {bs} | {drop} | {split} | {even} | {type(e).__name__}: {e} |")
        continue
    steps = run_epoch(p, acc.gradient_state)
    bsamp = type(p.batch_sampler).__name__ + ("(same object)" if p.batch_sampler is dl.batch_sampler else "")
    s = " ".join(f"{b}({'E' if e else '-'},{r})" for b, e, r in steps)
    print(f"| {n} | {bs} | {drop} | {split} | {even} | {real_class(p)} | {bsamp} | {len(p)} | {s} |")

print()
print("## IterableDataset, Accelerator.prepare, num_processes=1 (dispatch_batches default None and False)")
print("| n | bs | drop_last | split | even | dispatch | sized | class | len | batches (E=end_of_dataloader, remainder) |")
print("|---|---|---|---|---|---|---|---|---|---|")
for (n, bs), drop, split, dispatch, sized in itertools.product(SIZES, [False, True], [False, True], [None, False], [False, True]):
    acc = make_acc(split, True, dispatch)
    ds = SizedStream(n) if sized else Stream(n)
    dl = DataLoader(ds, batch_size=bs, drop_last=drop)
    try:
        p = acc.prepare(dl)
        steps = run_epoch(p, acc.gradient_state)
    except Exception as e:
        print(f"| {n} | {bs} | {drop} | {split} | - | {dispatch} | {sized} | {type(e).__name__}: {e} |")
        continue
    s = " ".join(f"{b}({'E' if e else '-'},{r})" for b, e, r in steps)
    print(f"| {n} | {bs} | {drop} | {split} | - | {dispatch} | {sized} | {real_class(p)} (dataset {type(p.dataset).__name__}) | {safe_len(p)} | {s} |")

print()
print("## prepare_data_loader(num_processes=1, process_index=0, put_on_device=False) - no Accelerator config")
from accelerate.data_loader import prepare_data_loader
for (n, bs), drop in itertools.product(SIZES, [False, True]):
    dl = DataLoader(list(range(n)), batch_size=bs, drop_last=drop)
    p = prepare_data_loader(dl, num_processes=1, process_index=0)
    print(n, bs, drop, real_class(p), type(p.batch_sampler).__name__, p.batch_sampler is dl.batch_sampler, len(p), [b.tolist() for b in p])

print()
print("## For comparison: Accelerate's BatchSamplerShard / IterableDatasetShard constructed directly with num_processes=1")
print("## (prepare_data_loader does NOT apply them when num_processes == 1; these rows show what applying them would give)")
from accelerate.data_loader import BatchSamplerShard, IterableDatasetShard
print("| n | bs | drop_last | split | even | BatchSamplerShard(P=1) batches | len | IterableDatasetShard(P=1) items |")
print("|---|---|---|---|---|---|---|---|")
for (n, bs), drop, split, even in itertools.product(SIZES, [False, True], [False, True], [True, False]):
    bsamp = DataLoader(list(range(n)), batch_size=bs, drop_last=drop).batch_sampler
    sh = BatchSamplerShard(bsamp, num_processes=1, process_index=0, split_batches=split, even_batches=even)
    ish = list(IterableDatasetShard(Stream(n), batch_size=bs, drop_last=drop, num_processes=1, process_index=0, split_batches=split))
    print(f"| {n} | {bs} | {drop} | {split} | {even} | {list(sh)} | {len(sh)} | {ish} |")
