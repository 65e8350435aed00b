"""Oracle for Accelerator.save_state/load_state with ProjectConfiguration(automatic_checkpoint_naming=True) (accelerate 1.15.0)."""
import logging, os, shutil, tempfile, traceback
import torch, accelerate
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed

print("accelerate", accelerate.__version__, "torch", torch.__version__)

class Cap(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG); self.msgs = []
    def emit(self, r):
        if r.levelno >= logging.WARNING or "Loading states from" in r.getMessage() or "Saving current state" in r.getMessage():
            self.msgs.append(f"{r.levelname}: {r.getMessage()}")
cap = Cap()
lg = logging.getLogger("accelerate.accelerator"); lg.addHandler(cap); lg.setLevel(logging.DEBUG)

ROOT = tempfile.mkdtemp(prefix="oracle_ckpt_")

def listing(pd):
    d = os.path.join(pd, "checkpoints")
    if not os.path.exists(d):
        return "<no checkpoints dir>"
    out = []
    for n in sorted(os.listdir(d)):
        out.append(n + ("/" if os.path.isdir(os.path.join(d, n)) else "(file)"))
    return out

def make(pd, limit, iteration=0):
    pc = ProjectConfiguration(project_dir=pd, automatic_checkpoint_naming=True, total_limit=limit, iteration=iteration)
    acc = Accelerator(cpu=True, project_config=pc)
    model = torch.nn.Linear(2, 2)
    model = acc.prepare(model)
    return acc, model

def save(acc, pd, label="", **kw):
    cap.msgs.clear()
    it = acc.project_configuration.iteration
    try:
        r = acc.save_state(**kw)
        res = f"ok -> {os.path.relpath(r, pd) if isinstance(r, str) and r.startswith(pd) else r}"
    except BaseException as e:
        res = f"{type(e).__name__}: {e}"
    print(f"  save{label}(iter before={it}, after={acc.project_configuration.iteration}): {res}")
    for m in cap.msgs:
        if "Saving" not in m: print("     log", m)
    print("     on disk:", listing(pd))

def load(acc, pd, input_dir=None):
    cap.msgs.clear()
    try:
        acc.load_state(input_dir)
        res = "ok"
    except BaseException as e:
        res = f"{type(e).__name__}: {e}"
    print(f"  load_state({input_dir!r}): {res}; iteration now {acc.project_configuration.iteration}")
    for m in cap.msgs: print("     log", m.replace(pd, "<pd>"))

def fresh(name):
    pd = os.path.join(ROOT, name)
    os.makedirs(pd)
    return pd

print("\n== A. repeated saves, 4 times, per total_limit ==")
for limit in [None, 0, 1, 2, -1]:
    pd = fresh(f"A_limit_{limit}")
    print(f"total_limit={limit}")
    acc, _ = make(pd, limit)
    for i in range(4):
        save(acc, pd)

print("\n== B. pre-existing checkpoint_5 (iteration starts 0) ==")
for limit in [None, 2]:
    pd = fresh(f"B_{limit}"); os.makedirs(os.path.join(pd, "checkpoints", "checkpoint_5"))
    print(f"total_limit={limit}, on disk: {listing(pd)}")
    acc, _ = make(pd, limit)
    for i in range(3): save(acc, pd)

print("\n== C. pre-existing checkpoint_0 -> collision ==")
for limit in [None, 1]:
    pd = fresh(f"C_{limit}"); os.makedirs(os.path.join(pd, "checkpoints", "checkpoint_0"))
    print(f"total_limit={limit}, on disk: {listing(pd)}")
    acc, _ = make(pd, limit)
    save(acc, pd)
    save(acc, pd)

print("\n== D. non-checkpoint entries ==")
entries = {
    "checkpoint_x (dir)": lambda d: os.makedirs(os.path.join(d, "checkpoint_x")),
    "foo (dir)": lambda d: os.makedirs(os.path.join(d, "foo")),
    "checkpoint_3.tmp (dir)": lambda d: os.makedirs(os.path.join(d, "checkpoint_3.tmp")),
    "checkpoint_7 (plain file)": lambda d: open(os.path.join(d, "checkpoint_7"), "w").close(),
    "notes.txt (plain file)": lambda d: open(os.path.join(d, "notes.txt"), "w").close(),
    "run_2_of_10 (dir)": lambda d: os.makedirs(os.path.join(d, "run_2_of_10")),
    "checkpoint_00 (dir)": lambda d: os.makedirs(os.path.join(d, "checkpoint_00")),
}
for ename, mk in entries.items():
    for limit in [None, 3, 1]:
        pd = fresh(f"D_{ename.split()[0]}_{limit}"); d = os.path.join(pd, "checkpoints"); os.makedirs(d); mk(d)
        print(f"[{ename}] total_limit={limit}, on disk: {listing(pd)}")
        acc, _ = make(pd, limit)
        for i in range(3): save(acc, pd)
        load(acc, pd)

