"""Property suite of the window-query token scores and of ``select_topk``.

``window_scores``: Triton (interpreted, fp32) == torch reference == a float64 brute force that runs
one softmax per (row, head, window query) over exactly its visible keys and pools each prefix
position by listing its neighbours.  ``select_topk``: equals sorting every (row, group) by
(score descending, position ascending) in Python, and keeps every window (+inf) token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from accelc.kernels.dispatch import lookup
from accelc.kernels.window_scores import select_topk, window_scores_torch, window_scores_triton

GARBAGE = (float("nan"), float("inf"), float("-inf"), 1e30)


@dataclass
class Case:
    """One drawn scoring problem; tensors are built from ``seed``."""

    batch: int
    kv_heads: int
    group: int
    head_dim: int
    window: int
    kv_len: list[int]
    n_cache: int
    kernel: int
    pooling: str
    garbage: float
    scale: float
    seed: int

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q_win (B, H, W, D), k (B, Hkv, N, D) with garbage past kv_len, kv_len (B,)."""
        gen = torch.Generator().manual_seed(self.seed)
        q = torch.randn(self.batch, self.kv_heads * self.group, self.window, self.head_dim, generator=gen)
        k = torch.randn(self.batch, self.kv_heads, self.n_cache, self.head_dim, generator=gen)
        for b, n in enumerate(self.kv_len):
            k[b, :, n:] = self.garbage
        return q, k, torch.tensor(self.kv_len, dtype=torch.int64)


def dense_window_scores(q: torch.Tensor, k: torch.Tensor, kv_len: torch.Tensor, scale: float, kernel: int,
                        pooling: str) -> torch.Tensor:
    """Brute force in float64: (B, Hkv, N) scores straight from the contract."""
    B, H, W, _ = q.shape
    hkv, N = k.shape[1], k.shape[2]
    out = torch.full((B, hkv, N), -math.inf, dtype=torch.float64)
    for b in range(B):
        n = int(kv_len[b])
        prefix = max(n - W, 0)
        out[b, :, prefix:n] = math.inf
        if prefix == 0:
            continue
        raw = torch.zeros(hkv, prefix, dtype=torch.float64)
        for h in range(H):
            g = h // (H // hkv)
            for w in range(W):
                visible = k[b, g, : n - W + w + 1].double()        # keys j <= position of query w
                raw[g] += torch.softmax(visible @ q[b, h, w].double() * scale, 0)[:prefix]
        for j in range(prefix):
            pool = raw[:, max(0, j - kernel // 2): min(prefix, j + kernel // 2 + 1)]
            out[b, :, j] = pool.amax(-1) if pooling == "max" else pool.sum(-1) / kernel
    return out


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """Rows of different lengths, some shorter than the window; N crossing the 64-key blocks."""
    batch = draw(st.integers(1, 3))
    window = draw(st.integers(1, 16))
    kv_len = draw(st.lists(st.one_of(st.integers(0, window), st.integers(window + 1, 150)),
                           min_size=batch, max_size=batch))
    return Case(batch=batch, kv_heads=draw(st.integers(1, 2)), group=draw(st.integers(1, 4)),
                head_dim=draw(st.sampled_from([16, 32, 64])), window=window, kv_len=kv_len,
                n_cache=max(1, max(kv_len)) + draw(st.integers(0, 20)), kernel=draw(st.sampled_from([1, 3, 5, 7])),
                pooling=draw(st.sampled_from(["max", "avg"])), garbage=draw(st.sampled_from(GARBAGE)),
                scale=draw(st.floats(0.05, 0.5)), seed=draw(st.integers(0, 2**31 - 1)))


# Pinned so that every profile has long ragged rows, a row equal to W, GQA 4 and both poolings.
@example(Case(3, 2, 4, 32, 16, [150, 16, 130], 165, 7, "max", float("nan"), 0.2, 1))
@example(Case(2, 1, 3, 64, 1, [140, 70], 150, 5, "avg", float("inf"), 0.3, 2))
@given(cases())
def test_window_scores_triton_equals_torch_equals_dense(case: Case) -> None:
    q, k, kv_len = case.tensors()
    ref = dense_window_scores(q, k, kv_len, case.scale, case.kernel, case.pooling)
    for impl in (window_scores_torch, window_scores_triton):
        out = impl(q, k, kv_len, case.scale, case.kernel, case.pooling)
        assert out.shape == (case.batch, case.kv_heads, case.n_cache) and out.dtype == torch.float32
        assert not out.isnan().any(), f"{impl.__name__}: NaN in scores"
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4, msg=lambda m: f"{impl.__name__}: {m}")


def brute_topk(scores: torch.Tensor, count: list[int]) -> torch.Tensor:
    """Sort each (row, group) by (-score, position) in Python; pad with the last kept position (0 if none)."""
    B, G, N = scores.shape
    width = max(count)
    out = torch.zeros(B, G, width, dtype=torch.int64)
    for b in range(B):
        for g in range(G):
            kept = sorted(sorted(range(N), key=lambda j: (-float(scores[b, g, j]), j))[: count[b]])
            pad = kept[-1] if kept else 0
            out[b, g] = torch.tensor(kept + [pad] * (width - len(kept)), dtype=torch.int64)
    return out


@st.composite
def topk_problems(draw: st.DrawFn) -> tuple[torch.Tensor, list[int]]:
    """Tie-heavy scores laid out like window_scores output: values, then +inf window, then -inf tail."""
    batch, groups, n = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 40))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scores = torch.randint(0, draw(st.integers(1, 4)), (batch, groups, n), generator=gen).float()
    count = []
    for b in range(batch):
        valid = draw(st.integers(0, n))
        window = draw(st.integers(0, valid))
        scores[b, :, valid - window: valid] = math.inf
        scores[b, :, valid:] = -math.inf
        count.append(draw(st.integers(window, valid)))
    return scores, count


