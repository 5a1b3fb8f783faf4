"""Property tests: streaming heads (sink + local window) and cache compaction (StreamingLLM).

Triton (``TRITON_INTERPRET=1``, fp32) == torch reference == brute-force dense softmax under the
explicit mask ``j <= p AND (j < sink OR j > p - local)``; local >= length is dense causal; the
compacted cache answers the newest query exactly as the full cache does.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton kernels are defined

import torch
from hypothesis import given, settings, strategies as st

from accelc.kernels.streaming import streaming_attention, streaming_attention_triton, streaming_keep_index

ATOL = RTOL = 1e-4


# --- brute force ------------------------------------------------------------------------------


def positions(kv_len: torch.Tensor, S: int) -> torch.Tensor:
    """(B, S): cache position of query s of row b."""
    return kv_len[:, None] - S + torch.arange(S)[None, :]


def streaming_mask(kv_len: torch.Tensor, S: int, N: int, sink: int, local: int) -> torch.Tensor:
    """(B, 1, S, N), written element by element from the definition."""
    B = kv_len.shape[0]
    pos = positions(kv_len, S)
    mask = torch.zeros(B, 1, S, N, dtype=torch.bool)
    for b in range(B):
        for s in range(S):
            p = int(pos[b, s])
            for j in range(N):
                mask[b, 0, s, j] = j <= p and (j < sink or j > p - local)
    return mask


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float):
    """Softmax over all N keys in float64 under an explicit (B, H, S, N) mask; no-key rows are 0."""
    g = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1).double(), v.repeat_interleave(g, 1).double()
    scores = (q.double() @ kk.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    p = torch.where(mask.any(-1, keepdim=True), torch.softmax(scores, -1), 0.0)
    vv = torch.where(mask.any(2)[..., None], vv, 0.0)  # garbage (NaN) keys nobody sees
    return p @ vv


# --- cases ------------------------------------------------------------------------------------


@st.composite
def cases(draw, max_s: int = 80):
    """q (B, H, S, D), k/v (B, Hkv, N, D) with garbage beyond each row's kv_len, kv_len (B,)."""
    B, Hkv, group = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 4))
    D = draw(st.sampled_from([16, 32, 64]))
    S = draw(st.integers(1, max_s))
    N = S + draw(st.integers(0, 64))
    kv_len = torch.tensor([draw(st.one_of(st.just(N), st.integers(0, N))) for _ in range(B)])
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q = torch.randn(B, Hkv * group, S, D, generator=gen)
    k = torch.randn(B, Hkv, N, D, generator=gen)
    v = torch.randn(B, Hkv, N, D, generator=gen)
    garbage = (torch.arange(N)[None, None, :] >= kv_len[:, None, None]).expand(B, Hkv, N)
    fill = draw(st.sampled_from([float("nan"), -3e4, 3e4]))  # garbage: NaN or huge finite values
    k[garbage] = fill
    v[garbage] = fill
    return q, k, v, kv_len


windows = st.tuples(st.integers(0, 40), st.integers(0, 80)).filter(lambda w: w[0] + w[1] >= 1)


def check_three_way(q, k, v, kv_len, sink, local, mask, scale):
    ref = streaming_attention(q, k, v, kv_len, sink, local, scale)
    tri = streaming_attention_triton(q, k, v, kv_len, sink, local, scale)
    dense = dense_attention(q, k, v, mask.expand(-1, q.shape[1], -1, -1), scale).float()
    assert not ref.isnan().any() and not tri.isnan().any()
    torch.testing.assert_close(ref, dense, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(tri, dense, atol=ATOL, rtol=RTOL)


# --- tests ------------------------------------------------------------------------------------


@settings(deadline=None)
@given(case=cases(), window=windows)
def test_streaming_equals_reference_and_explicit_mask(case, window):
    q, k, v, kv_len = case
    sink, local = window
    mask = streaming_mask(kv_len, q.shape[2], k.shape[2], sink, local)
    check_three_way(q, k, v, kv_len, sink, local, mask, q.shape[3] ** -0.5)


@settings(deadline=None)
@given(case=cases(), sink=st.integers(0, 8), beyond=st.integers(0, 100))
def test_local_covering_the_sequence_is_dense_causal(case, sink, beyond):
    q, k, v, kv_len = case
    S, N = q.shape[2], k.shape[2]
    causal = torch.arange(N)[None, None, :] <= positions(kv_len, S)[:, :, None]
    check_three_way(q, k, v, kv_len, sink, N + beyond, causal[:, None], 0.2)


@settings(deadline=None)
@given(lengths=st.lists(st.integers(0, 200), min_size=1, max_size=4), window=windows)
def test_keep_index_is_sink_plus_last_local_tokens(lengths, window):
    sink, local = window
    kv_len = torch.tensor(lengths)
    keep = streaming_keep_index(kv_len, sink, local)
    assert keep.shape == (len(lengths), sink + local)
    for b, L in enumerate(lengths):
        row = keep[b].tolist()
        expected = [j for j in range(L) if j < sink or j >= L - local]
        assert row == expected + [-1] * (sink + local - len(expected))


@settings(deadline=None)
@given(case=cases(max_s=1), window=windows)
def test_compacted_cache_answers_the_newest_query_like_the_full_cache(case, window):
    q, k, v, kv_len = case  # S = 1: one decode query at position kv_len - 1
    sink, local = window
    B, Hkv, _, D = k.shape
    keep = streaming_keep_index(kv_len, sink, local)
    idx = keep.clamp_min(0)[:, None, :, None].expand(B, Hkv, -1, D)
    k_c, v_c = k.gather(2, idx), v.gather(2, idx)
    kv_len_c = (keep >= 0).sum(1)
    causal_c = torch.arange(sink + local)[None, None, :] <= positions(kv_len_c, 1)[:, :, None]
    compact = dense_attention(q, k_c, v_c, causal_c[:, None].expand(-1, q.shape[1], -1, -1), 0.5).float()
    torch.testing.assert_close(streaming_attention(q, k, v, kv_len, sink, local, 0.5), compact, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(streaming_attention_triton(q, k, v, kv_len, sink, local, 0.5), compact,
                               atol=ATOL, rtol=RTOL)
