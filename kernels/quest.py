"""Quest: query-aware page selection for decode, and attention over the selected pages.

Tang et al., 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference".  The
cache is cut into pages of ``page`` consecutive positions; the runtime keeps, per KV head and page,
the element-wise min and max of the page's keys.  For a query ``q`` every key ``x`` of a page has
``q . x = sum_d q_d x_d <= sum_d max(q_d * kmin_d, q_d * kmax_d)``, an upper bound that needs no
key.  Decode ranks pages by the bound, keeps the top pages (always the page holding the newest
token) and attends to them only; the Triton kernel is flash-decoding (split over the selected
pages, then a log-sum-exp merge).

GQA aggregation: pages are chosen per KV head (all query heads of a group read the same pages),
ranked by the **max** of the bound over the group's query heads and over the S queries — a page is
kept when *some* query that reads it could score high on it, and the max of upper bounds is itself
an upper bound of every score in the group.

Tensor conventions (q, k, v, kv_len, fp32 accumulation, zeros for a query without visible keys, no
leak of garbage beyond ``kv_len``) are those of :mod:`accelc.kernels.block_sparse`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from accelc.kernels.block_sparse import (
    attend_tile,
    cdiv,
    check_attention_shapes,
    check_triton_tile,
    gather_positions,
    masked_gathered_attention,
    query_positions,
    sorted_selection,
    tile_dim,
)
from accelc.kernels.dispatch import register

# ----------------------------------------------------------------------------------------------
# Page metadata (kept by the runtime cache)
# ----------------------------------------------------------------------------------------------


@register("quest_page_bounds", "torch")
def page_bounds(k: torch.Tensor, kv_len: torch.Tensor, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-page element-wise key min and max over the valid keys.

    k: (B, Hkv, N, D); kv_len: (B,) int64.  Returns (kmin, kmax), each (B, Hkv, ceil(N / page), D)
    float32; a page without valid keys holds +inf (kmin) and -inf (kmax).
    """
    if page < 1:
        raise ValueError(f"page must be >= 1, got {page}")
    B, Hkv, N, D = k.shape
    P = cdiv(N, page)
    padded = torch.nn.functional.pad(k.float(), (0, 0, 0, P * page - N))
    valid = (torch.arange(P * page, device=k.device)[None, :] < kv_len[:, None])[:, None, :, None]
    kmin = torch.where(valid, padded, float("inf")).view(B, Hkv, P, page, D).amin(dim=3)
    kmax = torch.where(valid, padded, float("-inf")).view(B, Hkv, P, page, D).amax(dim=3)
    return kmin, kmax


@register("quest_update_page_bounds", "torch")
def update_page_bounds(
    kmin: torch.Tensor, kmax: torch.Tensor, k_new: torch.Tensor, start: torch.Tensor, page: int
) -> None:
    """Fold keys appended at positions ``[start_b, start_b + S)`` into the page bounds, in place.

    kmin, kmax: (B, Hkv, P, D) float32 from :func:`page_bounds` over the first ``start_b`` keys;
    k_new: (B, Hkv, S, D) the appended keys; start: (B,) int64.  Afterwards the bounds equal
    ``page_bounds`` recomputed over ``start_b + S`` keys.  Needs ``start_b + S <= P * page``.
    """
    B, Hkv, S, D = k_new.shape
    pos = start.to(torch.int64)[:, None] + torch.arange(S, device=k_new.device)[None, :]  # (B, S)
    pages = torch.div(pos, page, rounding_mode="floor")[:, None, :, None].expand(B, Hkv, S, D)
    kmin.scatter_reduce_(2, pages, k_new.to(kmin.dtype), reduce="amin", include_self=True)
    kmax.scatter_reduce_(2, pages, k_new.to(kmax.dtype), reduce="amax", include_self=True)


# ----------------------------------------------------------------------------------------------
# Page selection
# ----------------------------------------------------------------------------------------------


def pages_in_use(kv_len: torch.Tensor, page: int) -> torch.Tensor:
    """(B,) int64: pages holding at least one valid key, ``ceil(kv_len / page)``."""
    return torch.div(kv_len.to(torch.int64) + page - 1, page, rounding_mode="floor")


