# Topic 4: find_tied_parameters output order. Run: python oracle_bigmodel_tied.py
# Re-runs itself under PYTHONHASHSEED=0..7 because the group order comes from iterating a set of strings.
import os, sys, subprocess
import torch
import torch.nn as nn
from accelerate.utils import find_tied_parameters


class LM(nn.Module):  # embed.weight <-> lm_head.weight
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.body = nn.Linear(4, 4)
        self.lm_head = nn.Linear(4, 10, bias=False)
        self.lm_head.weight = self.embed.weight


class HeadFirst(nn.Module):  # registration order lm_head then embed
    def __init__(self):
        super().__init__()
        self.lm_head = nn.Linear(4, 10, bias=False)
        self.embed = nn.Embedding(10, 4)
        self.embed.weight = self.lm_head.weight


class Three(nn.Module):  # c.weight registered first, tied to b.weight and a.weight
    def __init__(self):
        super().__init__()
        self.c = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.a = nn.Linear(4, 4)
        self.b.weight = self.c.weight
        self.a.weight = self.c.weight


class WholeModule(nn.Module):  # the same module registered twice
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(4, 4)
        self.mid = nn.ReLU()
        self.dec = self.enc


class Many(nn.Module):  # several groups; numeric names that sort differently as strings
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(12)])
        self.heads = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])
        self.layers[10].weight = self.layers[2].weight  # group kept name layers.2.weight
        self.layers[11].bias = self.layers[9].bias
        self.heads[0].weight = self.layers[1].weight
        self.heads[1].weight = self.layers[1].weight
        self.heads[2].bias = self.layers[0].bias
        self.tail = nn.Linear(2, 2)
        self.tail.weight = self.layers[5].weight


class SharedBuffer(nn.Module):  # buffers are not looked at
    def __init__(self):
        super().__init__()
        t = torch.zeros(3)
        self.x = nn.Module(); self.x.register_buffer("b", t)
        self.y = nn.Module(); self.y.register_buffer("b", t)
        self.p = nn.Parameter(torch.zeros(4))
        self.q = nn.Parameter(self.p.data[:2])  # a view sharing storage, different Parameter object


def main():
    for cls in (LM, HeadFirst, Three, WholeModule, Many, SharedBuffer):
        m = cls()
        print(f"{cls.__name__}: named_parameters(remove_duplicate=True) = {[n for n, _ in m.named_parameters()]}")
        print(f"{cls.__name__}: find_tied_parameters = {find_tied_parameters(m)}")


if __name__ == "__main__":
    if os.environ.get("ORACLE_CHILD"):
        main()
    else:
        outs = {}
        for seed in range(8):
            env = dict(os.environ, ORACLE_CHILD="1", PYTHONHASHSEED=str(seed))
            outs[seed] = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True).stdout
        print(outs[0])
        ref = outs[0].splitlines()
        for seed in range(1, 8):
            diff = [(i, l) for i, l in enumerate(outs[seed].splitlines()) if l != ref[i]]
            print(f"### PYTHONHASHSEED={seed}: {len(diff)} lines differ from seed 0")
            for i, l in diff:
                print(f"    seed{seed}: {l}")
