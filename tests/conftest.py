"""Shared fixtures: the optional ../shared folder (real MNIST, published checkpoints, parity vectors)."""

from __future__ import annotations

import os
import shutil

# Without a GPU, the Triton kernels' tests run in triton's CPU interpreter, which must be chosen before triton is
# first imported (triton decorates its own library functions at import): so here, before anything imports torch.
if "TRITON_INTERPRET" not in os.environ and shutil.which("nvidia-smi") is None:
    os.environ["TRITON_INTERPRET"] = "1"
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GEVIT_SHARED_DIR", REPO.parent / "shared"))
# The published checkpoints of the reference folder, for every test and the notebooks they execute (the library
# itself only knows $GEVIT_CHECKPOINT_DIR, the data folder and the authors' URLs).
if (SHARED / "reference" / "checkpoints").is_dir():
    os.environ.setdefault("GEVIT_CHECKPOINT_DIR", str(SHARED / "reference" / "checkpoints"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long real-data checks (CI runs them; deselect with -m 'not slow')")
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the repository, or skip the test with the reason."""
    if not (SHARED / "reference").is_dir():
        pytest.skip(f"reference material not found at {SHARED} (set GEVIT_SHARED_DIR); CI provides it")
    return SHARED


@pytest.fixture(scope="session")
def shared_mnist_dir(shared_dir: Path) -> Path:
    """Folder with the genuine MNIST idx .gz files (../shared/data/mnist), or skip."""
    d = shared_dir / "data" / "mnist"
    if not (d / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"genuine MNIST not found in {d}")
    return d


@pytest.fixture
def float64():
    """float64 default dtype and seed 0 for exact equivariance checks; restores the dtype afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def stalled_server() -> Iterator[str]:
    """``http://127.0.0.1:<port>`` of a socket that accepts connections (the kernel's backlog) and never answers,
    like a server behind a firewall that drops replies. Local only; closed after the test."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
