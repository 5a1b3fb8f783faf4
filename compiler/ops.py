"""accelc's ``torch.library`` custom ops: the vocabulary the passes rewrite the graph into.

Each op is declared with :func:`torch.library.custom_op` (exact ``mutates_args``), has a
``register_fake`` implementation (shapes for export / fake-tensor propagation) and uses the torch
reference of its kernel as the default implementation.  The lowering pass later swaps the op for
the kernel that fits the device (Triton on CUDA, torch on CPU) with the same semantics.

- ``accelc::attention(q, k, v, scale, window=0)``: causal GQA attention of a whole sequence
  (stateless); what ``lift_attention`` turns each ``aten.scaled_dot_product_attention`` of the
  captured model into.  ``window > 0``: a sliding-window layer, query ``p`` sees keys
  ``p - window < j <= p`` (HF's convention).
- ``accelc::cached_attention(q, k, v, k_cache, v_cache, cache_len, q_len, scale, tree_mask,
  window=0, q_pos=None, k_pos=None)``: the same attention against the runtime-owned KV cache of
  one layer: writes the S new keys/values of row b at slots ``[cache_len[b], cache_len[b] + S)``,
  attends causally over ``[0, cache_len[b] + S)`` (or along ``tree_mask`` among the new tokens),
  then advances ``cache_len[b] += q_len[b]`` (right-padded rows advance by their real length only).
  A sliding-window layer (``window > 0``) also writes the new tokens' positions ``q_pos (B, S)``
  into its slot-position cache ``k_pos (B, Hkv, N)`` and hides every key whose *position* is
  ``<= query position - window``: windows follow token positions, not cache slots, so they stay
  exact when token selection or KV compression stored only some of the prompt.
- ``accelc::gather_positions(hidden, index)``: the rows of the sequence that need logits.
- ``accelc::linear(x, w, b)``: ``x @ w.T + b`` with ``w`` (N, K) packed by ``pack_linear``;
  lowered to the native CPU kernel for the few rows of decode/verification (batch invariant).
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
def attention(q: Tensor, k: Tensor, v: Tensor, scale: float, window: int = 0) -> Tensor:
    """Causal attention of a full sequence; ``window > 0``: query ``s`` sees keys ``s - window < j <= s``.

    q: (B, H, S, D); k, v: (B, Hkv, S, D) with H % Hkv == 0 (GQA).  Returns (B, H, S, D).
    """
    B, _, S, _ = q.shape
    kv_len = torch.full((B,), S, dtype=torch.long, device=q.device)
    return _attention_ref()(q, k, v, kv_len, scale, None, window)


@attention.register_fake
def _(q, k, v, scale, window=0):
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


def write_positions(k_pos: Tensor, q_pos: Tensor, start: Tensor) -> None:
    """k_pos (B, Hkv, N) <- q_pos (B, S) for every KV head at slots [start_b, start_b + S) of each row."""
    write_cache(k_pos.unsqueeze(-1), q_pos[:, None, :, None].expand(-1, k_pos.shape[1], -1, 1), start)


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
    window: int = 0,
    q_pos: Optional[Tensor] = None,
    k_pos: Optional[Tensor] = None,
    kernel=None,
) -> Tensor:
    """Shared body of ``accelc::cached_attention`` and its lowered forms (see module docstring).

    q: (B, H, S, D); k, v: (B, Hkv, S, D) the new tokens; k_cache, v_cache: (B, Hkv, N, D) with
    N >= max(cache_len) + S; cache_len: (B,) int64 slots already filled (mutated: += q_len);
    q_len: (B,) int64 real new tokens per row; tree_mask: (B, S, S) bool or None (causal);
    window: sliding window (0: none); q_pos: (B, S) int64 positions of the new tokens and
    k_pos: (B, Hkv, N) int64 positions of the cache slots (mutated), both required with a window.
    """
    write_cache(k_cache, k, cache_len)
    write_cache(v_cache, v, cache_len)
    kv_len = cache_len + q.shape[2]
    attend = kernel or _attention_ref()
    if window > 0:
        if q_pos is None or k_pos is None:
            raise ValueError("cached_attention: a sliding window needs q_pos and k_pos")
        write_positions(k_pos, q_pos, cache_len)
        out = attend(q, k_cache, v_cache, kv_len, scale, tree_mask, window, k_pos)
    else:
        out = attend(q, k_cache, v_cache, kv_len, scale, tree_mask)
    cache_len.add_(q_len)
    return out


@torch.library.custom_op("accelc::cached_attention", mutates_args=("k_cache", "v_cache", "cache_len", "k_pos"))
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
    window: int = 0,
    q_pos: Optional[Tensor] = None,
    k_pos: Optional[Tensor] = None,
) -> Tensor:
    """Attention against one layer's runtime-owned KV cache (see module docstring)."""
    return cached_attention_impl(q, k, v, k_cache, v_cache, cache_len, q_len, scale, tree_mask, window, q_pos, k_pos)


