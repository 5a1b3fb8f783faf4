"""Hypothesis profiles for the property suites, and the Triton interpreter switch.

``TRITON_INTERPRET`` is read by ``@triton.jit`` when a kernel module is *imported* (not by
``import triton``): it must be set before any ``accelc.kernels.*`` module is imported, which is why
it is set here, at conftest import time (the root ``tests/conftest.py`` sets it too, for test modules
collected before this directory).

Profiles (``HYPOTHESIS_PROFILE=ci|full``, default ``ci``): ``ci`` (derandomized) keeps the
interpreter-bound suites to seconds each on one core, ``full`` draws at least 200 examples per test.
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

from hypothesis import HealthCheck, settings  # noqa: E402

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=25, derandomize=True, **_COMMON)
settings.register_profile("full", max_examples=250, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
