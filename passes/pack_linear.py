"""pack_linear: weights stored for the matmul the runtime actually runs; sibling linears fused.

Decode multiplies a few rows (one token, or the gamma + 1 tokens of a speculative verification)
by every weight matrix: the cost is reading the weights once.  One matmul over concatenated weights
beats three small ones, and ``accelc::linear`` lowers to a native CPU kernel that streams each
weight once for all rows and gives every row the same result whatever the batch
(:mod:`accelc.kernels.linear`).  This pass:

Before::                                        After::
    q = aten.linear(h, Wq)                          qkv = accelc.linear(h, Wqkv)      # [Wq;Wk;Wv] packed once
    k = aten.linear(h, Wk)                          q, k, v = aten.split_with_sizes(qkv, [Nq, Nk, Nv], -1)
    v = aten.linear(h, Wv)
    o = aten.linear(a, Wo)                          o = accelc.linear(a, Wo)

Linears sharing an input (q/k/v, gate/up) are fused; every constant weight is packed (N, K)
contiguous.  Constant biases (Qwen2's q/k/v projections) are fused the same way,
``accelc.linear(h, Wqkv, [bq; bk; bv])`` with zeros for a sibling that has no bias.  The packed
weights and biases are buffers of the compiled graph module; the eager model is left untouched.
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.fx as fx

import accelc.ops  # noqa: F401  (registers accelc::linear)
from accelc.fx_utils import call
from accelc.pass_manager import Outcome, Pass, PassContext, Program, register_pass

aten = torch.ops.aten


def _const(gm: fx.GraphModule, node, dim: int = 2) -> torch.Tensor | None:
    """The ``dim``-d tensor a ``get_attr`` node reads, or None for anything else."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        obj = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        if isinstance(obj, torch.Tensor) and obj.dim() == dim:
            return obj
    return None


def _bias_arg(n: fx.Node):
    """The bias argument of an ``aten.linear`` node (None when absent)."""
    return n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")


def _packable(gm: fx.GraphModule, n: fx.Node) -> bool:
    """A linear whose weight, and bias if it has one, are constants of the graph module."""
    if not (n.op == "call_function" and n.target is aten.linear.default and _const(gm, n.args[1]) is not None):
        return False
    bias = _bias_arg(n)
    return bias is None or _const(gm, bias, dim=1) is not None


def _linears(gm: fx.GraphModule) -> dict[fx.Node, list[fx.Node]]:
    """Linears with constant weights (and biases), grouped by their input node (graph order)."""
    groups: dict[fx.Node, list[fx.Node]] = defaultdict(list)
    for n in gm.graph.nodes:
        if _packable(gm, n):
            groups[n.args[0]].append(n)
    return groups


def _packed_bias(gm: fx.GraphModule, lins: list[fx.Node], ws: list[torch.Tensor]) -> torch.Tensor | None:
    """``[b_1; ...; b_n]`` (out_1 + ... + out_n,) with zeros for bias-free linears; None if none has one."""
    biases = [_const(gm, _bias_arg(lin), dim=1) if _bias_arg(lin) is not None else None for lin in lins]
    if all(b is None for b in biases):
        return None
    return torch.cat([b.detach() if b is not None else w.new_zeros(w.shape[0]) for b, w in zip(biases, ws)])


@register_pass
class PackLinear(Pass):
    name = "pack_linear"
    stage = "finalize"
    requires = ("logits_selected",)
    provides = ("linear_packed",)

    def apply(self, program: Program, ctx: PassContext) -> Outcome:
        total, fused, biased = 0, 0, 0
        shared: dict[tuple[int, ...], torch.Tensor] = {}  # graphs share one packed copy per weight set
        for gm in (program.gm, *program.graphs.values()):
            for i, (x, lins) in enumerate(_linears(gm).items()):
                ws = [_const(gm, lin.args[1]).detach() for lin in lins]
                key = tuple((w.data_ptr(), tuple(w.shape)) for w in ws)
                if key not in shared:
                    shared[key] = torch.cat(ws, 0) if len(ws) > 1 else ws[0].contiguous()
                packed = shared[key]
                bias = _packed_bias(gm, lins, ws)
                name = f"_packed_w{i}"
                gm.register_buffer(name, packed, persistent=False)
                if bias is not None:
                    gm.register_buffer(f"_packed_b{i}", bias, persistent=False)
                first = lins[0]
                with gm.graph.inserting_before(first):
                    w_node = gm.graph.get_attr(name)
                    b_node = None
                    if bias is not None:
                        b_node = gm.graph.get_attr(f"_packed_b{i}")
                        biased += 1
                    mm = call(gm, torch.ops.accelc.linear.default, (x, w_node, b_node), like=first)
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
        return Outcome(total, (f"{total} linears packed as accelc.linear(x, W), {fused} of them fused with siblings sharing an input, "
                               f"{biased} packed groups carry a fused bias",))


import operator  # noqa: E402

_getitem = operator.getitem