def page_upper_bounds(
    q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, kv_len: torch.Tensor, page: int
) -> torch.Tensor:
    """Quest bound ``sum_d max(q_d kmin_d, q_d kmax_d)`` of every query head and page (Tang et al., 2024).

    q: (B, H, S, D); kmin, kmax: (B, Hkv, P, D); kv_len: (B,).  Returns (B, H, S, P) float32, at
    least ``q . x`` for every valid key ``x`` of the page; ``-inf`` for pages not in use.
    """
    B, H, S, D = q.shape
    Hkv, P = kmin.shape[1], kmin.shape[2]
    qg = q.float().reshape(B, Hkv, (H // Hkv) * S, D)
    # max(q_d kmin_d, q_d kmax_d) = max(q_d, 0) kmax_d + min(q_d, 0) kmin_d as kmin <= kmax: two matmuls
    bound = qg.clamp_min(0) @ kmax.transpose(-1, -2) + qg.clamp_max(0) @ kmin.transpose(-1, -2)
    bound = bound.view(B, H, S, P)  # NaN / inf on sentinel pages, replaced below
    in_use = torch.arange(P, device=q.device)[None, :] < pages_in_use(kv_len, page)[:, None]  # (B, P)
    return torch.where(in_use[:, None, None, :], bound, float("-inf"))


@register("quest_select", "torch")
def quest_select(
    q: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    kv_len: torch.Tensor,
    page: int,
    top_pages: int,
) -> torch.Tensor:
    """Top pages per KV head by the Quest bound, max-aggregated over the group's heads and queries.

    q: (B, H, S, D); kmin, kmax: (B, Hkv, P, D); kv_len: (B,) int64.  The page holding the newest
    token (``kv_len - 1``) is always kept.  Returns page_idx (B, Hkv, K) int32 ascending, padded
    with -1, ``K = min(top_pages, P)``; row ``b`` holds ``min(top_pages, ceil(kv_len_b / page))``
    pages.
    """
    if top_pages < 1:
        raise ValueError(f"top_pages must be >= 1, got {top_pages}")
    B, H, S, D = q.shape
    Hkv, P = kmin.shape[1], kmin.shape[2]
    lens = kv_len.tolist()
    if len(set(lens)) == 1 and lens[0] > 0 and cdiv(lens[0], page) >= top_pages:
        # every row has the same pages in use, at least top_pages of them (decode of one prompt, or
        # of equal-length rows): bound only those pages, force the newest, one topk -- a third of
        # the small ops of the general path, which matters once per layer and token on a CPU
        used = cdiv(lens[0], page)
        qg = q.float().reshape(B, Hkv, (H // Hkv) * S, D)
        bound = qg.clamp_min(0) @ kmax[:, :, :used].transpose(-1, -2) + qg.clamp_max(0) @ kmin[:, :, :used].transpose(-1, -2)
        score = bound.amax(dim=2)  # (B, Hkv, used)
        score[:, :, used - 1] = float("inf")
        return score.topk(top_pages, dim=-1).indices.sort(dim=-1).values.to(torch.int32)
    bound = page_upper_bounds(q, kmin, kmax, kv_len, page)  # (B, H, S, P)
    score = bound.view(B, Hkv, (H // Hkv) * S, P).amax(dim=2)  # (B, Hkv, P)
    newest = torch.div(kv_len.to(torch.int64) - 1, page, rounding_mode="floor")
    is_newest = (torch.arange(P, device=q.device)[None, :] == newest[:, None])[:, None, :]
    rank = torch.where(is_newest, float("inf"), score)
    count = pages_in_use(kv_len, page).clamp_max(top_pages)[:, None].expand(B, Hkv)
    return sorted_selection(rank, count, min(top_pages, P))


# ----------------------------------------------------------------------------------------------
# Attention over the selected pages: torch reference
# ----------------------------------------------------------------------------------------------


@register("paged_sparse_attention", "torch")
def paged_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_len: torch.Tensor,
    page_idx: torch.Tensor,
    page: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention restricted to the keys of the selected pages, causal within (torch reference).

    q: (B, H, S, D); k, v: (B, Hkv, N, D); kv_len: (B,) int64; page_idx: (B, Hkv, K) int32 distinct
    pages (-1 = none) read by every query head of the KV head's group.  Gathers K * page keys per
    KV head; returns (B, H, S, D) in ``q.dtype``.
    """
    group = check_attention_shapes(q, k, v, kv_len)
    B, H, S, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    pos, valid = gather_positions(page_idx, page, kv_len)  # (B, Hkv, T)
    q_pos = query_positions(kv_len, S)[:, None, None, :, None]  # (B, 1, 1, S, 1)
    visible = valid[:, :, None, None, :] & (pos[:, :, None, None, :] <= q_pos)  # (B, Hkv, 1, S, T)
    if not (k.is_contiguous() and v.is_contiguous()):
        b_ix = torch.arange(B, device=q.device)[:, None, None]
        h_ix = torch.arange(Hkv, device=q.device)[None, :, None]
        keys, values = k[b_ix, h_ix, pos], v[b_ix, h_ix, pos]  # (B, Hkv, T, D)
        out = masked_gathered_attention(q.reshape(B, Hkv, group, S, D), keys.unsqueeze(2), values.unsqueeze(2),
                                        visible, scale)
        return out.view(B, H, S, D).to(q.dtype)
    # one flat row gather per tensor (advanced indexing over three dims is ~10x slower on CPU);
    # invalid slots read slot 0, a real key unless the row is empty (an empty row's output is zeros)
    T = pos.shape[-1]
    rows = (torch.arange(B * Hkv, device=q.device).view(B, Hkv, 1) * N + pos).reshape(-1)
    keys = k.reshape(-1, D).index_select(0, rows).view(B, Hkv, T, D).float()
    values = v.reshape(-1, D).index_select(0, rows).view(B, Hkv, T, D).float()
    # (group * S) query rows per KV head against its T keys: one plain batched matmul
    scores = torch.matmul(q.reshape(B, Hkv, group * S, D).float(), keys.transpose(-1, -2)) * scale
    scores = scores.view(B, Hkv, group, S, T).masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a query without visible keys -> zeros
    out = torch.matmul(probs.view(B, Hkv, group * S, T), values)
    out = torch.where((kv_len > 0).view(B, 1, 1, 1), out, 0.0)
    return out.view(B, H, S, D).to(q.dtype)


# ----------------------------------------------------------------------------------------------
# Triton: flash-decoding over the selected pages
# ----------------------------------------------------------------------------------------------


@triton.jit
def _paged_partial_kernel(
    Q, K, V, KV_LEN, IDX, M_PART, L_PART, ACC_PART, scale,
    S, group, Hkv, n_sel, pages_per_split,
    sqb, sqh, sqs, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sib, sih, sik,
    D: tl.constexpr, PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Partial softmax state of one (row, KV head, row tile, split of the selected pages).

    The query rows of a KV head are its group's (head, query) pairs, row r = (h - hk * group) * S + s,
    so a page is loaded once for the whole group.
    """
    pid = tl.program_id(0)
    tile = tl.program_id(1)
    split = tl.program_id(2)
    n_split = tl.num_programs(2)
    b = (pid // Hkv).to(tl.int64)
    hk = (pid % Hkv).to(tl.int64)
    n_rows = group * S
    kv_len = tl.load(KV_LEN + b)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = rows < n_rows
    head = hk * group + rows // S
    s = rows % S
    offs_n = tl.arange(0, PAGE)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(Q + b * sqb + head[:, None] * sqh + s[:, None] * sqs + offs_d[None, :] * sqd,
                mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    q_pos = kv_len - S + s
    m_i = tl.full([BLOCK_M], -1e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    first = split * pages_per_split
    last = tl.minimum(first + pages_per_split, n_sel)
    for i in range(first, last):
        pg = tl.load(IDX + b * sib + hk * sih + i * sik).to(tl.int64)
        k_pos = pg * PAGE + offs_n
        k_ok = (k_pos >= 0) & (k_pos < kv_len)  # pg = -1 gives negative positions
        ld_mask = k_ok[:, None] & d_ok[None, :]
        keys = tl.load(K + b * skb + hk * skh + k_pos[:, None] * skn + offs_d[None, :] * skd,
                       mask=ld_mask, other=0.0)
        values = tl.load(V + b * svb + hk * svh + k_pos[:, None] * svn + offs_d[None, :] * svd,
                         mask=ld_mask, other=0.0)
        visible = k_ok[None, :] & (k_pos[None, :] <= q_pos[:, None]) & r_ok[:, None]
        m_i, l_i, acc = attend_tile(q, keys, values, visible, m_i, l_i, acc, scale)
    part = (pid * n_split + split) * n_rows + rows  # index into (B * Hkv, n_split, n_rows)
    tl.store(M_PART + part, m_i, mask=r_ok)
    tl.store(L_PART + part, l_i, mask=r_ok)
    tl.store(ACC_PART + part[:, None] * D + offs_d[None, :], acc, mask=r_ok[:, None] & d_ok[None, :])


@triton.jit
def _paged_merge_kernel(
    M_PART, L_PART, ACC_PART, O, S, group, Hkv, n_split,
    sob, soh, sos, sod,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Log-sum-exp merge of the splits' partial states into the output rows of one tile."""
    pid = tl.program_id(0)
    tile = tl.program_id(1)
    b = (pid // Hkv).to(tl.int64)
    hk = (pid % Hkv).to(tl.int64)
    n_rows = group * S
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = rows < n_rows
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_all = tl.full([BLOCK_M], -1e30, dtype=tl.float32)
    for sp in range(n_split):
        m_all = tl.maximum(m_all, tl.load(M_PART + (pid * n_split + sp) * n_rows + rows, mask=r_ok, other=-1e30))
    l_all = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for sp in range(n_split):
        part = (pid * n_split + sp) * n_rows + rows
        w = tl.exp(tl.load(M_PART + part, mask=r_ok, other=-1e30) - m_all)
        l_all += w * tl.load(L_PART + part, mask=r_ok, other=0.0)
        acc += w[:, None] * tl.load(ACC_PART + part[:, None] * D + offs_d[None, :],
                                    mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    out = acc / tl.where(l_all > 0, l_all, 1.0)[:, None]
    head = hk * group + rows // S
    s = rows % S
    tl.store(O + b * sob + head[:, None] * soh + s[:, None] * sos + offs_d[None, :] * sod,
             out.to(O.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])


_TARGET_SPLITS = 16  # enough programs per (row, KV head) to fill an SM-rich GPU at batch 1


@register("paged_sparse_attention", "triton")
def paged_sparse_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_len: torch.Tensor,
    page_idx: torch.Tensor,
    page: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Triton flash-decoding over the selected pages; same contract as :func:`paged_sparse_attention`.

    Pass 1, grid (B * Hkv, row tiles, splits): each program runs an online softmax over its share
    of the K selected pages for a tile of the group's (head, query) rows.  Pass 2 merges the splits.
    ``page`` must be a power of two >= 16.
    """
    group = check_attention_shapes(q, k, v, kv_len)
    check_triton_tile("page", page)
    B, H, S, D = q.shape
    Hkv = k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    n_sel = page_idx.shape[-1]
    pages_per_split = max(1, cdiv(n_sel, _TARGET_SPLITS))
    n_split = max(1, cdiv(n_sel, pages_per_split))
    n_rows = group * S
    block_m = tile_dim(min(n_rows, 64))
    m_part = torch.empty(B * Hkv, n_split, n_rows, dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    acc_part = torch.empty(B * Hkv, n_split, n_rows, D, dtype=torch.float32, device=q.device)
    kv_len = kv_len.to(torch.int64).contiguous()
    tiles = cdiv(n_rows, block_m)
    _paged_partial_kernel[(B * Hkv, tiles, n_split)](
        q, k, v, kv_len, page_idx, m_part, l_part, acc_part, float(scale),
        S, group, Hkv, n_sel, pages_per_split,
        *q.stride(), *k.stride(), *v.stride(), *page_idx.stride(),
        D=D, PAGE=page, BLOCK_M=block_m, BLOCK_D=tile_dim(D),
    )
    out = torch.empty_like(q)
    _paged_merge_kernel[(B * Hkv, tiles)](
        m_part, l_part, acc_part, out, S, group, Hkv, n_split, *out.stride(),
        D=D, BLOCK_M=block_m, BLOCK_D=tile_dim(D),
    )
    return out
