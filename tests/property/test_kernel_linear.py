"""Property tests: the native CPU linear kernel (``accelc.kernels.linear``).

native == float64 brute force == ``F.linear`` (fp32 tolerance) over drawn shapes (rows, K not a
multiple of 8, N not a multiple of 4, bias or none, leading dims); batch invariance is exact (a row
gives the same bits alone, in any batch, at any thread count); inputs it does not take fall back
to ``F.linear`` unchanged; a missing compiler or ``ACCELC_NATIVE=0`` falls back with a reason.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import accelc.ops  # noqa: F401  (registers accelc::linear)
from accelc.kernels import linear as L

needs_native = pytest.mark.skipif(L.native_library() is None, reason=f"native kernel unavailable: {L.native_status()}")


def brute(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ w.double().T
    return (y + b.double() if b is not None else y).float()


@st.composite
def problems(draw, max_rows: int = 40):
    lead = draw(st.lists(st.integers(1, 4), min_size=0, max_size=2))
    rows = 1
    for d in lead:
        rows *= d
    m = draw(st.integers(1, max(1, max_rows // rows)))
    K = draw(st.integers(1, 300))
    N = draw(st.integers(1, 70))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, m, K, generator=g)
    w = torch.randn(N, K, generator=g) / K**0.5
    b = torch.randn(N, generator=g) if draw(st.booleans()) else None
    return x, w, b


@needs_native
@given(problems())
def test_native_equals_brute_force_and_torch(p):
    x, w, b = p
    y = L.linear_native(x, w, b)
    assert y.shape == (*x.shape[:-1], w.shape[0]) and y.dtype == torch.float32
    torch.testing.assert_close(y, brute(x, w, b), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y, F.linear(x, w, b), atol=1e-4, rtol=1e-4)


@needs_native
@given(problems(max_rows=24), st.data())
def test_a_row_gives_the_same_bits_in_any_batch(p, data):
    x, w, b = p
    x = x.reshape(-1, x.shape[-1])
    full = L.linear_native(x, w, b)
    i = data.draw(st.integers(0, x.shape[0] - 1))
    j = data.draw(st.integers(i, x.shape[0] - 1))
    assert torch.equal(L.linear_native(x[i : i + 1], w, b), full[i : i + 1])
    assert torch.equal(L.linear_native(x[i : j + 1], w, b), full[i : j + 1])
    # a different neighbour does not change the row either
    other = torch.cat([torch.randn(3, x.shape[1]), x[i : i + 1]])
    assert torch.equal(L.linear_native(other, w, b)[3], full[i])


@needs_native
def test_thread_count_does_not_change_the_result():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(9, 577, generator=g), torch.randn(1030, 577, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = L.linear_native(x, w)
        torch.set_num_threads(max(2, threads))
        two = L.linear_native(x, w)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_inputs_the_kernel_does_not_take_go_to_torch():
    w = torch.randn(8, 16)
    long = torch.randn(L.NATIVE_MAX_ROWS + 1, 16)
    assert not L.native_fits(long, w, None)
    assert torch.equal(L.linear_native(long, w), F.linear(long, w))
    half = torch.randn(2, 16, dtype=torch.float64)
    assert not L.native_fits(half, w.double(), None)
    assert torch.equal(L.linear_native(half, w.double()), F.linear(half, w.double()))
    assert not L.native_fits(torch.randn(0, 16), w, None)


def test_non_contiguous_input_is_handled():
    x = torch.randn(16, 5).T  # (5, 16) non-contiguous
    w = torch.randn(7, 16)
    torch.testing.assert_close(L.linear_native(x, w), F.linear(x, w), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("env,cc,expect", [("0", None, "disabled by ACCELC_NATIVE=0"),
                                           ("1", "/nonexistent/cc", "no C compiler found")])
def test_fallback_says_why_and_still_computes(monkeypatch, tmp_path, env, cc, expect):
    monkeypatch.setenv("ACCELC_NATIVE", env)
    monkeypatch.setenv("ACCELC_CACHE_DIR", str(tmp_path))
    if cc:
        monkeypatch.setenv("CC", cc)
    L.reset_native()
    try:
        assert L.native_library() is None
        assert expect in L.native_status()
        x, w = torch.randn(3, 10), torch.randn(4, 10)
        assert torch.equal(L.linear_native(x, w), F.linear(x, w))
    finally:
        L.reset_native()


def test_broken_compiler_is_reported(monkeypatch, tmp_path):
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'cc: fatal error: no input files' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv("ACCELC_CACHE_DIR", str(tmp_path))
    L.reset_native()
    try:
        if L._cpu_supported() is not None:
            pytest.skip("CPU without AVX2: the build is never tried")
        assert L.native_library() is None
        assert "native build failed" in L.native_status() and "fatal error" in L.native_status()
    finally:
        L.reset_native()


def test_opcheck_linear():
    x, w, b = torch.randn(2, 3, 16), torch.randn(5, 16), torch.randn(5)
    torch.library.opcheck(torch.ops.accelc.linear.default, (x, w, b))
    torch.library.opcheck(torch.ops.accelc.linear.default, (x, w, None))


@pytest.mark.parametrize("avx512", ["0", "1"])
def test_each_isa_build_is_exact_and_batch_invariant(monkeypatch, avx512):
    """The C file has an AVX2 and an AVX-512 variant (row groups of 2 vs 4/2/1, 8 vs 16 lanes);
    the build this CPU picks is covered above, this runs both where the CPU has AVX-512."""
    if avx512 == "1" and torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("CPU without AVX-512")
    monkeypatch.setenv("ACCELC_NATIVE_AVX512", avx512)
    L.reset_native()
    try:
        if L.native_library() is None:
            pytest.skip(f"native kernel unavailable: {L.native_status()}")
        assert ("AVX-512" if avx512 == "1" else "AVX2") in L.native_status()
        g = torch.Generator().manual_seed(int(avx512))
        for M, K, N in [(1, 576, 37), (2, 17, 5), (3, 300, 70), (5, 16, 4), (8, 576, 9), (13, 33, 66)]:
            x = torch.randn(M, K, generator=g)
            w = torch.randn(N, K, generator=g) / K**0.5
            b = torch.randn(N, generator=g)
            y = L.linear_native(x, w, b)
            torch.testing.assert_close(y, brute(x, w, b), atol=1e-4, rtol=1e-4)
            for i in range(M):  # every row alone, and every suffix batch, gives the same bits
                assert torch.equal(L.linear_native(x[i : i + 1], w, b), y[i : i + 1])
                assert torch.equal(L.linear_native(x[i:], w, b), y[i:])
    finally:
        L.reset_native()
