# Topic 1: Accelerate 1.15.0 offload-folder format. Run: python oracle_bigmodel_offload.py
import json, os, shutil, tempfile, warnings
from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
import accelerate
from accelerate import disk_offload
from accelerate.utils import (
    offload_state_dict, offload_weight, save_offload_index, load_offloaded_weight,
    OffloadedWeightsLoader, load_offloaded_weights,
)

print("accelerate", accelerate.__version__, "torch", torch.__version__)
torch.manual_seed(0)


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.bn = nn.BatchNorm1d(2)
        self.register_buffer("half_b", torch.tensor([1.5, -2.0, 3.25], dtype=torch.bfloat16))
        self.register_buffer("scalar_f", torch.tensor(2.5))  # 0-d float32
        self.register_buffer("ints", torch.tensor([1, -2, 3], dtype=torch.int32))
        self.register_buffer("mask", torch.tensor([True, False, True]))
        self.register_buffer("u8", torch.tensor([[7, 255]], dtype=torch.uint8))
        self.register_buffer("f16", torch.tensor([0.5], dtype=torch.float16))
        self.register_buffer("f64", torch.tensor([[1.0, 2.0]], dtype=torch.float64))


m = M()
m.bn.num_batches_tracked.fill_(7)
root = tempfile.mkdtemp()
folder = os.path.join(root, "off")
print("\n=== offload_state_dict(folder, model.state_dict()) ===")
print("state_dict order:", list(m.state_dict().keys()))
offload_state_dict(folder, m.state_dict())
print("files:", sorted(os.listdir(folder)))
raw_index = open(os.path.join(folder, "index.json"), "rb").read()
print("index.json bytes (repr):", repr(raw_index.decode()))
print("index.json verbatim:\n" + raw_index.decode())
print("ends with newline:", raw_index.endswith(b"\n"))
for f in sorted(os.listdir(folder)):
    if f.endswith(".dat"):
        data = open(os.path.join(folder, f), "rb").read()
        print(f"{f:35s} size={len(data):3d} hex={data.hex()}")

print("\n=== read back: load_offloaded_weight / OffloadedWeightsLoader ===")
idx = json.load(open(os.path.join(folder, "index.json")))
loader = OffloadedWeightsLoader(save_folder=folder)
print("loader keys:", list(loader))
for k in idx:
    t = load_offloaded_weight(os.path.join(folder, f"{k}.dat"), idx[k])
    t2 = loader[k]
    print(f"{k:25s} -> dtype={t.dtype} shape={tuple(t.shape)} value={t.tolist()} equal_orig={torch.equal(t, m.state_dict()[k])} loader_same={torch.equal(t, t2)}")

print("\n=== bf16 on disk: int16 view of the bf16 bits, little endian ===")
print("bf16 values", m.half_b.tolist(), "int16 view", m.half_b.view(torch.int16).tolist(),
      "hex", m.half_b.view(torch.int16).numpy().tobytes().hex())

print("\n=== offload_weight directly on 0-d tensors ===")
index = {}
f2 = os.path.join(root, "direct"); os.makedirs(f2)
for name, t in [("zero_d_i64", torch.tensor(7)), ("zero_d_f32", torch.tensor(2.5)),
                ("zero_d_bf16", torch.tensor(1.5, dtype=torch.bfloat16)), ("zero_d_bool", torch.tensor(True))]:
    offload_weight(t, name, f2, index=index)
save_offload_index(index, f2)
print("index dict:", index)
for name in index:
    b = open(os.path.join(f2, name + ".dat"), "rb").read()
    back = load_offloaded_weight(os.path.join(f2, name + ".dat"), index[name])
    print(f"{name}: file {len(b)} bytes hex={b.hex()} -> back dtype={back.dtype} shape={tuple(back.shape)} value={back.item()}")

print("\n=== offload_weight with index=None: no index entry, still writes the file ===")
r = offload_weight(torch.ones(2), "noidx", f2)
print("returned", r, "file exists", os.path.exists(os.path.join(f2, "noidx.dat")))

