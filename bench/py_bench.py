"""Python Accelerate's side of L1 (`l1`), C1/C2 (`c`) and S/M training (`S`, `M`), using the functions of
shared/bench/py_anchor.py, which the device run copies next to this file."""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import py_anchor as p  # noqa: E402
from accelerate import notebook_launcher  # noqa: E402

if __name__ == "__main__":
    what = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    if what == "l1":
        t0 = time.time()
        notebook_launcher(p.first_collective, (t0,), num_processes=n)
        p.emit(part="launch_total_s", value=time.time() - t0)
    elif what == "c":
        notebook_launcher(p.allreduce_bw, (0,), num_processes=n)
    elif what in ("S", "M"):
        steps, warm = (300, 30) if what == "S" else (30, 5)
        notebook_launcher(p.train, (what, steps, warm, 0), num_processes=n)
    else:
        sys.exit(f"unknown part {what}")
