"""Property suite of the cache attention kernel: Triton (interpreted, fp32) == torch reference == dense.

The dense brute force below builds the visibility mask of every query explicitly from the op's
contract (causal or tree, per-row ``kv_len``, left-padded rows, sliding windows over slot
positions) and runs a float64 softmax over all N keys with the garbage beyond ``kv_len`` zeroed, so
a kernel that lets garbage in, shifts the causal diagonal or the window edge, or mishandles GQA /
empty rows disagrees with it.  The window edge itself is pinned to transformers'
``sliding_window_causal_mask_function``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from accelc.kernels.attention import Q_CHUNK, attention_torch, attention_triton
from accelc.kernels.dispatch import lookup

GARBAGE = (float("nan"), float("inf"), float("-inf"), 1e30)


@dataclass
class Case:
    """One drawn attention problem; tensors are built from ``seed``."""

    batch: int
    kv_heads: int
    group: int
    head_dim: int
    seq: int
    kv_len: list[int]
    n_cache: int
    garbage: float
    tree: bool
    scale: float
    seed: int

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """q (B, H, S, D), k, v (B, Hkv, N, D) with garbage past kv_len, kv_len (B,), tree (B, S, S) or None."""
        gen = torch.Generator().manual_seed(self.seed)
        B, S, D, N = self.batch, self.seq, self.head_dim, self.n_cache
        q = torch.randn(B, self.kv_heads * self.group, S, D, generator=gen)
        k = torch.randn(B, self.kv_heads, N, D, generator=gen)
        v = torch.randn(B, self.kv_heads, N, D, generator=gen)
        for b, n in enumerate(self.kv_len):
            k[b, :, n:] = self.garbage
            v[b, :, n:] = self.garbage
        tree = None
        if self.tree:
            tree = (torch.rand(B, S, S, generator=gen) < 0.5) | torch.eye(S, dtype=torch.bool)
        return q, k, v, torch.tensor(self.kv_len, dtype=torch.int64), tree


def _visibility(S: int, N: int, n: int, tree_row: torch.Tensor | None) -> torch.Tensor:
    """(S, N) bool: query s (at position n - S + s) sees key j, straight from the contract."""
    past = n - S
    mask = torch.zeros(S, N, dtype=torch.bool)
    for s in range(S):
        if tree_row is None:
            mask[s, : max(0, min(n, past + s + 1))] = True
            continue
        mask[s, : max(0, past)] = True
        for t in range(S):
            if past + t >= 0:
                mask[s, past + t] = bool(tree_row[s, t])
    return mask


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: torch.Tensor, scale: float,
                    tree_mask: torch.Tensor | None) -> torch.Tensor:
    """Brute force in float64 with an explicit (S, N) mask per row; (B, H, S, D)."""
    B, H, S, D = q.shape
    group, N = H // k.shape[1], k.shape[2]
    out = torch.zeros(B, H, S, D, dtype=torch.float64)
    for b in range(B):
        n = int(kv_len[b])
        mask = _visibility(S, N, n, None if tree_mask is None else tree_mask[b])
        valid = (torch.arange(N) < n)[:, None]
        kk = torch.where(valid, k[b].double(), 0.0).repeat_interleave(group, 0)      # (H, N, D)
        vv = torch.where(valid, v[b].double(), 0.0).repeat_interleave(group, 0)
        logits = torch.where(mask, q[b].double() @ kk.transpose(-1, -2) * scale, -math.inf)
        probs = torch.where(mask.any(-1)[:, None], torch.softmax(logits, -1), 0.0)
        out[b] = probs @ vv
    return out


@st.composite
def cases(draw: st.DrawFn, tree: bool) -> Case:
    """Shapes across block boundaries; per-row lengths: all == S (prefill), uniform, or ragged/padded."""
    batch = draw(st.integers(1, 3))
    seq = draw(st.one_of(st.just(1), st.integers(2, 9), st.integers(60, 130)))
    layout = draw(st.sampled_from(["prefill", "uniform", "ragged"]))
    if layout == "prefill":
        kv_len = [seq] * batch
    elif layout == "uniform":
        kv_len = [draw(st.integers(seq, seq + 90))] * batch
    else:
        kv_len = draw(st.lists(st.one_of(st.integers(seq, seq + 90), st.integers(0, seq)),
                               min_size=batch, max_size=batch))
    return Case(batch=batch, kv_heads=draw(st.integers(1, 2)), group=draw(st.integers(1, 4)),
                head_dim=draw(st.sampled_from([16, 32, 64])), seq=seq, kv_len=kv_len,
                n_cache=max(1, max(kv_len)) + draw(st.integers(0, 20)), garbage=draw(st.sampled_from(GARBAGE)),
                tree=tree, scale=draw(st.floats(0.05, 0.5)), seed=draw(st.integers(0, 2**31 - 1)))


def _assert_all_agree(case: Case) -> None:
    q, k, v, kv_len, tree = case.tensors()
    ref = dense_attention(q, k, v, kv_len, case.scale, tree)
    for impl in (attention_torch, attention_triton):
        out = impl(q, k, v, kv_len, case.scale, tree)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert torch.isfinite(out).all(), f"{impl.__name__}: non-finite output"
        torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4, msg=lambda m: f"{impl.__name__}: {m}")


def _case(batch: int, kv_heads: int, group: int, head_dim: int, seq: int, kv_len: list[int], tree: bool,
          garbage: float = float("nan")) -> Case:
    return Case(batch, kv_heads, group, head_dim, seq, kv_len, max(kv_len) + 11, garbage, tree, 0.2, seq)


# Pinned so that every profile crosses query/key blocks and Q_CHUNK with ragged, padded and past rows.
@example(_case(3, 2, 3, 32, 130, [200, 130, 57], tree=False))
@example(_case(2, 1, 4, 64, 70, [150, 150], tree=False, garbage=float("inf")))
@example(_case(2, 2, 2, 16, 1, [129, 64], tree=False, garbage=float("-inf")))
@given(cases(tree=False))
def test_causal_triton_equals_torch_equals_dense(case: Case) -> None:
    _assert_all_agree(case)


@example(_case(2, 1, 3, 32, 70, [200, 50], tree=True))
@example(_case(3, 2, 2, 16, 9, [9, 100, 4], tree=True, garbage=1e30))
@given(cases(tree=True))
def test_tree_triton_equals_torch_equals_dense(case: Case) -> None:
    _assert_all_agree(case)


def test_decode_gqa_smollm_shape() -> None:
    case = Case(batch=1, kv_heads=3, group=3, head_dim=64, seq=1, kv_len=[257], n_cache=320,
                garbage=float("nan"), tree=False, scale=0.125, seed=1)
    _assert_all_agree(case)


def test_torch_reference_chunks_long_queries() -> None:
    """S > Q_CHUNK with past keys and ragged rows: several masked chunks per row (torch only, cheap)."""
    seq = 2 * Q_CHUNK + 37
    case = Case(batch=2, kv_heads=2, group=2, head_dim=16, seq=seq, kv_len=[seq + 50, seq - 20],
                n_cache=seq + 60, garbage=float("inf"), tree=False, scale=0.25, seed=2)
    q, k, v, kv_len, _ = case.tensors()
    torch.testing.assert_close(attention_torch(q, k, v, kv_len, case.scale).double(),
                               dense_attention(q, k, v, kv_len, case.scale, None), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", [attention_torch, attention_triton])
def test_queries_that_see_no_key_output_zeros(impl) -> None:
    """Row 0 is empty, row 1 is left-padded (kv_len < S), row 2's tree rows point at no existing key."""
    case = Case(batch=3, kv_heads=1, group=2, head_dim=16, seq=4, kv_len=[0, 2, 3], n_cache=6,
                garbage=float("nan"), tree=False, scale=0.3, seed=3)
    q, k, v, kv_len, _ = case.tensors()
    out = impl(q, k, v, kv_len, case.scale)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[1, :, :2], torch.zeros_like(out[1, :, :2]))
    assert out[1, :, 2:].abs().sum() > 0
    tree = torch.eye(4, dtype=torch.bool).expand(3, 4, 4).clone()
    tree_out = impl(q, k, v, kv_len, case.scale, tree)
    assert torch.equal(tree_out[2, :, 0], torch.zeros_like(tree_out[2, :, 0]))   # sees only itself, at position -1
    torch.testing.assert_close(tree_out.double(), dense_attention(q, k, v, kv_len, case.scale, tree),
                               atol=1e-5, rtol=1e-5)


