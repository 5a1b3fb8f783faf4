"""early_exit: the pass serving ``decode.speculative`` -- exit heads for self-speculative drafts.

For ``draft: early_exit`` it adds a draft graph per exit layer k to ``program.graphs``: a copy of
the finished main graph cut after layer k, with the final norm and the LM head applied to the
residual stream there (LayerSkip, Elhoushi et al. 2024, "LayerSkip: Enabling Early Exit Inference
and Self-Speculative Decoding"; DEL, Zarch et al. 2025, for ``exit_layer: adaptive``)::

    main graph                                   draft graph "draft" (exit_layer k)
      h = embed(input_ids)                         h = embed(input_ids)
      h = layer_0(h, k_cache_0, ...)               h = layer_0(h, k_cache_0, ...)
      ...                                          ...
      h = layer_{n-1}(h, k_cache_{n-1}, ...)       h = layer_{k-1}(h, k_cache_{k-1}, ...)
                                                   [h = rmsnorm_1(h) @ A + b]        # exit_head: calibrated
      logits = lm_head(gather(norm(h), logits_index))   logits = lm_head(gather(norm(h), logits_index))

Contract of a draft graph (documented choice): its inputs are the main graph's inputs *minus* the
cache inputs of layers >= k, which are removed (``program.meta["speculative"]["inputs"][name]``
lists them, in order).  It reads and writes the *same* cache tensors as the main graph for layers
< k: drafting writes the draft tokens' entries of those layers, the runtime resets the lengths
afterwards, and the verification forward recomputes and overwrites them.

``exit_layer: adaptive`` builds one graph ``draft_<k>`` per candidate layer (about 1/8, 1/4, 3/8
and 1/2 of the depth); the runtime picks among them from the acceptance it observes.
``exit_head: calibrated`` inserts a linear adapter fitted at compile time by least squares on the
model's own hidden states (:mod:`accelc.runtime.speculative.calibrate`, cached on disk).

For ``prompt_lookup`` and ``token_recycling`` drafts there is nothing to rewrite: the drafters are
model-free and the main graph already verifies chains and trees (``tree_mask``).  The pass then
records the speculative plan in ``program.meta["speculative"]`` and reports one match (the plan)
with a note saying so.

The pass runs in the ``finalize`` stage after ``select_logits`` and ``pack_linear``, so a draft
graph shares the packed weights (and the LM head) of the main graph instead of packing its own
copies; ``lower`` then binds the kernels of every graph.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from accelc.capture import layer_of
from accelc.errors import AccelcError
from accelc.fx_utils import call
from accelc.pass_manager import Outcome, Pass, PassContext, Program, register_pass

aten = torch.ops.aten

ADAPTIVE_FRACTIONS = (0.125, 0.25, 0.375, 0.5)


def candidate_exit_layers(n_layers: int) -> list[int]:
    """Exit layers tried by ``exit_layer: adaptive``: about 1/8, 1/4, 3/8 and 1/2 of the depth."""
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


def build_draft_graph(main: fx.GraphModule, n_layers: int, exit_layer: int, adapter: Any = None) -> tuple[fx.GraphModule, list[str]]:
    """A draft graph exiting after ``exit_layer`` layers (module docstring); returns (graph, input names).

    main: the finished main graph (its final norm reads the residual stream leaving layer
    n_layers - 1); adapter: an :class:`~accelc.runtime.speculative.calibrate.ExitAdapter` or None.
    """
    if not 1 <= exit_layer < n_layers:
        raise AccelcError("pass early_exit", f"exit layer {exit_layer} is out of range", f"use 1..{n_layers - 1}")
    g = fx.Graph()
    g.output(g.graph_copy(main.graph, {}))
    final = layer_output(g, n_layers - 1)
    exit_h = layer_output(g, exit_layer - 1)
    heads = [u for u in final.users if u.op != "output" and layer_of(u) is None]
    if not heads:
        raise AccelcError("pass early_exit", "found no final norm reading the last layer's output", "unsupported model head")
    gm = fx.GraphModule(main, g, class_name="AccelcDraft")
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
    names = _prune(g)
    g.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm, names


def _graph_name(exit_layer: int, adaptive: bool) -> str:
    return f"draft_{exit_layer}" if adaptive else "draft"


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
        graphs: dict[int, str] = {}
        inputs: dict[str, list[str]] = {}
        for k in layers:
            gm, names = build_draft_graph(program.gm, n, k, adapters.get(k))
            name = _graph_name(k, adaptive)
            program.graphs[name] = gm
            graphs[k] = name
            inputs[name] = names
        plan.update(exit_layers=layers, graphs=graphs, inputs=inputs, exit_head=sp.exit_head, adaptive=adaptive)
        notes.insert(0, f"draft graphs {', '.join(graphs.values())} exit after layers {layers} of {n} (final norm + LM head)")
        return Outcome(len(layers), tuple(notes))
