"""Property tests: Quest page bounds, page selection and paged sparse decode attention.

Checks: the page bound is a true upper bound of q . k for every key of the page; incremental bound
updates equal a recomputation; selection keeps the newest page and the best bounds; Triton
(``TRITON_INTERPRET=1``, fp32) == torch reference == brute-force dense softmax under the explicit
mask ``causal AND key page selected for the query head's KV head``.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton kernels are defined

import torch
from hypothesis import given, settings, strategies as st

from accelc.kernels.quest import (
    page_bounds,
    page_upper_bounds,
    paged_sparse_attention,
    paged_sparse_attention_triton,
    quest_select,
    update_page_bounds,
)

ATOL = RTOL = 1e-4


# --- brute force ------------------------------------------------------------------------------


def causal_mask(kv_len: torch.Tensor, S: int, N: int) -> torch.Tensor:
    """(B, 1, S, N): query s of row b sees key j iff j <= kv_len_b - S + s."""
    pos = kv_len[:, None] - S + torch.arange(S)[None, :]
    return (torch.arange(N)[None, None, :] <= pos[:, :, None])[:, None]


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float):
    """Softmax over all N keys in float64 under an explicit (B, H, S, N) mask; no-key rows are 0."""
    g = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1).double(), v.repeat_interleave(g, 1).double()
    scores = (q.double() @ kk.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    p = torch.where(mask.any(-1, keepdim=True), torch.softmax(scores, -1), 0.0)
    vv = torch.where(mask.any(2)[..., None], vv, 0.0)  # garbage (NaN) keys nobody sees
    return p @ vv


def selected_page_mask(page_idx: torch.Tensor, page: int, H: int, S: int, N: int) -> torch.Tensor:
    """(B, H, S, N): key j's page is listed for query head h's KV head."""
    B, Hkv, _ = page_idx.shape
    P = -(-N // page)
    idx = torch.where(page_idx >= 0, page_idx.long(), P)
    sel = torch.zeros(B, Hkv, P + 1, dtype=torch.bool).scatter_(2, idx, True)[..., :P]
    sel = sel.repeat_interleave(H // Hkv, 1)[:, :, torch.arange(N) // page]  # (B, H, N)
    return sel[:, :, None, :].expand(B, H, S, N)


def brute_bounds(k: torch.Tensor, kv_len: torch.Tensor, page: int):
    """Per-page min/max of the valid keys by explicit loops (+inf / -inf for empty pages)."""
    B, Hkv, N, D = k.shape
    P = -(-N // page)
    kmin = torch.full((B, Hkv, P, D), float("inf"))
    kmax = torch.full((B, Hkv, P, D), float("-inf"))
    for b in range(B):
        for p in range(P):
            hi = min((p + 1) * page, int(kv_len[b]))
            if hi > p * page:
                kmin[b, :, p] = k[b, :, p * page:hi].amin(1)
                kmax[b, :, p] = k[b, :, p * page:hi].amax(1)
    return kmin, kmax


# --- cases ------------------------------------------------------------------------------------


@st.composite
def decode_cases(draw, max_s: int = 6, max_pages: int = 5):
    """q (B, H, S, D), k/v (B, Hkv, N, D) with garbage beyond each row's kv_len, kv_len (B,), page."""
    B, Hkv, group = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 4))
    D, page = draw(st.sampled_from([16, 32, 64])), draw(st.sampled_from([16, 32]))
    S = draw(st.integers(1, max_s))
    N = S + draw(st.integers(0, max_pages * page))
    kv_len = torch.tensor([draw(st.one_of(st.just(N), st.integers(0, N))) for _ in range(B)])
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q = torch.randn(B, Hkv * group, S, D, generator=gen)
    k = torch.randn(B, Hkv, N, D, generator=gen)
    v = torch.randn(B, Hkv, N, D, generator=gen)
    garbage = (torch.arange(N)[None, None, :] >= kv_len[:, None, None]).expand(B, Hkv, N)
    fill = draw(st.sampled_from([float("nan"), -3e4, 3e4]))  # garbage: NaN or huge finite values
    k[garbage] = fill
    v[garbage] = fill
    return q, k, v, kv_len, page


