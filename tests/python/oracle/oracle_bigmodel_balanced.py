# Topic 3: get_balanced_memory and the no-split buffer. Run: python oracle_bigmodel_balanced.py
# No GPU here: torch.cuda.device_count() == 0. Integer max_memory keys are counted as GPUs without touching CUDA
# (get_balanced_memory checks isinstance(d, int)); get_max_memory only logs "Device N is not available".
import logging
import torch
import torch.nn as nn
from accelerate.utils import get_balanced_memory, compute_module_sizes, infer_auto_device_map
from accelerate.utils.modeling import get_module_leaves

print("torch.cuda.is_available():", torch.cuda.is_available(), "device_count:", torch.cuda.device_count())


class Block(nn.Module):  # 2 x Linear(d, d): 2*(d*d+d)*4 bytes
    def __init__(self, d):
        super().__init__()
        self.fc1 = nn.Linear(d, d)
        self.fc2 = nn.Linear(d, d)


class Other(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)


class BufBlock(nn.Module):  # same class name trick: a no-split class holding only a buffer
    def __init__(self, n):
        super().__init__()
        self.register_buffer("table", torch.zeros(n))


class M(nn.Module):
    """Blocks registered zeta (d=8, 576 B), alpha (d=4, 160 B), mid (d=16, 2176 B)."""

    def __init__(self):
        super().__init__()
        self.zeta = Block(8)
        self.alpha = Block(4)
        self.mid = Block(16)
        self.other = Other(12)  # 624 B


def report(title, model, mm, **kw):
    out = get_balanced_memory(model, max_memory=dict(mm), **kw)
    print(f"{title}: in={mm} kw={kw}\n    -> {out}")
    return out


m = M()
sizes = compute_module_sizes(m)
print("sizes:", {k: v for k, v in sizes.items() if k.count(".") <= 0 or k.count(".") == 1 and "weight" not in k and "bias" not in k})
print("module_sizes key order (first keys):", list(sizes.keys())[:6])
leaves = get_module_leaves(sizes)
ms2 = {n: v for n, v in sizes.items() if n not in set(leaves)}
leaves2 = get_module_leaves(ms2)
print("final-module leaves:", leaves2, "mean:", int(sum(ms2[n] for n in leaves2) / len(leaves2)))
print("total:", sizes[""])
G = 100_000
for cls in (["Block"], ["Block", "Other"], ["Other"], ["Nope"], []):
    for n in (2, 3):
        mm = {i: G for i in range(n)}
        report(f"no_split={cls} {n} GPUs", m, mm, no_split_module_classes=cls)
report("no_split=Block 2 GPUs + cpu", m, {0: G, 1: G, "cpu": 10 * G}, no_split_module_classes=["Block"])
report("no_split=Block 3 GPUs low_zero", m, {0: G, 1: G, 2: G}, no_split_module_classes=["Block"], low_zero=True)
report("no_split=Block 2 GPUs low_zero", m, {0: G, 1: G}, no_split_module_classes=["Block"], low_zero=True)
try:
    report("low_zero non-contiguous 0,2,3", m, {0: G, 2: G, 3: G}, no_split_module_classes=["Block"], low_zero=True)
except Exception as e:
    print("low_zero non-contiguous 0,2,3 raised", type(e).__name__ + ":", e)
report("1 GPU, 0 bytes on it + cpu", m, {0: 0, "cpu": G})
report("no_split='Block' as str", m, {0: G, 1: G}, no_split_module_classes="Block")
report("1 GPU user-set (no 0.9)", m, {0: G, "cpu": G}, no_split_module_classes=["Block"])
report("GPU 0 with 0 bytes + 2 GPUs", m, {0: 0, 1: G, 2: G}, no_split_module_classes=["Block"])
report("non-contiguous 0,2", m, {0: G, 2: G}, no_split_module_classes=["Block"])
report("string sizes", m, {0: "10KB", 1: "1MiB", "cpu": "1GB"}, no_split_module_classes=["Block"])
report("small gpu0 (min with own)", m, {0: 1000, 1: G}, no_split_module_classes=["Block"])
report("dtype=float16", m, {0: G, 1: G}, no_split_module_classes=["Block"], dtype=torch.float16)
try:
    report("'cuda:0' string key", m, {"cuda:0": G, "cuda:1": G})
except Exception as e:
    print("'cuda:0' string key raised", type(e).__name__ + ":", e)
print("max_memory=None (no GPU):", {k: type(v).__name__ for k, v in get_balanced_memory(m).items()})


class MB(nn.Module):
    """A no-split block with only a buffer is registered first, but named_module_tensors yields params then buffers."""

    def __init__(self):
        super().__init__()
        self.buf = BufBlock(1000)  # 4000 B, buffers only
        self.small = Block(4)  # 160 B
        self.big = Block(16)  # 2176 B


class BufBlockAsBlock(BufBlock):
    pass


BufBlockAsBlock.__name__ = "Block"
mb = MB()
mb.buf = BufBlockAsBlock(1000)  # class name "Block" too
print("\nMB module_sizes key order:", [k for k in compute_module_sizes(mb).keys() if "." not in k])
for n in (2, 3):
    report(f"MB no_split=Block {n} GPUs", mb, {i: G for i in range(n)}, no_split_module_classes=["Block"])

# And the map infer_auto_device_map then makes from the balanced memory (2 GPUs)
bal = get_balanced_memory(m, max_memory={0: G, 1: G}, no_split_module_classes=["Block"])
print("\nmap from balanced (2 GPUs):", list(infer_auto_device_map(m, max_memory=bal, no_split_module_classes=["Block"]).items()))
bal = get_balanced_memory(m, max_memory={0: 3000, 1: 3000, "cpu": G}, no_split_module_classes=["Block"])
print("balanced {0:3000,1:3000,cpu}:", bal)
print("map from it:", list(infer_auto_device_map(m, max_memory=bal, no_split_module_classes=["Block"]).items()))
