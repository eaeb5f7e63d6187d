"""Build (once, cached) and load the fused CPU kernel of the local attention, ``csrc/local_attention_cpu.cpp``.

torch's JIT extension loader compiles it with the machine's C++ compiler and ninja on first use (~30-60 s) and
caches the build under ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``); later imports load it in
well under a second. The build name carries a digest of the source, the compiler flags and the CPU's vector
capability, so a shared home directory on a cluster never hands one CPU's build to another.

Set ``GEVIT_CPU_KERNEL=0`` to never build or use it. When the build fails (no compiler, no ninja) the attention
falls back to the chunked torch path with one warning naming the reason. A build says so in one plain line; torch's
own messages while loading (e.g. "No CUDA runtime is found" on a CPU-only machine) are held back.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["load", "available", "unavailable_reason", "SOURCE"]

SOURCE = Path(__file__).with_name("csrc") / "local_attention_cpu.cpp"
ENV_SWITCH = "GEVIT_CPU_KERNEL"

_LOCK = threading.Lock()
_MODULE: ModuleType | None = None
_ERROR: str | None = None


def _flags() -> list[str]:
    # Not -ffast-math (linking with it would set flush-to-zero for the whole process): only the parts that let the
    # sums and maxima vectorise. The kernel has no infinities (outside-image offsets are masked, not -inf).
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros", "-fassociative-math",
             "-ffinite-math-only", "-fno-tree-loop-distribute-patterns"]
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    if capability == "AVX512":  # the kernel's vectors then hold 16 floats (one pixel each) instead of 8
        flags += ["-mavx512f", "-mavx512vl", "-mavx512dq", "-mavx512bw"]
    return flags


def _disabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "off", "false", "no")


def _ninja_on_path() -> None:
    """torch runs ``ninja`` from PATH; pip's ninja lives beside the (not activated) venv's python."""
    if shutil.which("ninja"):
        return
    dirs = [str(Path(sys.executable).parent)]
    try:
        import ninja  # type: ignore[import-not-found]

        dirs.insert(0, str(ninja.BIN_DIR))
    except (ImportError, AttributeError):
        pass
    os.environ["PATH"] = os.pathsep.join(dirs + [os.environ.get("PATH", "")])


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hold back what torch's extension loader logs, warns or prints to stderr (its CUDA_HOME notice on a CPU-only
    machine, compiler checks); a failed build still raises with the compiler's output."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def load() -> ModuleType | None:
    """The compiled module, building it on first use; None if disabled or the build failed (see the warning)."""
    global _MODULE, _ERROR
    if _disabled():
        return None
    if _MODULE is not None or _ERROR is not None:
        return _MODULE
    with _LOCK:
        if _MODULE is not None or _ERROR is not None:
            return _MODULE
        flags = _flags()
        digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode()
                                + torch.backends.cpu.get_cpu_capability().encode() + torch.__version__.encode())
        name = f"gevit_attention_cpu_{digest.hexdigest()[:12]}"
        try:
            with _quiet():
                from torch.utils import cpp_extension
            try:  # torch's (private) build folder: a cached build loads in a second and needs no notice
                built = Path(cpp_extension._get_build_directory(name, verbose=False), f"{name}.so").exists()
            except Exception:  # noqa: BLE001 - only decides whether to print the notice
                built = False
            if not built:
                print("gevit_lib: building the fused CPU attention kernel once, ~1 min", flush=True)
            _ninja_on_path()
            with _quiet():
                _MODULE = cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=flags,
                                             extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as err:  # noqa: BLE001 - any build failure means: use the torch path
            _ERROR = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
            warnings.warn(f"gevit_lib: the fused CPU attention kernel could not be built ({_ERROR}); using the "
                          f"slower chunked torch path. Install a C++ compiler and `pip install ninja`, or set "
                          f"{ENV_SWITCH}=0 to silence this.", RuntimeWarning, stacklevel=2)
    return _MODULE


def available() -> bool:
    """Whether the kernel is enabled and builds (builds it if needed)."""
    return load() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True)."""
    if _disabled():
        return f"disabled by {ENV_SWITCH}={os.environ.get(ENV_SWITCH)}"
    return None if load() is not None else _ERROR