@cached_attention.register_fake
def _(q, k, v, k_cache, v_cache, cache_len, q_len, scale, tree_mask=None, window=0, q_pos=None, k_pos=None):
    return torch.empty_like(q)


CACHED_WINDOW_ARGS = 9
"""Index of ``window`` in ``accelc::cached_attention``'s arguments (``q_pos``, ``k_pos`` follow)."""


def attention_window(node) -> tuple[int, object, object]:
    """``(window, q_pos, k_pos)`` of a cached attention node of the graph; ``(0, None, None)`` when
    the layer attends over its whole context (any op but a windowed ``accelc::cached_attention``)."""
    if node.target is not torch.ops.accelc.cached_attention.default or len(node.args) <= CACHED_WINDOW_ARGS:
        return 0, None, None
    window, q_pos, k_pos = node.args[CACHED_WINDOW_ARGS:CACHED_WINDOW_ARGS + 3]
    return int(window), q_pos, k_pos


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
@torch.library.custom_op("accelc::linear", mutates_args=())
def linear(x: Tensor, w: Tensor, b: Optional[Tensor] = None) -> Tensor:
    """x (..., K) @ w (N, K)^T + b (N,) -> (..., N): the packed linear layers (see pack_linear)."""
    return torch.nn.functional.linear(x, w, b)


@linear.register_fake
def _(x, w, b=None):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


# --------------------------------------------------------------------------------------------
# Token selection (FastKV TSP) and KV-cache compression (SnapKV / PyramidKV).
def kept_count(n: Tensor, keep: float, budget: int, window: int, ref: Tensor | None = None, floor: int = 0) -> Tensor:
    """How many of a row's ``n`` tokens to keep: (B,) int64.

    The top-scored ``budget`` tokens (``budget > 0``), else the top fraction ``keep`` of ``ref``
    (default ``n``; the prompt length for KV compression) rounded up and at least ``floor``, *plus*
    the window (the last ``min(window, n)`` tokens, always kept), at most ``n``: ``keep=1.0`` or a
    budget >= n keeps everything, and a short prompt never shrinks to its window alone.
    """
    if budget > 0:
        top = torch.full_like(n, budget)
    else:
        top = torch.ceil((n if ref is None else ref).to(torch.float64) * keep).to(torch.long).clamp(min=floor)
    return torch.minimum(top + n.clamp(max=window), n)


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
               keep: float, budget: int, floor: int = 0) -> tuple[Tensor, Tensor]:
    """FastKV token-selective propagation: which tokens the layers after this one keep (the top
    fraction ``keep``, at least ``floor``, or the top ``budget``; plus the window).

    q: (B, H, S, D) this layer's queries of a fresh prefill; k_cache: (B, Hkv, N, D) holding the
    prompt's keys at slots [0, q_len_b); q_len: (B,).  Scores are summed over all KV heads (one
    token set for the whole hidden state).  Returns ``idx (B, K)`` int64 kept positions sorted
    ascending (rows with fewer kept tokens are padded, see select_topk) and ``count (B,)``.
    """
    scores = token_scores(q, k_cache, q_len, scale, window, kernel, pooling).sum(1, keepdim=True)
    count = kept_count(q_len, keep, budget, window, floor=floor)
    idx = lookup("select_topk", q.device)(scores, count)[:, 0]
    return idx, count


