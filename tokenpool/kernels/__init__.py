"""CPU kernels in C, built on first use for this CPU's instruction-set class and cached.

Each kernel is one C file beside this module, compiled with the machine's C compiler (`$CC`, else `cc`) into
`$TOKENPOOL_CACHE_DIR` (default `~/.cache/tokenpool/kernels`), keyed by the source, the flags and the
compiler, and loaded with ctypes. The build takes about a second. Where no compiler is found or the build
fails, `load` returns None (logged once) and the caller falls back to PyTorch's own kernels: slower, same
results.

The OpenMP runtime: the library is linked against libgomp.so.1 and loaded after torch, whose bundled
libgomp.so.1 is already in the process, so the dynamic loader reuses it (matched by SONAME): one OpenMP
team for torch and for our kernels, never two competing for the cores.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch  # noqa: F401 - loads torch's libgomp before any kernel library

from tokenpool.platforms.cpu import cpu_info

logger = logging.getLogger("tokenpool")

CACHE_ENV = "TOKENPOOL_CACHE_DIR"
# Set to 0 to never build or load the C kernels (PyTorch's kernels everywhere).
KERNELS_ENV = "TOKENPOOL_CPU_KERNELS"

_COMMON_FLAGS = ["-O3", "-shared", "-fPIC", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-std=gnu11",
                 "-Wno-psabi"]
# Build per class: the widest vectors the class has (the C code sizes its vector types from __AVX512F__).
_ISA_FLAGS = {
    "amx": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-mprefer-vector-width=512",
            "-mavx512bf16", "-mamx-tile", "-mamx-bf16"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-mprefer-vector-width=512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "generic": [],
}


def build_variant() -> str:
    """Which build this CPU runs: "amx", "avx512", "avx2" or "generic"."""
    cls = cpu_info().isa_class
    if cls == "amx":
        return "amx"
    if cls in ("avx512", "avx512_bf16"):
        return "avx512"
    return "avx2" if cls == "avx2" else "generic"


def kernel_variant(bf16: bool) -> str:
    """The build a kernel runs for bf16 or fp32 work: on the AMX class, fp32 runs the AVX-512 build (it has no
    use for the tiles, and the attention kernel measured 5-8% faster than the same C code built with the AMX
    flags: bench/cpu_kernels.py, 2.45 vs 2.64 us/token/layer at MiniLM's shapes)."""
    variant = build_variant()
    return "avx512" if variant == "amx" and not bf16 else variant


def vector_width(variant: str | None = None) -> int:
    """Floats per vector in a build (default: this CPU's): row lengths and head dims must be multiples of it."""
    return 16 if (variant or build_variant()) in ("amx", "avx512") else 8


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache",
                                                      "tokenpool")
    return Path(root) / "kernels"


def buildable_variants() -> list[str]:
    """The builds this CPU can run, widest first (the tests check each)."""
    return {"amx": ["amx", "avx512", "avx2", "generic"], "avx512": ["avx512", "avx2", "generic"],
            "avx2": ["avx2", "generic"]}.get(build_variant(), ["generic"])


@functools.cache
def load(name: str, variant: str | None = None) -> ctypes.CDLL | None:
    """The kernel library `name` (from `name`.c beside this module) built for `variant` (default: this CPU's
    class, `build_variant()`), or None where unavailable."""
    if os.environ.get(KERNELS_ENV, "1").strip() == "0":
        logger.info("C kernels off ($%s=0): PyTorch's CPU kernels are used.", KERNELS_ENV)
        return None
    if not sys.platform.startswith("linux"):
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.warning("No C compiler found (set $CC): the CPU uses PyTorch's kernels for %s (slower).", name)
        return None
    source = Path(__file__).with_name(f"{name}.c")
    variant = variant or build_variant()
    flags = [*_COMMON_FLAGS, *_ISA_FLAGS[variant]]
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        logger.warning("C compiler %s does not run (%s): PyTorch's kernels for %s.", compiler, e, name)
        return None
    header = source.with_name("simd.h")
    key = hashlib.sha256("\0".join([source.read_text(), header.read_text(), *flags, version]).encode()).hexdigest()[:16]
    target = cache_dir() / f"{name}-{variant}-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        proc = subprocess.run([compiler, *flags, f"-I{source.parent}", str(source), "-o", tmp], capture_output=True,
                              text=True, timeout=300)
        if proc.returncode != 0:
            os.unlink(tmp)
            logger.warning("Building the %s kernel failed (PyTorch's kernels are used instead):\n%s", name,
                           proc.stderr[-2000:])
            return None
        os.replace(tmp, target)  # atomic: a concurrent build or reader sees a whole file or none
        logger.info("Built the %s CPU kernel (%s) into %s", name, variant, target)
    try:
        return ctypes.CDLL(str(target))
    except OSError as e:
        logger.warning("Loading %s failed (%s): PyTorch's kernels for %s.", target, e, name)
        return None


@functools.cache
def function(name: str, argtypes: tuple, variant: str | None = None) -> Callable[..., int] | None:
    """The C function `tp_<name>` of kernel `name` (returning an int status), or None where unavailable."""
    lib = load(name, variant)
    if lib is None:
        return None
    fn = getattr(lib, f"tp_{name}")
    fn.restype = ctypes.c_int
    fn.argtypes = list(argtypes)
    return fn
