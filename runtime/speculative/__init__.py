"""Speculative decoding: drafters (:mod:`.drafts`), gamma policies (:mod:`.gamma`), verification
(:mod:`.verify`), the engine loop (:mod:`.loop`) and calibrated early-exit heads (:mod:`.calibrate`).

``accelc.compile`` gives a :class:`SpeculativeEngine` when the spec sets ``decode.speculative``.
"""
from __future__ import annotations

from typing import Any

__all__ = ["SpeculativeEngine", "SpecStats"]


def __getattr__(name: str) -> Any:  # lazy: the loop imports the engine, which must not import us back
    if name in __all__:
        from accelc.runtime.speculative import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
