"""gpt2fn's native kernels, built on first use with the machine's C++ compiler: `affine.cpp` (the products) and
`attend.cpp` (a decode step's attention), sharing `vectors.h`.

Why a kernel of our own: torch's CPU products of 1..64 rows (MKL's small GEMMs) run below the memory bandwidth
on some of the CPUs gpt2fn is built on (the AMD EPYC most of all), and decoding a batch is exactly such products;
its tied head `x @ tok_emb.T` runs at about half the bandwidth of the other orientation in torch. `affine.cpp`
reads the stored matrices in place (`[in, out]` and, for the tied head, `[vocab, d_model]`), fp32, bf16, fp16 or
int8 with per-column scales, widens them to fp32 in registers and keeps a block of rows x a band of columns of
fp32 accumulators (int8 with AVX-512BW: exact integer sums of 16-bit-rounded inputs instead, `int8_integer`);
each thread reads its half of a matrix front to back. `attend.cpp` attends one query per row and head over a KV
cache as stored (fp32, bf16 or fp16), where torch's fused attention costs more per call than a decode step's
reads and needs the cache in the query's dtype. The policy that decides when each is used is `gpt2fn.kernels`.

How it is built: the sources ship in the package; the first call compiles them into one library with `$CXX`
(default `c++`), `-O3 -march=native -fopenmp`, into the user cache (`$XDG_CACHE_HOME/gpt2fn/native/<key>/`,
default `~/.cache/gpt2fn`), keyed by the sources, the flags, the compiler's version and the CPU's flags, so a
machine never loads a build made for another. The build is one compiler call (a few seconds, no torch headers, no
ninja) and is a verified cache entry (`gpt2fn.files.cached_entry`): written atomically, then its size and sha256 into
`libgpt2fn_affine.so.check`, under a lock, so concurrent first builds compile once. Each process checks the file
against its check before `dlopen`, and loads the very file it checked (`/proc/self/fd/N` where there is one): a
short or altered build (a full disk, a copied home directory) is rebuilt with one warning, never mapped (a short
`.so` kills the process with SIGBUS). It is loaded with ctypes; its OpenMP threads are the libgomp that torch itself
loaded (torch's own thread pool).

When it is not used: `GPT2FN_NATIVE=0` turns it off; with no compiler, a failed build, or a platform without
OpenMP, `status()` says why and every caller takes its torch path. Nothing is ever required from it.
"""

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import IO

from ..files import cache_dir, cached_entry

__all__ = ["library", "available", "status", "vector_width", "has_type", "int8_integer", "STORED_TYPES"]

STORED_TYPES = ("f32", "bf16", "f16", "i8")
"""The stored weight types the kernel reads (fp32, bf16, fp16, int8 with per-column scales); f16 only where the
compiler knows `_Float16` (`has_type`)."""

_HERE = Path(__file__).parent
_SOURCES = (_HERE / "affine.cpp", _HERE / "attend.cpp")
_HEADERS = (_HERE / "vectors.h",)
_FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-fPIC", "-shared", "-std=c++17")
_ENV = "GPT2FN_NATIVE"
_status = "not loaded yet"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    want = os.environ.get("CXX") or "c++"
    return shutil.which(want) or (None if os.environ.get("CXX") else shutil.which("g++"))