print("\n== E. numeric vs lexical order: iteration=8, saves 8,9,10,11 ==")
for limit in [None, 2]:
    pd = fresh(f"E_{limit}")
    print(f"total_limit={limit}")
    acc, _ = make(pd, limit, iteration=8)
    for i in range(4): save(acc, pd)
    load(acc, pd)

print("\n== F. load_state(None) picks which? ==")
pd = fresh("F")
acc, model = make(pd, None)
marks = {}
for i in range(3):
    with torch.no_grad(): model.weight.fill_(float(i))
    save(acc, pd)
# rename so that highest number is not latest iteration
d = os.path.join(pd, "checkpoints")
os.rename(os.path.join(d, "checkpoint_0"), os.path.join(d, "checkpoint_10"))
print("  renamed checkpoint_0 -> checkpoint_10 (weights=0.0); checkpoint_2 has weights=2.0; on disk:", listing(pd))
with torch.no_grad(): model.weight.fill_(-1.0)
load(acc, pd)
print("  weight after load:", model.weight.flatten().tolist())

print("\n== G. load_state(None) with no checkpoints / empty / no dir ==")
pd = fresh("G_nodir"); acc, _ = make(pd, None); load(acc, pd)
pd = fresh("G_empty"); os.makedirs(os.path.join(pd, "checkpoints")); acc, _ = make(pd, None); load(acc, pd)
pd = fresh("G_foo_only"); os.makedirs(os.path.join(pd, "checkpoints", "foo")); acc, _ = make(pd, None); load(acc, pd)
pd = fresh("G_nonauto"); acc = Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=pd)); load(acc, pd)
load(acc, pd, input_dir=os.path.join(pd, "does_not_exist"))

print("\n== H. restart: new Accelerator (iteration=0) over existing checkpoint_0..2, load_state(None) then save ==")
for limit in [None, 2, 3, 4]:
    pd = fresh(f"H_{limit}")
    acc, _ = make(pd, limit)
    for i in range(3): save(acc, pd)
    print(f"total_limit={limit}: before restart {listing(pd)}")
    acc2, _ = make(pd, limit)
    load(acc2, pd)
    save(acc2, pd)
    save(acc2, pd)

print("\n== I. save_state(output_dir=explicit) with automatic naming on ==")
pd = fresh("I"); acc, _ = make(pd, None)
explicit = os.path.join(ROOT, "I_explicit")
save(acc, pd, label="(output_dir=explicit)", output_dir=explicit)
print("  explicit dir exists:", os.path.exists(explicit))
load(acc, pd, input_dir=os.path.join(pd, "checkpoints", "checkpoint_0"))

print("\n== J. automatic naming with project_dir=None ==")
acc = Accelerator(cpu=True, project_config=ProjectConfiguration(automatic_checkpoint_naming=True))
try:
    acc.save_state()
except BaseException as e:
    print("  save_state():", type(e).__name__, e)
try:
    acc.load_state()
except BaseException as e:
    print("  load_state():", type(e).__name__, e)

print("\n== K. non-auto save_state() with no output_dir ==")
acc = Accelerator(cpu=True)
try:
    acc.save_state()
except BaseException as e:
    print("  save_state():", type(e).__name__, e)

print("\n== L. what is in a checkpoint folder, and iteration after explicit non-auto saves ==")
pd = fresh("L"); acc, _ = make(pd, None); save(acc, pd)
print("  files in checkpoint_0:", sorted(os.listdir(os.path.join(pd, "checkpoints", "checkpoint_0"))))
acc = Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=pd))
it0 = acc.project_configuration.iteration
acc.save_state(os.path.join(pd, "manual"))
print("  non-auto save_state increments iteration:", it0, "->", acc.project_configuration.iteration, "; save_iteration property:", acc.save_iteration)

shutil.rmtree(ROOT)
