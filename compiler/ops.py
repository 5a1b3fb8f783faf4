"""accelc's ``torch.library`` custom ops: the vocabulary the passes rewrite the graph into.

Each op is declared with :func:`torch.library.custom_op` (exact ``mutates_args``), has a
``register_fake`` implementation (shapes for export / fake-tensor propagation) and uses the torch
reference of its kernel as the default implementation.  The lowering pass later swaps the op for
the kernel that fits the device (Triton on CUDA, torch on CPU) with the same semantics.

- ``accelc::attention(q, k, v, scale)``: causal GQA attention of a whole sequence (stateless);
  what ``lift_attention`` turns each ``aten.scaled_dot_product_attention`` of the captured model into.
- ``accelc::cached_attention(q, k, v, k_cache, v_cache, cache_len, q_len, scale, tree_mask)``:
  the same attention against the runtime-owned KV cache of one layer: writes the S new keys/values
  of row b at slots ``[cache_len[b], cache_len[b] + S)``, attends causally over
  ``[0, cache_len[b] + S)`` (or along ``tree_mask`` among the new tokens), then advances
  ``cache_len[b] += q_len[b]`` (right-padded rows advance by their real length only).
- ``accelc::gather_positions(hidden, index)``: the rows of the sequence that need logits.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from accelc.kernels.dispatch import lookup


def _attention_ref():
    return lookup("attention", "cpu", prefer="torch")


# --------------------------------------------------------------------------------------------
@torch.library.custom_op("accelc::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Causal attention of a full sequence.

    q: (B, H, S, D); k, v: (B, Hkv, S, D) with H % Hkv == 0 (GQA).  Returns (B, H, S, D).
    """
    B, _, S, _ = q.shape
    kv_len = torch.full((B,), S, dtype=torch.long, device=q.device)
    return _attention_ref()(q, k, v, kv_len, scale, None)


@attention.register_fake
def _(q, k, v, scale):
    return torch.empty_like(q)


# --------------------------------------------------------------------------------------------
def write_cache(cache: Tensor, new: Tensor, start: Tensor) -> None:
    """cache (B, Hkv, N, D) <- new (B, Hkv, S, D) at slots [start_b, start_b + S) of each row."""
    S = new.shape[2]
    starts = start.tolist()
    if all(s == starts[0] for s in starts):
        cache[:, :, starts[0] : starts[0] + S].copy_(new)
    else:
        for b, s in enumerate(starts):
            cache[b, :, s : s + S].copy_(new[b])


def cached_attention_impl(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_len: Tensor,
    q_len: Tensor,
    scale: float,
    tree_mask: Optional[Tensor] = None,
    kernel=None,
) -> Tensor:
    """Shared body of ``accelc::cached_attention`` and its lowered forms (see module docstring).

    q: (B, H, S, D); k, v: (B, Hkv, S, D) the new tokens; k_cache, v_cache: (B, Hkv, N, D) with
    N >= max(cache_len) + S; cache_len: (B,) int64 slots already filled (mutated: += q_len);
    q_len: (B,) int64 real new tokens per row; tree_mask: (B, S, S) bool or None (causal).
    """
    write_cache(k_cache, k, cache_len)
    write_cache(v_cache, v, cache_len)
    kv_len = cache_len + q.shape[2]
    out = (kernel or _attention_ref())(q, k_cache, v_cache, kv_len, scale, tree_mask)
    cache_len.add_(q_len)
    return out


@torch.library.custom_op("accelc::cached_attention", mutates_args=("k_cache", "v_cache", "cache_len"))
def cached_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_len: Tensor,
    q_len: Tensor,
    scale: float,
    tree_mask: Optional[Tensor] = None,
) -> Tensor:
    """Attention against one layer's runtime-owned KV cache (see module docstring)."""
    return cached_attention_impl(q, k, v, k_cache, v_cache, cache_len, q_len, scale, tree_mask)


@cached_attention.register_fake
def _(q, k, v, k_cache, v_cache, cache_len, q_len, scale, tree_mask=None):
    return torch.empty_like(q)


# --------------------------------------------------------------------------------------------
@torch.library.custom_op("accelc::gather_positions", mutates_args=())
def gather_positions(hidden: Tensor, index: Tensor) -> Tensor:
    """hidden (B, S, C), index (B, n) int64 -> (B, n, C): the positions that need logits."""
    return gather_positions_impl(hidden, index)


def gather_positions_impl(hidden: Tensor, index: Tensor) -> Tensor:
    """Body of ``accelc::gather_positions`` (also its lowered form)."""
    if index.shape[0] == 1 and hidden.shape[0] == 1:
        return hidden.index_select(1, index[0])
    return hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


@gather_positions.register_fake
def _(hidden, index):
    return hidden.new_empty((hidden.shape[0], index.shape[1], hidden.shape[2]))


# --------------------------------------------------------------------------------------------
# Token selection (FastKV TSP) and KV-cache compression (SnapKV / PyramidKV).
def kept_count(n: Tensor, keep: float, budget: int, window: int) -> Tensor:
    """How many of a row's ``n`` tokens to keep: (B,) int64.

    ``budget > 0``: keep ``budget`` tokens (window included); else the fraction ``keep`` of them
    (rounded up).  Never fewer than the window (or ``n`` if shorter), never more than ``n``, so
    ``keep=1.0`` or a budget >= n keeps everything.
    """
    if budget > 0:
        c = torch.full_like(n, budget)
    else:
        c = torch.ceil(n.to(torch.float64) * keep).to(torch.long)
    return torch.minimum(torch.maximum(c, n.clamp(max=window)), n)


