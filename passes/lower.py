"""lower: bind every accelc op to the kernel that fits the device (same schema either way).

Linear layers (``accelc::linear``) go to the native CPU kernel on CPU (``F.linear`` for long
inputs, or where it cannot be built) and to ``F.linear`` elsewhere.

Before::                                         After (CPU)::
    o = accelc.cached_attention(q, k, v, ...)        o = cached_attention_torch(q, k, v, ...)
                                                 After (CUDA)::
                                                     o = cached_attention_triton(q, k, v, ...)

The custom ops stay the portable description of the graph (they have fake impls and pass
``opcheck``); lowering replaces them with direct calls of the chosen implementation from the
kernel dispatch table (``accelc.kernels.dispatch``), which also removes the dispatcher overhead
from the decode hot path.
"""
from __future__ import annotations

import torch

from accelc.fx_utils import calls
from accelc.kernels.dispatch import lookup
from accelc.ops import (
    block_sparse_prefill_impl,
    cached_attention_impl,
    compress_cache_impl,
    gather_positions_impl,
    gather_tokens_impl,
    sparse_attention_impl,
)
from accelc.pass_manager import Outcome, Pass, PassContext, Program, register_pass

_ATTN = {}


def _attention_kernel(backend: str):
    if backend not in _ATTN:
        _ATTN[backend] = lookup("attention", prefer=backend)
    return _ATTN[backend]


def cached_attention_torch(q, k, v, k_cache, v_cache, cache_len, q_len, scale, tree_mask=None, window=0, q_pos=None, k_pos=None):
    """accelc::cached_attention with the torch reference attention kernel."""
    return cached_attention_impl(q, k, v, k_cache, v_cache, cache_len, q_len, scale, tree_mask, window, q_pos, k_pos,
                                 kernel=_attention_kernel("torch"))


def cached_attention_triton(q, k, v, k_cache, v_cache, cache_len, q_len, scale, tree_mask=None, window=0, q_pos=None, k_pos=None):
    """accelc::cached_attention with the Triton attention kernel (CUDA)."""
    return cached_attention_impl(q, k, v, k_cache, v_cache, cache_len, q_len, scale, tree_mask, window, q_pos, k_pos,
                                 kernel=_attention_kernel("triton"))


@register_pass
class Lower(Pass):
    name = "lower"
    stage = "lower"
    requires = ("kv_cache",)
    provides = ("lowered",)

    def apply(self, program: Program, ctx: PassContext) -> Outcome:
        use_triton = ctx.device.type == "cuda" and lookup("attention", ctx.device) is _attention_kernel_safe("triton")
        linear_impl = lookup("linear", ctx.device)
        table = {
            torch.ops.accelc.linear.default: linear_impl,
            torch.ops.accelc.cached_attention.default: cached_attention_triton if use_triton else cached_attention_torch,
            torch.ops.accelc.gather_positions.default: gather_positions_impl,
            torch.ops.accelc.gather_tokens.default: gather_tokens_impl,
            torch.ops.accelc.compress_cache.default: compress_cache_impl,
            torch.ops.accelc.cached_sparse_attention.default: sparse_attention_impl,
            torch.ops.accelc.cached_block_sparse_attention.default: block_sparse_prefill_impl,
        }
        n = 0
        for gm in (program.gm, *program.graphs.values()):
            for node in calls(gm, *table):
                node.target = table[node.target]
                n += 1
        backend = "triton" if use_triton else "torch"
        program.meta["backend"] = backend
        notes = [f"{n} op calls bound to {backend} kernels on {ctx.device.type}"]
        if linear_impl is not lookup("linear", prefer="torch"):
            from accelc.kernels.linear import native_status

            program.meta["linear"] = native_status()
            notes.append(f"linear layers: {program.meta['linear']}")
        return Outcome(n, tuple(notes))


def _attention_kernel_safe(backend: str):
    try:
        return _attention_kernel(backend)
    except KeyError:
        return None