print("\n=== save_offload_index merges into existing index.json (update; existing keys keep their position) ===")
save_offload_index({"zero_d_f32": {"dtype": "float32", "shape": [1]}, "new": {"dtype": "int8", "shape": [2]}}, f2)
print(open(os.path.join(f2, "index.json")).read())
print("save_offload_index({}) / None writes nothing:")
f3 = os.path.join(root, "empty"); os.makedirs(f3)
save_offload_index({}, f3); save_offload_index(None, f3)
print("files in empty:", os.listdir(f3))

print("\n=== 0-d tensor whose index.json says shape [1] ===")
t = load_offloaded_weight(os.path.join(folder, "bn.num_batches_tracked.dat"), {"dtype": "int64", "shape": [1]})
print("load_offloaded_weight -> shape", tuple(t.shape), "value", t.tolist())
bn = nn.BatchNorm1d(2)
sd = bn.state_dict()
sd["num_batches_tracked"] = t
try:
    bn.load_state_dict(sd)
    print("load_state_dict OK")
except Exception as e:
    print("load_state_dict raised", type(e).__name__ + ":\n" + str(e))
# what torch itself does when copying a [1] tensor into a 0-d buffer (load_state_dict copies with shape check)
try:
    bn.num_batches_tracked.copy_(t)
    print("copy_ [1] -> 0-d works:", bn.num_batches_tracked)
except Exception as e:
    print("copy_ raised", e)
# set_module_tensor_to_device (used by load_offloaded_weights) with a [1] value for a 0-d buffer
from accelerate.utils import set_module_tensor_to_device
bn2 = nn.BatchNorm1d(2)
try:
    set_module_tensor_to_device(bn2, "num_batches_tracked", "cpu", value=t)
    print("set_module_tensor_to_device OK, new shape", tuple(bn2.num_batches_tracked.shape))
except Exception as e:
    print("set_module_tensor_to_device raised", type(e).__name__ + ":", e)
# load_offloaded_weights with a [1]-shape index entry for the 0-d buffer
bn3 = nn.BatchNorm1d(2)
fbn = os.path.join(root, "bnfolder"); os.makedirs(fbn)
offload_state_dict(fbn, bn3.state_dict())
ix = json.load(open(os.path.join(fbn, "index.json")))
print("bn index:", ix)
ix_bad = dict(ix); ix_bad["num_batches_tracked"] = {"dtype": "int64", "shape": [1]}
try:
    load_offloaded_weights(bn3, ix_bad, fbn)
    print("load_offloaded_weights with shape [1] OK -> num_batches_tracked shape", tuple(bn3.num_batches_tracked.shape))
except Exception as e:
    print("load_offloaded_weights with shape [1] raised", type(e).__name__ + ":", e)
# The wrong direction: index says [] for a file written with shape [1] is the normal case; index says [] but file has 2 elements
try:
    x = load_offloaded_weight(os.path.join(folder, "lin.bias.dat"), {"dtype": "float32", "shape": []})
    print("shape [] on a 2-element file reads element 0:", x, tuple(x.shape))
except Exception as e:
    print("raised", e)
try:
    x = load_offloaded_weight(os.path.join(folder, "lin.bias.dat"), {"dtype": "float32", "shape": [3]})
    print("shape [3] on 8-byte file ->", x)
except Exception as e:
    print("shape [3] on 8-byte file raised", type(e).__name__ + ":", e)

print("\n=== disk_offload(model, dir) (writes the full state_dict incl. buffers) ===")
m2 = M()
d2 = os.path.join(root, "disk")
disk_offload(m2, d2, execution_device="cpu")
print("files:", sorted(os.listdir(d2)))
print("index keys in order:", list(json.load(open(os.path.join(d2, "index.json"))).keys()))
print("params now on:", {n: str(p.device) for n, p in m2.named_parameters()})
print("buffers now on:", {n: str(p.device) for n, p in m2.named_buffers()})
with torch.no_grad():
    m2.eval()
    print("forward ok:", m2.bn(m2.lin(torch.ones(4, 3))).shape)

