"""The deep frame-stack trampoline of the generation entry points (runtime/pystack.py)."""
from __future__ import annotations

import sys

import pytest

from accelc.runtime import pystack
from accelc.runtime.pystack import PAD_SLOTS, deep_stack


def _frames_below():
    """Code objects of the calling frames, innermost first."""
    frame, codes = sys._getframe(1), []
    while frame is not None:
        codes.append(frame.f_code)
        frame = frame.f_back
    return codes


@pytest.mark.skipif(sys.version_info < (3, 11), reason="frames live on the data stack from CPython 3.11")
def test_decorated_call_runs_below_one_roomy_frame_and_nested_calls_do_not_add_another():
    @deep_stack
    def inner():
        return [c for c in _frames_below() if c.co_name == "_trampoline"]

    @deep_stack
    def outer(x, *, y):
        return x + y, inner()

    total, trampolines = outer(1, y=2)
    assert total == 3
    assert len(trampolines) == 1 and trampolines[0].co_nlocals >= PAD_SLOTS
    assert len(inner()) == 1  # a fresh top-level call gets its own


def test_exceptions_propagate_and_reset_the_state():
    @deep_stack
    def boom():
        raise ValueError("x")

    with pytest.raises(ValueError):
        boom()
    assert not getattr(pystack._state, "deep", False)


def test_engine_entry_points_are_wrapped():
    from accelc.runtime.engine import Engine
    from accelc.runtime.speculative.loop import SpeculativeEngine

    for fn in (Engine.generate, Engine.forward, SpeculativeEngine.run):
        assert fn.__wrapped__ is not None
