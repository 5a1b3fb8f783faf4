"""Streaming heads: attention over the attention sinks plus a local window.

StreamingLLM (Xiao et al., 2024, "Efficient Streaming Language Models with Attention Sinks") and
DuoAttention (Xiao et al., 2025, "DuoAttention: Efficient Long-Context LLM Inference with Retrieval
and Streaming Heads"): many heads put their attention on the first few tokens (sinks) and on recent
tokens, so such a head keeps only ``sink`` + ``local`` tokens of KV.  The query at position ``p``
sees key ``j`` iff ``j <= p`` and (``j < sink`` or ``j > p - local``).  The Triton kernel visits
only the sink blocks and the blocks of the local window; :func:`streaming_keep_index` compacts a
cache to the tokens a decode query still needs.

Tensor conventions are those of :mod:`accelc.kernels.block_sparse`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from accelc.kernels.block_sparse import (
    attend_tile,
    cdiv,
    check_attention_shapes,
    masked_gathered_attention,
    query_positions,
    tile_dim,
)
from accelc.kernels.dispatch import register

_REF_CHUNK = 128  # queries per step of the torch reference


def _check_window(sink: int, local: int) -> None:
    if sink < 0 or local < 0 or sink + local < 1:
        raise ValueError(f"sink and local must be >= 0 with sink + local >= 1, got sink={sink}, local={local}")


def streaming_visible(j: torch.Tensor, p: torch.Tensor, sink: int, local: int) -> torch.Tensor:
    """The streaming mask: key position ``j`` is visible from query position ``p`` (broadcasting)."""
    return (j >= 0) & (j <= p) & ((j < sink) | (j > p - local))


def _candidates(q_pos: torch.Tensor, N: int, sink: int, local: int) -> torch.Tensor:
    """Key positions that a chunk of queries can see: the sinks, then the chunk's window span.

    q_pos: (B, M) ascending positions of the chunk's queries.  Returns (B, T) int64 positions,
    ``T = min(sink, N) + min(local + M - 1, N)``; window positions below ``sink`` repeat sinks and
    are masked by the caller, positions beyond ``N - 1`` are clamped (never visible: ``p < N``).
    """
    B, M = q_pos.shape
    sinks = torch.arange(min(sink, N), device=q_pos.device).expand(B, -1)
    span = min(local + M - 1, N)
    start = (q_pos[:, :1] - local + 1).clamp_min(0)
    window = start + torch.arange(span, device=q_pos.device)
    return torch.cat([sinks, window], dim=1)


_FAST_QUERIES = 16  # decode and speculative verification: contiguous slices + one SDPA call


def _few_queries(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int, sink: int, local: int,
                 scale: float) -> torch.Tensor:
    """Streaming attention of the last S queries of rows that all hold n keys (decode, verification).

    The keys any of them sees are two contiguous slices, the sinks and the window span of the first
    query through the last; one SDPA call with the streaming mask over them (no gather).  When the
    whole cache fits in sink + local, every key up to a query is visible: plain causal attention.
    """
    S = q.shape[2]
    first = n - S  # position of the first query
    lo = max(min(sink, n), first - local + 1)
    if lo <= min(sink, n):  # nothing between the sinks and the window: causal attention over [0, n)
        keys, values, pos = k[:, :, :n], v[:, :, :n], torch.arange(n, device=q.device)
    else:
        keys = torch.cat([k[:, :, :sink], k[:, :, lo:n]], dim=2)
        values = torch.cat([v[:, :, :sink], v[:, :, lo:n]], dim=2)
        pos = torch.cat([torch.arange(sink, device=q.device), torch.arange(lo, n, device=q.device)])
    p = first + torch.arange(S, device=q.device)
    mask = None if S == 1 else streaming_visible(pos[None, :], p[:, None], sink, local)  # (S, T); one query sees all
    out = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.to(q.dtype)


@register("streaming_attention", "torch")
def streaming_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_len: torch.Tensor,
    sink: int,
    local: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Sink + local-window causal attention (torch reference; O(S * (sink + local)) memory).

    q: (B, H, S, D); k, v: (B, Hkv, N, D); kv_len: (B,) int64.  Processes queries in chunks, each
    over its gathered sink and window keys.  Returns (B, H, S, D) in ``q.dtype``.
    """
    group = check_attention_shapes(q, k, v, kv_len)
    _check_window(sink, local)
    B, H, S, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    lens = kv_len.tolist()
    if S <= _FAST_QUERIES and len(set(lens)) == 1 and lens[0] >= S:
        return _few_queries(q, k, v, lens[0], sink, local, scale)
    qg = q.reshape(B, Hkv, group, S, D)
    out = torch.empty(B, Hkv, group, S, D, dtype=q.dtype, device=q.device)
    n_sink = min(sink, N)
    for s0 in range(0, S, _REF_CHUNK):
        s1 = min(S, s0 + _REF_CHUNK)
        q_pos = query_positions(kv_len, S, s0, s1)  # (B, M)
        j = _candidates(q_pos, N, sink, local)  # (B, T)
        first_of_kind = torch.arange(j.shape[1], device=q.device) < n_sink
        j_idx = j.clamp_max(N - 1)[:, None, :, None].expand(B, Hkv, -1, D)
        keys, values = k.gather(2, j_idx), v.gather(2, j_idx)  # (B, Hkv, T, D)
        visible = streaming_visible(j[:, None, :], q_pos[:, :, None], sink, local)
        visible &= first_of_kind | (j[:, None, :] >= sink)  # each position counted once
        res = masked_gathered_attention(qg[:, :, :, s0:s1], keys[:, :, None], values[:, :, None],
                                        visible[:, None, None], scale)
        out[:, :, :, s0:s1] = res.to(q.dtype)
    return out.view(B, H, S, D)


