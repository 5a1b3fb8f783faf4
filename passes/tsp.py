"""tsp: FastKV token-selective propagation in prefill (Jo et al. 2025, "FastKV: KV Cache
Compression for Fast Long-Context Processing with Token-Selective Propagation").

After decoder layer L, the prompt tokens are scored by the attention the last ``window`` queries of
layer L give them (softmax, pooled along the sequence, summed over heads); the top ``keep`` tokens
plus the window propagate, the rest stop.  Layers > L run on the kept tokens only, at their original
positions, so prefill costs ~ (L+1)/n + (1-(L+1)/n)·keep of the full compute.  Decoding is unchanged
(layers > L simply hold fewer cache entries; each layer has its own cache length).

Rewrites the *prefill* graph only (see Program.prefill_graph)::

    h_L = <layer L output>  (B, S, C)            idx, count = accelc.tsp_select(q_L, k_cache_L, q_len, ...)
    cos, sin (B, S, D); S = sym_size(ids, 1)      every value crossing into layers > L with a sequence axis:
                                           =>       h_L' = accelc.gather_tokens(h_L, idx)          (B, K, C)
    layers > L use h_L, cos, sin, S, q_len          cos' / sin' likewise, S -> K, q_len -> count,
    gather_positions(h, logits_index)               logits_index -> accelc.remap_positions(idx, count, logits_index)

Sliding-window layers after L receive the gathered ``position_ids`` with everything else, so their
windows stay measured in token positions among the kept tokens.  Layer L itself must attend over
the whole prompt: a sliding-window layer's queries see only their last window of tokens and
cannot rank the rest, so choosing one is an error that lists the full-attention layers.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import SymInt

from accelc.capture import layer_of
from accelc.errors import AccelcError
from accelc.fx_utils import call, calls, placeholder
from accelc.ops import cached_attention_targets
from accelc.pass_manager import Outcome, Pass, PassContext, Program, register_pass

aten = torch.ops.aten


def keep_args(keep: float | int) -> tuple[float, int]:
    """Spec ``keep`` (fraction in (0, 1] or int budget) -> op args (fraction, budget)."""
    if isinstance(keep, bool):
        raise TypeError("keep must be a number")
    if isinstance(keep, int):
        return 1.0, int(keep)
    return float(keep), 0


def _same_sym(a, b) -> bool:
    return isinstance(a, SymInt) and isinstance(b, SymInt) and a.node.expr == b.node.expr


def _attention_of_layer(gm: fx.GraphModule, layer: int) -> fx.Node:
    for n in calls(gm, *cached_attention_targets()):
        if n.meta.get("accelc_layer") == layer:
            return n
    raise AccelcError("pass tsp", f"no attention found for layer {layer}")


@register_pass
class TokenSelectivePropagation(Pass):
    name = "tsp"
    feature = "token_selection"
    requires = ("kv_cache",)
    provides = ("token_selection",)

    def apply(self, program: Program, ctx: PassContext) -> Outcome:
        cfg = self.spec.prefill.token_selection
        info = program.info
        L = cfg.layer
        if L >= info.n_layers - 1:
            raise AccelcError("spec prefill.token_selection.layer", f"is {L}; the model has {info.n_layers} layers", f"use 0..{info.n_layers - 2}")
        if info.window(L):
            full = [l for l in range(info.n_layers - 1) if not info.window(l)]
            raise AccelcError(
                "spec prefill.token_selection.layer",
                f"layer {L} attends through a sliding window of {info.window(L)} tokens, so its attention cannot rank the whole prompt",
                f"choose a full-attention layer: {', '.join(map(str, full)) or 'this model has none before its last layer'}",
            )
        gm = program.prefill_graph()
        g = gm.graph
        attn = _attention_of_layer(gm, L)
        nodes = list(g.nodes)
        boundary = next((n for n in nodes if n.op == "call_function" and layer_of(n) == L + 1), None)
        if boundary is None:
            raise AccelcError("pass tsp", f"found no node of layer {L + 1}", "the graph's layers could not be located")
        after = set(nodes[nodes.index(boundary):])
        ids = placeholder(gm, "input_ids")
        S = ids.meta["val"].shape[1] if "val" in ids.meta else None
        q, _k, _v, k_cache, _vc, _cl, q_len, scale = attn.args[:8]
        fraction, budget = keep_args(cfg.keep)
        with g.inserting_before(boundary):
            sel = call(gm, torch.ops.accelc.tsp_select.default,
                       (q, k_cache, q_len, scale, cfg.window, cfg.kernel, cfg.pooling, fraction, budget, cfg.min_keep), like=attn)
            idx = call(gm, operator.getitem, (sel, 0), like=attn)
            count = call(gm, operator.getitem, (sel, 1), like=attn)
            k_size = call(gm, aten.sym_size.int, (idx, 1), like=attn)
        crossing = [n for n in nodes[: nodes.index(boundary)] if n.op != "get_attr" and any(u in after for u in n.users)]
        rewired = []
        for c in crossing:
            val = c.meta.get("val")
            new = None
            if c.op == "placeholder" and c.target == "q_len":
                new = count
            elif c.op == "placeholder" and c.target == "logits_index":
                with g.inserting_before(boundary):
                    new = call(gm, torch.ops.accelc.remap_positions.default, (idx, count, c))
            elif S is not None and _same_sym(val, S):
                new = k_size
            elif isinstance(val, torch.Tensor) and val.dim() >= 2 and S is not None and _same_sym(val.shape[1], S):
                with g.inserting_before(boundary):
                    new = call(gm, torch.ops.accelc.gather_tokens.default, (c, idx), like=c)
            if new is not None:
                c.replace_all_uses_with(new, delete_user_cb=lambda u: u in after)
                rewired.append(c.name)
        program.meta["tsp"] = {"layer": L, "keep": cfg.keep, "window": cfg.window}
        return Outcome(1, (f"after layer {L}: keep {cfg.keep} of the prompt (+{cfg.window} window); "
                           f"{len(rewired)} values gathered into layers > {L}: {', '.join(rewired)}",))