def test_registered_in_dispatch_table() -> None:
    assert lookup("attention", prefer="torch") is attention_torch
    assert lookup("attention", prefer="triton") is attention_triton
    assert lookup("attention", "cpu") is attention_torch


def test_rejects_mismatched_shapes() -> None:
    q, k, v = torch.zeros(1, 3, 2, 16), torch.zeros(1, 2, 8, 16), torch.zeros(1, 2, 8, 16)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        attention_torch(q, k, v, torch.tensor([4]), 0.25)
    with pytest.raises(ValueError, match="tree_mask"):
        attention_torch(torch.zeros(1, 2, 2, 16), k, v, torch.tensor([4]), 0.25, torch.ones(1, 2, 3, dtype=torch.bool))


# ----------------------------------------------------------------------------- sliding windows


@dataclass
class WindowCase:
    """A drawn problem plus a sliding window over slot positions ``k_pos`` (B, Hkv, N).

    gaps: the past positions skip some (a cache thinned by token selection / KV compression);
    per_head: each KV head skips others (KV compression keeps entries per head).  The new keys sit
    after the past ones, consecutive for a causal case, at random depths for a tree (siblings
    share a position).  Slots past ``kv_len`` hold garbage positions.
    """

    case: Case
    window: int
    gaps: bool
    per_head: bool

    def positions(self) -> torch.Tensor:
        c = self.case
        gen = torch.Generator().manual_seed(c.seed + 1)
        pos = torch.randint(-10**6, 10**6, (c.batch, c.kv_heads, c.n_cache), generator=gen)
        for b, n in enumerate(c.kv_len):
            past = max(0, n - c.seq)
            shared = 1 + torch.randint(0, 3 if self.gaps else 1, (past,), generator=gen)
            for g in range(c.kv_heads):
                steps = 1 + torch.randint(0, 3, (past,), generator=gen) if self.per_head and self.gaps else shared
                pos[b, g, :past] = torch.cumsum(steps, 0) - 1
                start = int(pos[b, g, past - 1]) + 1 if past else 0
                new = n - past
                offset = (torch.randint(0, c.seq, (new,), generator=gen) if c.tree else torch.arange(new))
                pos[b, g, past:n] = start + offset
        return pos