@register("streaming_keep_index", "torch")
def streaming_keep_index(kv_len: torch.Tensor, sink: int, local: int) -> torch.Tensor:
    """Cache positions a streaming head keeps: the first ``sink`` and the last ``local`` tokens.

    kv_len: (B,) int64.  Returns (B, sink + local) int64, ascending and distinct; row ``b`` holds
    ``min(kv_len_b, sink + local)`` positions, then -1 padding.  Gathering these positions (the
    padding clamped to 0) gives a cache of length ``min(kv_len_b, sink + local)`` over which dense
    attention of the newest query equals :func:`streaming_attention` over the full cache.
    """
    _check_window(sink, local)
    L = kv_len.to(torch.int64)[:, None]
    slot = torch.arange(sink + local, device=kv_len.device)[None, :]
    window = L - local + (slot - sink)  # slot sink + t -> L - local + t (>= sink when not short)
    short = L < sink + local  # the whole prefix fits: keep positions 0 .. L - 1
    pos = torch.where(short | (slot < sink), slot, window)
    return torch.where(pos < L, pos, -1)


# ----------------------------------------------------------------------------------------------
# Triton: one program per (row, query head, query tile); sink blocks, then the window's blocks
# ----------------------------------------------------------------------------------------------


@triton.jit
def _streaming_kernel(
    Q, K, V, O, KV_LEN, scale, S, H, group, sink, local,
    sqb, sqh, sqs, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, sos, sod,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    tile = tl.program_id(1)
    b = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    hk = h // group
    kv_len = tl.load(KV_LEN + b)
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < S
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    q_pos = kv_len - S + offs_m
    first_pos = kv_len - S + tile * BLOCK_M
    end_pos = kv_len - S + tl.minimum(tile * BLOCK_M + BLOCK_M, S)  # one past the tile's last query
    m_i = tl.full([BLOCK_M], -1e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    sink_end = tl.minimum(sink, end_pos)
    for start in range(0, sink_end, BLOCK_N):  # sink blocks: keys j < sink
        k_pos = start + offs_n
        k_ok = k_pos < sink_end
        ld_mask = k_ok[:, None] & d_ok[None, :]
        keys = tl.load(k_base + k_pos[:, None] * skn + offs_d[None, :] * skd, mask=ld_mask, other=0.0)
        values = tl.load(v_base + k_pos[:, None] * svn + offs_d[None, :] * svd, mask=ld_mask, other=0.0)
        visible = k_ok[None, :] & (k_pos[None, :] <= q_pos[:, None]) & m_ok[:, None]
        m_i, l_i, acc = attend_tile(q, keys, values, visible, m_i, l_i, acc, scale)
    win_lo = tl.maximum(tl.maximum(first_pos - local + 1, sink), 0)
    for start in range((win_lo // BLOCK_N) * BLOCK_N, end_pos, BLOCK_N):  # window blocks: j >= sink
        k_pos = start + offs_n
        k_ok = (k_pos >= win_lo) & (k_pos < end_pos)
        ld_mask = k_ok[:, None] & d_ok[None, :]
        keys = tl.load(k_base + k_pos[:, None] * skn + offs_d[None, :] * skd, mask=ld_mask, other=0.0)
        values = tl.load(v_base + k_pos[:, None] * svn + offs_d[None, :] * svd, mask=ld_mask, other=0.0)
        visible = (k_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
                   & (k_pos[None, :] > q_pos[:, None] - local) & m_ok[:, None])
        m_i, l_i, acc = attend_tile(q, keys, values, visible, m_i, l_i, acc, scale)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :] * sod,
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


_BLOCK_N = 32  # keys per step


@register("streaming_attention", "triton")
def streaming_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_len: torch.Tensor,
    sink: int,
    local: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Triton streaming attention; same contract as :func:`streaming_attention`.

    Grid (B * H, query tiles); a program visits ``ceil(sink / 32)`` sink blocks and the
    ``~(local + tile) / 32`` blocks of its tile's window, whatever the cache length.
    """
    group = check_attention_shapes(q, k, v, kv_len)
    _check_window(sink, local)
    B, H, S, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    block_m = tile_dim(min(S, 64))
    out = torch.empty_like(q)
    kv_len = kv_len.to(torch.int64).contiguous()
    _streaming_kernel[(B * H, cdiv(S, block_m))](
        q, k, v, out, kv_len, float(scale), S, H, group, sink, local,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        D=D, BLOCK_M=block_m, BLOCK_N=_BLOCK_N, BLOCK_D=tile_dim(D),
    )
    return out
