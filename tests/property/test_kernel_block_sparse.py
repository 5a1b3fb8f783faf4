"""Property tests: block selection and block-sparse prefill attention (MInference / LServe).

Every kernel output is checked three ways: Triton (``TRITON_INTERPRET=1``, fp32) == torch reference
== brute-force dense softmax under the explicit mask ``causal AND key block selected`` built here.
Example counts come from the hypothesis profile ("ci" / "full", see conftest.py).
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton kernels are defined

import torch
from hypothesis import given, settings, strategies as st

from accelc.kernels.block_sparse import (block_sparse_attention, block_sparse_attention_triton, fresh_prefill_layout,
                                         select_blocks)

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


def selected_block_mask(block_idx: torch.Tensor, block: int, S: int, N: int) -> torch.Tensor:
    """(B, H, S, N): key j's block is listed for query s's block."""
    B, H, nqb, _ = block_idx.shape
    nkb = -(-N // block)
    idx = torch.where(block_idx >= 0, block_idx.long(), nkb)
    sel = torch.zeros(B, H, nqb, nkb + 1, dtype=torch.bool).scatter_(3, idx, True)[..., :nkb]
    return sel[:, :, torch.arange(S) // block][:, :, :, torch.arange(N) // block]


# --- cases ------------------------------------------------------------------------------------


@st.composite
def prefill_cases(draw):
    """q (B, H, S, D), k/v (B, Hkv, N, D) with garbage beyond each row's kv_len, kv_len (B,), block."""
    B, Hkv, group = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 4))
    D, block = draw(st.sampled_from([16, 32, 64])), draw(st.sampled_from([16, 32]))
    S = draw(st.integers(1, 3 * block + 8))
    N = S + draw(st.integers(0, 2 * block))
    kv_len = torch.tensor([draw(st.one_of(st.just(N), st.integers(0, N))) for _ in range(B)])
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q = torch.randn(B, Hkv * group, S, D, generator=gen)
    k = torch.randn(B, Hkv, N, D, generator=gen)
    v = torch.randn(B, Hkv, N, D, generator=gen)
    garbage = torch.arange(N)[None, None, :] >= kv_len[:, None, None]
    fill = draw(st.sampled_from([float("nan"), -3e4, 3e4]))  # garbage: NaN or huge finite values
    k[garbage.expand(B, Hkv, N)] = fill
    v[garbage.expand(B, Hkv, N)] = fill
    return q, k, v, kv_len, block