def dense_windowed_attention(q, k, v, kv_len, scale, tree_mask, window, k_pos) -> torch.Tensor:
    """Brute force in float64: query ``s`` of KV head ``g`` sees key ``j`` iff the causal/tree rule
    lets it and ``k_pos[g, j] > k_pos[g, kv_len - S + s] - window`` (no key at a negative slot)."""
    B, H, S, D = q.shape
    hkv, N = k.shape[1], k.shape[2]
    group = H // hkv
    out = torch.zeros(B, H, S, D, dtype=torch.float64)
    for b in range(B):
        n = int(kv_len[b])
        base = _visibility(S, N, n, None if tree_mask is None else tree_mask[b])
        mask = torch.zeros(hkv, S, N, dtype=torch.bool)
        for s in range(S):
            slot = n - S + s
            if slot >= 0:
                mask[:, s] = base[s] & (k_pos[b] > k_pos[b, :, slot:slot + 1] - window)
        mask = mask.repeat_interleave(group, 0)                                      # (H, S, N)
        valid = (torch.arange(N) < n)[:, None]
        kk = torch.where(valid, k[b].double(), 0.0).repeat_interleave(group, 0)
        vv = torch.where(valid, v[b].double(), 0.0).repeat_interleave(group, 0)
        logits = torch.where(mask, q[b].double() @ kk.transpose(-1, -2) * scale, -math.inf)
        probs = torch.where(mask.any(-1, keepdim=True), torch.softmax(logits, -1), 0.0)
        out[b] = probs @ vv
    return out


@st.composite
def window_cases(draw: st.DrawFn, tree: bool) -> WindowCase:
    """Windows narrower than one block, around the block size, and wider than every row."""
    return WindowCase(case=draw(cases(tree=tree)), window=draw(st.one_of(st.integers(1, 4), st.integers(5, 70), st.integers(200, 400))),
                      gaps=draw(st.booleans()), per_head=draw(st.booleans()))


