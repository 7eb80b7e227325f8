"""lorakit's native CPU kernel: the per-row grouped pair (functional.grouped_lora_into_) as one C++ call.

At decode sizes a mixed batch's LoRA cost on a CPU is the factors' reading and the cost of each op (two bmm,
their views, ~20 µs a layer), not arithmetic; `grouped.cpp` meets each adapter's factors once per pair of rows
with no intermediate tensor, in one call per layer (SmolLM2-135M's 210 layers, 8 slots, 2 threads: numbers in
the README's serving section). It is used by fast/rows.py wherever it applies (CPU, float32) once `load()` has
succeeded in this process, and never inside `fast.plain_path()`.

`load()` is explicit (`lorakit serve --native-kernel auto`, the default, calls it at start-up) because the
first one on a machine compiles the source (torch.utils.cpp_extension: a C++ compiler and ninja, ~1 min on 2
cores), with -march=native, into the lorakit cache (`models.cache_dir() / "kernels"`), keyed by the source, the
torch and Python versions and the CPU's flags, so a cache shared between different machines never hands one
a build for another's CPU. Later loads take well under a second.
"""

from __future__ import annotations

import hashlib
import platform
import sys
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("grouped.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp"]  # OpenMP: at::parallel_for runs serially without it

_lock = threading.Lock()
_module = None  # the loaded extension, once load() succeeded


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def build_key() -> str:
    """What a build depends on, hashed: the source, the flags, torch, Python and the CPU."""
    h = hashlib.sha256(SOURCE.read_bytes())
    for part in (" ".join(FLAGS), torch.__version__, sys.version, _cpu_flags()):
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:16]


def build_dir() -> Path:
    from ...models import cache_dir

    return cache_dir() / "kernels" / f"grouped_{build_key()}"


def built() -> bool:
    """Whether this machine's cache holds a build for this source, torch and CPU (then `load` is quick)."""
    where = build_dir()
    return where.is_dir() and any(where.glob("*.so"))


def load(verbose: bool = False) -> str | None:
    """Load the kernel into this process (building it first when this machine has no build yet).

    Returns:
        None once loaded (again: a no-op), else why it could not be (one line; the eager path stays in use).
    """
    global _module
    with _lock:
        if _module is not None:
            return None
        try:
            from torch.utils.cpp_extension import load as cpp_load

            where = build_dir()
            where.mkdir(parents=True, exist_ok=True)
            _module = cpp_load(name=f"lorakit_grouped_{build_key()}", sources=[str(SOURCE)], extra_cflags=FLAGS,
                               extra_ldflags=["-fopenmp"], build_directory=str(where), verbose=verbose)  # fmt: skip
        except Exception as e:  # no compiler, no ninja, a failed build: say which, keep the eager path
            lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
            return f"{type(e).__name__}: {lines[0] if lines else e}"
    return None


def loaded() -> bool:
    return _module is not None


def grouped_lora_(y, x, A, sB, index, keep, width: int, tokens: int) -> None:
    """The kernel (grouped.cpp): y (N, out) += keep · (x A_gᵀ)(s·B_g)ᵀ over G groups of `width` places of
    `tokens` token rows each; x (N, in); A (G, r, in), sB (G, r, out) fp32 contiguous CPU; index: empty or
    (G·width,) int64 batch rows; keep: empty or (G·width,) float32 (0: a place adds nothing).

    Raises:
        RuntimeError: not loaded, or tensors that do not fit the contract (the kernel's own checks).
    """
    if _module is None:
        raise RuntimeError("lorakit's native kernel is not loaded: call lorakit.fast.native.load() first")
    _module.grouped_lora_(y, x, A, sB, index, keep, width, tokens)
