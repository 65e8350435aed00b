"""Where a launch's CUDA start-up goes: N processes, started together, each calls cuInit, then makes its
first GPU's primary context current and asks for free memory (what every rank does before its first
collective). Through the driver API alone (ctypes on libcuda), so neither torch nor hasten is involved.
Run: python cuda_init_probe.py. Prints one PROBE JSON line per configuration and repetition."""
import ctypes
import json
import multiprocessing as mp
import os
import time


def one(visible, barrier, out):
    if visible is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible
    cuda = ctypes.CDLL("libcuda.so.1")
    barrier.wait()
    t0 = time.time()
    assert cuda.cuInit(0) == 0
    t1 = time.time()
    count = ctypes.c_int()
    cuda.cuDeviceGetCount(ctypes.byref(count))
    dev = ctypes.c_int()
    assert cuda.cuDeviceGet(ctypes.byref(dev), 0) == 0
    ctx = ctypes.c_void_p()
    assert cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) == 0
    assert cuda.cuCtxSetCurrent(ctx) == 0
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    assert cuda.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)) == 0
    t2 = time.time()
    out.put({"visible": visible, "devices": count.value, "cuInit_s": t1 - t0, "context_s": t2 - t1, "end_s": t2 - t0})


def run(config):
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(len(config))
    out = ctx.Queue()
    procs = [ctx.Process(target=one, args=(v, barrier, out)) for v in config]
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return results


if __name__ == "__main__":
    gpus = int(os.popen("nvidia-smi -L | wc -l").read())
    configs = {
        "1 process, 1 GPU visible": ["0"],
        f"1 process, {gpus} visible": [None],
        "2 processes, 1 GPU each": ["0", "1"],
        f"2 processes, {gpus} visible each": [None, None],
        f"{gpus} processes, 1 GPU each": [str(i) for i in range(gpus)],
        f"{gpus} processes, {gpus} visible each": [None] * gpus,
    }
    for rep in (1, 2):
        for name, config in configs.items():
            results = run(config)
            print("PROBE " + json.dumps({
                "config": name, "rep": rep,
                "slowest_end_s": max(r["end_s"] for r in results),
                "cuInit_s": sorted(round(r["cuInit_s"], 3) for r in results),
                "context_s": sorted(round(r["context_s"], 3) for r in results),
            }), flush=True)