def _assert_windowed_agree(wc: WindowCase) -> None:
    q, k, v, kv_len, tree = wc.case.tensors()
    k_pos = wc.positions()
    ref = dense_windowed_attention(q, k, v, kv_len, wc.case.scale, tree, wc.window, k_pos)
    for impl in (attention_torch, attention_triton):
        out = impl(q, k, v, kv_len, wc.case.scale, tree, wc.window, k_pos)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert torch.isfinite(out).all(), f"{impl.__name__}: non-finite output"
        torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4, msg=lambda m: f"{impl.__name__}: {m}")


def _wcase(case: Case, window: int, gaps: bool = True, per_head: bool = True) -> WindowCase:
    return WindowCase(case, window, gaps, per_head)


# Pinned: chunks of Q_CHUNK and 64-key blocks with the window start inside the past, ragged and
# left-padded rows, per-head gaps; a window of 1 (each query sees itself only).
@example(_wcase(_case(3, 2, 3, 32, 130, [300, 130, 57], tree=False), window=70))
@example(_wcase(_case(2, 2, 2, 16, 1, [200, 64], tree=False, garbage=float("-inf")), window=17, per_head=False))
@example(_wcase(_case(2, 1, 2, 16, 9, [90, 9], tree=False), window=1))
@given(window_cases(tree=False))
def test_windowed_triton_equals_torch_equals_dense(wc: WindowCase) -> None:
    _assert_windowed_agree(wc)


@example(_wcase(_case(2, 2, 2, 16, 9, [150, 6], tree=True, garbage=1e30), window=5))
@given(window_cases(tree=True))
def test_windowed_tree_triton_equals_torch_equals_dense(wc: WindowCase) -> None:
    _assert_windowed_agree(wc)


@pytest.mark.parametrize("impl", [attention_torch, attention_triton])
@pytest.mark.parametrize("window", [1, 3, 8])
def test_window_edge_is_transformers_sliding_window_mask(impl, window) -> None:
    """With q = 0 every visible key gets the same weight, so one-hot values read the visible set
    back: it is exactly transformers' sliding-window causal mask, for a prefill (slot = position)
    and for one decode query after it."""
    from transformers.masking_utils import sliding_window_causal_mask_function

    hf = sliding_window_causal_mask_function(window)
    N = 20
    k = torch.randn(1, 1, N, 32)
    v = torch.eye(N, 32)[None, None]
    for S, n in ((N, N), (1, N)):
        out = impl(torch.zeros(1, 2, S, 32), k, v, torch.tensor([n]), 0.3, None, window)
        for s in range(S):
            p = n - S + s
            zero = torch.tensor(0)
            want = torch.cat([hf(zero, zero, torch.tensor(p), torch.arange(N)), torch.zeros(32 - N, dtype=torch.bool)])
            assert torch.equal(out[0, :, s] > 0, want.expand(2, -1)), (S, p)


def test_window_without_positions_reads_slots_as_positions() -> None:
    case = _case(2, 2, 2, 16, 7, [40, 7], tree=False)
    q, k, v, kv_len, _ = case.tensors()
    slots = torch.arange(k.shape[2]).expand(2, 2, -1).contiguous()
    for impl in (attention_torch, attention_triton):
        torch.testing.assert_close(impl(q, k, v, kv_len, 0.2, None, 5), impl(q, k, v, kv_len, 0.2, None, 5, slots))


def test_window_wider_than_every_row_is_plain_attention() -> None:
    case = _case(2, 2, 2, 16, 9, [60, 9], tree=False)
    q, k, v, kv_len, _ = case.tensors()
    torch.testing.assert_close(attention_torch(q, k, v, kv_len, 0.2, None, 61), attention_torch(q, k, v, kv_len, 0.2))


def test_rejects_bad_window_arguments() -> None:
    q, k, v = torch.zeros(1, 2, 2, 16), torch.zeros(1, 2, 8, 16), torch.zeros(1, 2, 8, 16)
    with pytest.raises(ValueError, match="window must be >= 0"):
        attention_torch(q, k, v, torch.tensor([4]), 0.25, None, -1)
    with pytest.raises(ValueError, match="k_pos must be int64"):
        attention_torch(q, k, v, torch.tensor([4]), 0.25, None, 2, torch.zeros(1, 2, 8, dtype=torch.int32))
