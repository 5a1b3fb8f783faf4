"""Attention over the runtime-managed KV cache: prefill, decode and speculative (tree) verify.

One op, ``attention(q, k, v, kv_len, scale, tree_mask=None, window=0, k_pos=None) -> out``:

- ``q``: (B, H, S, D) queries of the S new tokens (RoPE already applied);
- ``k``, ``v``: (B, Hkv, N, D) the cache; row ``b`` holds ``kv_len[b]`` valid entries, everything
  at ``j >= kv_len[b]`` is garbage (possibly NaN/inf) and never influences the result;
- ``kv_len``: (B,) int64, valid keys per row *including* the S new tokens, which are the last S
  valid keys ``[kv_len[b] - S, kv_len[b])``.  A row with ``kv_len[b] < S`` is left-padded: its
  first ``S - kv_len[b]`` queries sit at negative positions and see no key;
- GQA: query head ``h`` reads KV head ``h // (H // Hkv)``;
- visibility: causal, query ``s`` sees key ``j`` iff ``j <= kv_len[b] - S + s``; with
  ``tree_mask`` (B, S, S) bool, query ``s`` sees every past key ``j < kv_len[b] - S`` and new key
  ``t`` iff ``tree_mask[b, s, t]``;
- sliding window (``window > 0``, Gemma 3 / Mistral / Qwen2 sliding layers): additionally, a query
  at position ``p`` sees only keys at positions ``p - window < pos <= p`` (HF's
  ``sliding_window_overlay``: the query itself and the ``window - 1`` before it).  Positions are
  ``k_pos`` (B, Hkv, N) int64, the position of every cache slot per KV head (None: the slot index);
  the S new queries sit at the positions of the S new keys, ``k_pos[b, g, kv_len[b] - S + s]``, and
  a query at a negative slot (left padding) sees no key.  The past slots ``[0, kv_len[b] - S)`` hold
  ascending positions (they may skip some: token selection and KV compression keep a subset), so a
  query's window is one contiguous run of past slots, found by binary search; the new keys may be
  in any order (a speculative tree puts siblings at one position);
- a query that sees no key outputs zeros; ``out`` is (B, H, S, D) in ``q.dtype``, accumulated in fp32.

The torch reference runs on any device through ``scaled_dot_product_attention`` and never builds an
S x N mask for a whole head: uniform causal prefill uses the ``is_causal`` fast path, decode needs no
mask at all, every other case goes row by row in query chunks of :data:`Q_CHUNK`.  A windowed chunk
attends only to the slots from its earliest query's window start to its last key, so its mask is
at most Q_CHUNK x (window + Q_CHUNK) per head when positions are contiguous.  The Triton
kernel is a FlashAttention forward (Dao et al., 2022, "FlashAttention: Fast and Memory-Efficient
Exact Attention with IO-Awareness") with the online softmax of Milakov & Gimelshein (2018).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from accelc.kernels.dispatch import register

Q_CHUNK = 128
"""Queries per masked SDPA call in the torch reference: the boolean mask is at most Q_CHUNK x N."""


def check_attention_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: torch.Tensor,
                         tree_mask: torch.Tensor | None, window: int = 0, k_pos: torch.Tensor | None = None) -> None:
    """Raise ``ValueError`` unless the shapes follow the op's contract (see the module docstring).

    Args:
        q: (B, H, S, D). k, v: (B, Hkv, N, D). kv_len: (B,) int64. tree_mask: (B, S, S) bool or None.
        window: 0 (no window) or the sliding window. k_pos: (B, Hkv, N) int64 or None.
    """
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"attention: q must be (B, H, S, D) and k, v equal (B, Hkv, N, D); got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, H, S, D = q.shape
    if k.shape[0] != B or k.shape[3] != D or H % k.shape[1] != 0:
        raise ValueError(f"attention: k {tuple(k.shape)} does not fit q {tuple(q.shape)} "
                         "(same B and D, H a multiple of Hkv)")
    if kv_len.shape != (B,):
        raise ValueError(f"attention: kv_len must be ({B},), got {tuple(kv_len.shape)}")
    if tree_mask is not None and (tree_mask.shape != (B, S, S) or tree_mask.dtype != torch.bool):
        raise ValueError(f"attention: tree_mask must be bool ({B}, {S}, {S}), got "
                         f"{tree_mask.dtype} {tuple(tree_mask.shape)}")
    if window < 0:
        raise ValueError(f"attention: window must be >= 0 (0: no window), got {window}")
    if k_pos is not None and (k_pos.shape != k.shape[:3] or k_pos.dtype != torch.int64):
        raise ValueError(f"attention: k_pos must be int64 {tuple(k.shape[:3])} (B, Hkv, N), got "
                         f"{k_pos.dtype} {tuple(k_pos.shape)}")


# ----------------------------------------------------------------------------- torch reference


def _visible(c0: int, c1: int, n_keys: int, past: int, tree: torch.Tensor | None,
             device: torch.device) -> torch.Tensor:
    """Boolean mask (c1 - c0, n_keys): which of keys ``[0, n_keys)`` queries ``[c0, c1)`` see.

    Args:
        past: number of past keys of the row (``kv_len - S``, negative for left-padded rows).
        tree: (S, S) bool tree mask of the row, or None for causal.
    """
    if tree is None:
        j = torch.arange(n_keys, device=device)
        s = torch.arange(c0 + past, c1 + past, device=device)
        return j[None, :] <= s[:, None]
    new = tree[c0:c1, max(0, -past):]
    return torch.cat([new.new_ones(c1 - c0, max(0, past)), new], dim=1)


def _row_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int, scale: float,
                   tree: torch.Tensor | None, out: torch.Tensor) -> None:
    """Masked attention of one row (or of rows sharing ``past``), written into ``out``.

    A query whose mask row is all False gets zeros from SDPA itself (its safe softmax, torch >= 2.5,
    pinned by the tests); causal queries at negative positions are skipped and keep ``out``'s zeros.

    Args:
        q: (b, H, S, D). k, v: (b, Hkv, past + S, D) exactly the valid keys. out: (b, H, S, D).
        past: valid keys before the new ones (may be negative). tree: (S, S) bool or None.
    """
    S = q.shape[2]
    first = 0 if tree is not None else max(0, -past)     # causal queries before it see nothing
    for c0 in range(first, S, Q_CHUNK):
        c1 = min(S, c0 + Q_CHUNK)
        n_keys = k.shape[2] if tree is not None else past + c1
        mask = _visible(c0, c1, n_keys, past, tree, q.device)
        out[:, :, c0:c1] = F.scaled_dot_product_attention(q[:, :, c0:c1], k[:, :, :n_keys], v[:, :, :n_keys],
                                                          attn_mask=mask, scale=scale, enable_gqa=True)


def slot_positions(k: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, N) int64 positions equal to the slot index: ``k_pos`` of a cache filled in order."""
    B, hkv, N, _ = k.shape
    return torch.arange(N, device=k.device).expand(B, hkv, N)