def random_block_idx(B: int, H: int, S: int, N: int, block: int, K: int, seed: int) -> torch.Tensor:
    """Distinct random key blocks per query block (any, not only causal), ascending, -1 padded."""
    gen = torch.Generator().manual_seed(seed)
    nqb, nkb = -(-S // block), -(-N // block)
    idx = torch.rand(B, H, nqb, nkb, generator=gen).argsort(-1)[..., :K]
    drop = torch.rand(B, H, nqb, K, generator=gen) < 0.3
    idx = torch.where(drop, nkb, idx).sort(-1).values
    return torch.where(idx == nkb, -1, idx).to(torch.int32)


def check_three_way(q, k, v, kv_len, block_idx, block, mask, scale):
    ref = block_sparse_attention(q, k, v, kv_len, block_idx, block, scale)
    tri = block_sparse_attention_triton(q, k, v, kv_len, block_idx, block, scale)
    dense = dense_attention(q, k, v, mask, scale).float()
    assert not ref.isnan().any() and not tri.isnan().any()
    torch.testing.assert_close(ref, dense, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(tri, dense, atol=ATOL, rtol=RTOL)


# --- tests ------------------------------------------------------------------------------------


@settings(deadline=None)
@given(case=prefill_cases(), top=st.integers(0, 3), sink=st.integers(0, 2), local=st.integers(1, 2),
       random_idx=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_block_sparse_equals_reference_and_explicit_mask(case, top, sink, local, random_idx, seed):
    q, k, v, kv_len, block = case
    B, H, S, D = q.shape
    N = k.shape[2]
    if random_idx:
        K = min(top + sink + local, -(-N // block))
        block_idx = random_block_idx(B, H, S, N, block, K, seed)
    else:
        block_idx = select_blocks(q, k, kv_len, block, top, sink, local)
    mask = selected_block_mask(block_idx, block, S, N) & causal_mask(kv_len, S, N)
    check_three_way(q, k, v, kv_len, block_idx, block, mask, D ** -0.5)


@settings(deadline=None)
@given(case=prefill_cases(), sink=st.integers(0, 2), local=st.integers(0, 2))
def test_covering_all_blocks_is_dense_causal(case, sink, local):
    q, k, v, kv_len, block = case
    S, N = q.shape[2], k.shape[2]
    block_idx = select_blocks(q, k, kv_len, block, -(-N // block), sink, local)
    check_three_way(q, k, v, kv_len, block_idx, block, causal_mask(kv_len, S, N).expand(-1, q.shape[1], -1, -1), 0.3)


def brute_force_estimate(q, k, kv_len, b, h, i, c, block, group) -> float:
    """mean(valid queries of query block i) . mean(valid keys of key block c), in float64."""
    S = q.shape[2]
    qs = [s for s in range(i * block, min(S, (i + 1) * block)) if int(kv_len[b]) - S + s >= 0]
    ks = [j for j in range(c * block, min(k.shape[2], (c + 1) * block)) if j < int(kv_len[b])]
    g = h // group
    heads = range(g * group, (g + 1) * group)  # the KV head's query heads share one estimate
    q_sum = sum(q[b, x, qs].double().mean(0) if qs else torch.zeros(q.shape[3], dtype=torch.float64) for x in heads)
    return float(q_sum @ k[b, g, ks].double().mean(0))


@settings(deadline=None)
@given(case=prefill_cases(), top=st.integers(0, 3), sink=st.integers(0, 2), local=st.integers(0, 2))
def test_select_blocks_keeps_sink_local_and_top_estimates(case, top, sink, local):
    q, k, v, kv_len, block = case
    if top + sink + local == 0:
        return
    B, H, S, _ = q.shape
    group = H // k.shape[1]
    block_idx = select_blocks(q, k, kv_len, block, top, sink, local)
    assert block_idx.dtype == torch.int32
    assert block_idx.shape == (B, H, -(-S // block), min(top + sink + local, -(-k.shape[2] // block)))
    assert torch.equal(block_idx, block_idx[:, ::group].repeat_interleave(group, dim=1)), "a GQA group shares blocks"
    for b in range(B):
        for h in range(H):
            for i in range(block_idx.shape[2]):
                row = block_idx[b, h, i].tolist()
                chosen = [c for c in row if c >= 0]
                assert row == chosen + [-1] * (len(row) - len(chosen)), "padding must trail"
                assert chosen == sorted(set(chosen)), "ascending and distinct"
                diag = (int(kv_len[b]) - S + min(S, (i + 1) * block) - 1) // block
                causal = set(range(diag + 1))
                forced = {c for c in causal if c < sink or c > diag - local}
                assert forced <= set(chosen) <= causal
                assert len(chosen) == len(forced) + min(top, len(causal) - len(forced))
                extra, rest = set(chosen) - forced, causal - set(chosen)
                if extra and rest:
                    est = {c: brute_force_estimate(q, k, kv_len, b, h, i, c, block, group) for c in extra | rest}
                    assert min(est[c] for c in extra) >= max(est[c] for c in rest) - 1e-4


@settings(deadline=None)
@given(case=prefill_cases(), top=st.integers(1, 2))
def test_select_blocks_ignores_garbage_beyond_kv_len(case, top):
    q, k, _, kv_len, block = case
    sink = local = 0  # the partly valid last block competes on its estimate instead of being forced
    garbage = (torch.arange(k.shape[2])[None, :] >= kv_len[:, None])[:, None].expand(-1, k.shape[1], -1)
    selections = []
    for fill in (float("nan"), -3e4, 3e4, 0.0):
        k[garbage] = fill
        selections.append(select_blocks(q, k, kv_len, block, top, sink, local))
    assert all(torch.equal(selections[0], other) for other in selections[1:])


@settings(deadline=None, max_examples=30)
@given(case=prefill_cases(), top=st.integers(0, 3), sink=st.integers(0, 2), local=st.integers(1, 2),
       gather=st.integers(1, 40), strided=st.booleans())
def test_torch_path_in_chunks_and_on_strided_caches(case, top, sink, local, gather, strided):
    """The torch reference processes query blocks in chunks of GATHER_KEYS gathered keys, from a flat
    row gather of a contiguous cache or by indexing a strided one: every chunking equals the mask."""
    import accelc.kernels.block_sparse as bs

    q, k, v, kv_len, block = case
    S, N = q.shape[2], k.shape[2]
    block_idx = select_blocks(q, k, kv_len, block, top, sink, local)
    if strided:  # a view of every other KV head slot: not contiguous
        k = torch.stack([k, torch.zeros_like(k)], dim=2).flatten(1, 2)[:, ::2]
        v = torch.stack([v, torch.zeros_like(v)], dim=2).flatten(1, 2)[:, ::2]
    want = bs.block_sparse_attention(q, k.contiguous(), v.contiguous(), kv_len, block_idx, block, 0.3)
    old = bs.GATHER_KEYS
    bs.GATHER_KEYS = gather
    try:
        got = bs.block_sparse_attention(q, k, v, kv_len, block_idx, block, 0.3)
    finally:
        bs.GATHER_KEYS = old
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


@settings(deadline=None)
@given(case=prefill_cases(), top=st.integers(0, 3), sink=st.integers(0, 2), local=st.integers(1, 2),
       gather=st.sampled_from([1, 50, 16384]))
def test_fresh_prefill_fast_path_equals_explicit_mask(case, top, sink, local, gather):
    """A prefill from an empty cache (kv_len = S, garbage after it) with select_blocks' selection
    takes the shared-gather path with one constant diagonal mask; it equals the explicit mask for
    every chunking of the query blocks."""
    import accelc.kernels.block_sparse as bs

    q, k, v, _, block = case
    B, H, S, D = q.shape
    N = k.shape[2]
    kv_len = torch.full((B,), S)
    gen = torch.Generator().manual_seed(S * 7 + N)
    k[:, :, :S] = torch.randn(k[:, :, :S].shape, generator=gen)  # the case's garbage started at its own kv_len
    v[:, :, :S] = torch.randn(v[:, :, :S].shape, generator=gen)
    k[:, :, S:] = float("nan")
    v[:, :, S:] = float("nan")
    block_idx = select_blocks(q, k, kv_len, block, top, sink, local)
    assert fresh_prefill_layout(block_idx, kv_len, S, block, H // k.shape[1])
    mask = selected_block_mask(block_idx, block, S, N) & causal_mask(kv_len, S, N)
    old = bs.GATHER_KEYS
    bs.GATHER_KEYS = gather
    try:
        got = bs.block_sparse_attention(q, k, v, kv_len, block_idx, block, D ** -0.5)
    finally:
        bs.GATHER_KEYS = old
    assert not got.isnan().any()
    torch.testing.assert_close(got, dense_attention(q, k, v, mask, D ** -0.5).float(), atol=ATOL, rtol=RTOL)
    if S > block:  # a selection that does not end at the diagonal block is not this layout
        assert not fresh_prefill_layout(block_idx, kv_len + 1, S, block, H // k.shape[1])


@settings(deadline=None)
@given(case=prefill_cases(), K=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_fresh_prefill_with_any_selection_equals_explicit_mask(case, K, seed):
    """Random selections (future blocks, gaps, unshared heads) on a fresh prefill: whether or not
    they take the fast path, the result is the explicit mask's."""
    q, k, v, _, block = case
    B, H, S, D = q.shape
    N = k.shape[2]
    kv_len = torch.full((B,), S)
    gen = torch.Generator().manual_seed(seed)
    k[:, :, :S] = torch.randn(k[:, :, :S].shape, generator=gen)
    v[:, :, :S] = torch.randn(v[:, :, :S].shape, generator=gen)
    block_idx = random_block_idx(B, H, S, N, block, min(K, -(-N // block)), seed)
    mask = selected_block_mask(block_idx, block, S, N) & causal_mask(kv_len, S, N)
    got = block_sparse_attention(q, k, v, kv_len, block_idx, block, D ** -0.5)
    torch.testing.assert_close(got, dense_attention(q, k, v, mask, D ** -0.5).float(), atol=ATOL, rtol=RTOL)
