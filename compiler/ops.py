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