@tsp_select.register_fake
def _(q, k_cache, q_len, scale, window, kernel, pooling, keep, budget, floor=0):
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


@torch.library.custom_op("accelc::compress_cache", mutates_args=("k_cache", "v_cache", "cache_len", "k_pos"))
def compress_cache(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_len: Tensor, prompt_len: Tensor, scale: float,
                   window: int, kernel: int, pooling: str, keep: float, budget: int, sliding_window: int = 0,
                   k_pos: Optional[Tensor] = None, floor: int = 0) -> None:
    """SnapKV / PyramidKV: keep, per KV head, the top-scored prompt entries (+ the window).

    Runs right after a fresh prefill wrote this layer's cache (slots [0, cache_len_b)).  Scores
    come from the last ``window`` queries (GQA: summed over each KV group's query heads, never
    expanding the cache); each KV head keeps its own ``count_b`` best entries in position order,
    compacted to slots [0, count_b); ``cache_len`` becomes ``count``.  A fraction ``keep`` is of
    ``prompt_len`` (B,), so layers after token selection keep the same share of the prompt;
    ``floor`` is the fewest top entries a fraction keeps (``min_keep``).

    On a sliding-window layer (``sliding_window > 0``) the slot positions ``k_pos (B, Hkv, N)`` are
    compacted with the entries, and the entries that no later query can see any more (position
    ``<= last prompt position + 1 - sliding_window``) rank below every other entry: a budget of
    ``sliding_window - 1`` entries or more then keeps everything the layer will read.
    """
    compress_cache_impl(q, k_cache, v_cache, cache_len, prompt_len, scale, window, kernel, pooling, keep, budget,
                        sliding_window, k_pos, floor)


def compress_cache_impl(q, k_cache, v_cache, cache_len, prompt_len, scale, window, kernel, pooling, keep, budget,
                        sliding_window=0, k_pos=None, floor=0) -> None:
    n = cache_len.clone()
    count = kept_count(n, keep, budget, window, ref=prompt_len, floor=floor)
    if bool((count == n).all()):
        return
    scores = token_scores(q, k_cache, n, scale, window, kernel, pooling)
    if sliding_window > 0:
        last = k_pos.gather(2, (n - 1).clamp(min=0)[:, None, None].expand(-1, k_pos.shape[1], 1))   # (B, Hkv, 1)
        stale = k_pos[:, :, :scores.shape[-1]] <= last + 1 - sliding_window
        scores = torch.where(stale & torch.isfinite(scores), -1.0, scores)   # below every reachable score (>= 0)
    idx = lookup("select_topk", q.device)(scores, count)  # (B, Hkv, K)
    K = idx.shape[-1]
    D = k_cache.shape[-1]
    g = idx.unsqueeze(-1).expand(*idx.shape, D)
    k_sel, v_sel = k_cache.gather(2, g), v_cache.gather(2, g)
    k_cache[:, :, :K].copy_(k_sel)
    v_cache[:, :, :K].copy_(v_sel)
    if sliding_window > 0:
        k_pos[:, :, :K].copy_(k_pos.gather(2, idx))
    cache_len.copy_(count)


@compress_cache.register_fake
def _(q, k_cache, v_cache, cache_len, prompt_len, scale, window, kernel, pooling, keep, budget, sliding_window=0, k_pos=None,
      floor=0):
    return None


# --------------------------------------------------------------------------------------------
# Sparse attention: streaming heads, Quest page selection (decode), block-sparse prefill.
QUEST_MAX_QUERIES = 16  # beyond this many new tokens in one step (prefill), Quest attends densely


