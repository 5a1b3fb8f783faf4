"""Linear layers of the packed graph: ``linear(x, w, b=None) = x @ w.T + b``.

- ``x``: (..., K) activations; ``w``: (N, K) weights (nn.Linear's layout; ``pack_linear``
  concatenates siblings such as q/k/v along N); ``b``: (N,) or None.  Returns (..., N).

Backends:

* ``torch`` -- ``F.linear`` (cuBLAS on CUDA, MKL/oneDNN on CPU); the reference.
* ``native`` (CPU) -- a small C kernel (``linear_cpu.c``, AVX2 + FMA, or AVX-512 where torch reports
  that capability; OpenMP) for the few rows of
  decode and speculative verification: it streams the weights from memory once for all rows,
  where the BLAS path re-reads them and, on the AMD CPUs measured here, costs 2-4x more for 2-16
  rows than for one.  Its result for a row does not depend on the other rows multiplied with it
  (batch invariance, see the C file), so a verification forward of 9 tokens computes bit for bit
  the logits 9 decode steps would.  Inputs of more than :data:`NATIVE_MAX_ROWS` rows (prefill),
  other dtypes or devices go to ``F.linear``.

The C file is compiled at first use with the system C compiler (``$CC``, else ``cc``/``gcc``) into
``accelc.models.cache_dir() / "native"`` (about a second) and loaded with ctypes; the file name
carries a hash of the source, flags and compiler, so an edit rebuilds it.  On an AVX-512 CPU
(``ACCELC_NATIVE_AVX512=0`` opts out) the AVX-512 variant takes 4 input rows per pass: measured
on the bundled model (2 Zen 5 cores), a verification forward costs ~1.3 ms more per token instead
of ~2.3 ms (8 tokens: 34.5 vs 40.6 ms, one token 25 ms either way).  Without a compiler, on
a CPU without AVX2/FMA, or with ``ACCELC_NATIVE=0``, the native backend is the torch reference
(:func:`native_status` says why; the ``lower`` pass reports it).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from accelc.kernels.dispatch import register

NATIVE_MAX_ROWS = 128
"""Most rows the native kernel takes; measured on 2 AMD EPYC cores it beats MKL up to ~128 rows."""

SOURCE = Path(__file__).with_name("linear_cpu.c")
CFLAGS = ("-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")
AVX512_FLAGS = ("-mavx512f",)
"""Added where torch reports the AVX512 CPU capability: the C file then builds its AVX-512 variant."""


def _cflags() -> tuple[str, ...]:
    avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512" and os.environ.get("ACCELC_NATIVE_AVX512", "1") != "0"
    return CFLAGS + AVX512_FLAGS if avx512 else CFLAGS

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_status: str | None = None


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or (cc if Path(cc).is_file() else None)
    return shutil.which("cc") or shutil.which("gcc")


def _cpu_supported() -> str | None:
    """None when the CPU runs the kernel, else why not."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"{platform.machine()} is not x86-64"
    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in ("AVX2", "AVX512"):
        return f"CPU capability {cap} lacks AVX2/FMA"
    return None


def _build(cc: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *_cflags(), str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{Path(cc).name} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
        os.replace(tmp, out)  # atomic: concurrent builders publish the same file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> ctypes.CDLL | None:
    global _lib, _status
    if os.environ.get("ACCELC_NATIVE", "1") == "0":
        _status = "disabled by ACCELC_NATIVE=0"
        return None
    why = _cpu_supported()
    if why:
        _status = why
        return None
    cc = _compiler()
    if cc is None:
        _status = "no C compiler found (set CC)"
        return None
    from accelc.models import cache_dir

    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join((cc, *_cflags())).encode()).hexdigest()[:16]
    path = cache_dir() / "native" / f"linear_cpu-{digest}.so"
    try:
        if not path.is_file():
            _build(cc, path)
        lib = ctypes.CDLL(str(path))
        fn = lib.accelc_linear
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                       ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _status = f"native build failed ({e})"
        return None
    lib.accelc_linear_isa.restype = ctypes.c_int
    isa = "AVX-512" if lib.accelc_linear_isa() == 512 else "AVX2"
    _status = f"native {isa} kernel ({path.name})"
    _lib = lib
    return lib


def native_library() -> ctypes.CDLL | None:
    """The loaded kernel library (built on first call), or None when unavailable."""
    if _lib is None and _status is None:
        with _lock:
            if _lib is None and _status is None:
                _load()
    return _lib


def native_status() -> str:
    """What the native backend runs: the kernel, or why it falls back to the torch reference."""
    native_library()
    return _status or "unknown"


def reset_native() -> None:
    """Forget the loaded library and its status (tests switch ``ACCELC_NATIVE``)."""
    global _lib, _status
    with _lock:
        _lib, _status = None, None


@register("linear", "torch")
def linear_torch(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: ``F.linear``.  x (..., K), w (N, K), b (N,) or None -> (..., N)."""
    return F.linear(x, w, b)


def native_fits(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> bool:
    """Whether the native kernel takes these arguments (CPU fp32, at most NATIVE_MAX_ROWS rows)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or w.dtype != torch.float32 or w.dim() != 2:
        return False
    if b is not None and (b.dtype != torch.float32 or b.dim() != 1):
        return False
    rows = x.numel() // max(1, x.shape[-1]) if x.dim() else 0
    return 0 < rows <= NATIVE_MAX_ROWS and x.shape[-1] == w.shape[1] and w.shape[0] > 0


@register("linear", "native")
def linear_native(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """The native kernel where it fits (:func:`native_fits`), ``F.linear`` otherwise."""
    lib = native_library() if native_fits(x, w, b) else None
    if lib is None:
        return F.linear(x, w, b)
    K, N = w.shape[1], w.shape[0]
    x2 = x.reshape(-1, K)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    wc = w if w.is_contiguous() else w.contiguous()
    bc = None if b is None else (b if b.is_contiguous() else b.contiguous())
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=torch.float32)
    lib.accelc_linear(x2.data_ptr(), K, wc.data_ptr(), None if bc is None else bc.data_ptr(), y.data_ptr(), N, M, N, K,
                      torch.get_num_threads())
    return y.view(*x.shape[:-1], N)