@given(topk_problems())
def test_select_topk_equals_brute_force_and_keeps_window(problem: tuple[torch.Tensor, list[int]]) -> None:
    scores, count = problem
    idx = select_topk(scores, torch.tensor(count, dtype=torch.int64))
    assert idx.dtype == torch.int64
    assert torch.equal(idx, brute_topk(scores, count))
    for b, c in enumerate(count):
        window = set(torch.nonzero(scores[b, 0] == math.inf).flatten().tolist())
        for g in range(scores.shape[1]):
            assert window <= set(idx[b, g, :c].tolist())


def test_topk_of_window_scores_keeps_window_and_prefers_attended_tokens() -> None:
    """A key equal to the window queries' direction wins the pooled score and is selected."""
    case = Case(batch=2, kv_heads=2, group=2, head_dim=16, window=4, kv_len=[40, 30], n_cache=48, kernel=3,
                pooling="max", garbage=float("nan"), scale=1.0, seed=4)
    q, k, kv_len = case.tensors()
    k[:, :, 7] = 4 * q[:, ::2].mean(dim=2)            # KV head g gets the mean query of its first head
    scores = window_scores_torch(q, k, kv_len, case.scale, case.kernel, case.pooling)
    idx = select_topk(scores, torch.tensor([7, 5]))
    assert idx[0].tolist() == [[6, 7, 8, 36, 37, 38, 39]] * 2        # max-pool spreads key 7 to 6 and 8
    assert idx[1].tolist() == [[6, 26, 27, 28, 29, 29, 29]] * 2      # tie 6/7/8: lowest position; padded


def test_select_topk_zero_count() -> None:
    assert select_topk(torch.zeros(2, 3, 5), torch.tensor([0, 0])).shape == (2, 3, 0)


def test_registered_in_dispatch_table() -> None:
    assert lookup("window_scores", prefer="torch") is window_scores_torch
    assert lookup("window_scores", prefer="triton") is window_scores_triton
    assert lookup("select_topk") is select_topk


@pytest.mark.parametrize("kernel, pooling, match", [(4, "max", "odd"), (3, "median", "pooling")])
def test_rejects_bad_pooling(kernel: int, pooling: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        window_scores_torch(torch.zeros(1, 2, 4, 16), torch.zeros(1, 1, 8, 16), torch.tensor([8]), 0.25,
                            kernel, pooling)
