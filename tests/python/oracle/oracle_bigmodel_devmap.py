# Topic 2: infer_auto_device_map and modules that own no tensors (activations, dropout, all-tied modules).
# Run: python oracle_bigmodel_devmap.py        (one hash seed)
#      the __main__ block also re-runs itself under PYTHONHASHSEED=0..5 to show which outputs depend on set order.
import os, sys, subprocess, logging, warnings
import torch
import torch.nn as nn
from accelerate.utils import infer_auto_device_map, compute_module_sizes
from accelerate.utils.modeling import clean_device_map
from accelerate.utils import modeling as am

logging.disable(logging.WARNING)  # "Device 0 is not available" (no CUDA here) is logged by get_max_memory
warnings.simplefilter("ignore")


def lin():  # 4x4 float32 + bias = 80 bytes
    return nn.Linear(4, 4)


class A(nn.Module):
    """lin1(80) act(ReLU) block=Seq(Linear80, ReLU, Dropout, Linear80) drop lin2(80). Total 320."""

    def __init__(self):
        super().__init__()
        self.lin1 = lin()
        self.act = nn.ReLU()
        self.block = nn.Sequential(lin(), nn.ReLU(), nn.Dropout(0.1), lin())
        self.drop = nn.Dropout()
        self.lin2 = lin()


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = lin()
        self.act = nn.GELU()
        self.out = lin()


class B(nn.Module):
    """embed(Embedding 10x4 = 160) layers=ModuleList(Block x3, 160 each) act norm(LayerNorm 4 = 32) lm_head(weight tied to embed)."""

    def __init__(self, head_first=False, head_bias=False):
        super().__init__()
        if head_first:
            self.lm_head = nn.Linear(4, 10, bias=head_bias)
        self.embed = nn.Embedding(10, 4)
        self.layers = nn.ModuleList([Block() for _ in range(3)])
        self.act = nn.ReLU()
        self.norm = nn.LayerNorm(4)
        if not head_first:
            self.lm_head = nn.Linear(4, 10, bias=head_bias)
        self.lm_head.weight = self.embed.weight


def show(title, model, max_memory, **kw):
    mm = dict(max_memory)
    unclean = infer_auto_device_map(model, max_memory=dict(mm), clean_result=False, **kw)
    clean = infer_auto_device_map(model, max_memory=dict(mm), **kw)
    print(f"--- {title}: max_memory={mm} kw={kw}")
    print("  unclean:", list(unclean.items()))
    print("  clean  :", list(clean.items()))


def main():
    torch.manual_seed(0)
    a = A()
    print("A sizes:", {k: v for k, v in compute_module_sizes(a).items() if "." not in k or k.count(".") == 1 and not k.endswith(("weight", "bias"))})
    print("A named_children:", [n for n, _ in a.named_children()])
    show("A everything fits on 0", a, {0: 10_000, "cpu": 10_000})
    show("A block split across 0/1", a, {0: 250, 1: 1000})
    show("A block split across 0/cpu", a, {0: 250, "cpu": 1000})
    show("A split, no_split Sequential", a, {0: 250, 1: 1000}, no_split_module_classes=["Sequential"])
    show("A gpu0 smaller than largest layer", a, {0: 60, 1: 1000})
    show("A only cpu, then disk", a, {"cpu": 250})
    show("A act right after move", a, {0: 170, 1: 1000})

    b = B()
    print("\nB find_tied_parameters:", am.find_tied_parameters(b))
    print("B sizes:", dict(compute_module_sizes(b)))
    show("B all fits", b, {0: 10_000})
    show("B layers split, no_split Block", b, {0: 600, 1: 10_000}, no_split_module_classes=["Block"])
    show("B layers split, no Block no_split", b, {0: 600, 1: 10_000})
    show("B tight, cpu", b, {0: 400, 1: 400, "cpu": 10_000}, no_split_module_classes=["Block"])

    bh = B(head_first=True)
    print("\nB(head_first) find_tied_parameters:", am.find_tied_parameters(bh))
    print("B(head_first) named_children:", [n for n, _ in bh.named_children()])
    print("B(head_first) sizes embed/lm_head:", compute_module_sizes(bh).get("embed"), compute_module_sizes(bh).get("lm_head"),
          "named_parameters:", [n for n, _ in bh.named_parameters()][:2])
    show("B head_first all fits", bh, {0: 10_000})
    show("B head_first tight", bh, {0: 400, 1: 10_000}, no_split_module_classes=["Block"])
    bb = B(head_bias=True)
    print("\nB(head_bias) sizes lm_head:", compute_module_sizes(bb)["lm_head"])
    show("B head_bias tight", bb, {0: 400, 1: 10_000}, no_split_module_classes=["Block"])

    # A split module with a direct buffer: split = direct params + children, buffers are dropped
    class WithBuf(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.ones(4))  # 16 B direct buffer
            self.w = nn.Parameter(torch.ones(4))  # 16 B direct param
            self.a = lin()
            self.b = lin()

    class C(nn.Module):
        def __init__(self):
            super().__init__()
            self.x = lin()
            self.mod = WithBuf()

    c = C()
    show("C split module with direct buffer", c, {0: 200, 1: 1000})
    from accelerate.utils import check_device_map
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            check_device_map(c, infer_auto_device_map(c, max_memory={0: 200, 1: 1000}))
        print("  check_device_map on it: OK;", [str(x.message) for x in w])
    except Exception as e:
        print("  check_device_map on it raised", type(e).__name__ + ":", e)

    # clean_device_map on its own: order after collapsing
    dm = {"a.0": 0, "a.1": 0, "b": 1, "c.x": 1, "c.y": 1, "d.0.p": 0, "d.0.q": 0, "d.1": 1}
    print("\nclean_device_map input :", list(dm.items()))
    print("clean_device_map output:", list(clean_device_map(dict(dm)).items()))
    dm2 = {"x.0": 0, "x.1": 0, "y": 0}
    print("clean_device_map all-same:", list(clean_device_map(dict(dm2)).items()))


if __name__ == "__main__":
    if os.environ.get("ORACLE_CHILD"):
        main()
    else:
        outs = {}
        for seed in range(6):
            env = dict(os.environ, ORACLE_CHILD="1", PYTHONHASHSEED=str(seed))
            outs[seed] = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True).stdout
        print(outs[0])
        ref = outs[0].splitlines()
        for seed in range(1, 6):
            diff = [(i, l) for i, l in enumerate(outs[seed].splitlines()) if l != ref[i]]
            print(f"### PYTHONHASHSEED={seed}: {len(diff)} lines differ from seed 0")
            for i, l in diff:
                print(f"    seed0: {ref[i]}\n    seed{seed}: {l}")