def _window_start(k_pos: torch.Tensor, past: int, limit: torch.Tensor) -> int:
    """First past slot whose key lies inside some window: min over KV heads of the first slot
    ``j < past`` with ``k_pos[g, j] > limit[g]`` (``past`` if none).

    Args:
        k_pos: (Hkv, N) int64, ascending on ``[0, past)``. limit: (Hkv,) int64 the smallest
            ``query position - window`` of the chunk per KV head.
    """
    if past <= 0:
        return 0
    return min(int(torch.searchsorted(k_pos[g, :past], limit[g:g + 1], right=True)) for g in range(k_pos.shape[0]))


def _windowed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: torch.Tensor, scale: float,
                        tree_mask: torch.Tensor | None, window: int, k_pos: torch.Tensor) -> torch.Tensor:
    """Sliding-window attention, row by row in query chunks over the chunk's key span only.

    Args:
        q: (B, H, S, D). k, v: (B, Hkv, N, D). kv_len: (B,) int64. tree_mask: (B, S, S) bool or None.
        window: > 0. k_pos: (B, Hkv, N) int64 (module docstring).
    """
    B, H, S, _ = q.shape
    group = H // k.shape[1]
    out = torch.zeros_like(q)
    for b, n in enumerate(kv_len.tolist()):
        past = n - S
        tree = None if tree_mask is None else tree_mask[b]
        for c0 in range(max(0, -past), S, Q_CHUNK):      # queries at negative slots see nothing
            c1 = min(S, c0 + Q_CHUNK)
            q_pos = k_pos[b, :, past + c0:past + c1]                                  # (Hkv, m)
            lo = _window_start(k_pos[b], past, q_pos.min(dim=1).values - window)
            hi = n if tree is not None else past + c1
            j = torch.arange(lo, hi, device=q.device)
            if tree is None:
                base = j[None, :] <= torch.arange(c0 + past, c1 + past, device=q.device)[:, None]
            else:
                t = j - past
                base = (t < 0)[None, :] | tree[c0:c1, t.clamp(min=0)]
            inside = k_pos[b, :, lo:hi][:, None, :] > (q_pos - window)[:, :, None]  # (Hkv, m, T)
            mask = (base[None] & inside).repeat_interleave(group, 0)[None]             # (1, H, m, T)
            out[b:b + 1, :, c0:c1] = F.scaled_dot_product_attention(
                q[b:b + 1, :, c0:c1], k[b:b + 1, :, lo:hi], v[b:b + 1, :, lo:hi], attn_mask=mask, scale=scale,
                enable_gqa=True)
    return out


