"""Topic 4: how Accelerate's shuffling draws its permutation, on 1 process, and reproduction with plain torch
calls and with a pure-Python MT19937 (what libtorch's CPUGeneratorImpl uses), for a Rust port.
Also re-checks the 2-process results recorded by oracle_data_3_two_process.py (/tmp/oracle_data_2p/merged.json)."""
import json, os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
from torch.utils.data import DataLoader
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed


# ---------- pure-Python model of libtorch CPU generator ----------
class MT19937:
    def __init__(self, seed):
        self.mt = [0] * 624
        self.mt[0] = seed & 0xFFFFFFFF
        for i in range(1, 624):
            self.mt[i] = (1812433253 * (self.mt[i - 1] ^ (self.mt[i - 1] >> 30)) + i) & 0xFFFFFFFF
        self.idx = 624

    def next32(self):
        if self.idx >= 624:
            for i in range(624):
                y = (self.mt[i] & 0x80000000) | (self.mt[(i + 1) % 624] & 0x7FFFFFFF)
                self.mt[i] = self.mt[(i + 397) % 624] ^ (y >> 1) ^ (0x9908B0DF if y & 1 else 0)
            self.idx = 0
        y = self.mt[self.idx]; self.idx += 1
        y ^= y >> 11; y ^= (y << 7) & 0x9D2C5680; y ^= (y << 15) & 0xEFC60000; y ^= y >> 18
        return y & 0xFFFFFFFF

    def next64(self):  # CPUGeneratorImpl::random64: (first << 32) | second
        hi = self.next32(); lo = self.next32()
        return (hi << 32) | lo


def py_randperm(n, gen):
    """at::randperm CPU for n < 2^32/20: r=[0..n); for i in 0..n-2: z = random() % (n-i); swap(r[i], r[i+z])."""
    r = list(range(n))
    for i in range(n - 1):
        z = gen.next32() % (n - i)
        r[i], r[i + z] = r[i + z], r[i]
    return r


def py_random_int64(gen):
    """torch.empty((), dtype=torch.int64).random_(): random64() % 2^63."""
    return gen.next64() % (1 << 63)


def chunks(p, bs):
    return [p[i:i + bs] for i in range(0, len(p), bs)]


def make_acc(seedable, data_seed=None):
    AcceleratorState._reset_state(True); GradientState._reset_state()
    return Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=seedable, data_seed=data_seed))


print("default DataLoaderConfiguration().use_seedable_sampler =", DataLoaderConfiguration().use_seedable_sampler)
print()
print("## 1. pure-Python MT19937 model vs torch")
ok = True
for seed in [0, 1, 42, 43, 44, 123, 2**32 + 5, 787378610816999299]:
    for n in [1, 2, 7, 10, 33, 100, 1000]:
        t = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        torch.manual_seed(seed); t2 = torch.randperm(n).tolist()
        p = py_randperm(n, MT19937(seed))
        ok &= (t == p == t2)
    g = torch.Generator().manual_seed(seed)
    t = [int(torch.empty((), dtype=torch.int64).random_(generator=g).item()) for _ in range(3)]
    m = MT19937(seed); p = [py_random_int64(m) for _ in range(3)]
    ok &= t == p
    # chained: random_ int64 seed then randperm (non-seedable sampler path)
print("randperm(n, Generator().manual_seed(s)) == manual_seed(s);randperm(n) == py model, and int64 random_() == py model:", ok)
print("only the low 32 bits of the seed matter: randperm(10, seed 42) == randperm(10, seed 42 + 2**32):",
      torch.randperm(10, generator=torch.Generator().manual_seed(42)).tolist()
      == torch.randperm(10, generator=torch.Generator().manual_seed(42 + 2**32)).tolist())
print()

print("## 2. one process, use_seedable_sampler=True, set_seed(42) before prepare, bs=2")
print("| n | epoch | Accelerate batches | randperm(n, Generator().manual_seed(42+epoch)) | equal |")
print("|---|---|---|---|---|")
for n in (10, 7):
    acc = make_acc(True)
    set_seed(42)
    p = acc.prepare(DataLoader(list(range(n)), batch_size=2, shuffle=True))
    for e in range(3):
        got = [b.tolist() for b in p]
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(42 + e)).tolist()
        print(f"| {n} | {e} | {got} | {perm} | {got == chunks(perm, 2)} |")
print()
print("seed captured at prepare time: set_seed(7) AFTER prepare (initial_seed stays the prepare-time value):")
acc = make_acc(True); set_seed(42)
p = acc.prepare(DataLoader(list(range(10)), batch_size=2, shuffle=True)); set_seed(7)
print("  initial_seed =", p.batch_sampler.sampler.initial_seed, " epoch0 =", [b.tolist() for b in p])
acc = make_acc(True, data_seed=123); set_seed(42)
p = acc.prepare(DataLoader(list(range(10)), batch_size=2, shuffle=True))
print("  data_seed=123: initial_seed =", p.batch_sampler.sampler.initial_seed, " epoch0 =", [b.tolist() for b in p],
      " randperm(seed 123) =", torch.randperm(10, generator=torch.Generator().manual_seed(123)).tolist())
print("  sampler class on 1 process:", type(p.batch_sampler.sampler).__name__,
      "; batch_sampler:", type(p.batch_sampler).__name__)
print()