print("\n=== float8 ===")
f8 = os.path.join(root, "f8"); os.makedirs(f8)
ix8 = {}
offload_weight(torch.tensor([1.0, -2.0], dtype=torch.float8_e4m3fn), "w8", f8, index=ix8)
print(ix8, open(os.path.join(f8, "w8.dat"), "rb").read().hex())
print("back", load_offloaded_weight(os.path.join(f8, "w8.dat"), ix8["w8"]))

print("\n=== dispatch_model with a disk entry, offload_dir without index.json (writes only disk modules) ===")
from accelerate import dispatch_model
m3 = M()
d3 = os.path.join(root, "dispatch")
dispatch_model(m3, {"lin": "cpu", "bn": "disk", "half_b": "cpu", "scalar_f": "cpu", "ints": "cpu", "mask": "cpu", "u8": "cpu", "f16": "cpu", "f64": "cpu"}, main_device="cpu", offload_dir=d3)
print("files:", sorted(os.listdir(d3)))
print(open(os.path.join(d3, "index.json")).read())

print("\n=== hasten-style folder (0-d written with shape [1]) used by disk_offload(offload_buffers=True) forward ===")
bnm = nn.Sequential(nn.BatchNorm1d(2)); bnm.eval()
d4 = os.path.join(root, "shape1"); os.makedirs(d4)
offload_state_dict(d4, bnm.state_dict())
ix4 = json.load(open(os.path.join(d4, "index.json"))); ix4["0.num_batches_tracked"]["shape"] = [1]
json.dump(ix4, open(os.path.join(d4, "index.json"), "w"), indent=2)
disk_offload(bnm, d4, execution_device="cpu", offload_buffers=True)
try:
    with torch.no_grad():
        bnm(torch.ones(3, 2))
    print("forward OK")
except Exception as e:
    print("forward raised", type(e).__name__ + ":", e)

print("\n=== OffloadedWeightsLoader with safetensors-style index entries (no .dat files) ===")
from safetensors.torch import save_file
st = os.path.join(root, "w.safetensors")
save_file({"orig.w": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0])}, st)
ldr = OffloadedWeightsLoader(index={"x.weight": {"safetensors_file": st, "weight_name": "orig.w", "dtype": "float16"},
                                    "b": {"safetensors_file": st}},
                             state_dict={"s": torch.zeros(1)})
print("keys:", list(ldr), "x.weight:", ldr["x.weight"], "b:", ldr["b"])

print("\n=== load_checkpoint_in_model(dtype=float16, device_map disk): which dtype lands in index.json? ===")
from accelerate import load_checkpoint_in_model
import logging; logging.getLogger("accelerate").setLevel(logging.ERROR); os.environ["TQDM_DISABLE"] = "1"
ck = os.path.join(root, "ck.safetensors")
src = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
src[1].running_mean.fill_(5.0); src[1].num_batches_tracked.fill_(9)
save_file({k: v.contiguous() for k, v in src.state_dict().items()}, ck)
dst = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
od = os.path.join(root, "lc")
try:
    load_checkpoint_in_model(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), ck, device_map={"": "disk"}, offload_folder=od)
except Exception as e:
    print("all-disk map on a .safetensors raised", type(e).__name__ + ":", e)
load_checkpoint_in_model(dst, ck, device_map={"0": "cpu", "1": "disk"}, offload_folder=od, dtype=torch.float16)
print(open(os.path.join(od, "index.json")).read())
print("files:", sorted(os.listdir(od)))
print("model tensors after:", {n: (str(t.device), str(t.dtype)) for n, t in dst.state_dict().items()})
dst2 = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
od2 = os.path.join(root, "lc2")
load_checkpoint_in_model(dst2, ck, device_map={"0": "cpu", "1": "disk"}, offload_folder=od2, offload_buffers=True)
print("offload_buffers=True files:", sorted(os.listdir(od2)))
print("offload_buffers=False: disk buffers after load (checkpoint has running_mean=5, num_batches_tracked=9):",
      dst[1].running_mean.tolist(), dst[1].num_batches_tracked.item())
shutil.rmtree(root)
