"""Build a C source with the machine's compiler and load it with :mod:`ctypes`; CPU features.

Used by every native kernel of scatstore (the scattering kernels in
``scatstore/transforms/_cpu_kernels.c``, the loader's conversion kernels). Nothing is
downloaded: a C source shipped in the package is compiled once per (source, compiler version,
flags, CPU) into ``cache_dir()/kernels/`` and loaded with typed signatures. ``ctypes`` calls
release the GIL. When no compiler exists or the build fails, :meth:`NativeLibrary.load` returns
``None`` and :meth:`NativeLibrary.info` says why; callers keep a pure-Python/torch path.

Public API (stable; add, don't break):

* :func:`cache_dir`, :func:`find_compiler`, :func:`native_disabled`
* :func:`cpu_features` (feature flags of the running CPU), :func:`isa_levels` (the levels it
  supports, best first), :func:`isa_level` (the level to build for, honouring
  ``SCATSTORE_ISA``), :func:`march_flags` (compiler flags for a level), :func:`has_features`
* :func:`build` (compile a source to a cached shared library), :class:`NativeLibrary` (lazy,
  thread-safe build + load + typed signatures + reason).

Environment:

* ``SCATSTORE_NATIVE=0`` disables every native kernel.
* ``SCATSTORE_ISA=<level>`` builds for a lower ISA level than the CPU's (e.g. ``x86-64-v3`` on
  an AVX-512 machine, for benchmarking the AVX2 kernels); a level the CPU does not support is
  refused (the best supported level is used, and :func:`isa_level_reason` says so).
* ``SCATSTORE_CACHE`` sets the cache directory (default ``$XDG_CACHE_HOME/scatstore`` or
  ``~/.cache/scatstore``).
* ``CC`` names the compiler (default: ``cc``, then ``gcc``, then ``clang``).
"""
from __future__ import annotations

import ctypes
import functools
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
from typing import Mapping, Sequence

__all__ = ["cache_dir", "find_compiler", "native_disabled", "cpu_features", "has_features",
           "isa_levels", "isa_level", "isa_level_reason", "march_flags", "build",
           "NativeLibrary", "ISA_FEATURES"]

# feature flags (as /proc/cpuinfo spells them) each ISA level needs, best level first per arch
ISA_FEATURES: dict[str, tuple[str, ...]] = {
    "x86-64-v4": ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx2", "fma",
                  "f16c", "bmi2"),
    "x86-64-v3": ("avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "avx"),
    "x86-64-v2": ("sse4_2", "sse4_1", "ssse3", "popcnt", "cx16"),
    "aarch64-sve": ("asimd", "sve"),
    "aarch64-neon": ("asimd",),
    "generic": (),
}
_ARCH_LEVELS = {
    "x86_64": ("x86-64-v4", "x86-64-v3", "x86-64-v2", "generic"),
    "aarch64": ("aarch64-sve", "aarch64-neon", "generic"),
}
# compiler flags per level: explicit levels, never -march=native, so a build for a level gives
# the same code on every CPU of that level (same bytes out)
_MARCH = {
    "x86-64-v4": ["-march=x86-64-v4", "-mtune=generic"],
    "x86-64-v3": ["-march=x86-64-v3", "-mtune=generic"],
    "x86-64-v2": ["-march=x86-64-v2", "-mtune=generic"],
    "aarch64-sve": ["-march=armv8.2-a+sve"],
    "aarch64-neon": ["-march=armv8-a"],
    "generic": [],
}


def cache_dir() -> Path:
    """Where built libraries go (``SCATSTORE_CACHE``, else the XDG cache, ``kernels/`` below)."""
    base = os.environ.get("SCATSTORE_CACHE")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "scatstore"


def native_disabled(env: str = "SCATSTORE_NATIVE") -> bool:
    """True when ``$env`` is set to 0/false/no/off."""
    return os.environ.get(env, "1").strip().lower() in ("0", "false", "no", "off")


def find_compiler() -> str | None:
    """The C compiler command (``$CC``, else cc/gcc/clang on PATH), or ``None``."""
    cc = os.environ.get("CC")
    if cc:
        return cc if shutil.which(cc.split()[0]) else None
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return name
    return None


def _cpuinfo_text() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def _machine() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


@functools.lru_cache(maxsize=None)
def cpu_features() -> frozenset[str]:
    """Feature flags of the running CPU (``/proc/cpuinfo`` ``flags`` on x86, ``Features`` on
    aarch64), lower case. Empty where they cannot be read (then only ``generic`` is used)."""
    for line in _cpuinfo_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return frozenset(value.lower().split())
    if _machine() == "aarch64":  # NEON is architectural on aarch64 (ARMv8-A)
        return frozenset({"asimd"})
    return frozenset()


def has_features(*names: str) -> bool:
    """True when the running CPU reports every feature in ``names``."""
    feats = cpu_features()
    return all(n.lower() in feats for n in names)


def cpu_model() -> str:
    for line in _cpuinfo_text().splitlines():
        if line.lower().startswith(("model name", "cpu model", "hardware")):
            return line.partition(":")[2].strip()
    return platform.processor() or _machine() or "unknown"


def isa_levels() -> list[str]:
    """The ISA levels the running CPU supports, best first, always ending with ``generic``."""
    levels = _ARCH_LEVELS.get(_machine(), ("generic",))
    return [lv for lv in levels if has_features(*ISA_FEATURES[lv])]


