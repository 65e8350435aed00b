"""Shared set-up for the kernel tests: the real hasten-kernel binary, installed as a kernelspec into a
temporary Jupyter prefix that every test (and jupyter_client's kernel lookup) uses."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def kernel_binary() -> Path:
    explicit = os.environ.get("HASTEN_KERNEL_BIN")
    if explicit:
        return Path(explicit)
    target = os.environ.get("CARGO_TARGET_DIR", str(ROOT / "target"))
    return Path(target) / "debug" / "hasten-kernel"


KERNEL = kernel_binary()
if not KERNEL.is_file():
    sys.exit(f"kernel tests: {KERNEL} does not exist; build it first (make test does)")

PREFIX = Path(tempfile.mkdtemp(prefix="hasten-kernelspec-"))
subprocess.run([str(KERNEL), "install", "--prefix", str(PREFIX)], check=True, capture_output=True)
os.environ["JUPYTER_PATH"] = str(PREFIX / "share" / "jupyter")
# Keep the tests' Jupyter runtime files (connection files) out of the user's directories.
os.environ.setdefault("JUPYTER_RUNTIME_DIR", str(PREFIX / "runtime"))


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(PREFIX, ignore_errors=True)


@pytest.fixture(scope="session")
def kernel_binary_path() -> Path:
    return KERNEL