def _build(cxx: str) -> tuple[Path, IO[bytes]]:
    """Compile the kernel for this machine (or find the build already made): its path and the verified file, open."""
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    source = b"\0".join(f.read_bytes() for f in (*_SOURCES, *_HEADERS))
    key = hashlib.sha256(b"\0".join([source, " ".join(_FLAGS).encode(), version.encode(),
                                     platform.machine().encode(), _cpu_flags().encode()])).hexdigest()[:16]
    out = cache_dir("native", key, "libgpt2fn_affine.so")

    def compile_to(tmp: Path) -> None:
        done = subprocess.run([cxx, *_FLAGS, "-o", str(tmp), *map(str, _SOURCES)], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {done.stderr.strip()[-400:]}")

    return out, cached_entry(out, key, compile_to, what="the native kernel build")


def _load(path: Path, fh: IO[bytes]) -> ctypes.CDLL:
    """`dlopen` the file `fh` holds, which was verified, rather than whatever `path` names by now."""
    with fh:
        by_fd = f"/proc/self/fd/{fh.fileno()}"
        return ctypes.CDLL(by_fd if os.path.exists(by_fd) else str(path))


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (then `status()` says why). Built on the first call of a process."""
    global _status
    if os.environ.get(_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        _status = f"off: {_ENV}={os.environ[_ENV]}"
        return None
    cxx = _compiler()
    if cxx is None:
        _status = "off: no C++ compiler found (set CXX, or install g++ or clang++)"
        return None
    import torch  # noqa: F401  -- torch's libgomp must be loaded first, so the kernel shares its threads

    try:
        path, fh = _build(cxx)
        lib = _load(path, fh)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _status = f"off: the build failed ({type(e).__name__}: {e})"
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.gpt2fn_vector_width.restype = ctypes.c_int
    lib.gpt2fn_has_f16.restype = ctypes.c_int
    lib.gpt2fn_i8_integer.restype = ctypes.c_int
    for name in STORED_TYPES if lib.gpt2fn_has_f16() else tuple(t for t in STORED_TYPES if t != "f16"):
        fn = getattr(lib, f"gpt2fn_affine_{name}")
        fn.restype = ctypes.c_int
        fn.argtypes = [ptr, i64, i64, i64, ptr, i64, i64, ptr, ptr, ctypes.c_int, ptr, i64, ctypes.c_int, i64]
        fn = getattr(lib, f"gpt2fn_affine_t_{name}")
        fn.restype = ctypes.c_int
        fn.argtypes = [ptr, i64, i64, i64, ptr, i64, i64, ptr, ptr, i64, ctypes.c_int]
        if name != "i8":
            fn = getattr(lib, f"gpt2fn_attend_{name}")
            fn.restype = ctypes.c_int
            fn.argtypes = [ptr, i64, i64, i64, i64, i64, ptr, ptr, i64, i64, i64, i64, i64, i64, ptr, i64, i64,
                           ctypes.c_float, ptr, i64, i64, ctypes.c_int]
            fn = getattr(lib, f"gpt2fn_attend_append_{name}")
            fn.restype = ctypes.c_int
            fn.argtypes = [ptr, i64, i64, i64, i64, i64, ptr, ptr, i64, i64, i64, i64, i64, i64, ptr, i64, i64,
                           ctypes.c_float, ptr, i64, i64, ctypes.c_int, ptr, ptr, i64, i64, ptr]
    _status = f"on: {path} ({lib.gpt2fn_vector_width()} floats per vector)"
    return lib


def available() -> bool:
    """Whether the native kernel is built and loaded in this process."""
    return library() is not None


def status() -> str:
    """`on: <path> (...)`, or `off: <why>`."""
    library()
    return _status


@functools.cache
def has_type(name: str) -> bool:
    """Whether the loaded kernel has the entry points for stored type `name` (one of `STORED_TYPES`)."""
    lib = library()
    return lib is not None and name in STORED_TYPES and (name != "f16" or bool(lib.gpt2fn_has_f16()))


@functools.cache
def int8_integer() -> bool:
    """Whether int8 products are integer sums (AVX-512BW): each input row rounded to 16-bit integers with one scale
    (at most `min(32767, (2**31 - 1) // 127 // K)` levels, so K products never overflow int32), summed exactly, then
    scaled. False: the int8 weights are widened to fp32 like the 16-bit ones (the fp32 product of the dequantized
    weights, up to summation order)."""
    lib = library()
    return lib is not None and bool(lib.gpt2fn_i8_integer())


@functools.cache
def vector_width() -> int:
    """Floats per vector register in this build (16 with AVX-512, 8 with AVX2)."""
    lib = library()
    return 0 if lib is None else int(lib.gpt2fn_vector_width())
