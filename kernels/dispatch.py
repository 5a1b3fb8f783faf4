"""The dispatch table: one entry per kernel op, one implementation per backend.

Each kernel file registers its torch reference (``backend="torch"``, runs anywhere) and, where it
has one, its Triton kernel (``backend="triton"``, CUDA only) or native CPU kernel
(``backend="native"``, see :mod:`accelc.kernels.linear`).  The lowering pass asks :func:`lookup`
for the implementation that fits the device of the tensors it will see: Triton on CUDA when
registered and importable, native on CPU when registered, the torch reference otherwise.  Tests call the Triton
implementations directly on CPU tensors under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

from typing import Callable

import torch

BACKENDS = ("torch", "triton", "native")
_TABLE: dict[str, dict[str, Callable]] = {}


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as ``op``'s implementation for ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def deco(fn: Callable) -> Callable:
        impls = _TABLE.setdefault(op, {})
        if backend in impls and impls[backend] is not fn:
            raise ValueError(f"kernel {op!r} already has a {backend} implementation ({impls[backend].__qualname__})")
        impls[backend] = fn
        return fn

    return deco


def triton_usable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def lookup(op: str, device: torch.device | str = "cpu", prefer: str | None = None) -> Callable:
    """The implementation of ``op`` for ``device`` (``prefer`` forces a backend when registered)."""
    _load_all()
    impls = _TABLE.get(op)
    if not impls:
        raise KeyError(f"no kernel registered for {op!r}; known: {sorted(_TABLE)}")
    if prefer is not None:
        if prefer not in impls:
            raise KeyError(f"kernel {op!r} has no {prefer} implementation; has {sorted(impls)}")
        return impls[prefer]
    dev = torch.device(device)
    if dev.type == "cuda" and "triton" in impls and triton_usable():
        return impls["triton"]
    if dev.type == "cpu" and "native" in impls:
        return impls["native"]
    return impls["torch"]


def table() -> dict[str, list[str]]:
    """``{op: [backends]}`` for every registered kernel."""
    _load_all()
    return {op: sorted(impls) for op, impls in sorted(_TABLE.items())}


_LOADED = False


def _load_all() -> None:
    """Import every kernel module of this package so that its registrations run."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import importlib
    import pkgutil

    import accelc.kernels as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name not in ("dispatch",) and not info.name.startswith("_"):
            importlib.import_module(f"accelc.kernels.{info.name}")
