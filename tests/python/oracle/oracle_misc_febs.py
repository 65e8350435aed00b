"""Oracle for accelerate.utils.memory.find_executable_batch_size / should_reduce_batch_size (accelerate 1.15.0)."""
import gc, sys, traceback
import torch, accelerate
import accelerate.utils.memory as M
from accelerate.utils import find_executable_batch_size
from accelerate.utils.memory import should_reduce_batch_size

print("accelerate", accelerate.__version__, "torch", torch.__version__)

class MyRTE(RuntimeError):
    pass

cases = [
    ("RuntimeError('CUDA out of memory. Tried to allocate 2.00 GiB')", RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")),
    ("torch.cuda.OutOfMemoryError('CUDA out of memory. Tried ...')", torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")),
    ("torch.OutOfMemoryError('XPU out of memory.')", torch.OutOfMemoryError("XPU out of memory.")),
    ("torch.OutOfMemoryError('boom') (no marker)", torch.OutOfMemoryError("boom")),
    ("RuntimeError('HIP out of memory. Tried')", RuntimeError("HIP out of memory. Tried")),
    ("RuntimeError('XPU out of memory.')", RuntimeError("XPU out of memory.")),
    ("RuntimeError('foo out of memory.')", RuntimeError("foo out of memory.")),
    ("RuntimeError('out of memory.') (no leading space)", RuntimeError("out of memory.")),
    ("RuntimeError('CUDA out of memory') (no period)", RuntimeError("CUDA out of memory")),
    ("RuntimeError('CUDA error: out of memory\\nCUDA kernel errors might ...')", RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported")),
    ("RuntimeError('CUDA error: out of memory.')", RuntimeError("CUDA error: out of memory.")),
    ("RuntimeError('CUDA Out Of Memory.') (case)", RuntimeError("CUDA Out Of Memory.")),
    ("RuntimeError('MPS backend out of memory (MPS allocated: ...)')", RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)")),
    ("RuntimeError('cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear ...')", RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a non-contiguous input.")),
    ("RuntimeError('cuDNN error: CUDNN_STATUS_NOT_SUPPORTED') (no period)", RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED")),
    ("RuntimeError('cuDNN error: CUDNN_STATUS_INTERNAL_ERROR')", RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR")),
    ("RuntimeError('[enforce fail] DefaultCPUAllocator: can't allocate memory: you tried ...')", RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 bytes")),
    ("RuntimeError('FATAL ERROR :: MODULE:PT_DEVMEM Allocation failed')", RuntimeError("FATAL ERROR :: MODULE:PT_DEVMEM Allocation failed")),
    ("MyRTE(RuntimeError subclass)('CUDA out of memory.')", MyRTE("CUDA out of memory.")),
    ("RuntimeError('CUDA out of memory.', 'extra') (2 args)", RuntimeError("CUDA out of memory.", "extra")),
    ("RuntimeError() (0 args)", RuntimeError()),
    ("RuntimeError(123) (non-str arg)", RuntimeError(123)),
    ("RuntimeError(['CUDA out of memory.']) (list arg)", RuntimeError(["CUDA out of memory."])),
    ("MemoryError('CUDA out of memory.')", MemoryError("CUDA out of memory.")),
    ("MemoryError() (python)", MemoryError()),
    ("ValueError('CUDA out of memory.')", ValueError("CUDA out of memory.")),
    ("Exception('CUDA out of memory.')", Exception("CUDA out of memory.")),
    ("NotImplementedError('CUDA out of memory.') (RuntimeError subclass)", NotImplementedError("CUDA out of memory.")),
    ("RecursionError('CUDA out of memory.') (RuntimeError subclass)", RecursionError("CUDA out of memory.")),
    ("KeyboardInterrupt('CUDA out of memory.') (BaseException)", KeyboardInterrupt("CUDA out of memory.")),
]

print("\n== should_reduce_batch_size and behaviour inside find_executable_batch_size(starting=4) ==")
for name, exc in cases:
    try:
        srb = should_reduce_batch_size(exc)
    except BaseException as e:
        srb = f"raises {type(e).__name__}: {e}"
    calls = []
    def f(bs, exc=exc):
        calls.append(bs)
        if len(calls) == 1:
            raise exc
        return bs
    g = find_executable_batch_size(f, starting_batch_size=4)
    try:
        r = g()
        out = f"returned {r}; calls={calls} -> RETRIED"
    except BaseException as e:
        same = e is exc
        ctx = f"; __context__ is original: {e.__context__ is exc}" if not same else ""
        out = f"raised {type(e).__name__}({e!s}) identity_same={same}{ctx}; calls={calls} -> RE-RAISED"
    print(f"{name:85s} srb={srb!s:6s} | {out}")

print("\n== real CPU OOM from torch ==")
try:
    torch.empty(2**50, dtype=torch.uint8)
except BaseException as e:
    print(type(e).__mro__, repr(str(e))[:300], "args len", len(e.args), "srb", should_reduce_batch_size(e))

print("\n== default reduction sequence from 128 (all OOM) ==")
seq = []
def always_oom(bs):
    seq.append(bs)
    raise RuntimeError("CUDA out of memory.")
g = find_executable_batch_size(always_oom, starting_batch_size=128)
try:
    g()
except BaseException as e:
    print("final:", type(e).__name__, repr(str(e)))
print("sequence:", seq)
# calling again after reaching zero
seq.clear()
try:
    g()
except BaseException as e:
    print("second call after zero:", type(e).__name__, repr(str(e)), "calls:", seq)

print("\n== int(n*0.9) vs n*9//10 for n in 1..10_000_000 ==")
diffs = [n for n in range(1, 10_000_001) if int(n * 0.9) != n * 9 // 10]
print("count of differences:", len(diffs), "first 20:", diffs[:20])

print("\n== batch size persists across calls of the same decorated function ==")
calls = []
@find_executable_batch_size(starting_batch_size=100)
def t(bs):
    calls.append(bs)
    if bs > 80:
        raise RuntimeError("CUDA out of memory.")
    return bs
print("1st call ->", t(), "calls", calls); calls.clear()
print("2nd call ->", t(), "calls", calls)

print("\n== starting_batch_size=0 ==")
calls = []
try:
    find_executable_batch_size(lambda bs: calls.append(bs), starting_batch_size=0)()
except BaseException as e:
    print(type(e).__name__, repr(str(e)), "calls", calls)

print("\n== starting_batch_size=1 with OOM ==")
calls = []
def o1(bs):
    calls.append(bs); raise RuntimeError("CUDA out of memory.")
try:
    find_executable_batch_size(o1, starting_batch_size=1)()
except BaseException as e:
    print(type(e).__name__, repr(str(e)), "calls", calls)

print("\n== custom reduce_batch_size_fn ==")
log = []
def halve():
    log.append(("reduce_called", state["bs"]))
    state["bs"] //= 2
    return state["bs"]
state = {"bs": 64}
calls = []
@find_executable_batch_size(starting_batch_size=64, reduce_batch_size_fn=halve)
def h(bs):
    calls.append(bs); log.append(("fn", bs))
    raise RuntimeError("CUDA out of memory.")
try:
    h()
except BaseException as e:
    print("halving to zero:", type(e).__name__, repr(str(e)))
print("calls", calls); print("log", log)

# custom returning negative / None / same value
for label, ret in [("negative", [-3, 0]), ("None", [None, 0]), ("float", [2.5, 0])]:
    it = iter(ret); calls = []
    def fn(bs):
        calls.append(bs); raise RuntimeError("CUDA out of memory.")
    try:
        find_executable_batch_size(fn, starting_batch_size=5, reduce_batch_size_fn=lambda: next(it))()
    except BaseException as e:
        print(f"custom returns {label}: {type(e).__name__} {str(e)!r} calls={calls}")

# custom fn with an argument -> TypeError at reduction time
calls = []
def fn2(bs):
    calls.append(bs); raise RuntimeError("CUDA out of memory.")
try:
    find_executable_batch_size(fn2, starting_batch_size=5, reduce_batch_size_fn=lambda x: x // 2)()
except BaseException as e:
    print(f"custom fn taking 1 arg: {type(e).__name__} {str(e)!r} calls={calls}")

print("\n== what the function receives ==")
@find_executable_batch_size(starting_batch_size=7)
def recv(batch_size, a, b=None, **kw):
    return (batch_size, a, b, kw)
print(recv("A", b="B", extra=1))
try:
    recv(7, "A")
except BaseException as e:
    print("passing batch size explicitly:", type(e).__name__, repr(str(e)))
@find_executable_batch_size(starting_batch_size=7)
def varargs(batch_size, *args):
    return (batch_size, args)
for a in [(), ("x",), ("x", "y")]:
    try:
        print("varargs", a, "->", varargs(*a))
    except BaseException as e:
        print("varargs", a, "->", type(e).__name__, repr(str(e)))

print("\n== gc / clear_device_cache calls ==")
orig = M.clear_device_cache
events = []
def spy(garbage_collection=False):
    events.append(("clear_device_cache", garbage_collection)); return orig(garbage_collection)
M.clear_device_cache = spy
orig_collect = gc.collect
def spy_collect(*a, **k):
    events.append(("gc.collect",)); return orig_collect(*a, **k)
gc.collect = spy_collect
n = [0]
@find_executable_batch_size(starting_batch_size=10)
def gfn(bs):
    events.append(("fn", bs)); n[0] += 1
    if n[0] < 3:
        raise RuntimeError("CUDA out of memory.")
    return bs
gfn()
print(events)
events.clear()
@find_executable_batch_size(starting_batch_size=10)
def gfn2(bs):
    events.append(("fn", bs)); raise ValueError("x")
try: gfn2()
except ValueError: pass
print("non-OOM:", events)
gc.collect = orig_collect; M.clear_device_cache = orig

print("\n== explicit batch size passed by user (guard only counts positional params) ==")
@find_executable_batch_size(starting_batch_size=7)
def two(batch_size, a):
    return (batch_size, a)
for a in [("A",), (7, "A")]:
    try:
        print("two", a, "->", two(*a))
    except BaseException as e:
        print("two", a, "->", type(e).__name__, repr(str(e)))
print("recv(7, 'A') ->", recv(7, "A"))