def random_page_idx(B: int, Hkv: int, P: int, K: int, seed: int) -> torch.Tensor:
    """Distinct random pages per KV head, ascending, some dropped to -1 (padding trails)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.rand(B, Hkv, P, generator=gen).argsort(-1)[..., :K]
    idx = torch.where(torch.rand(B, Hkv, K, generator=gen) < 0.3, P, idx).sort(-1).values
    return torch.where(idx == P, -1, idx).to(torch.int32)


def check_three_way(q, k, v, kv_len, page_idx, page, mask, scale):
    ref = paged_sparse_attention(q, k, v, kv_len, page_idx, page, scale)
    tri = paged_sparse_attention_triton(q, k, v, kv_len, page_idx, page, scale)
    dense = dense_attention(q, k, v, mask, scale).float()
    assert not ref.isnan().any() and not tri.isnan().any()
    torch.testing.assert_close(ref, dense, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(tri, dense, atol=ATOL, rtol=RTOL)


# --- page metadata ----------------------------------------------------------------------------


@settings(deadline=None)
@given(case=decode_cases())
def test_page_bounds_match_brute_force(case):
    _, k, _, kv_len, page = case
    kmin, kmax = page_bounds(k, kv_len, page)
    bmin, bmax = brute_bounds(k, kv_len, page)
    assert torch.equal(kmin, bmin) and torch.equal(kmax, bmax)


@settings(deadline=None)
@given(case=decode_cases(max_s=40), data=st.data())
def test_incremental_update_equals_recompute(case, data):
    _, k, _, _, page = case
    B, Hkv, N, D = k.shape
    S = data.draw(st.integers(1, N), label="appended")
    start = torch.tensor([data.draw(st.integers(0, N - S), label=f"start{b}") for b in range(B)])
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    k = torch.randn(B, Hkv, N, D, generator=gen)
    k[(torch.arange(N)[None, :] >= start[:, None])[:, None].expand(B, Hkv, N)] = float("nan")
    kmin, kmax = page_bounds(k, start, page)  # over the old prefix; garbage beyond it is NaN
    k_new = torch.randn(B, Hkv, S, D, generator=gen)
    for b in range(B):
        k[b, :, int(start[b]):int(start[b]) + S] = k_new[b]
    update_page_bounds(kmin, kmax, k_new, start, page)
    rmin, rmax = page_bounds(k, start + S, page)
    assert torch.equal(kmin, rmin) and torch.equal(kmax, rmax)


@settings(deadline=None)
@given(case=decode_cases(), log_scale=st.floats(-3, 3), zero_frac=st.floats(0, 0.7), seed=st.integers(0, 2**31 - 1))
def test_page_bound_is_an_upper_bound_of_every_key_score(case, log_scale, zero_frac, seed):
    q, k, _, kv_len, page = case
    gen = torch.Generator().manual_seed(seed)
    q = q * 10.0 ** log_scale * (torch.rand(q.shape, generator=gen) >= zero_frac)  # exact zeros hit 0 * inf
    B, H, S, _ = q.shape
    N = k.shape[2]
    kmin, kmax = page_bounds(k, kv_len, page)
    bound = page_upper_bounds(q, kmin, kmax, kv_len, page)  # (B, H, S, P)
    group = H // k.shape[1]
    scores = q.double() @ k.repeat_interleave(group, 1).double().transpose(-1, -2)  # (B, H, S, N)
    magnitude = torch.maximum(kmin.abs(), kmax.abs()).nan_to_num(0.0, posinf=0.0).repeat_interleave(group, 1)
    slack = 1e-5 * (q.double().abs() @ magnitude.double().transpose(-1, -2)) + 1e-6  # fp32 rounding, (B, H, S, P)
    valid = torch.arange(N)[None, :] < kv_len[:, None]
    per_key = torch.arange(N) // page
    ok = (scores <= (bound.double() + slack)[..., per_key]) | ~valid[:, None, None, :]
    assert ok.all()
    in_use = torch.arange(bound.shape[-1])[None, :] < (kv_len[:, None] + page - 1) // page
    assert torch.isfinite(bound[in_use[:, None, None, :].expand_as(bound)]).all()
    assert (bound[~in_use[:, None, None, :].expand_as(bound)] == float("-inf")).all()


# --- selection --------------------------------------------------------------------------------


@settings(deadline=None)
@given(case=decode_cases(max_pages=12), top_pages=st.integers(1, 4))
def test_quest_select_keeps_newest_page_and_top_bounds(case, top_pages):
    q, k, _, kv_len, page = case
    B, H, S, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    group, P = H // Hkv, -(-N // page)
    kmin, kmax = page_bounds(k, kv_len, page)
    page_idx = quest_select(q, kmin, kmax, kv_len, page, top_pages)
    assert page_idx.dtype == torch.int32 and page_idx.shape == (B, Hkv, min(top_pages, P))
    bmin, bmax = brute_bounds(k, kv_len, page)
    for b in range(B):
        used = -(-int(kv_len[b]) // page)
        for hk in range(Hkv):
            row = page_idx[b, hk].tolist()
            chosen = [p for p in row if p >= 0]
            assert row == chosen + [-1] * (len(row) - len(chosen)) and chosen == sorted(set(chosen))
            assert len(chosen) == min(top_pages, used) and set(chosen) <= set(range(used))
            if used == 0:
                continue
            newest = (int(kv_len[b]) - 1) // page
            assert newest in chosen
            qs = q[b, hk * group:(hk + 1) * group].double().reshape(-1, 1, D)  # (group * S, 1, D)
            score = torch.maximum(qs * bmin[b, hk, :used].double(), qs * bmax[b, hk, :used].double())
            score = score.sum(-1).amax(0)  # max over the group's heads and queries, (used,)
            extra, rest = set(chosen) - {newest}, set(range(used)) - set(chosen)
            if extra and rest:
                assert min(score[p] for p in extra) >= max(score[p] for p in rest) - 1e-4


# --- attention --------------------------------------------------------------------------------


@settings(deadline=None)
@given(case=decode_cases(), top_pages=st.integers(1, 4), random_idx=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_paged_sparse_equals_reference_and_explicit_mask(case, top_pages, random_idx, seed):
    q, k, v, kv_len, page = case
    B, H, S, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    P = -(-N // page)
    if random_idx:
        page_idx = random_page_idx(B, Hkv, P, min(top_pages, P), seed)
    else:
        kmin, kmax = page_bounds(k, kv_len, page)
        page_idx = quest_select(q, kmin, kmax, kv_len, page, top_pages)
    mask = selected_page_mask(page_idx, page, H, S, N) & causal_mask(kv_len, S, N)
    check_three_way(q, k, v, kv_len, page_idx, page, mask, D ** -0.5)


@settings(deadline=None)
@given(case=decode_cases(), extra=st.integers(0, 3))
def test_top_pages_covering_all_pages_is_dense_causal(case, extra):
    q, k, v, kv_len, page = case
    H, S, N = q.shape[1], q.shape[2], k.shape[2]
    kmin, kmax = page_bounds(k, kv_len, page)
    page_idx = quest_select(q, kmin, kmax, kv_len, page, -(-N // page) + extra)
    check_three_way(q, k, v, kv_len, page_idx, page, causal_mask(kv_len, S, N).expand(-1, H, -1, -1), 0.25)
