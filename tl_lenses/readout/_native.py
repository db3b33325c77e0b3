"""Build and load tl_lenses' C kernels: lens statistics and DLA's row dot products.

``kernels/row_stats.c`` sweeps the logit lens's softmax statistics; ``kernels/row_dots.c``
reads DLA's residual rows in place. The kernels are plain C with OpenMP, no torch headers,
so they compile in about a second with the system's C compiler, into one shared library
cached under ``$TL_LENSES_CACHE/kernels`` (default ``~/.cache/tl_lenses/kernels``), keyed
by the sources, the compiler, the flags and the CPU (``-march=native`` code must not run
on another CPU). Without a compiler, or if the build fails, :func:`row_stats_kernel` and
:func:`row_dots_kernel` return None and their callers stay on their torch paths;
:func:`build_error` says why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple

# Tried in order: the first that compiles is used (a CPU without 512-bit vectors or a
# compiler without OpenMP still gets a working, slower kernel).
FLAG_SETS = (
    ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp"],
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-fopenmp"],
    ["-O3"],
)
COMMON_FLAGS = ["-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC"]
SOURCES = ("row_stats.c", "row_dots.c")
_errors: list[str] = []


class Kernels(NamedTuple):
    """The library's functions (ctypes)."""

    row_stats: object
    row_dots: object


def row_stats_kernel():
    """The compiled ``tl_row_stats`` function (ctypes), or None when it can't be built."""
    kernels = _load()
    return None if kernels is None else kernels.row_stats


def row_dots_kernel():
    """The compiled ``tl_row_dots`` function (ctypes), or None when it can't be built."""
    kernels = _load()
    return None if kernels is None else kernels.row_dots


def build_error() -> str | None:
    """What failed while building or loading the kernel (None if nothing did)."""
    return "; ".join(_errors) or None


@functools.lru_cache(maxsize=1)
def _load() -> Kernels | None:
    kernels = _build_and_load()
    if kernels is None and not os.environ.get("TL_LENSES_NO_NATIVE"):
        warnings.warn(f"tl_lenses: the C kernels (lens statistics, DLA's projections) are "
                      f"unavailable ({build_error()}); using the slower torch paths",
                      RuntimeWarning, stacklevel=4)
    return kernels


def _build_and_load():
    if os.environ.get("TL_LENSES_NO_NATIVE"):
        _errors.append("disabled by $TL_LENSES_NO_NATIVE")
        return None
    compiler = os.environ.get("CC") or next(
        (c for c in ("gcc", "cc", "clang") if shutil.which(c)), None)
    if compiler is None:
        _errors.append("no C compiler found (gcc, cc or clang; or set $CC)")
        return None
    sources = {name: (Path(__file__).parent / "kernels" / name).read_text() for name in SOURCES}
    for flags in FLAG_SETS:
        path = _library_path(sources, compiler, flags)
        if path.exists() or _compile(sources, compiler, flags, path):
            try:
                return _bind(ctypes.CDLL(str(path)))
            except OSError as error:
                _errors.append(f"loading {path}: {error}")
    return None


def _library_path(sources: dict[str, str], compiler: str, flags: list[str]) -> Path:
    from tl_lenses.models import cache_root

    key = hashlib.sha256("\n".join(
        [*sources.values(), compiler, _compiler_version(compiler), *flags, *COMMON_FLAGS,
         platform.machine(), _cpu_flags()]).encode()).hexdigest()[:16]
    return cache_root() / "kernels" / f"tl_kernels-{key}.so"


def _compile(sources: dict[str, str], compiler: str, flags: list[str], path: Path) -> bool:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            files = [Path(tmp) / name for name in sources]
            for file, text in zip(files, sources.values()):
                file.write_text(text)
            out = Path(tmp) / path.name
            done = subprocess.run([compiler, *flags, *COMMON_FLAGS, "-o", str(out),
                                   *map(str, files)],
                                  capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                _errors.append(f"{compiler} {' '.join(flags)}: {done.stderr.strip()[-300:]}")
                return False
            os.replace(out, path)  # atomic: a concurrent process sees all of it or nothing
    except (OSError, subprocess.TimeoutExpired) as error:  # no compiler, unwritable cache
        _errors.append(f"{compiler} {' '.join(flags)} into {path.parent}: {error}")
        return False
    return True


def _bind(library) -> Kernels:
    pointer, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    row_stats, row_dots = library.tl_row_stats, library.tl_row_dots
    row_stats.argtypes = [pointer, pointer, i64, i64, c_int] + [pointer] * 5
    # (pointers, n, offsets, rows, u, n_dir, d, threads, out)
    row_dots.argtypes = [pointer, i64, pointer, i64, pointer, i64, i64, c_int, pointer]
    for function in (row_stats, row_dots):
        function.restype = None
    return Kernels(row_stats, row_dots)


def _compiler_version(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True,
                              timeout=30).stdout.split("\n")[0]
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()