def _isa_choice() -> tuple[str, str]:
    supported = isa_levels()
    want = os.environ.get("SCATSTORE_ISA", "").strip().lower()
    if not want or want == "native":
        return supported[0], f"best level the CPU supports ({_describe(supported[0])})"
    if want in supported:
        return want, f"SCATSTORE_ISA={want} (CPU supports up to {supported[0]})"
    known = sorted({lv for levels in _ARCH_LEVELS.values() for lv in levels})
    why = ("not supported by this CPU" if want in known else f"unknown (known: {', '.join(known)})")
    warnings.warn(f"scatstore: SCATSTORE_ISA={want} is {why}; using {supported[0]}",
                  RuntimeWarning, stacklevel=3)
    return supported[0], f"SCATSTORE_ISA={want} refused ({why}); using {supported[0]}"


def _describe(level: str) -> str:
    feats = ISA_FEATURES.get(level, ())
    shown = [f for f in feats if f in ("avx512f", "avx2", "fma", "f16c", "asimd", "sve")]
    return f"{level}: {'+'.join(shown)}" if shown else level


def isa_level() -> str:
    """The ISA level native code is built for: the best the CPU supports, or the lower level
    ``SCATSTORE_ISA`` names (never a higher one)."""
    return _isa_choice()[0]


def isa_level_reason() -> str:
    """One line: why :func:`isa_level` chose its level."""
    return _isa_choice()[1]


def march_flags(level: str | None = None) -> list[str]:
    """Compiler flags that target ``level`` (default :func:`isa_level`)."""
    level = level or isa_level()
    return list(_MARCH.get(level, []))


def _compiler_version(cc: str) -> str:
    try:
        return subprocess.run([*cc.split(), "--version"], capture_output=True, text=True,
                              timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def build(source: Path | str, *, name: str, flags: Sequence[str], cc: str | None = None,
          libs: Sequence[str] = ("-lm",), out_dir: Path | None = None) -> Path:
    """Compile ``source`` into a shared library (cached) and return its path.

    The cache key covers the source bytes, the compiler's ``--version``, the flags, the CPU
    model/features and the machine type, so a change in any rebuilds. The library is built
    next to its final name and renamed into place: concurrent processes never load a
    half-written file. Raises ``RuntimeError`` with the compiler's message on failure.
    """
    cc = cc or find_compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    source = Path(source)
    src = source.read_bytes()
    all_flags = [*flags, "-fPIC", "-shared"]
    cpu = (cpu_model() + " " + " ".join(sorted(cpu_features()))).encode()
    key = hashlib.sha256(b"\0".join([src, _compiler_version(cc).encode(),
                                     " ".join(all_flags).encode(), " ".join(libs).encode(), cpu,
                                     _machine().encode()]))
    target = (out_dir or cache_dir() / "kernels") / f"{name}-{key.hexdigest()[:20]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([*cc.split(), *all_flags, str(source), "-o", tmp, *libs],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-800:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


Signature = Sequence | tuple  # argtypes, or (argtypes, restype)


class NativeLibrary:
    """A C source built on first use and loaded with typed functions.

    ``signatures`` maps each exported function name to its ``argtypes`` list, or to a pair
    ``(argtypes, restype)`` (default restype ``None``). ``flags`` may be a list or a callable
    returning one (evaluated at load time, e.g. to follow :func:`isa_level`). :meth:`load`
    returns the ``ctypes.CDLL`` or ``None``; :meth:`info` says which and why.
    """

    def __init__(self, source: Path | str, *, name: str, flags, signatures: Mapping[str, Signature],
                 disable_env: str = "SCATSTORE_NATIVE", what: str = "native kernels",
                 fallback: str = "the slower fallback path"):
        self.source = Path(source)
        self.name = name
        self._flags = flags
        self.signatures = dict(signatures)
        self.disable_env = disable_env
        self.what = what
        self.fallback = fallback
        self._lock = threading.Lock()
        self._state: dict = {}

    def flags(self) -> list[str]:
        return list(self._flags() if callable(self._flags) else self._flags)

    def load(self):
        """The loaded library, or ``None`` when disabled or unbuildable (warns once then)."""
        with self._lock:
            if "lib" in self._state:
                return self._state["lib"]
            lib, reason, path, flags = None, "", None, []
            if native_disabled(self.disable_env):
                reason = f"disabled by {self.disable_env}=0"
            elif sys.byteorder != "little":
                reason = "big-endian platform"
            else:
                cc = find_compiler()
                if cc is None:
                    reason = "no C compiler found (set CC)"
                else:
                    try:
                        flags = self.flags()
                        path = build(self.source, name=self.name, flags=flags, cc=cc)
                        lib = ctypes.CDLL(str(path))
                        for fname, sig in self.signatures.items():
                            fn = getattr(lib, fname)
                            if (isinstance(sig, tuple) and len(sig) == 2
                                    and isinstance(sig[0], (list, tuple))):
                                fn.argtypes, fn.restype = list(sig[0]), sig[1]
                            else:
                                fn.argtypes, fn.restype = list(sig), None
                    except (OSError, RuntimeError, AttributeError,
                            subprocess.SubprocessError) as exc:
                        lib, reason = None, f"build failed: {exc}"
                        warnings.warn(f"scatstore: {self.what} unavailable ({reason}); using "
                                      f"{self.fallback}", RuntimeWarning, stacklevel=3)
            self._state.update(lib=lib, reason=reason or "loaded", path=path, flags=flags)
            return lib

    def info(self) -> dict:
        """``{"available", "reason", "path", "flags"}``."""
        self.load()
        st = self._state
        return {"available": st["lib"] is not None, "reason": st["reason"],
                "path": str(st["path"]) if st["path"] else None, "flags": list(st["flags"])}

    def reset(self) -> None:
        """Forget the loaded library (tests; after changing the environment)."""
        with self._lock:
            self._state.clear()