def _q_heads(kv_heads: Tensor, group: int) -> Tensor:
    """Query-head indices of the given KV heads: (n,) -> (n * group,)."""
    return (kv_heads[:, None] * group + torch.arange(group, device=kv_heads.device)).reshape(-1)


def update_bounds(k_min: Tensor, k_max: Tensor, k: Tensor, cache_len: Tensor, q_len: Tensor, page: int) -> None:
    """Fold the real new keys of each row (the first q_len_b of S; right padding excluded) into the
    Quest page bounds."""
    update = lookup("quest_update_page_bounds", k.device)
    S = k.shape[2]
    if not bool((q_len < S).any()):
        update(k_min, k_max, k, cache_len, page)
        return
    for b, n in enumerate(q_len.tolist()):  # right-padded prefill: once per prompt
        if n > 0:
            update(k_min[b : b + 1], k_max[b : b + 1], k[b : b + 1, :, :n], cache_len[b : b + 1], page)


def sparse_attention_impl(q, k, v, k_cache, v_cache, cache_len, q_len, scale, tree_mask, k_min, k_max,
                          sink: int, local: int, stream_heads, page: int, top_pages: int) -> Tensor:
    """Body of ``accelc::cached_sparse_attention`` (see its docstring)."""
    write_cache(k_cache, k, cache_len)
    write_cache(v_cache, v, cache_len)
    S = q.shape[2]
    kv_len = cache_len + S
    dev = k_cache.device
    if page > 0:
        update_bounds(k_min, k_max, k, cache_len, q_len, page)

    def dense(qh, kc, vc):
        if page > 0 and tree_mask is None and S <= QUEST_MAX_QUERIES and int(kv_len.max()) > top_pages * page:
            kmin, kmax = (k_min, k_max) if kc is k_cache else (k_min[:, kv_idx], k_max[:, kv_idx])
            idx = lookup("quest_select", dev)(qh, kmin, kmax, kv_len, page, top_pages)
            return lookup("paged_sparse_attention", dev)(qh, kc, vc, kv_len, idx, page, scale)
        return lookup("attention", dev)(qh, kc, vc, kv_len, scale, tree_mask)

    def streaming(qh, kc, vc):
        if tree_mask is not None:
            raise NotImplementedError("tree-shaped speculative verification over streaming heads")
        return lookup("streaming_attention", dev)(qh, kc, vc, kv_len, sink, local, scale)

    if sink < 0:
        out = dense(q, k_cache, v_cache)
    elif stream_heads is None:
        out = streaming(q, k_cache, v_cache)
    else:
        group = q.shape[1] // k_cache.shape[1]
        s_idx = stream_heads.nonzero().flatten()
        kv_idx = (~stream_heads).nonzero().flatten()
        out = torch.empty_like(q)
        out[:, _q_heads(s_idx, group)] = streaming(q[:, _q_heads(s_idx, group)], k_cache[:, s_idx], v_cache[:, s_idx])
        if kv_idx.numel():
            qd = _q_heads(kv_idx, group)
            kc, vc = k_cache[:, kv_idx], v_cache[:, kv_idx]
            out[:, qd] = dense(q[:, qd], kc, vc)
    cache_len.add_(q_len)
    return out


@torch.library.custom_op("accelc::cached_sparse_attention", mutates_args=("k_cache", "v_cache", "cache_len", "k_min", "k_max"))
def cached_sparse_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, cache_len: Tensor, q_len: Tensor,
                            scale: float, tree_mask: Optional[Tensor], k_min: Optional[Tensor], k_max: Optional[Tensor],
                            sink: int, local: int, stream_heads: Optional[Tensor], page: int, top_pages: int) -> Tensor:
    """``accelc::cached_attention`` with sparse attention patterns (same cache contract).

    Streaming (StreamingLLM / DuoAttention): with ``sink >= 0`` the KV heads flagged in
    ``stream_heads (Hkv,) bool`` (all heads when None) see only the first ``sink`` and the last
    ``local`` slots before each query.  Quest (Tang et al. 2024): with ``page > 0`` the page
    min/max key bounds ``k_min, k_max (B, Hkv, P, D)`` are updated with the new keys, and a step
    of at most QUEST_MAX_QUERIES queries attends only to the ``top_pages`` pages with the highest
    bound on q·k (dense heads only; prefill stays exact).
    """
    return sparse_attention_impl(q, k, v, k_cache, v_cache, cache_len, q_len, scale, tree_mask, k_min, k_max,
                                 sink, local, stream_heads, page, top_pages)


