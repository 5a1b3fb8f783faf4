"""Shared fixtures: the bundled SmolLM2 (loaded once per session) and tiny random Llamas.

``TRITON_INTERPRET=1`` is set before anything imports a kernel module, so Triton kernels run on
the CPU interpreter in the property suites.
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import accelc  # noqa: E402,F401  (first: drops the checkout root from sys.path, see accelc._unshadow_checkout)
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from _support import TINY  # noqa: E402,F401  (re-exported for fixtures)


@pytest.fixture(scope="session")
def smollm2():
    """The bundled SmolLM2-135M-Instruct (fp32), loaded once."""
    from accelc.models import load_model

    return load_model("llama")


@pytest.fixture(scope="session")
def tiny():
    from accelc.models import load_model

    return load_model("tiny", seed=0, **TINY)


@pytest.fixture(scope="session")
def tiny_compiled(tiny):
    import accelc

    return accelc.compile(tiny, accelc.load_spec({"accelc": 1}))


@pytest.fixture(scope="session")
def smollm2_compiled(smollm2):
    import accelc

    return accelc.compile(smollm2, accelc.load_spec({"accelc": 1}))