print("## 3. one process, use_seedable_sampler=False (default), set_seed(42) before prepare, bs=2")
print("Model: each epoch, DataLoader iterator __init__ draws _base_seed = int64 random_() from the GLOBAL generator,")
print("then RandomSampler (generator=None) draws seed = int64 random_() from the global generator and does")
print("randperm(n, Generator().manual_seed(seed)).")
print("| n | epoch | Accelerate batches | model | equal |")
print("|---|---|---|---|---|")
for n in (10, 7):
    acc = make_acc(False)
    set_seed(42)
    p = acc.prepare(DataLoader(list(range(n)), batch_size=2, shuffle=True))
    got_all = [[b.tolist() for b in p] for _ in range(3)]
    torch.manual_seed(42)
    for e in range(3):
        _base = torch.empty((), dtype=torch.int64).random_()
        s = int(torch.empty((), dtype=torch.int64).random_().item())
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(s)).tolist()
        print(f"| {n} | {e} | {got_all[e]} | {perm} (sampler seed {s}) | {got_all[e] == chunks(perm, 2)} |")
print()

# ---------- 2-process results ----------
path = "/tmp/oracle_data_2p/merged.json"
if os.path.exists(path):
    m = json.load(open(path))
    r0 = {x["what"]: x for x in m["rank0"] if x.get("topic") == 4 and "what" in x}
    r1 = {x["what"]: x for x in m["rank1"] if x.get("topic") == 4 and "what" in x}

    def shard(perm, bs=2, P=2):
        """BatchSamplerShard (split=False, even_batches=True, drop_last=False) of chunks(perm)."""
        from accelerate.data_loader import BatchSamplerShard
        from torch.utils.data import BatchSampler
        out = []
        for rank in range(P):
            class Fixed(BatchSampler):
                def __init__(s): s.batch_size, s.drop_last = bs, False
                def __iter__(s): return iter(chunks(perm, bs))
                def __len__(s): return len(chunks(perm, bs))
            out.append(list(BatchSamplerShard(Fixed(), P, rank)))
        return out

    print("## 4. two processes (debug_launcher, gloo), bs=2: rank batches vs model")
    print("| case | n | epoch | rank0 | rank1 | full order (model) | equal |")
    print("|---|---|---|---|---|---|---|")
    for n in (10, 7):
        k = f"seedable, set_seed(42) before prepare, n={n}"
        for e in range(3):
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(42 + e)).tolist()
            a, b = r0[k]["auto_epochs"][e], r1[k]["auto_epochs"][e]
            print(f"| seedable, seed 42 | {n} | {e} | {a} | {b} | randperm(seed {42+e}) = {perm} | {[a, b] == shard(perm)} |")
    k = "seedable, set_seed(42), data_seed=123, n=10"
    for e in range(2):
        perm = torch.randperm(10, generator=torch.Generator().manual_seed(123 + e)).tolist()
        a, b = r0[k]["epochs"][e], r1[k]["epochs"][e]
        print(f"| seedable, data_seed 123 | 10 | {e} | {a} | {b} | randperm(seed {123+e}) = {perm} | {[a, b] == shard(perm)} |")
    for n in (10, 7):
        k = f"NOT seedable (default), set_seed(42) before prepare, n={n}"
        torch.manual_seed(42)
        s = int(torch.empty((), dtype=torch.int64).random_().item())
        g = torch.Generator().manual_seed(s)
        for e in range(3):
            # RandomSampler.__iter__ with num_samples == n runs `randperm(n)` for the loop and then
            # `randperm(n)[:0]` for the (empty) tail: two randperms per fully-iterated epoch.
            perm = torch.randperm(n, generator=g).tolist()
            _tail = torch.randperm(n, generator=g)
            a, b = r0[k]["epochs"][e], r1[k]["epochs"][e]
            print(f"| not seedable, set_seed 42 | {n} | {e} | {a} | {b} | randperm #{2*e+1} of Generator(seed {s}) = {perm} | {[a, b] == shard(perm)} |")
    print()
    print("not-seedable generator seed recorded by Accelerate:", r0[k]["gen_initial_seed"], "; rng_types:", r0[k]["rng_types"])
    k = "seedable, set_seed(42) before prepare, n=10"
    print("interrupted epoch (break after first batch, then iterate again):", "rank0 next =", r0[k]["next_iter_after_break"],
          "rank1 next =", r1[k]["next_iter_after_break"], "iteration attr =", r0[k]["iteration_attr"])
    k = "seedable 42, n=10: epoch0 on p, then skip_first_batches(p,1) iterated (p.iteration=1)"
    print("skip_first_batches(p,1) after a full epoch 0: rank0", r0[k]["skipped"], "rank1", r1[k]["skipped"],
          "(epoch-1 order", shard(torch.randperm(10, generator=torch.Generator().manual_seed(43)).tolist()), ")")
    k = "seedable, no set_seed, n=10"
    print("no set_seed (forked ranks share the parent's nondeterministic default seed):", "initial_seed r0/r1 =",
          r0[k]["initial_seed"], r1[k]["initial_seed"])

print()
print("## 5. default seed when none is given: torch.random.initial_seed() in two fresh interpreter processes")
import subprocess
for _ in range(2):
    out = subprocess.run([sys.executable, "-c", "import torch; from accelerate import Accelerator; Accelerator(cpu=True); "
                          "print(torch.random.initial_seed())"], capture_output=True, text=True).stdout.strip()
    print("  fresh process initial_seed():", out)
