"""Build and load the fused CPU kernels (``_cpu_kernels.c``) with the machine's C compiler.

The kernels are compiled once per (source, compiler, CPU) with ``-O3 -march=native`` into a
cache directory and loaded with :mod:`ctypes` (whose calls release the GIL). Nothing is
downloaded. When no compiler is found or the build fails, :func:`load` returns ``None`` and the
transform keeps its pure-torch path (same results, slower); :func:`native_info` says which path
is in use and why.

Environment:

* ``SCATSTORE_NATIVE=0`` disables the kernels (pure-torch path).
* ``SCATSTORE_CACHE`` sets the cache directory (default ``$XDG_CACHE_HOME/scatstore`` or
  ``~/.cache/scatstore``); the library is written under ``kernels/``.
* ``CC`` names the compiler (default: ``cc``, then ``gcc``, then ``clang``).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

_SOURCE = Path(__file__).with_name("_cpu_kernels.c")
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=fast", "-fopenmp-simd",
          "-fPIC", "-shared", "-std=gnu99"]

_lock = threading.Lock()
_state: dict = {}

_vp, _i64 = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "sc_prod_periodize": [_vp, _vp, _i64, _vp, _i64, _i64, _i64, _i64, _vp, _i64, _vp],
    "sc_modulus": [_vp, _i64, _i64, _vp, _vp, ctypes.c_float],
    "sc_fft2": [_vp, _i64, _i64, _i64, _vp, _i64, _vp, _vp, _i64, _vp, _i64, _vp],
    "sc_lowpass": [_vp, _i64, _i64, _i64, _vp, _vp, _i64, _i64, _vp, _vp, _i64, _i64, _vp, _vp,
                   _vp],
}


def cache_dir() -> Path:
    base = os.environ.get("SCATSTORE_CACHE")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "scatstore"


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return cc if shutil.which(cc.split()[0]) else None
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return name
    return None


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _build(cc: str) -> Path:
    source = _SOURCE.read_bytes()
    try:
        version = subprocess.run([*cc.split(), "--version"], capture_output=True, text=True,
                                 timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    key = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(_FLAGS).encode(),
                                     _cpu_signature().encode(), platform.machine().encode()]))
    target = cache_dir() / "kernels" / f"scatkern-{key.hexdigest()[:20]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # build next to the target and rename: concurrent processes (dask workers) never load a
    # half-written library
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([*cc.split(), *_FLAGS, str(_SOURCE), "-o", tmp, "-lm"],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-800:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load():
    """The kernel library (a ``ctypes.CDLL`` with typed functions), or ``None`` if unavailable."""
    with _lock:
        if "lib" in _state:
            return _state["lib"]
        lib, reason, path = None, "", None
        if os.environ.get("SCATSTORE_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
            reason = "disabled by SCATSTORE_NATIVE=0"
        elif sys.byteorder != "little":
            reason = "big-endian platform"
        else:
            cc = _compiler()
            if cc is None:
                reason = "no C compiler found (set CC)"
            else:
                try:
                    path = _build(cc)
                    lib = ctypes.CDLL(str(path))
                    for name, args in _SIGNATURES.items():
                        fn = getattr(lib, name)
                        fn.argtypes = args
                        fn.restype = None
                except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                    lib, reason = None, f"build failed: {exc}"
                    warnings.warn(f"scatstore: fused CPU kernels unavailable ({reason}); "
                                  f"using the slower pure-torch path", RuntimeWarning,
                                  stacklevel=3)
        _state.update(lib=lib, reason=reason or "loaded", path=path)
        return lib


def native_info() -> dict:
    """``{"available": bool, "reason": str, "path": str | None}`` for the fused CPU kernels."""
    load()
    return {"available": _state["lib"] is not None, "reason": _state["reason"],
            "path": str(_state["path"]) if _state["path"] else None}


def _reset_for_tests() -> None:
    with _lock:
        _state.clear()
