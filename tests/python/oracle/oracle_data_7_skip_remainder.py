"""Topic 5 cause: why gradient_state.remainder is -1 on a loader returned by skip_first_batches(DataLoaderShard).
One process; the shard is built with prepare_data_loader(num_processes=2, process_index=1) (no group needed)."""
import os
import sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch.utils.data import DataLoader
from accelerate.data_loader import prepare_data_loader, skip_first_batches
from accelerate.state import GradientState
from oracle_data_common import SizedStream

gs = GradientState()
for n in (10, 11):
    p = prepare_data_loader(DataLoader(list(range(n)), batch_size=2), num_processes=2, process_index=1)
    sk = skip_first_batches(p, 1)
    try:
        tbs = sk.total_batch_size
    except Exception as e:
        tbs = f"{type(e).__name__}: {e}"
    rows = []
    for b in p:
        rows.append((b.tolist(), gs.end_of_dataloader, gs.remainder))
    srows = []
    for b in sk:
        srows.append((b.tolist(), gs.end_of_dataloader, gs.remainder))
    print(f"n={n} rank1: prepared total_batch_size={p.total_batch_size} _drop_last={p._drop_last} steps={rows}")
    print(f"      skipped: class batch_sampler={type(sk.batch_sampler).__name__} has batch_size attr="
          f"{hasattr(sk.batch_sampler, 'batch_size')} total_batch_size -> {tbs}; _drop_last={sk._drop_last}; steps={srows}")
p = prepare_data_loader(DataLoader(list(range(10)), batch_size=2, drop_last=True), num_processes=2, process_index=1)
sk = skip_first_batches(p, 1)
print(f"drop_last=True: prepared _drop_last={p._drop_last}, skipped _drop_last={sk._drop_last}")
p = prepare_data_loader(DataLoader(SizedStream(10), batch_size=2), num_processes=2, process_index=1)
print(f"sized iterable n=10 P=2: len(dataset IterableDatasetShard)={len(p.dataset)} total_batch_size={p.total_batch_size} "
      f"steps={[(b.tolist(), gs.end_of_dataloader, gs.remainder) for b in p]}")
