"""pack_linear: weights stored for the matmul the runtime actually runs; sibling linears fused.

Decode multiplies one row by every weight matrix (a GEMV).  On CPU, ``x @ Wt`` with ``Wt`` stored
(in_features, out_features) contiguous runs ~1.6x faster than ``linear(x, W)`` with the HF layout
(out, in), and one GEMV over concatenated weights beats three small ones.  This pass:

Before::                                        After::
    q = aten.linear(h, Wq)                          qkv = aten.matmul(h, Wqkv_t)      # [Wq;Wk;Wv]^T packed once
    k = aten.linear(h, Wk)                          q, k, v = aten.split_with_sizes(qkv, [Nq, Nk, Nv], -1)
    v = aten.linear(h, Wv)
    o = aten.linear(a, Wo)                          o = aten.matmul(a, Wo_t)

Linears sharing an input (q/k/v, gate/up) are fused; every constant weight is packed.  The packed
weights are buffers of the compiled graph module; the eager model is left untouched.
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.fx as fx

from accelc.fx_utils import call
from accelc.pass_manager import Outcome, Pass, PassContext, Program, register_pass

aten = torch.ops.aten


def _const(gm: fx.GraphModule, node) -> torch.Tensor | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        obj = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        if isinstance(obj, torch.Tensor) and obj.dim() == 2:
            return obj
    return None


def _linears(gm: fx.GraphModule) -> dict[fx.Node, list[fx.Node]]:
    """Bias-free linears with constant weights, grouped by their input node (graph order)."""
    groups: dict[fx.Node, list[fx.Node]] = defaultdict(list)
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is aten.linear.default and len(n.args) == 2 and _const(gm, n.args[1]) is not None:
            groups[n.args[0]].append(n)
    return groups


@register_pass
class PackLinear(Pass):
    name = "pack_linear"
    stage = "finalize"
    requires = ("logits_selected",)
    provides = ("linear_packed",)

    def apply(self, program: Program, ctx: PassContext) -> Outcome:
        total, fused = 0, 0
        shared: dict[tuple[int, ...], torch.Tensor] = {}  # graphs share one packed copy per weight set
        for gm in (program.gm, *program.graphs.values()):
            for i, (x, lins) in enumerate(_linears(gm).items()):
                ws = [_const(gm, lin.args[1]).detach() for lin in lins]
                key = tuple((w.data_ptr(), tuple(w.shape)) for w in ws)
                if key not in shared:
                    shared[key] = torch.cat(ws, 0).t().contiguous() if len(ws) > 1 else ws[0].t().contiguous()
                packed = shared[key]
                name = f"_packed_w{i}"
                gm.register_buffer(name, packed, persistent=False)
                first = lins[0]
                with gm.graph.inserting_before(first):
                    w_node = gm.graph.get_attr(name)
                    mm = call(gm, aten.matmul.default, (x, w_node), like=first)
                    if len(lins) > 1:
                        sizes = [w.shape[0] for w in ws]
                        parts = call(gm, aten.split_with_sizes.default, (mm, sizes, -1), like=first)
                        outs = [call(gm, _getitem, (parts, j), like=first) for j in range(len(lins))]
                        fused += len(lins)
                    else:
                        outs = [mm]
                for lin, out in zip(lins, outs):
                    lin.replace_all_uses_with(out)
                    gm.graph.erase_node(lin)
                total += len(lins)
            gm.graph.eliminate_dead_code()
            gm.delete_all_unused_submodules()
        return Outcome(total, (f"{total} linears packed as x @ W^T, {fused} of them fused with siblings sharing an input",))


import operator  # noqa: E402

_getitem = operator.getitem
