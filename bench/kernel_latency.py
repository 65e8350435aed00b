"""hasten-kernel latencies, through a real jupyter_client: kernel start to kernel_info, to the first
result, a cell that builds and runs a tch model, and repeated small cells. Needs the kernelspec
installed (hasten-kernel install) and the shared build warm (hasten-kernel warm).

    python bench/kernel_latency.py [--runs N]
"""

import argparse
import statistics
import time

from jupyter_client import KernelManager

MODEL_CELL = """let vs = nn::VarStore::new(Device::Cpu);
let model = nn::seq()
    .add(nn::linear(vs.root() / "fc1", 64, 256, Default::default()))
    .add_fn(|x| x.relu())
    .add(nn::linear(vs.root() / "fc2", 256, 10, Default::default()));
let out = model.forward(&Tensor::randn([32, 64], (Kind::Float, Device::Cpu)));
out.size()"""


def run_cell(kc, code):
    started = time.monotonic()
    reply = kc.execute_interactive(code, timeout=600, output_hook=lambda msg: None)
    assert reply["content"]["status"] == "ok", reply["content"]
    return time.monotonic() - started


def one_session():
    started = time.monotonic()
    km = KernelManager(kernel_name="hasten")
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=120)
    ready = time.monotonic() - started
    first = run_cell(kc, "1 + 1") + ready
    model = run_cell(kc, MODEL_CELL)
    model_again = run_cell(kc, "model.forward(&Tensor::ones([2, 64], (Kind::Float, Device::Cpu))).size()")
    run_cell(kc, "let mut x = 0u64;")
    repeats = [run_cell(kc, "x += 1; x") for _ in range(10)]
    kc.stop_channels()
    km.shutdown_kernel(now=True)
    return ready, first, model, model_again, repeats


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    rows = [one_session() for _ in range(args.runs)]
    med = lambda xs: statistics.median(xs)
    print(f"kernel_info reply after start : {med([r[0] for r in rows]):.2f} s (runs: {[round(r[0], 2) for r in rows]})")
    print(f"start to first result (1 + 1) : {med([r[1] for r in rows]):.2f} s (runs: {[round(r[1], 2) for r in rows]})")
    print(f"cell building a tch model     : {med([r[2] for r in rows]):.2f} s (runs: {[round(r[2], 2) for r in rows]})")
    print(f"next cell using the model     : {med([r[3] for r in rows]):.2f} s")
    all_repeats = [x for r in rows for x in r[4]]
    print(f"repeat cell `x += 1; x`       : median {med(all_repeats):.2f} s, min {min(all_repeats):.2f} s, max {max(all_repeats):.2f} s ({len(all_repeats)} cells)")


if __name__ == "__main__":
    main()
