"""Expected values for hasten's tests/bin/training.rs `dispatch` check: Accelerate 1.15, CPU, gloo, P=2 and 3
(accelerate.debug_launcher). A map dataset of 21 labels, batch 4, dispatch_batches=True: each rank's batches,
len(), and the same after skip_first_batches(1) and (2); and an iterable (sized) dataset read with
dispatch_batches=False, skip 1."""
import json, os, sys
N = int(sys.argv[1]) if len(sys.argv) > 1 else 2

def worker():
    import torch
    from torch.utils.data import DataLoader, IterableDataset
    from accelerate import Accelerator
    from accelerate.data_loader import skip_first_batches
    acc = Accelerator(cpu=True)
    out = {}
    def run(dl):
        return [b.tolist() for b in dl]
    c = acc.dataloader_config
    c.dispatch_batches = True
    p = acc.prepare(DataLoader(list(range(21)), batch_size=4))
    out["map_dispatch"] = {"len": len(p), "batches": run(p)}
    for k in (1, 2):
        s = skip_first_batches(p, k)
        out[f"map_dispatch_skip{k}"] = {"len": len(s), "batches": run(s)}
    class Sized(IterableDataset):
        def __init__(self, n): self.n = n
        def __iter__(self): return iter(range(self.n))
        def __len__(self): return self.n
    c.dispatch_batches = False
    p = acc.prepare(DataLoader(Sized(21), batch_size=4))
    out["iter_shard"] = {"len": len(p), "batches": run(p)}
    s = skip_first_batches(p, 1)
    out["iter_shard_skip1"] = {"len": len(s), "batches": run(s)}
    c.dispatch_batches = True
    p = acc.prepare(DataLoader(Sized(21), batch_size=4))
    out["iter_dispatch"] = {"len": len(p), "batches": run(p)}
    s = skip_first_batches(p, 1)
    out["iter_dispatch_skip1"] = {"len": len(s), "batches": run(s)}
    os.makedirs("/tmp/oracle_tests", exist_ok=True)
    json.dump(out, open(f"/tmp/oracle_tests/p{acc.num_processes}_r{acc.process_index}.json", "w"))

if __name__ == "__main__":
    from accelerate import debug_launcher
    debug_launcher(worker, num_processes=N)
    for r in range(N):
        d = json.load(open(f"/tmp/oracle_tests/p{N}_r{r}.json"))
        for k, v in d.items():
            print(f"P={N} rank {r} {k}: len {v['len']} {v['batches']}")
