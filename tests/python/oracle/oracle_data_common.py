"""Shared helpers for the oracle_data_*.py scripts (Accelerate 1.15.0, torch 2.11 CPU)."""
import torch
from torch.utils.data import IterableDataset


class Stream(IterableDataset):
    """An IterableDataset yielding 0..n-1 (no __len__)."""
    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter(range(self.n))


class SizedStream(Stream):
    """Same, with __len__."""
    def __len__(self):
        return self.n


def vals(b):
    if isinstance(b, torch.Tensor):
        return b.tolist()
    return b


def real_class(obj):
    # DataLoaderAdapter overrides __class__ to look like DataLoader; type() shows the real class.
    return type(obj).__name__


def run_epoch(dl, gs=None):
    """Iterate once, return list of (batch, end_of_dataloader, remainder) seen *during* each step."""
    out = []
    for b in dl:
        eod = getattr(dl, "end_of_dataloader", None)
        if gs is not None:
            out.append((vals(b), gs.end_of_dataloader, gs.remainder))
        else:
            out.append((vals(b), eod, getattr(dl, "remainder", None)))
    return out


def safe_len(dl):
    try:
        return len(dl)
    except Exception as e:  # noqa
        return f"{type(e).__name__}: {e}"
