"""Block-sparse causal prefill attention: block selection by pooled scores and the sparse kernel.

The idea follows MInference (Jiang et al., 2024, "MInference 1.0: Accelerating Pre-filling for
Long-Context LLMs via Dynamic Sparse Attention") and LServe (Yang et al., 2025, "LServe: Efficient
Long-sequence LLM Serving with Unified Sparse Attention"): the attention map of a long prompt is
concentrated on a few key blocks per query block, so the prefill estimates block importance cheaply
from mean-pooled queries and keys, keeps the sink and local (diagonal) blocks always, adds the top
blocks by the estimate, and the kernel visits only the kept blocks.

Conventions shared by every sparse kernel of this package (``streaming.py`` and ``quest.py`` too):

- ``q`` (B, H, S, D); ``k``/``v`` (B, Hkv, N, D), the cache with its capacity N; query head ``h``
  reads KV head ``h // (H // Hkv)`` (GQA).
- ``kv_len`` (B,) int64: valid keys of each row, the S new ones included; query ``s`` of row ``b``
  sits at position ``kv_len[b] - S + s`` and causally sees keys ``j <= kv_len[b] - S + s``.  Cache
  entries at or beyond ``kv_len`` are garbage (NaN allowed) and never reach the output.
- Scores and accumulation in fp32; output (B, H, S, D) in ``q.dtype``; a query that sees no key
  (left padding, an empty selection) outputs zeros, never NaN.

Blocks here: query block ``i`` is queries ``s`` in ``[i * block, (i + 1) * block)`` (indices into
the S new queries); key block ``c`` is cache positions ``[c * block, (c + 1) * block)``.  The
*diagonal* key block of a query block is the one holding its last query's position, so with a
cached prefix (``kv_len > S``) and an unaligned offset, key blocks and query blocks still line up
by position.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from accelc.kernels.dispatch import register

# ----------------------------------------------------------------------------------------------
# Shared torch helpers (also used by the references in quest.py and streaming.py)
# ----------------------------------------------------------------------------------------------


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for non-negative ints."""
    return -(-a // b)


def query_positions(kv_len: torch.Tensor, S: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Cache positions of queries ``start..stop`` of every row.

    kv_len: (B,) int64.  Returns (B, stop - start) int64: ``kv_len[b] - S + s`` (negative for
    left-padding queries, which see no key).
    """
    stop = S if stop is None else stop
    s = torch.arange(start, stop, device=kv_len.device, dtype=torch.int64)
    return kv_len.to(torch.int64)[:, None] - S + s[None, :]


def masked_gathered_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float
) -> torch.Tensor:
    """Softmax attention over gathered candidate keys with an explicit visibility mask, in fp32.

    q: (..., M, D) queries; k, v: (..., T, D) candidate keys/values (may hold garbage, NaN included,
    wherever no query sees them); visible: (..., M, T) bool, broadcastable against the scores.
    Returns (..., M, D) float32; rows with no visible key are zeros.
    """
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    visible = visible.expand_as(scores)
    scores = torch.where(visible, scores, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
    p = torch.exp(scores - row_max)  # exactly 0 where not visible
    denom = p.sum(dim=-1, keepdim=True)
    used = visible.any(dim=-2).unsqueeze(-1)  # (..., T, 1): keys some query sees are valid keys
    v_safe = torch.where(used, v.float(), 0.0)
    out = torch.matmul(p, v_safe)
    return torch.where(denom > 0, out / torch.where(denom > 0, denom, 1.0), 0.0)


def check_attention_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: torch.Tensor) -> int:
    """Validate the shared q/k/v/kv_len conventions; returns the GQA group size H // Hkv."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"expected q (B, H, S, D), k = v (B, Hkv, N, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, _, D = q.shape
    if k.shape[0] != B or k.shape[3] != D or H % k.shape[1] != 0:
        raise ValueError(f"k {tuple(k.shape)} does not fit q {tuple(q.shape)}: batch and head dim must "
                         "match and H must be a multiple of Hkv")
    if kv_len.shape != (B,):
        raise ValueError(f"kv_len must have shape ({B},), got {tuple(kv_len.shape)}")
    return H // k.shape[1]


def sorted_selection(rank: torch.Tensor, count: torch.Tensor, K: int) -> torch.Tensor:
    """The ``count`` highest-ranked indices of the last dim, ascending, padded with -1 to ``K``.

    rank: (..., C) float (forced entries +inf, ineligible ones -inf); count: (...) int64, at most
    the number of eligible entries and at most ``K``.  Returns (..., K) int32.
    """
    C = rank.shape[-1]
    idx = rank.topk(K, dim=-1).indices
    keep = torch.arange(K, device=rank.device) < count.unsqueeze(-1)
    idx = torch.where(keep, idx, C).sort(dim=-1).values
    return torch.where(idx == C, -1, idx).to(torch.int32)


# ----------------------------------------------------------------------------------------------
# Block selection (torch; O(B * H * n_q_blocks * n_k_blocks), no per-token work)
# ----------------------------------------------------------------------------------------------


def _pool(x: torch.Tensor, valid: torch.Tensor, block: int) -> torch.Tensor:
    """Mean of ``x`` over each block of its dim 2, counting valid rows only.

    x: (B, Hx, L, D); valid: (B, L) bool.  Returns (B, Hx, ceil(L / block), D) float32 (zeros for a
    block without valid rows).
    """
    B, Hx, L, D = x.shape
    n = cdiv(L, block)
    pad = n * block - L
    x = torch.nn.functional.pad(x.float(), (0, 0, 0, pad))
    valid = torch.nn.functional.pad(valid, (0, pad))
    x = torch.where(valid[:, None, :, None], x, 0.0)
    counts = valid.view(B, n, block).sum(-1).clamp_min(1)
    return x.view(B, Hx, n, block, D).sum(3) / counts[:, None, :, None]


def diagonal_blocks(kv_len: torch.Tensor, S: int, block: int) -> torch.Tensor:
    """Key block holding the last query of each query block (B, ceil(S / block)) int64 (< 0: none)."""
    last_s = torch.arange(cdiv(S, block), device=kv_len.device) * block + block - 1
    last_s = last_s.clamp_max(S - 1)
    last_pos = kv_len.to(torch.int64)[:, None] - S + last_s[None, :]
    return torch.div(last_pos, block, rounding_mode="floor")


@register("block_sparse_select", "torch")
def select_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    kv_len: torch.Tensor,
    block: int,
    top_blocks: int,
    sink_blocks: int,
    local_blocks: int,
) -> torch.Tensor:
    """Key blocks each query block attends to, per query head (MInference / LServe block selection).

    q: (B, H, S, D); k: (B, Hkv, N, D); kv_len: (B,) int64.  A key block is *causal* for a query
    block when it starts at or before the block's last query position.  Among causal blocks the
    first ``sink_blocks`` and the ``local_blocks`` ending at the diagonal are always kept; then
    the ``top_blocks`` best others by ``sum over the KV head's query heads h of mean_q_h(query
    block) . mean_k(key block)`` (means over valid queries/keys only).  The query heads of one KV
    head (a GQA group) thus share their blocks, so the attention gathers each key block once per
    group instead of once per query head.  Returns block_idx (B, H, ceil(S / block), K) int32,
    ascending, padded with -1, ``K = min(sink_blocks + local_blocks + top_blocks, ceil(N / block))``.
    """
    group = check_attention_shapes(q, k, k, kv_len)
    if block < 1 or min(top_blocks, sink_blocks, local_blocks) < 0:
        raise ValueError(f"block must be >= 1 and block counts >= 0; got block={block}, top={top_blocks}, "
                         f"sink={sink_blocks}, local={local_blocks}")
    B, H, S, _ = q.shape
    N = k.shape[2]
    n_kb = cdiv(N, block)
    K = min(sink_blocks + local_blocks + top_blocks, n_kb)
    if K == 0:
        raise ValueError("sink_blocks + local_blocks + top_blocks must be >= 1")
    q_valid = (query_positions(kv_len, S) >= 0)
    k_valid = torch.arange(N, device=k.device)[None, :] < kv_len[:, None]
    q_pool = _pool(q, q_valid, block)  # (B, H, n_qb, D)
    k_pool = _pool(k, k_valid, block)  # (B, Hkv, n_kb, D)
    # a KV head's query heads share its blocks: the estimate of the group is the sum of its heads'
    q_group = q_pool.view(B, H // group, group, -1, q_pool.shape[-1]).sum(2)  # (B, Hkv, n_qb, D)
    estimate = torch.matmul(q_group, k_pool.transpose(-1, -2)).repeat_interleave(group, dim=1)  # (B, H, n_qb, n_kb)

    diag = diagonal_blocks(kv_len, S, block)[:, None, :, None]  # (B, 1, n_qb, 1)
    kb = torch.arange(n_kb, device=k.device)
    causal = kb <= diag
    forced = causal & ((kb < sink_blocks) | (kb > diag - local_blocks))
    rank = torch.where(forced, float("inf"), torch.where(causal, estimate, float("-inf")))
    n_forced = forced.sum(-1)
    count = n_forced + (causal.sum(-1) - n_forced).clamp_max(top_blocks)
    return sorted_selection(rank, count.expand(B, H, -1), K)


# ----------------------------------------------------------------------------------------------
# Torch reference: per query block, gather the selected key blocks (no N x N tensor)
# ----------------------------------------------------------------------------------------------


def gather_positions(idx: torch.Tensor, size: int, kv_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Key positions of selected blocks/pages and whether each is a valid key.

    idx: (B, X, ..., K) int (block or page numbers, -1 = none); size: block/page size; kv_len: (B,).
    Returns (positions, valid), each (B, X, ..., K * size); invalid positions are clamped to 0 so
    they can index a cache safely.
    """
    pos = (idx.to(torch.int64).unsqueeze(-1) * size + torch.arange(size, device=idx.device)).flatten(-2)
    lens = kv_len.to(torch.int64).view(-1, *([1] * (pos.dim() - 1)))
    valid = (idx >= 0).repeat_interleave(size, dim=-1) & (pos < lens)
    return torch.where(valid, pos, 0), valid


def fresh_prefill_layout(block_idx: torch.Tensor, kv_len: torch.Tensor, S: int, block: int, group: int) -> bool:
    """Whether a selection has the layout :func:`_fresh_prefill_attention` exploits.

    A prefill from an empty cache (``kv_len == S`` in every row) whose selection comes from
    :func:`select_blocks` with ``local_blocks >= 1``: the query heads of a KV head share their
    blocks, the first K query blocks list all their causal blocks (dense), and every later one lists
    exactly K blocks, the last of them its diagonal block.  Checked on the small index tensor only.
    """
    B, H, n_qb, K = block_idx.shape
    if K == 0 or not bool((kv_len == S).all()):
        return False
    groups = block_idx.view(B, H // group, group, n_qb, K)
    if group > 1 and not bool((groups == groups[:, :, :1]).all()):
        return False
    head = groups[:, :, 0]  # (B, Hkv, n_qb, K)
    first = min(K, n_qb)
    # entries are distinct (the op's contract): i + 1 of them, none above i, are exactly blocks 0..i
    counts = (head[:, :, :first] >= 0).sum(-1)
    upto = torch.arange(first, device=head.device)
    if not bool((counts == upto + 1).all()) or not bool((head[:, :, :first].amax(-1) == upto).all()):
        return False
    rest = head[:, :, first:]
    diag = torch.arange(first, n_qb, device=rest.device, dtype=rest.dtype)
    return bool((rest >= 0).all()) and bool((rest[..., -1] == diag).all()) and bool((rest.amax(-1) == diag).all())


def _fresh_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor, block: int,
                             scale: float) -> torch.Tensor:
    """Block-sparse prefill from an empty cache in the layout of :func:`fresh_prefill_layout`.

    The first K query blocks see all their causal keys: one causal SDPA over the first K blocks.
    Every later query block sees K - 1 earlier blocks in full and its diagonal block causally, so
    its mask is the same constant (block, K * block) pattern for every block and head; the key
    blocks are gathered once per KV head and the group's queries attend together (group * block
    query rows per SDPA batch entry).  No per-element mask is built.
    """
    B, H, S, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    group = H // Hkv
    K = block_idx.shape[-1]
    n_qb = cdiv(S, block)
    out = torch.empty(B, H, S, D, dtype=q.dtype, device=q.device)
    P = min(S, K * block)
    out[:, :, :P] = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, :P], k[:, :, :P], v[:, :, :P], is_causal=True, scale=scale, enable_gqa=True)
    if n_qb <= K:
        return out
    T = K * block
    t = torch.arange(T, device=q.device)
    r = torch.arange(block, device=q.device)
    mask = (t[None, :] < T - block) | (t[None, :] - (T - block) <= r[:, None])  # (block, T)
    mask = mask.repeat(group, 1)  # (group * block, T): the group's queries, head by head
    sel = block_idx.view(B, Hkv, group, n_qb, K)[:, :, 0, K:]  # (B, Hkv, n_qb - K, K)
    pos = (sel.to(torch.int64).unsqueeze(-1) * block + r).flatten(-2).clamp_max(S - 1)  # (B, Hkv, n, T)
    base = (torch.arange(B, device=q.device)[:, None] * Hkv + torch.arange(Hkv, device=q.device)[None, :]) * N
    k2, v2 = k.reshape(-1, D), v.reshape(-1, D)
    chunk = max(1, GATHER_KEYS * group // T)  # query blocks per step
    for i0 in range(K, n_qb, chunk):
        i1 = min(n_qb, i0 + chunk)
        c = i1 - i0
        s0, s1 = i0 * block, min(S, i1 * block)
        rows = (base[:, :, None, None] + pos[:, :, i0 - K:i1 - K]).reshape(-1)
        keys = k2.index_select(0, rows).view(B * Hkv, c, T, D)
        values = v2.index_select(0, rows).view(B * Hkv, c, T, D)
        qs = torch.nn.functional.pad(q[:, :, s0:s1], (0, 0, 0, c * block - (s1 - s0)))
        qs = qs.view(B, Hkv, group, c, block, D).transpose(2, 3).reshape(B * Hkv, c, group * block, D)
        o = torch.nn.functional.scaled_dot_product_attention(qs, keys, values, attn_mask=mask, scale=scale)  # 4-D: flash
        o = o.view(B, Hkv, c, group, block, D).transpose(2, 3).reshape(B, H, c * block, D)
        out[:, :, s0:s1] = o[:, :, : s1 - s0]
    return out


GATHER_KEYS = 16384  # keys gathered per query head and step of the torch block-sparse attention


@register("block_sparse_attention", "torch")
def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_len: torch.Tensor,
    block_idx: torch.Tensor,
    block: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal attention of every query block over its selected key blocks only (torch reference).

    q: (B, H, S, D); k, v: (B, Hkv, N, D); kv_len: (B,) int64; block_idx: (B, H, ceil(S / block), K)
    int32 from :func:`select_blocks` (distinct entries, -1 = none).  Equals dense attention under the
    mask ``causal AND (key block selected for the query's block)``.  Works one query block at a
    time on the gathered K * block keys.  Returns (B, H, S, D) in ``q.dtype``.
    """
    group = check_attention_shapes(q, k, v, kv_len)
    B, H, S, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    if fresh_prefill_layout(block_idx, kv_len, S, block, group) and k.is_contiguous() and v.is_contiguous():
        return _fresh_prefill_attention(q, k, v, block_idx, block, scale)
    pos, valid = gather_positions(block_idx, block, kv_len)  # (B, H, n_qb, T)
    Hkv, N = k.shape[1], k.shape[2]
    out = torch.empty(B, H, S, D, dtype=q.dtype, device=q.device)
    flat = k.is_contiguous() and v.is_contiguous()
    if flat:  # row gathers from the flattened cache (advanced indexing over three dims is ~10x slower on CPU)
        base = ((torch.arange(B, device=q.device)[:, None] * Hkv + torch.arange(H, device=q.device)[None, :] // group) * N)
        k2, v2 = k.reshape(-1, D), v.reshape(-1, D)
    else:
        b_ix = torch.arange(B, device=q.device)[:, None, None]
        h_ix = (torch.arange(H, device=q.device) // group)[None, :, None]
    n_qb = cdiv(S, block)
    chunk = max(1, GATHER_KEYS // max(1, pos.shape[-1]))  # query blocks per step: bounded gathered keys
    for i0 in range(0, n_qb, chunk):
        i1 = min(n_qb, i0 + chunk)
        s0, s1 = i0 * block, min(S, i1 * block)
        kpos = pos[:, :, i0:i1]  # (B, H, c, T)
        c, T = kpos.shape[2], kpos.shape[3]
        if flat:
            rows = (base[:, :, None, None] + kpos).reshape(-1)
            keys = k2.index_select(0, rows).view(B, H, c, T, D)
            values = v2.index_select(0, rows).view(B, H, c, T, D)
        else:
            keys = k[b_ix[..., None], h_ix[..., None], kpos]
            values = v[b_ix[..., None], h_ix[..., None], kpos]
        qs = torch.nn.functional.pad(q[:, :, s0:s1], (0, 0, 0, c * block - (s1 - s0))).view(B, H, c, block, D)
        qpos = (kv_len.to(torch.int64)[:, None] - S + s0 + torch.arange(c * block, device=q.device)[None, :]).view(B, 1, c, block, 1)
        visible = valid[:, :, i0:i1, None, :] & (kpos[:, :, :, None, :] <= qpos)  # (B, H, c, block, T)
        if flat:  # SDPA with a boolean mask: ~3x faster on CPU than softmax(masked q k^T) v in separate ops
            n = H * c
            o = torch.nn.functional.scaled_dot_product_attention(
                qs.float().reshape(B, n, block, D), keys.float().view(B, n, T, D), values.float().view(B, n, T, D),
                attn_mask=visible.reshape(B, n, block, T), scale=scale).view(B, H, c, block, D)
            o = o.nan_to_num(0.0)  # a query without visible keys -> zeros
            o = torch.where((kv_len > 0).view(B, 1, 1, 1, 1), o, 0.0)  # an empty row read garbage at slot 0
        else:
            o = masked_gathered_attention(qs, keys, values, visible, scale)
        out[:, :, s0:s1] = o.reshape(B, H, c * block, D)[:, :, : s1 - s0].to(q.dtype)
    return out


# ----------------------------------------------------------------------------------------------
# Triton: one program per (row, query head, query block); loops over the K selected blocks only
# ----------------------------------------------------------------------------------------------


@triton.jit
def attend_tile(q, keys, values, visible, m_i, l_i, acc, scale):
    """One online-softmax step (flash attention) over a key tile; shared by the sparse kernels.

    q: [M, BD] tile; keys, values: [N, BD] tiles (zeros where not loaded); visible: [M, N] bool;
    m_i, l_i: [M] running max (starts at -1e30, finite, so an all-masked row stays NaN-free) and
    running denominator; acc: [M, BD] fp32.  Returns the updated (m_i, l_i, acc).
    """
    scores = tl.dot(q, tl.trans(keys)) * scale
    scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(values.dtype), values)
    return m_new, l_i, acc


@triton.jit
def _block_sparse_kernel(
    Q, K, V, O, KV_LEN, IDX, scale, S, n_sel, H, group,
    sqb, sqh, sqs, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sob, soh, sos, sod, sib, sih, siq, sik,
    D: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    qb = tl.program_id(1)
    b = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    hk = h // group
    kv_len = tl.load(KV_LEN + b)
    offs_m = qb * BLOCK + tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < S
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    q_pos = kv_len - S + offs_m
    m_i = tl.full([BLOCK], -1e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    acc = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    idx_row = IDX + b * sib + h * sih + qb * siq
    for i in range(n_sel):
        kb = tl.load(idx_row + i * sik).to(tl.int64)
        k_pos = kb * BLOCK + offs_n
        k_ok = (k_pos >= 0) & (k_pos < kv_len)  # kb = -1 gives negative positions
        ld_mask = k_ok[:, None] & d_ok[None, :]
        keys = tl.load(K + b * skb + hk * skh + k_pos[:, None] * skn + offs_d[None, :] * skd,
                       mask=ld_mask, other=0.0)
        values = tl.load(V + b * svb + hk * svh + k_pos[:, None] * svn + offs_d[None, :] * svd,
                         mask=ld_mask, other=0.0)
        visible = k_ok[None, :] & (k_pos[None, :] <= q_pos[:, None]) & m_ok[:, None]
        m_i, l_i, acc = attend_tile(q, keys, values, visible, m_i, l_i, acc, scale)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :] * sod,
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def tile_dim(n: int) -> int:
    """Power-of-two tile extent >= 16 covering ``n`` (``tl.dot`` needs >= 16 and powers of two)."""
    return max(16, triton.next_power_of_2(n))


def check_triton_tile(name: str, size: int) -> None:
    """The Triton kernels use a block/page as one tile: a power of two >= 16."""
    if size < 16 or size & (size - 1):
        raise ValueError(f"the Triton kernel needs {name} to be a power of two >= 16, got {size} "
                         "(the torch reference takes any size)")


@register("block_sparse_attention", "triton")
def block_sparse_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_len: torch.Tensor,
    block_idx: torch.Tensor,
    block: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Triton block-sparse attention; same contract as :func:`block_sparse_attention`.

    Grid (B * H, ceil(S / block)); each program holds one query block and visits only the K key
    blocks listed in ``block_idx`` with a flash-attention online softmax.  ``block`` must be a
    power of two >= 16.
    """
    group = check_attention_shapes(q, k, v, kv_len)
    check_triton_tile("block", block)
    B, H, S, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    out = torch.empty_like(q)
    kv_len = kv_len.to(torch.int64).contiguous()
    grid = (B * H, cdiv(S, block))
    _block_sparse_kernel[grid](
        q, k, v, out, kv_len, block_idx, float(scale), S, block_idx.shape[-1], H, group,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *block_idx.stride(),
        D=D, BLOCK=block, BLOCK_D=tile_dim(D),
    )
    return out
