"""Attention over the runtime-managed KV cache: prefill, decode and speculative (tree) verify.

One op, ``attention(q, k, v, kv_len, scale, tree_mask=None) -> out``:

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
- a query that sees no key outputs zeros; ``out`` is (B, H, S, D) in ``q.dtype``, accumulated in fp32.

The torch reference runs on any device through ``scaled_dot_product_attention`` and never builds an
S x N mask for a whole head: uniform causal prefill uses the ``is_causal`` fast path, decode needs no
mask at all, every other case goes row by row in query chunks of :data:`Q_CHUNK`.  The Triton
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
                         tree_mask: torch.Tensor | None) -> None:
    """Raise ``ValueError`` unless the shapes follow the op's contract (see the module docstring).

    Args:
        q: (B, H, S, D). k, v: (B, Hkv, N, D). kv_len: (B,) int64. tree_mask: (B, S, S) bool or None.
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


@register("attention", "torch")
def attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: torch.Tensor,
                    scale: float, tree_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference of the cache attention (contract in the module docstring).

    Args:
        q: (B, H, S, D). k, v: (B, Hkv, N, D). kv_len: (B,) int64. scale: softmax scale.
        tree_mask: (B, S, S) bool or None.

    Returns:
        (B, H, S, D) in ``q.dtype``.
    """
    check_attention_args(q, k, v, kv_len, tree_mask)
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
    q_ptr, k_ptr, v_ptr, o_ptr, kv_len_ptr, tree_ptr,
    sq_b, sq_h, sq_s, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
    so_b, so_h, so_s, so_d, st_b, st_s, st_t,
    S, D, HKV, qk_scale,
    GROUP: tl.constexpr, HAS_TREE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program: KV head ``g`` of row ``b`` and BLOCK_M of its GROUP * S (query head, query) rows.

    Row ``r`` is query ``r % S`` of head ``g * GROUP + r // S``, so the K/V blocks of the KV head
    are read once for all the query heads of its group.  ``qk_scale`` is ``scale * log2(e)``.
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

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, hi, BLOCK_N):
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
                     scale: float, tree_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Triton cache attention, same contract and signature as :func:`attention_torch`.

    Args:
        q: (B, H, S, D). k, v: (B, Hkv, N, D), any strides. kv_len: (B,) int64.
        scale: softmax scale. tree_mask: (B, S, S) bool or None.

    Returns:
        (B, H, S, D) in ``q.dtype``.
    """
    check_attention_args(q, k, v, kv_len, tree_mask)
    B, H, S, D = q.shape
    hkv = k.shape[1]
    group = H // hkv
    out = torch.empty_like(q)
    tree = tree_mask.view(torch.uint8) if tree_mask is not None else kv_len   # kv_len: unused placeholder
    st = tree.stride() if tree_mask is not None else (0, 0, 0)
    block_m = min(64, max(16, triton.next_power_of_2(group * S)))
    grid = (triton.cdiv(group * S, block_m), B * hkv)
    _attention_fwd[grid](
        q, k, v, out, kv_len, tree,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *st,
        S, D, hkv, scale * 1.4426950408889634,
        GROUP=group, HAS_TREE=tree_mask is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=64, BLOCK_D=max(16, triton.next_power_of_2(D)),
    )
    return out
