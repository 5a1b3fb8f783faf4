"""select_logits: compute the LM head only at the positions the runtime asks for.

Before::                                  After::
    logits = aten.linear(h, lm_head)          # new graph input logits_index (B, n) int64
                                              h_sel  = accelc.gather_positions(h, logits_index)
                                              logits = aten.linear(h_sel, lm_head)      # (B, n, V)

Prefill needs one row of logits per prompt (its last real token), decode one, speculative
verification γ+1: the vocabulary projection (49152 x 576 for SmolLM2) is then paid for n
positions instead of S — for a 2048-token prompt that is ~116 GFLOP saved.

Elementwise ops between the LM head and the output (Gemma's final logit soft-capping,
``tanh(logits / c) * c``) act on each position alone, so they simply run on the selected rows.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from accelc.errors import AccelcError
from accelc.fx_utils import add_placeholder, call, fake_tensor, new_symint
from accelc.pass_manager import Outcome, Pass, PassContext, Program, register_pass

aten = torch.ops.aten


# Per-position ops allowed after the LM head: unary, or with a Python scalar as the other operand.
_ELEMENTWISE = {aten.tanh.default, aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar}


def lm_head(node: fx.Node, packed: bool = False) -> fx.Node | None:
    """The LM head's ``aten.linear`` under ``node`` through a chain of elementwise ops, else None
    (``packed``: also an ``accelc.linear``, the head after ``pack_linear``)."""
    while node.op == "call_function" and node.target in _ELEMENTWISE and len(node.users) == 1:
        if any(isinstance(a, fx.Node) for a in (*node.args[1:], *node.kwargs.values())):
            return None
        node = node.args[0]
    targets = (aten.linear.default, torch.ops.accelc.linear.default) if packed else (aten.linear.default,)
    return node if node.op == "call_function" and node.target in targets else None


@register_pass
class SelectLogits(Pass):
    name = "select_logits"
    stage = "cache"
    requires = ("kv_cache",)
    provides = ("logits_selected",)

    def apply(self, program: Program, ctx: PassContext) -> Outcome:
        gm = program.gm
        out = gm.graph.output_node()
        logits = lm_head(out.args[0])
        if logits is None:
            raise AccelcError("pass select_logits", f"the graph output {out.args[0]} is not the LM head's linear "
                              "(followed by elementwise ops at most)", "unsupported model head")
        hidden = logits.args[0]
        hv = hidden.meta.get("val")
        idx_val = fake_tensor(gm, (hv.shape[0], new_symint(gm)), torch.long) if hv is not None else None
        idx = add_placeholder(gm, "logits_index", idx_val)
        with gm.graph.inserting_before(logits):
            sel = call(gm, torch.ops.accelc.gather_positions.default, (hidden, idx), like=logits)
        logits.replace_input_with(hidden, sel)
        return Outcome(1, ("LM head computed only at logits_index positions",))
