"""Token importance from the attention of the last W queries, and the top-k selection built on it.

Used by FastKV token-selective propagation (Jo et al., 2025, "FastKV: KV Cache Compression for Fast
Long-Context Processing with Token-Selective Propagation") and by SnapKV (Li et al., 2024, "SnapKV:
LLM Knows What You are Looking for Before Generation") / PyramidKV (Cai et al., 2024) cache
compression.  ``window_scores(q_win, k, kv_len, scale, kernel, pooling) -> scores``:

- ``q_win``: (B, H, W, D) the last W queries of each row; query ``w`` of row ``b`` sits at
  position ``kv_len[b] - W + w``.  ``k``: (B, Hkv, N, D), garbage beyond ``kv_len[b]`` ignored;
- ``p[b, h, w, j]``: causal softmax (keys ``j <= kv_len[b] - W + w``) of ``scale * q . k``;
- ``raw[b, g, j]``: sum of ``p`` over the window queries and over the query heads of KV group ``g``,
  for ``j`` in the prefix ``[0, kv_len[b] - W)``;
- pooled along the prefix with a centered 1-D window of odd size ``kernel``, stride 1: ``"max"``
  (padding is -inf) or ``"avg"`` (zero padding, divided by ``kernel``); nothing outside the prefix
  enters a pool;
- ``scores``: (B, Hkv, N) float32, pooled values on the prefix, ``+inf`` on the window
  ``[kv_len[b] - W, kv_len[b])`` (always kept), ``-inf`` from ``kv_len[b]`` on.  When
  ``kv_len[b] <= W`` every valid key is window.

The torch reference materialises (B, H, W, N) probabilities, never N x N.  The Triton version runs
three passes: softmax statistics per window query, probabilities summed per key block, pooling.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from accelc.kernels.dispatch import register

POOLINGS = ("max", "avg")


def check_window_args(q_win: torch.Tensor, k: torch.Tensor, kv_len: torch.Tensor, kernel: int, pooling: str) -> None:
    """Raise ``ValueError`` unless the arguments follow the op's contract (module docstring).

    Args:
        q_win: (B, H, W, D). k: (B, Hkv, N, D). kv_len: (B,) int64. kernel: odd >= 1. pooling: max | avg.
    """
    if q_win.dim() != 4 or k.dim() != 4 or k.shape[0] != q_win.shape[0] or k.shape[3] != q_win.shape[3] \
            or q_win.shape[1] % k.shape[1] != 0:
        raise ValueError(f"window_scores: q_win (B, H, W, D) {tuple(q_win.shape)} does not fit "
                         f"k (B, Hkv, N, D) {tuple(k.shape)} (same B and D, H a multiple of Hkv)")
    if kv_len.shape != (q_win.shape[0],):
        raise ValueError(f"window_scores: kv_len must be ({q_win.shape[0]},), got {tuple(kv_len.shape)}")
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"window_scores: kernel must be an odd integer >= 1, got {kernel}")
    if pooling not in POOLINGS:
        raise ValueError(f"window_scores: pooling must be one of {POOLINGS}, got {pooling!r}")


# ----------------------------------------------------------------------------- torch reference


def _pool(raw: torch.Tensor, prefix: torch.Tensor, kernel: int, pooling: str) -> torch.Tensor:
    """Pool ``raw`` (B, Hkv, n) along the last dim inside each row's prefix (B,) -> (B, Hkv, n).

    Entries at ``j >= prefix[b]`` are replaced by the padding value first, so they never leak in.
    """
    inside = torch.arange(raw.shape[-1], device=raw.device)[None, None, :] < prefix[:, None, None]
    if pooling == "max":
        return F.max_pool1d(torch.where(inside, raw, float("-inf")), kernel, stride=1, padding=kernel // 2)
    return F.avg_pool1d(torch.where(inside, raw, 0.0), kernel, stride=1, padding=kernel // 2,
                        count_include_pad=True)


def _finalize(pooled: torch.Tensor, kv_len: torch.Tensor, prefix: torch.Tensor, n_out: int) -> torch.Tensor:
    """Scores (B, Hkv, n_out): ``pooled`` (B, Hkv, n <= n_out) on the prefix, +inf window, -inf past kv_len."""
    j = torch.arange(n_out, device=pooled.device)[None, None, :]
    tail = torch.where(j < kv_len[:, None, None], float("inf"), float("-inf"))
    pooled = F.pad(pooled, (0, n_out - pooled.shape[-1]))
    return torch.where(j < prefix[:, None, None], pooled, tail)


@register("window_scores", "torch")
def window_scores_torch(q_win: torch.Tensor, k: torch.Tensor, kv_len: torch.Tensor, scale: float,
                        kernel: int, pooling: str) -> torch.Tensor:
    """Torch reference of the window-query token scores (contract in the module docstring).

    Args:
        q_win: (B, H, W, D). k: (B, Hkv, N, D). kv_len: (B,) int64. scale: softmax scale.
        kernel: odd pooling window. pooling: "max" or "avg".

    Returns:
        (B, Hkv, N) float32.
    """
    check_window_args(q_win, k, kv_len, kernel, pooling)
    B, H, W, D = q_win.shape
    hkv, N = k.shape[1], k.shape[2]
    n = max(1, int(kv_len.max()))
    kv_len = kv_len.to(q_win.device)
    prefix = (kv_len - W).clamp(min=0)
    logits = torch.matmul(q_win.float().reshape(B, hkv, (H // hkv) * W, D) * scale,
                          k[:, :, :n].float().transpose(-1, -2)).view(B, hkv, H // hkv, W, n)
    pos = kv_len[:, None] - W + torch.arange(W, device=q_win.device)          # (B, W)
    visible = torch.arange(n, device=q_win.device)[None, None, :] <= pos[:, :, None]
    probs = torch.softmax(logits.masked_fill(~visible[:, None, None], float("-inf")), dim=-1)
    raw = probs.sum(dim=(2, 3))                                              # (B, Hkv, n)
    return _finalize(_pool(raw, prefix, kernel, pooling), kv_len, prefix, N)


# ----------------------------------------------------------------------------- Triton


@triton.jit
def _window_stats(
    q_ptr, k_ptr, kv_len_ptr, m_ptr, l_ptr,
    sq_b, sq_h, sq_w, sq_d, sk_b, sk_h, sk_n, sk_d,
    W, D, HKV, qk_scale,
    GROUP: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Pass 1: the causal softmax max ``m`` (log2 domain) and denominator ``l`` of every window query.

    One program: KV head ``g`` of row ``b`` and BLOCK_M of its GROUP * W rows (row ``r`` is query
    ``r % W`` of head ``g * GROUP + r // W``); ``m``/``l`` are (B, Hkv, GROUP * W) contiguous.
    """
    pid_m = tl.program_id(0)
    b = tl.program_id(1) // HKV
    g = tl.program_id(1) % HKV
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < GROUP * W
    w = rows % W
    h = g * GROUP + rows // W
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    kv_len = tl.load(kv_len_ptr + b)
    pos = kv_len - W + w
    q = tl.load(q_ptr + b * sq_b + h[:, None] * sq_h + w[:, None] * sq_w + d[None, :] * sq_d,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, kv_len, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        k = tl.load(k_ptr + b * sk_b + g * sk_h + j[:, None] * sk_n + d[None, :] * sk_d,
                    mask=(j < kv_len)[:, None] & d_ok[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        qk = tl.where((j[None, :] <= pos[:, None]) & row_ok[:, None], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(qk - m_safe[:, None]), axis=1)
        m_i = m_new
    out = (b * HKV + g) * GROUP * W + rows
    tl.store(m_ptr + out, m_i, mask=row_ok)
    tl.store(l_ptr + out, l_i, mask=row_ok)


@triton.jit
def _window_raw(
    q_ptr, k_ptr, kv_len_ptr, m_ptr, l_ptr, raw_ptr,
    sq_b, sq_h, sq_w, sq_d, sk_b, sk_h, sk_n, sk_d,
    W, D, N, HKV, qk_scale,
    GROUP: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Pass 2: ``raw[b, g, j]`` for one block of prefix keys, summed over all GROUP * W window rows.

    Every prefix key is visible to every window query, so ``p = exp2(qk - m) / l`` needs no causal mask.
    ``raw`` is (B, Hkv, N) contiguous; entries outside the prefix are left unwritten.
    """
    b = tl.program_id(1) // HKV
    g = tl.program_id(1) % HKV
    prefix = tl.maximum(tl.load(kv_len_ptr + b) - W, 0)
    j = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    if tl.program_id(0) * BLOCK_N < prefix:
        key_ok = j < prefix
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        k = tl.load(k_ptr + b * sk_b + g * sk_h + j[:, None] * sk_n + d[None, :] * sk_d,
                    mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.zeros([BLOCK_N], tl.float32)
        for r0 in range(0, GROUP * W, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)
            row_ok = rows < GROUP * W
            w = rows % W
            h = g * GROUP + rows // W
            q = tl.load(q_ptr + b * sq_b + h[:, None] * sq_h + w[:, None] * sq_w + d[None, :] * sq_d,
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            stat = (b * HKV + g) * GROUP * W + rows
            m = tl.load(m_ptr + stat, mask=row_ok, other=0.0)
            l = tl.load(l_ptr + stat, mask=row_ok, other=1.0)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            p = tl.exp2(qk - m[:, None]) / l[:, None]
            acc += tl.sum(tl.where(row_ok[:, None] & key_ok[None, :], p, 0.0), axis=0)
        tl.store(raw_ptr + (b * HKV + g) * N + j, acc, mask=key_ok)


@triton.jit
def _window_pool(
    raw_ptr, out_ptr, kv_len_ptr, W, N, HKV,
    KERNEL: tl.constexpr, IS_MAX: tl.constexpr, BLOCK: tl.constexpr,
):
    """Pass 3: pool ``raw`` inside the prefix and write the final (B, Hkv, N) scores (+inf window, -inf tail)."""
    b = tl.program_id(1) // HKV
    row = raw_ptr + tl.program_id(1) * N
    kv_len = tl.load(kv_len_ptr + b)
    prefix = tl.maximum(kv_len - W, 0)
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if IS_MAX:
        pooled = tl.full([BLOCK], float("-inf"), tl.float32)
    else:
        pooled = tl.zeros([BLOCK], tl.float32)
    for off in tl.static_range(KERNEL):
        jj = j + off - KERNEL // 2
        inside = (jj >= 0) & (jj < prefix)
        if IS_MAX:
            pooled = tl.maximum(pooled, tl.load(row + jj, mask=inside, other=float("-inf")))
        else:
            pooled += tl.load(row + jj, mask=inside, other=0.0)
    if not IS_MAX:
        pooled = pooled / KERNEL
    tail = tl.where(j < kv_len, float("inf"), float("-inf"))
    tl.store(out_ptr + tl.program_id(1) * N + j, tl.where(j < prefix, pooled, tail), mask=j < N)


@register("window_scores", "triton")
def window_scores_triton(q_win: torch.Tensor, k: torch.Tensor, kv_len: torch.Tensor, scale: float,
                         kernel: int, pooling: str) -> torch.Tensor:
    """Triton window-query token scores, same contract and signature as :func:`window_scores_torch`.

    Args:
        q_win: (B, H, W, D). k: (B, Hkv, N, D), any strides. kv_len: (B,) int64. scale: softmax scale.
        kernel: odd pooling window. pooling: "max" or "avg".

    Returns:
        (B, Hkv, N) float32.
    """
    check_window_args(q_win, k, kv_len, kernel, pooling)
    B, H, W, D = q_win.shape
    hkv, N = k.shape[1], k.shape[2]
    group = H // hkv
    stats = torch.empty(2, B, hkv, group * W, dtype=torch.float32, device=q_win.device)
    raw = torch.empty(B, hkv, N, dtype=torch.float32, device=q_win.device)
    out = torch.empty_like(raw)
    block_m = min(64, max(16, triton.next_power_of_2(group * W)))
    common = dict(GROUP=group, PRECISION="ieee" if q_win.dtype == torch.float32 else "tf32",
                  BLOCK_M=block_m, BLOCK_N=64, BLOCK_D=max(16, triton.next_power_of_2(D)))
    strides = (*q_win.stride(), *k.stride())
    qk_scale = scale * 1.4426950408889634
    _window_stats[(triton.cdiv(group * W, block_m), B * hkv)](
        q_win, k, kv_len, stats[0], stats[1], *strides, W, D, hkv, qk_scale, **common)
    _window_raw[(triton.cdiv(N, 64), B * hkv)](
        q_win, k, kv_len, stats[0], stats[1], raw, *strides, W, D, N, hkv, qk_scale, **common)
    _window_pool[(triton.cdiv(N, 256), B * hkv)](
        raw, out, kv_len, W, N, hkv, KERNEL=kernel, IS_MAX=pooling == "max", BLOCK=256)
    return out


@register("select_topk", "torch")
def select_topk(scores: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Positions of the ``count[b]`` best scores of every (row, group), sorted ascending by position.

    Ties go to the lower position (stable descending sort).  Rows keep different counts; the
    output is padded to ``max(count)`` by repeating the row's last kept (largest) position, or 0 when
    ``count[b] == 0``, so a gather with it stays in bounds and callers mask by ``count``.

    Args:
        scores: (B, G, N) float, e.g. from ``window_scores`` (+inf = always keep, -inf = invalid).
        count: (B,) int64, per row at most the number of entries above -inf.

    Returns:
        (B, G, max(count)) int64.
    """
    B, G, _ = scores.shape
    if count.shape != (B,):
        raise ValueError(f"select_topk: count must be ({B},), got {tuple(count.shape)}")
    K = int(count.max()) if B else 0
    if K == 0:
        return torch.zeros(B, G, 0, dtype=torch.int64, device=scores.device)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :K]
    count = count.to(scores.device)
    keep = torch.arange(K, device=scores.device)[None, None, :] < count[:, None, None]
    chosen = torch.sort(torch.where(keep, order, scores.shape[-1]), dim=-1).values
    last = chosen.gather(-1, (count - 1).clamp(min=0)[:, None, None].expand(B, G, 1))
    return torch.where(keep, chosen, torch.where(count[:, None, None] > 0, last, 0))
