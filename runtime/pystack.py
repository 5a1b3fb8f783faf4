"""Run the generation loops on a roomy CPython frame stack.

CPython >= 3.11 keeps Python frames on a per-thread stack of 16 KiB chunks.  When a call does not fit
in the current chunk it gets a new chunk from ``mmap``, and when that call returns the chunk is
``munmap``-ed again.  A captured FX graph's ``forward`` is one function with a local per node
(~1,900 slots, ~15 KiB for SmolLM2), so whether the many small calls it makes (kernels, custom ops)
fit behind it in the chunk depends on where the chunk boundary falls -- on the caller's stack
depth.  When they do not fit, every one of them maps and unmaps a chunk: ~250 ``mmap``/``munmap``
pairs per decoded token, and with a second thread running the kernels each ``munmap`` flushes that
core's TLB by an inter-processor interrupt.  Measured on the early-exit draft graphs: 48 ms per
pass instead of 16 ms, depending only on the call depth at which the loop ran.

:func:`deep_stack` makes the decorated entry point run inside a frame of ``PAD_SLOTS`` unused
locals: that frame opens a fresh 128 KiB chunk, so the whole loop below it (graph frames included)
stays inside one chunk and never maps memory for frames.  Nested decorated calls run directly.
"""
from __future__ import annotations

import functools
import sys
import threading
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

PAD_SLOTS = 8192  # 64 KiB of frame: CPython sizes its chunk to 128 KiB, leaving ~64 KiB for callees

_state = threading.local()


def _make_trampoline(slots: int) -> Callable[..., Any]:
    names = " = ".join(f"_slot{i}" for i in range(slots))
    source = f"def _trampoline(fn, args, kwargs):\n    if False:\n        {names} = None\n    return fn(*args, **kwargs)\n"
    namespace: dict[str, Any] = {}
    exec(compile(source, "<accelc deep stack>", "exec"), namespace)  # noqa: S102 - generated, constant code
    return namespace["_trampoline"]


_trampoline = _make_trampoline(PAD_SLOTS) if sys.version_info >= (3, 11) else None


def deep_stack(fn: F) -> F:
    """Decorator: run ``fn`` below a frame that opens a roomy frame-stack chunk (module docstring)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _trampoline is None or getattr(_state, "deep", False):
            return fn(*args, **kwargs)
        _state.deep = True
        try:
            return _trampoline(fn, args, kwargs)
        finally:
            _state.deep = False

    return wrapper  # type: ignore[return-value]
