"""Small FX helpers shared by the passes: fake-tensor metadata, placeholders, node queries."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode


def fake_mode_of(gm: fx.GraphModule) -> FakeTensorMode | None:
    """The FakeTensorMode that produced the graph's ``meta["val"]`` (None if there is none)."""
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        if isinstance(v, FakeTensor):
            return v.fake_mode
    return None


def _vals(arg: Any) -> Any:
    return fx.node.map_arg(arg, lambda n: n.meta.get("val"))


def infer_val(gm: fx.GraphModule, target: Callable, args: tuple, kwargs: dict | None = None) -> Any:
    """``meta["val"]`` for a new call of ``target`` on nodes (runs the fake impl); None if unknown."""
    mode = fake_mode_of(gm)
    if mode is None:
        return None
    fargs, fkwargs = _vals(args), _vals(kwargs or {})
    leaves = [a for a in torch.utils._pytree.tree_leaves((fargs, fkwargs))]
    if any(a is None and False for a in leaves):
        return None
    try:
        with mode:
            return target(*fargs, **fkwargs)
    except Exception:
        return None


def call(gm: fx.GraphModule, target: Callable, args: tuple, kwargs: dict | None = None, *, like: fx.Node | None = None) -> fx.Node:
    """Insert ``target(*args, **kwargs)`` at the graph's current insertion point with meta.

    ``like``: a node whose ``nn_module_stack``/``accelc_layer`` metadata the new node inherits.
    """
    node = gm.graph.call_function(target, args, kwargs or {})
    if like is not None:
        for key in ("nn_module_stack", "accelc_layer", "stack_trace"):
            if key in like.meta:
                node.meta[key] = like.meta[key]
    val = infer_val(gm, target, args, kwargs)
    if val is not None:
        node.meta["val"] = val
    return node


def new_symint(gm: fx.GraphModule):
    """A fresh symbolic size for a dimension the runtime chooses (e.g. cache capacity)."""
    mode = fake_mode_of(gm)
    if mode is None or mode.shape_env is None:
        return None
    return mode.shape_env.create_unbacked_symint()


def add_placeholder(gm: fx.GraphModule, name: str, val: Any = None) -> fx.Node:
    """Append a placeholder (graph input) named ``name`` after the existing ones."""
    last = None
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            last = n
    g = gm.graph
    ctx = g.inserting_after(last) if last is not None else g.inserting_before(next(iter(g.nodes)))
    with ctx:
        node = g.placeholder(name)
    if val is not None:
        node.meta["val"] = val
    return node


def fake_tensor(gm: fx.GraphModule, shape: Iterable, dtype: torch.dtype, device: torch.device | str = "cpu"):
    """A fake tensor of ``shape`` (ints or SymInts) in the graph's fake mode, or None."""
    mode = fake_mode_of(gm)
    if mode is None:
        return None
    with mode:
        return torch.empty(tuple(shape), dtype=dtype, device=device)


def calls(gm: fx.GraphModule, *targets: Callable) -> list[fx.Node]:
    """All call_function nodes whose target is one of ``targets``."""
    ts = set(targets)
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in ts]


def placeholder(gm: fx.GraphModule, name: str) -> fx.Node:
    for n in gm.graph.nodes:
        if n.op == "placeholder" and n.target == name:
            return n
    raise KeyError(name)


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule with a copy of ``gm``'s graph, sharing its parameters and buffers."""
    g = fx.Graph()
    out = g.graph_copy(gm.graph, {})
    g.output(out)
    g._codegen = gm.graph._codegen
    return fx.GraphModule(gm, g, class_name=type(gm).__name__)
