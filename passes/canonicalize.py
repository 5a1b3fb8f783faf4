"""canonicalize: remove export bookkeeping that costs time at every step and means nothing.

Before::                                   After::
    _assert_tensor_metadata(x, dtype=f32)      (gone)
    y = aten.to.dtype(x, float32)  # no-op     y -> x
    z = aten.alias(y)                          z -> y
    c = aten.mul.Tensor(cos, 1.0)              c -> cos

Only rewrites that are exact identities (same dtype, multiply by 1.0, alias) are applied, so the
graph computes bit-identical results with fewer Python-level op calls per decode step.
"""
from __future__ import annotations

import torch

from accelc.pass_manager import Outcome, Pass, PassContext, Program, register_pass

aten = torch.ops.aten


def _same_dtype(node, dtype) -> bool:
    v = node.args[0].meta.get("val") if hasattr(node.args[0], "meta") else None
    return v is not None and v.dtype == dtype


@register_pass
class Canonicalize(Pass):
    name = "canonicalize"
    stage = "canonicalize"
    provides = ("canonical",)

    def apply(self, program: Program, ctx: PassContext) -> Outcome:
        g = program.gm.graph
        removed = 0
        for n in list(g.nodes):
            if n.op != "call_function":
                continue
            if n.target is aten._assert_tensor_metadata.default:
                g.erase_node(n)
                removed += 1
                continue
            src = None
            if n.target is aten.alias.default:
                src = n.args[0]
            elif n.target is aten.to.dtype and len(n.args) == 2 and not n.kwargs and _same_dtype(n, n.args[1]):
                src = n.args[0]
            elif n.target is aten.mul.Tensor and n.args[1] == 1.0 and isinstance(n.args[1], float):
                v = n.args[0].meta.get("val")
                if v is not None and v.dtype.is_floating_point:
                    src = n.args[0]
            if src is not None:
                n.replace_all_uses_with(src)
                g.erase_node(n)
                removed += 1
        g.eliminate_dead_code()
        return Outcome(removed, (f"removed {removed} no-op nodes",))
