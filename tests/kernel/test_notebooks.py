"""nbclient runs every notebook in notebooks/ through the installed kernelspec; outputs are asserted."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


def run(name: str) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, kernel_name="hasten", timeout=600, startup_timeout=120).execute()
    return nb


def text_of(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif out["output_type"] in ("execute_result", "display_data"):
            parts.append(out["data"].get("text/plain", ""))
        elif out["output_type"] == "error":
            parts.append(out["ename"] + ": " + out["evalue"] + "\n" + "\n".join(out["traceback"]))
    return "".join(parts)


def test_every_notebook_is_tested():
    assert {p.name for p in NOTEBOOKS.glob("*.ipynb")} == {
        "quickstart.ipynb",
        "debug_mode.ipynb",
        "big_model_inference.ipynb",
    }


def test_quickstart_trains_on_two_processes():
    nb = run("quickstart.ipynb")
    code = [c for c in nb.cells if c.cell_type == "code"]
    launch = text_of(code[2])
    assert "[rank0]: training on 2 processes" in launch, launch
    for epoch in (1, 2, 3):
        assert f"[rank0]: epoch {epoch}: test accuracy" in launch, launch
    accuracy = float(code[2].outputs[-1]["data"]["text/plain"])
    assert accuracy > 0.8
    assert "final accuracy" in text_of(code[3])


def test_debug_mode_shows_the_cross_rank_shape_mismatch():
    nb = run("debug_mode.ipynb")
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "debug mode on" in text_of(code[0])
    failed = text_of(code[2])
    assert any(o["output_type"] == "error" for o in code[2].outputs), failed
    assert "shape mismatches" in failed, failed
    assert "Process 0: [1, 5]" in failed and "Process 1: [1, 2, 5]" in failed, failed
    assert "debug mode off" in text_of(code[3])
    assert "survived" in text_of(code[4])


def test_big_model_inference_matches_the_reference():
    nb = run("big_model_inference.ipynb")
    code = [c for c in nb.cells if c.cell_type == "code"]
    mapping = text_of(code[2])
    assert "Disk" in mapping, mapping
    diff = float(code[3].outputs[-1]["data"]["text/plain"])
    assert diff < 1e-4