def window_queries(q: Tensor, n: Tensor, window: int) -> Tensor:
    """The last ``window`` real queries of each right-padded row: q (B, H, S, D), n (B,) -> (B, H, W, D)."""
    B, H, S, D = q.shape
    pos = (n.unsqueeze(1) - window + torch.arange(window, device=q.device)).clamp(min=0, max=S - 1)
    return q.gather(2, pos[:, None, :, None].expand(B, H, window, D))


def token_scores(q: Tensor, k_cache: Tensor, n: Tensor, scale: float, window: int, kernel: int, pooling: str) -> Tensor:
    """Per-KV-head importance of every cached token from the last window queries: (B, Hkv, N).

    +inf for the window (always kept), -inf past ``n`` (never kept); see kernels/window_scores.py.
    """
    W = min(window, q.shape[2])
    return lookup("window_scores", k_cache.device)(window_queries(q, n, W), k_cache, n, scale, kernel, pooling)


@torch.library.custom_op("accelc::tsp_select", mutates_args=())
def tsp_select(q: Tensor, k_cache: Tensor, q_len: Tensor, scale: float, window: int, kernel: int, pooling: str,
               keep: float, budget: int) -> tuple[Tensor, Tensor]:
    """FastKV token-selective propagation: which tokens the layers after this one keep.

    q: (B, H, S, D) this layer's queries of a fresh prefill; k_cache: (B, Hkv, N, D) holding the
    prompt's keys at slots [0, q_len_b); q_len: (B,).  Scores are summed over all KV heads (one
    token set for the whole hidden state).  Returns ``idx (B, K)`` int64 kept positions sorted
    ascending (rows with fewer kept tokens are padded, see select_topk) and ``count (B,)``.
    """
    scores = token_scores(q, k_cache, q_len, scale, window, kernel, pooling).sum(1, keepdim=True)
    count = kept_count(q_len, keep, budget, window)
    idx = lookup("select_topk", q.device)(scores, count)[:, 0]
    return idx, count


@tsp_select.register_fake
def _(q, k_cache, q_len, scale, window, kernel, pooling, keep, budget):
    ctx = torch.library.get_ctx()
    K = ctx.new_dynamic_size()
    return q_len.new_empty((q.shape[0], K)), torch.empty_like(q_len)


@torch.library.custom_op("accelc::gather_tokens", mutates_args=())
def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """x (B, S, ...) , idx (B, K) -> (B, K, ...): the kept tokens of every row, in order."""
    return gather_tokens_impl(x, idx)


def gather_tokens_impl(x: Tensor, idx: Tensor) -> Tensor:
    shape = idx.shape + x.shape[2:]
    flat = idx.reshape(idx.shape + (1,) * (x.dim() - 2)).expand(shape)
    return x.gather(1, flat)


@gather_tokens.register_fake
def _(x, idx):
    return x.new_empty(tuple(idx.shape) + tuple(x.shape[2:]))


@torch.library.custom_op("accelc::remap_positions", mutates_args=())
def remap_positions(idx: Tensor, count: Tensor, index: Tensor) -> Tensor:
    """Where original positions ``index (B, n)`` landed among the kept ``idx (B, K)``: (B, n).

    Positions that were dropped map to the kept position before them (callers only ask for
    kept ones: the window, which holds the last token, is always kept).
    """
    pos = torch.searchsorted(idx.contiguous(), index.contiguous(), right=True) - 1
    return torch.minimum(pos.clamp(min=0), (count - 1).clamp(min=0).unsqueeze(1))


@remap_positions.register_fake
def _(idx, count, index):
    return torch.empty_like(index)


@torch.library.custom_op("accelc::compress_cache", mutates_args=("k_cache", "v_cache", "cache_len"))
def compress_cache(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_len: Tensor, scale: float, window: int,
                   kernel: int, pooling: str, keep: float, budget: int) -> None:
    """SnapKV / PyramidKV: keep, per KV head, the top-scored prompt entries (+ the window).

    Runs right after a fresh prefill wrote this layer's cache (slots [0, cache_len_b)).  Scores
    come from the last ``window`` queries (GQA: summed over each KV group's query heads, never
    expanding the cache); each KV head keeps its own ``count_b`` best entries in position order,
    compacted to slots [0, count_b); ``cache_len`` becomes ``count``.
    """
    compress_cache_impl(q, k_cache, v_cache, cache_len, scale, window, kernel, pooling, keep, budget)


def compress_cache_impl(q, k_cache, v_cache, cache_len, scale, window, kernel, pooling, keep, budget) -> None:
    n = cache_len.clone()
    count = kept_count(n, keep, budget, window)
    if bool((count == n).all()):
        return
    scores = token_scores(q, k_cache, n, scale, window, kernel, pooling)
    idx = lookup("select_topk", q.device)(scores, count)  # (B, Hkv, K)
    K = idx.shape[-1]
    D = k_cache.shape[-1]
    g = idx.unsqueeze(-1).expand(*idx.shape, D)
    k_sel, v_sel = k_cache.gather(2, g), v_cache.gather(2, g)
    k_cache[:, :, :K].copy_(k_sel)
    v_cache[:, :, :K].copy_(v_sel)
    cache_len.copy_(count)


@compress_cache.register_fake
def _(q, k_cache, v_cache, cache_len, scale, window, kernel, pooling, keep, budget):
    return None
