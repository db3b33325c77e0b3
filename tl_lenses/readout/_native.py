"""Build and load tl_lenses' C kernel for the lens statistics (``kernels/row_stats.c``).

The kernel is plain C with OpenMP, no torch headers, so it compiles in about a second with
the system's C compiler; the shared library is cached under ``$TL_LENSES_CACHE/kernels``
(default ``~/.cache/tl_lenses/kernels``), keyed by the source, the compiler, the flags and
the CPU (``-march=native`` code must not run on another CPU). Without a compiler, or if the
build fails, :func:`row_stats_kernel` returns None and the readout stays on its eager torch
path; :func:`build_error` says why.
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

# Tried in order: the first that compiles is used (a CPU without 512-bit vectors or a
# compiler without OpenMP still gets a working, slower kernel).
FLAG_SETS = (
    ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp"],
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-fopenmp"],
    ["-O3"],
)
COMMON_FLAGS = ["-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC"]
_errors: list[str] = []


def row_stats_kernel():
    """The compiled ``tl_row_stats`` function (ctypes), or None when it can't be built."""
    return _load()


def build_error() -> str | None:
    """What failed while building or loading the kernel (None if nothing did)."""
    return "; ".join(_errors) or None


@functools.lru_cache(maxsize=1)
def _load():
    function = _build_and_load()
    if function is None and not os.environ.get("TL_LENSES_NO_NATIVE"):
        warnings.warn(f"tl_lenses: the C kernel for the lens statistics is unavailable "
                      f"({build_error()}); using the slower torch path", RuntimeWarning,
                      stacklevel=4)
    return function


def _build_and_load():
    if os.environ.get("TL_LENSES_NO_NATIVE"):
        _errors.append("disabled by $TL_LENSES_NO_NATIVE")
        return None
    compiler = os.environ.get("CC") or next(
        (c for c in ("gcc", "cc", "clang") if shutil.which(c)), None)
    if compiler is None:
        _errors.append("no C compiler found (gcc, cc or clang; or set $CC)")
        return None
    source = (Path(__file__).parent / "kernels" / "row_stats.c").read_text()
    for flags in FLAG_SETS:
        path = _library_path(source, compiler, flags)
        if path.exists() or _compile(source, compiler, flags, path):
            try:
                return _bind(ctypes.CDLL(str(path)))
            except OSError as error:
                _errors.append(f"loading {path}: {error}")
    return None


def _library_path(source: str, compiler: str, flags: list[str]) -> Path:
    from tl_lenses.models import cache_root

    key = hashlib.sha256("\n".join(
        [source, compiler, _compiler_version(compiler), *flags, *COMMON_FLAGS,
         platform.machine(), _cpu_flags()]).encode()).hexdigest()[:16]
    return cache_root() / "kernels" / f"row_stats-{key}.so"


def _compile(source: str, compiler: str, flags: list[str], path: Path) -> bool:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            src, out = Path(tmp) / "row_stats.c", Path(tmp) / path.name
            src.write_text(source)
            done = subprocess.run([compiler, *flags, *COMMON_FLAGS, "-o", str(out), str(src)],
                                  capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                _errors.append(f"{compiler} {' '.join(flags)}: {done.stderr.strip()[-300:]}")
                return False
            os.replace(out, path)  # atomic: a concurrent process sees all of it or nothing
    except (OSError, subprocess.TimeoutExpired) as error:  # no compiler, unwritable cache
        _errors.append(f"{compiler} {' '.join(flags)} into {path.parent}: {error}")
        return False
    return True


def _bind(library):
    function = library.tl_row_stats
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    function.argtypes = [pointer, pointer, i64, i64, ctypes.c_int] + [pointer] * 5
    function.restype = None
    return function


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
