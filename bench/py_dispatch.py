"""Python Accelerate's side of D2 (bench/src/dispatch.rs): an IterableDataset of [65536, 784] rows and
int64 labels, batch 128, prepared on 2 processes and read to the end.
`accelerate launch --num_processes 2 py_dispatch.py dispatch|shard [epochs]`."""
import json
import sys
import time

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from torch.utils.data import DataLoader, IterableDataset

SAMPLES, BATCH = 65536, 128


class Rows(IterableDataset):
    def __init__(self):
        torch.manual_seed(0)
        self.x = torch.randn(SAMPLES, 784)
        self.y = torch.randint(10, (SAMPLES,))

    def __iter__(self):
        for i in range(SAMPLES):
            yield self.x[i], self.y[i]


def main():
    mode = sys.argv[1]
    epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    acc = Accelerator(dataloader_config=DataLoaderConfiguration(dispatch_batches=(mode == "dispatch")))
    dl = acc.prepare(DataLoader(Rows(), batch_size=BATCH))
    for epoch in range(epochs + 1):
        acc.wait_for_everyone()
        t0 = time.time()
        batches, checksum = 0, 0
        for x, y in dl:
            batches += 1
            checksum += int(y.sum()) + x.shape[0]
        acc.wait_for_everyone()
        s = time.time() - t0
        if acc.is_main_process and epoch > 0:
            print("BENCH " + json.dumps({"bench": "D2", "side": "python", "mode": mode, "epoch": epoch, "s": s,
                                         "samples_per_s": SAMPLES / s, "batches_per_rank": batches,
                                         "checksum_rank0": checksum}), flush=True)


if __name__ == "__main__":
    main()
