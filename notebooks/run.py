"""Runs a notebook through the installed hasten kernel (nbclient) and prints each cell's output, as
`make demo` does with quickstart.ipynb: `python notebooks/run.py NOTEBOOK [KERNEL_NAME]`."""

import sys
import time

import nbformat
from nbclient import NotebookClient


def main() -> int:
    path = sys.argv[1]
    kernel = sys.argv[2] if len(sys.argv) > 2 else "hasten"
    nb = nbformat.read(path, as_version=4)
    started = time.monotonic()
    client = NotebookClient(nb, kernel_name=kernel, timeout=1200, startup_timeout=120)
    try:
        client.execute()
    finally:
        for cell in nb.cells:
            if cell.cell_type != "code":
                continue
            print(f"In [{cell.get('execution_count') or ' '}]: {cell.source.splitlines()[0]} …")
            for out in cell.get("outputs", []):
                if out["output_type"] == "stream":
                    print(out["text"], end="")
                elif out["output_type"] in ("execute_result", "display_data"):
                    print(out["data"].get("text/plain", ""))
                elif out["output_type"] == "error":
                    print(f"{out['ename']}: {out['evalue']}")
    print(f"{path}: ran through kernel {kernel!r} in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