@cached_sparse_attention.register_fake
def _(q, k, v, k_cache, v_cache, cache_len, q_len, scale, tree_mask, k_min, k_max, sink, local, stream_heads, page, top_pages):
    return torch.empty_like(q)


def block_sparse_prefill_impl(q, k, v, k_cache, v_cache, cache_len, q_len, scale, tree_mask,
                              block: int, top_blocks: int, sink_blocks: int, local_blocks: int,
                              k_min=None, k_max=None, page: int = 0) -> Tensor:
    """Body of ``accelc::cached_block_sparse_attention``."""
    write_cache(k_cache, k, cache_len)
    write_cache(v_cache, v, cache_len)
    S = q.shape[2]
    kv_len = cache_len + S
    dev = k_cache.device
    if page > 0:
        update_bounds(k_min, k_max, k, cache_len, q_len, page)

    def run(qr, kc, vc, n):
        if tree_mask is not None or qr.shape[2] <= block:
            return lookup("attention", dev)(qr, kc, vc, n, scale, tree_mask)
        idx = lookup("block_sparse_select", dev)(qr, kc, n, block, top_blocks, sink_blocks, local_blocks)
        return lookup("block_sparse_attention", dev)(qr, kc, vc, n, idx, block, scale)

    if tree_mask is None and bool((q_len != S).any()):
        # Right-padded rows: block statistics must not see padding queries -> each row on its own.
        out = torch.zeros_like(q)
        for b, n in enumerate(q_len.tolist()):
            start = int(cache_len[b])
            out[b : b + 1, :, :n] = run(q[b : b + 1, :, :n], k_cache[b : b + 1], v_cache[b : b + 1],
                                        torch.tensor([start + n], device=dev))
    else:
        out = run(q, k_cache, v_cache, kv_len)
    cache_len.add_(q_len)
    return out


@torch.library.custom_op("accelc::cached_block_sparse_attention",
                         mutates_args=("k_cache", "v_cache", "cache_len", "k_min", "k_max"))
def cached_block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, cache_len: Tensor,
                                  q_len: Tensor, scale: float, tree_mask: Optional[Tensor], block: int, top_blocks: int,
                                  sink_blocks: int, local_blocks: int, k_min: Optional[Tensor] = None,
                                  k_max: Optional[Tensor] = None, page: int = 0) -> Tensor:
    """Block-sparse prefill (MInference / LServe): each query block attends to its sink, local and
    ``top_blocks`` highest-estimated key blocks (mean-pooled q·k); the kernel skips the others.
    On a Quest layer (``page > 0``) it also folds the new keys into the page bounds."""
    return block_sparse_prefill_impl(q, k, v, k_cache, v_cache, cache_len, q_len, scale, tree_mask,
                                     block, top_blocks, sink_blocks, local_blocks, k_min, k_max, page)


@cached_block_sparse_attention.register_fake
def _(q, k, v, k_cache, v_cache, cache_len, q_len, scale, tree_mask, block, top_blocks, sink_blocks, local_blocks,
      k_min=None, k_max=None, page=0):
    return torch.empty_like(q)


def cached_attention_targets() -> tuple:
    """Every op (and its lowered forms) that is 'attention against one layer's KV cache'.

    They share the argument prefix ``(q, k, v, k_cache, v_cache, cache_len, q_len, scale, tree_mask)``.
    """
    return (torch.ops.accelc.cached_attention.default, torch.ops.accelc.cached_sparse_attention.default,
            torch.ops.accelc.cached_block_sparse_attention.default)
