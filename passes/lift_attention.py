"""lift_attention: every ``aten.scaled_dot_product_attention`` becomes ``accelc::attention``.

The captured HF graph computes, per layer (GQA with ``repeat_kv`` expanded in the graph)::

    k_rep = reshape(expand(unsqueeze(k, 2), [B, Hkv, n_rep, S, D]), [B, H, S, D])     # repeat_kv
    v_rep = ...same for v...
    mask  = <causal mask built from position_ids>                                       # ~20 nodes
    o     = aten.scaled_dot_product_attention(q, k_rep, v_rep, mask, scale=s)

After this pass::

    o = accelc.attention(q, k, v, scale=s)          # k, v: (B, Hkv, S, D); meta accelc_layer = N

The repeat is dropped (the op is GQA-aware, so the KV cache later stores Hkv heads, never H), the
mask computation becomes dead and is removed.  accelc captures without an attention mask, so the
mask is the causal mask; padding is the runtime's job (right padding + per-row lengths).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from accelc import ops
from accelc.capture import layer_of
from accelc.errors import AccelcError
from accelc.fx_utils import call, calls
from accelc.pass_manager import Outcome, Pass, PassContext, Program, register_pass

aten = torch.ops.aten


def strip_repeat_kv(node: fx.Node, n_kv_heads: int) -> fx.Node:
    """The (B, Hkv, S, D) tensor under HF's ``repeat_kv`` (reshape <- expand <- unsqueeze)."""
    cur = node
    if cur.target in (aten.reshape.default, aten.view.default, aten._unsafe_view.default):
        e = cur.args[0]
        if e.op == "call_function" and e.target is aten.expand.default:
            u = e.args[0]
            if u.op == "call_function" and u.target is aten.unsqueeze.default and u.args[1] == 2:
                cur = u.args[0]
    v = cur.meta.get("val")
    if v is not None and v.shape[1] != n_kv_heads:
        raise AccelcError(
            "pass lift_attention",
            f"could not find the {n_kv_heads} KV heads under {node.name} (found {v.shape[1]} heads)",
            "the attention's key/value plumbing does not match HF's repeat_kv pattern",
        )
    return cur


@register_pass
class LiftAttention(Pass):
    name = "lift_attention"
    stage = "lift"
    requires = ("canonical",)
    provides = ("attention_lifted",)

    def apply(self, program: Program, ctx: PassContext) -> Outcome:
        gm, info = program.gm, program.info
        sites = calls(gm, aten.scaled_dot_product_attention.default)
        if not sites:
            raise AccelcError(
                "pass lift_attention", "found no scaled_dot_product_attention in the captured graph",
                "load the model with attn_implementation='sdpa' (accelc's loaders do this)",
            )
        layers = []
        for n in sites:
            q, k, v = n.args[:3]
            if n.kwargs.get("dropout_p", 0.0) or (len(n.args) > 4 and n.args[4]):
                raise AccelcError("pass lift_attention", f"{n.name} uses dropout", "compile the model in eval mode")
            scale = n.kwargs.get("scale")
            if scale is None:
                scale = info.head_dim ** -0.5
            layer = layer_of(n)
            if layer is None:
                raise AccelcError("pass lift_attention", f"cannot tell which layer {n.name} belongs to", "no model.layers.N in its module stack")
            k0 = strip_repeat_kv(k, info.n_kv_heads)
            v0 = strip_repeat_kv(v, info.n_kv_heads)
            with gm.graph.inserting_before(n):
                new = call(gm, torch.ops.accelc.attention.default, (q, k0, v0, float(scale)), like=n)
            new.meta["accelc_layer"] = layer
            n.replace_all_uses_with(new)
            gm.graph.erase_node(n)
            layers.append(layer)
        gm.graph.eliminate_dead_code()
        if sorted(layers) != list(range(info.n_layers)):
            raise AccelcError("pass lift_attention", f"found attention in layers {sorted(layers)}, expected 0..{info.n_layers - 1}")
        return Outcome(len(sites), (f"{len(sites)} attention sites lifted (GQA {info.n_heads}/{info.n_kv_heads} heads)",))


__all__ = ["LiftAttention", "strip_repeat_kv", "ops"]
