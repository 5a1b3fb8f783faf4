"""early_exit: the pass serving ``decode.speculative`` -- exit heads for self-speculative drafts.

For ``draft: early_exit`` it cuts the finished main graph at exit layer k into three graphs
(LayerSkip, Elhoushi et al. 2024, "LayerSkip: Enabling Early Exit Inference and Self-Speculative
Decoding"; DEL, Zarch et al. 2025, for ``exit_layer: adaptive``)::

    main graph                           "draft" (k)                           "tail" (k)
      h = embed(input_ids)                 h = embed(input_ids)                  h = exit_hidden   (input)
      h = layer_0(h, k_cache_0, ...)       h = layer_0(h, k_cache_0, ...)        h = layer_k(h, k_cache_k, ...)
      ...                                  ...                                   ...
      h = layer_{n-1}(h, ...)              h = layer_{k-1}(h, ...)  -> exit_h    h = layer_{n-1}(h, ...)
                                           [x = rmsnorm_1(h) @ A + b]            # exit_head: calibrated
      logits = lm_head(gather(norm(h)))    logits = gather(norm(x)) @ draft_head_weight^T
                                           returns (logits, exit_h)              logits = lm_head(gather(norm(h)))

and "lower" (k), the draft graph without its head (returns exit_h only).  A speculative step runs
the draft graph once per drafted token and the tail graph once over all of them: the layers below
the exit are computed once per token, by the draft, and *reused* by the verification (their cache
entries are exactly what the full model writes).  The draft head reads the rows of the LM head
that the runtime passes as ``draft_head_weight``: all of them, or with ``draft_vocab: K`` the K
most frequent tokens plus the context's (a head 49152 x 576 is a fifth of SmolLM2's weights).

Contract (documented choice): each graph's inputs are the main graph's inputs that it still uses
(``program.meta["speculative"]["inputs"][name]`` lists them, in order): the draft and lower graphs
read and write the caches of layers < k only, the tail graph those of layers >= k plus
``exit_hidden``; rollback resets every layer's lengths as for any verification.

``exit_layer: adaptive`` builds the three graphs per candidate layer (about 1/2, 2/3, 4/5 and 9/10
of the depth; named ``draft_<k>``, ``lower_<k>``, ``tail_<k>``); the runtime picks among them from
the acceptance it observes.  ``exit_head: calibrated`` inserts a linear adapter fitted at compile
time by least squares on the model's own hidden states
(:mod:`accelc.runtime.speculative.calibrate`, cached on disk).

For ``prompt_lookup`` and ``token_recycling`` drafts there is nothing to rewrite: the drafters are
model-free and the main graph already verifies chains and trees (``tree_mask``).  The pass then
records the speculative plan in ``program.meta["speculative"]`` and reports one match (the plan)
with a note saying so.

The pass runs in the ``finalize`` stage after ``select_logits`` and ``pack_linear``, so the cut
graphs share the packed weights (and the LM head) of the main graph instead of packing their own
copies; ``lower`` then binds the kernels of every graph.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from accelc.capture import layer_of
from accelc.errors import AccelcError
from accelc.fx_utils import add_placeholder, call
from accelc.pass_manager import Outcome, Pass, PassContext, Program, register_pass
from accelc.passes.select_logits import lm_head

aten = torch.ops.aten

ADAPTIVE_FRACTIONS = (0.5, 0.67, 0.8, 0.9)


def candidate_exit_layers(n_layers: int) -> list[int]:
    """Exit layers tried by ``exit_layer: adaptive``: about 1/2, 2/3, 4/5 and 9/10 of the depth.

    On a checkpoint never trained for early exit the exit head only agrees with the full model from
    the upper layers on (SmolLM2-135M, calibrated head: 0.20 at layer 16, 0.61 at 24, 0.80 at 27;
    ``accelc bench --suite spec_exit``), so the candidates sit in the upper half; the runtime's
    choice among them weighs acceptance against the measured cost of each draft."""
    return sorted({min(n_layers - 1, max(1, round(n_layers * f))) for f in ADAPTIVE_FRACTIONS})


def layer_output(graph: fx.Graph, layer: int) -> fx.Node:
    """The residual stream leaving decoder layer ``layer``: its one node used outside the layer.

    Raises AccelcError when the layer has no such node or several (an unexpected architecture).
    """
    leaving = [
        n for n in graph.nodes
        if n.op == "call_function" and layer_of(n) == layer
        and any(u.op != "output" and layer_of(u) != layer for u in n.users)
    ]
    if len(leaving) != 1:
        raise AccelcError(
            "pass early_exit",
            f"expected one residual stream leaving layer {layer}, found {[n.name for n in leaving]}",
            "the decoder layers do not follow the pre-norm residual pattern of Llama-style models",
        )
    return leaving[0]


def _prune(graph: fx.Graph) -> list[str]:
    """Remove every node the output does not depend on (mutating ops and placeholders included:
    the cache writes of the layers cut away must go).  Returns the remaining placeholder names."""
    live: set[fx.Node] = set()
    stack = [graph.output_node()]
    while stack:
        n = stack.pop()
        if n in live:
            continue
        live.add(n)
        stack.extend(n.all_input_nodes)
    for n in reversed(list(graph.nodes)):
        if n not in live:
            graph.erase_node(n)
    return [n.target for n in graph.nodes if n.op == "placeholder"]


def _rms(gm: fx.GraphModule, h: fx.Node, like: fx.Node) -> fx.Node:
    """h / sqrt(mean(h^2, -1) + 1e-6), inserted at the current insertion point."""
    sq = call(gm, aten.pow.Tensor_Scalar, (h, 2), like=like)
    mean = call(gm, aten.mean.dim, (sq, [-1], True), like=like)
    inv = call(gm, aten.rsqrt.default, (call(gm, aten.add.Tensor, (mean, 1e-6), like=like),), like=like)
    return call(gm, aten.mul.Tensor, (h, inv), like=like)


def _copy(main: fx.GraphModule, class_name: str) -> fx.GraphModule:
    g = fx.Graph()
    g.output(g.graph_copy(main.graph, {}))
    return fx.GraphModule(main, g, class_name=class_name)


def _finish(gm: fx.GraphModule) -> list[str]:
    names = _prune(gm.graph)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return names


def build_draft_graph(main: fx.GraphModule, n_layers: int, exit_layer: int, adapter: Any = None,
                      head: bool = True) -> tuple[fx.GraphModule, list[str]]:
    """A draft graph exiting after ``exit_layer`` layers (module docstring); returns (graph, input names).

    main: the finished main graph (its final norm reads the residual stream leaving layer
    n_layers - 1); adapter: an :class:`~accelc.runtime.speculative.calibrate.ExitAdapter` or None.
    head=True: outputs ``(logits, exit_hidden)``, the logits over the rows of the graph input
    ``draft_head_weight`` (and ``draft_head_bias`` when the LM head has a bias) at
    ``logits_index``; head=False (the ``lower`` graph): outputs ``exit_hidden`` only.
    """
    if not 1 <= exit_layer < n_layers:
        raise AccelcError("pass early_exit", f"exit layer {exit_layer} is out of range", f"use 1..{n_layers - 1}")
    gm = _copy(main, "AccelcDraft" if head else "AccelcLower")
    g = gm.graph
    out = g.output_node()
    exit_h = layer_output(g, exit_layer - 1)
    if not head:
        out.args = (exit_h,)
        return gm, _finish(gm)
    final = layer_output(g, n_layers - 1)
    heads = [u for u in final.users if u.op != "output" and layer_of(u) is None]
    linear = lm_head(out.args[0], packed=True)
    if not heads or linear is None:
        raise AccelcError("pass early_exit", "found no final norm + LM head reading the last layer's output", "unsupported model head")
    source = exit_h
    if adapter is not None:
        gm.register_buffer("_exit_adapter_w", adapter.weight.to(exit_h.meta["val"].dtype), persistent=False)
        gm.register_buffer("_exit_adapter_b", adapter.bias.to(exit_h.meta["val"].dtype), persistent=False)
        with g.inserting_before(exit_h.next):
            w = g.get_attr("_exit_adapter_w")
            b = g.get_attr("_exit_adapter_b")
            scaled = _rms(gm, exit_h, exit_h)
            source = call(gm, aten.add.Tensor, (call(gm, aten.matmul.default, (scaled, w), like=exit_h), b), like=exit_h)
    for u in heads:
        u.replace_input_with(final, source)
    weight = linear.args[1]
    linear.replace_input_with(weight, add_placeholder(gm, "draft_head_weight", weight.meta.get("val")))
    if len(linear.args) > 2 and isinstance(linear.args[2], fx.Node):
        bias = linear.args[2]
        linear.replace_input_with(bias, add_placeholder(gm, "draft_head_bias", bias.meta.get("val")))
    out.args = ((out.args[0], exit_h),)
    return gm, _finish(gm)


def build_tail_graph(main: fx.GraphModule, n_layers: int, exit_layer: int) -> tuple[fx.GraphModule, list[str]]:
    """The main graph from layer ``exit_layer`` on: the residual stream entering that layer is the
    graph input ``exit_hidden`` (B, S, C) (what the draft graph computed); outputs the logits.
    Returns (graph, input names): the embedding and the layers below are gone, with their caches."""
    if not 1 <= exit_layer < n_layers:
        raise AccelcError("pass early_exit", f"exit layer {exit_layer} is out of range", f"use 1..{n_layers - 1}")
    gm = _copy(main, "AccelcTail")
    exit_h = layer_output(gm.graph, exit_layer - 1)
    entry = add_placeholder(gm, "exit_hidden", exit_h.meta.get("val"))
    exit_h.replace_all_uses_with(entry)
    return gm, _finish(gm)


def _graph_name(exit_layer: int, adaptive: bool, kind: str = "draft") -> str:
    return f"{kind}_{exit_layer}" if adaptive else kind


@register_pass
class EarlyExit(Pass):
    """Serves ``decode.speculative``: draft graphs for early exit, the plan for every draft."""

    name = "early_exit"
    stage = "finalize"
    feature = "speculative"
    requires = ("logits_selected", "linear_packed")
    provides = ("speculative_plan",)

    def apply(self, program: Program, ctx: PassContext) -> Outcome:
        sp = ctx.spec.decode.speculative
        plan: dict[str, Any] = {"draft": sp.draft, "gamma": sp.gamma, "gamma_max": sp.gamma_max, "verify": sp.verify}
        program.meta["speculative"] = plan
        if sp.draft != "early_exit":
            return Outcome(1, (f"{sp.draft}: model-free drafter, no graph rewrite (plan recorded; the main graph verifies)",))
        n = program.info.n_layers
        adaptive = sp.exit_layer == "adaptive"
        layers = candidate_exit_layers(n) if adaptive else [int(sp.exit_layer)]
        adapters: dict[int, Any] = {}
        notes: list[str] = []
        if sp.exit_head == "calibrated":
            if ctx.model is None:
                raise AccelcError("decode.speculative.exit_head", "calibrated needs the eager model to fit the adapter", "compile from a loaded model")
            from accelc.runtime.speculative.calibrate import exit_adapters

            adapters, hit = exit_adapters(ctx.model, layers, getattr(ctx, "tokenizer", None))
            notes.append("calibrated exit heads " + ("loaded from the disk cache" if hit else "fitted now")
                         + ": " + ", ".join(f"layer {k} R^2 {adapters[k].r2:.3f}" for k in layers))
        linear = lm_head(program.gm.graph.output_node().args[0], packed=True)
        head = [a.target if isinstance(a, fx.Node) and a.op == "get_attr" else None for a in linear.args[1:3]] if linear else []
        if not head or head[0] is None:
            raise AccelcError("pass early_exit", "the LM head's weight is not a parameter of the graph", "unsupported model head")
        kinds = {"draft": build_draft_graph, "lower": lambda *a: build_draft_graph(*a, head=False), "tail": build_tail_graph}
        graphs: dict[str, dict[int, str]] = {kind: {} for kind in kinds}
        inputs: dict[str, list[str]] = {}
        for k in layers:
            for kind, build in kinds.items():
                gm, names = build(program.gm, n, k, adapters.get(k)) if kind == "draft" else build(program.gm, n, k)
                name = _graph_name(k, adaptive, kind)
                program.graphs[name] = gm
                graphs[kind][k] = name
                inputs[name] = names
        plan.update(exit_layers=layers, graphs=graphs["draft"], lower=graphs["lower"], tail=graphs["tail"], inputs=inputs,
                    exit_head=sp.exit_head, adaptive=adaptive, head_weight=head[0], head_bias=head[1] if len(head) > 1 else None,
                    draft_vocab=sp.draft_vocab)
        notes.insert(0, f"draft graphs {', '.join(graphs['draft'].values())} exit after layers {layers} of {n} "
                        f"(final norm + LM head{' over ' + str(sp.draft_vocab) + ' + context tokens' if sp.draft_vocab else ''}); "
                        f"verification runs {', '.join(graphs['tail'].values())} from the exit layer on (drafted layers reused)")
        return Outcome(len(layers), tuple(notes))
