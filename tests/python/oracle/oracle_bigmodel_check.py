# Topic 5: check_device_map and related device_map validation messages.
# Run: python oracle_bigmodel_check.py
import logging, os, tempfile, warnings
import torch
import torch.nn as nn
from accelerate import dispatch_model, load_checkpoint_in_model
from accelerate.utils import check_device_map, infer_auto_device_map
from safetensors.torch import save_file


class Capture(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(f"[{record.levelname} {record.name}] {record.getMessage()}")


cap = Capture()
logging.getLogger("accelerate").addHandler(cap)
logging.getLogger("accelerate").setLevel(logging.INFO)
logging.getLogger("accelerate").propagate = False


def run(title, fn):
    cap.records.clear()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            r = fn()
            res = "returned " + repr(r if not isinstance(r, nn.Module) else type(r).__name__)
        except Exception as e:
            res = f"RAISED {type(e).__name__}: {e}"
    print(f"--- {title}")
    for x in w:
        print(f"    warning {x.category.__name__}: {x.message}")
    for rec in cap.records:
        print(f"    log {rec}")
    print(f"    {res}")


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.ones(2))  # root parameter
        self.lin = nn.Linear(2, 2)
        self.lin2 = nn.Linear(2, 2)
        self.act = nn.ReLU()
        self.bn = nn.BatchNorm1d(2)
        self.register_buffer("np_buf", torch.zeros(1), persistent=False)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(4, 2)
        self.lm_head = nn.Linear(2, 4, bias=False)
        self.lm_head.weight = self.embed.weight


m = M()
print("state_dict keys:", list(m.state_dict().keys()))
print("named_modules:", [n for n, _ in m.named_modules()])
full = {"p": "cpu", "lin": "cpu", "lin2": "cpu", "bn": "cpu"}
run("complete module map", lambda: check_device_map(m, full))
run("'' covers all", lambda: check_device_map(m, {"": "cpu"}))
run("'' plus a typo", lambda: check_device_map(m, {"typo": 0, "": "cpu"}))
run("tensor keys (lin.weight, lin.bias, p) + modules", lambda: check_device_map(m, {"p": 0, "lin.weight": 0, "lin.bias": "cpu", "lin2": 0, "bn": 0}))
run("activation key (module with no tensors)", lambda: check_device_map(m, dict(full, act=0)))
run("typo key, rest complete", lambda: check_device_map(m, dict(full, **{"lin3": 0, "bn.running": 0})))
run("missing lin2 and bn", lambda: check_device_map(m, {"p": 0, "lin": 0}))
run("typo + missing", lambda: check_device_map(m, {"p": 0, "lin": 0, "lni2": 0}))
run("prefix without dot does not cover ('li')", lambda: check_device_map(m, {"p": 0, "li": 0, "lin2": 0, "bn": 0}))
run("non-persistent buffer key named", lambda: check_device_map(m, dict(full, np_buf=0)))
run("buffer key bn.num_batches_tracked + bn.weight etc", lambda: check_device_map(m, {"p": 0, "lin": 0, "lin2": 0, "bn.weight": 0, "bn.bias": 0, "bn.running_mean": 0, "bn.running_var": 0, "bn.num_batches_tracked": 0}))
run("empty map", lambda: check_device_map(m, {}))
run("key with trailing dot 'lin.'", lambda: check_device_map(m, dict(full, **{"lin.": 0})))

t = Tied()
print("Tied state_dict keys:", list(t.state_dict().keys()))
run("Tied: only embed", lambda: check_device_map(t, {"embed": 0}))
run("Tied: embed + lm_head", lambda: check_device_map(t, {"embed": 0, "lm_head": 0}))

# dispatch_model calls check_device_map first; an auto map of a model with a root parameter has a tensor key.
m2 = M()
auto = infer_auto_device_map(m2, max_memory={"cpu": 60})
print("auto map (cpu 60 bytes):", list(auto.items()))
run("dispatch_model with that auto map (tensor key 'p')", lambda: dispatch_model(m2, auto, main_device="cpu", offload_dir=tempfile.mkdtemp()))
run("dispatch_model disk w/o offload_dir", lambda: dispatch_model(M(), {"": "disk"}, main_device="cpu"))
run("dispatch_model incomplete map", lambda: dispatch_model(M(), {"lin": "cpu"}))

# load_checkpoint_in_model device_map checks
d = tempfile.mkdtemp()
ckpt = os.path.join(d, "model.safetensors")
save_file({k: v.contiguous() for k, v in M().state_dict().items()}, ckpt)
run("load_checkpoint_in_model: map misses bn", lambda: load_checkpoint_in_model(M(), ckpt, device_map={"p": "cpu", "lin": "cpu", "lin2": "cpu"}))
run("load_checkpoint_in_model: typo key + complete", lambda: load_checkpoint_in_model(M(), ckpt, device_map=dict(full, typo="cpu")))
run("load_checkpoint_in_model: tensor keys", lambda: load_checkpoint_in_model(M(), ckpt, device_map={"p": "cpu", "lin.weight": "cpu", "lin.bias": "cpu", "lin2": "cpu", "bn": "cpu"}))
run("load_checkpoint_in_model: disk without folder", lambda: load_checkpoint_in_model(M(), ckpt, device_map={"": "disk"}))
tc = os.path.join(d, "tied.safetensors")
save_file({"embed.weight": torch.zeros(4, 2)}, tc)
run("load_checkpoint_in_model Tied: map only embed", lambda: load_checkpoint_in_model(Tied(), tc, device_map={"embed": "cpu"}))
run("load_checkpoint_in_model Tied: embed cpu, lm_head disk", lambda: load_checkpoint_in_model(Tied(), tc, device_map={"embed": "cpu", "lm_head": "disk"}, offload_folder=os.path.join(d, "off")))