@register("attention", "torch")
def attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: torch.Tensor,
                    scale: float, tree_mask: torch.Tensor | None = None, window: int = 0,
                    k_pos: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference of the cache attention (contract in the module docstring).

    Args:
        q: (B, H, S, D). k, v: (B, Hkv, N, D). kv_len: (B,) int64. scale: softmax scale.
        tree_mask: (B, S, S) bool or None. window: sliding window (0: none).
        k_pos: (B, Hkv, N) int64 slot positions (None: the slot index); read only with a window.

    Returns:
        (B, H, S, D) in ``q.dtype``.
    """
    check_attention_args(q, k, v, kv_len, tree_mask, window, k_pos)
    if window > 0:
        return _windowed_attention(q, k, v, kv_len, scale, tree_mask, window,
                                   slot_positions(k) if k_pos is None else k_pos)
    S = q.shape[2]
    lens = kv_len.tolist()
    n = lens[0]
    if tree_mask is None and n >= S and lens.count(n) == len(lens):
        if S == 1:                                        # decode: every valid key is visible
            return F.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n], scale=scale, enable_gqa=True)
        if n == S:                                        # prefill from an empty cache
            return F.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n], is_causal=True,
                                                  scale=scale, enable_gqa=True)
        out = torch.empty_like(q)
        _row_attention(q, k[:, :, :n], v[:, :, :n], n - S, scale, None, out)
        return out
    out = torch.zeros_like(q)
    for b, n in enumerate(lens):
        if n > 0:
            tree = None if tree_mask is None else tree_mask[b]
            _row_attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], n - S, scale, tree, out[b:b + 1])
    return out


# ----------------------------------------------------------------------------- Triton


@triton.jit
def _attention_fwd(
    q_ptr, k_ptr, v_ptr, o_ptr, kv_len_ptr, tree_ptr, kpos_ptr,
    sq_b, sq_h, sq_s, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
    so_b, so_h, so_s, so_d, st_b, st_s, st_t, sp_b, sp_h, sp_n,
    S, D, HKV, qk_scale, window,
    GROUP: tl.constexpr, HAS_TREE: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program: KV head ``g`` of row ``b`` and BLOCK_M of its GROUP * S (query head, query) rows.

    Row ``r`` is query ``r % S`` of head ``g * GROUP + r // S``, so the K/V blocks of the KV head
    are read once for all the query heads of its group.  ``qk_scale`` is ``scale * log2(e)``.
    With HAS_WINDOW the key loop starts at the block holding the first past slot inside the
    earliest window of the program's queries (binary search over the ascending past positions).
    """
    pid_m = tl.program_id(0)
    b = tl.program_id(1) // HKV
    g = tl.program_id(1) % HKV
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < GROUP * S
    s = rows % S
    h = g * GROUP + rows // S
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    kv_len = tl.load(kv_len_ptr + b)
    past = kv_len - S

    q = tl.load(q_ptr + b * sq_b + h[:, None] * sq_h + s[:, None] * sq_s + d[None, :] * sq_d,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if HAS_TREE:
        hi = kv_len
    else:
        hi = tl.minimum(kv_len, past + tl.max(tl.where(row_ok, s, 0), axis=0) + 1)
    if HAS_WINDOW:
        kpos_base = kpos_ptr + b * sp_b + g * sp_h
        q_live = row_ok & (past + s >= 0)                   # a query at a negative slot sees nothing
        lim = tl.load(kpos_base + (past + s) * sp_n, mask=q_live, other=0) - window   # visible: pos > lim
        lim_min = tl.min(tl.where(q_live, lim, tl.full([BLOCK_M], 2**62, tl.int64)), axis=0)
        lo = past * 0
        top = tl.maximum(past, 0)
        while lo < top:                                      # first past slot with position > lim_min
            mid = (lo + top) // 2
            right = tl.load(kpos_base + mid * sp_n) <= lim_min
            lo = tl.where(right, mid + 1, lo)
            top = tl.where(right, top, mid)
        first = (lo // BLOCK_N) * BLOCK_N
    else:
        first = 0

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(first, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        key_ok = j < kv_len
        kv_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + b * sk_b + g * sk_h + j[:, None] * sk_n + d[None, :] * sk_d, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + b * sv_b + g * sv_h + j[:, None] * sv_n + d[None, :] * sv_d, mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if HAS_TREE:
            t = j - past
            is_new = t >= 0
            tm = tl.load(tree_ptr + b * st_b + s[:, None] * st_s + t[None, :] * st_t,
                         mask=row_ok[:, None] & (is_new & key_ok)[None, :], other=0)
            visible = key_ok[None, :] & ((~is_new)[None, :] | (tm != 0))
        else:
            visible = key_ok[None, :] & (j[None, :] <= (past + s)[:, None])
        if HAS_WINDOW:
            k_pos = tl.load(kpos_base + j * sp_n, mask=key_ok, other=0)
            visible = visible & q_live[:, None] & (k_pos[None, :] > lim[:, None])
        qk = tl.where(visible & row_ok[:, None], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptr + b * so_b + h[:, None] * so_h + s[:, None] * so_s + d[None, :] * so_d,
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@register("attention", "triton")
def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: torch.Tensor,
                     scale: float, tree_mask: torch.Tensor | None = None, window: int = 0,
                     k_pos: torch.Tensor | None = None) -> torch.Tensor:
    """Triton cache attention, same contract and signature as :func:`attention_torch`.

    Args:
        q: (B, H, S, D). k, v: (B, Hkv, N, D), any strides. kv_len: (B,) int64.
        scale: softmax scale. tree_mask: (B, S, S) bool or None. window: sliding window (0: none).
        k_pos: (B, Hkv, N) int64 slot positions (None: the slot index); read only with a window.

    Returns:
        (B, H, S, D) in ``q.dtype``.
    """
    check_attention_args(q, k, v, kv_len, tree_mask, window, k_pos)
    B, H, S, D = q.shape
    hkv = k.shape[1]
    group = H // hkv
    out = torch.empty_like(q)
    tree = tree_mask.view(torch.uint8) if tree_mask is not None else kv_len   # kv_len: unused placeholder
    st = tree.stride() if tree_mask is not None else (0, 0, 0)
    if window > 0 and k_pos is None:
        k_pos = slot_positions(k)
    pos = k_pos if window > 0 else kv_len                                       # kv_len: unused placeholder
    sp = pos.stride() if window > 0 else (0, 0, 0)
    block_m = min(64, max(16, triton.next_power_of_2(group * S)))
    grid = (triton.cdiv(group * S, block_m), B * hkv)
    _attention_fwd[grid](
        q, k, v, out, kv_len, tree, pos,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *st, *sp,
        S, D, hkv, scale * 1.4426950408889634, window,
        GROUP=group, HAS_TREE=tree_mask is not None, HAS_WINDOW=window > 0,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=64, BLOCK_D=max(16, triton.next_power_of_2(D)),
    )
    return out
