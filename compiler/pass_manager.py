"""The only place that orders, runs, times, lints and records passes (DESIGN.md, "Pass contract").

A pass is a subclass of :class:`Pass` in its own file under ``passes/``, registered by name with
:func:`register_pass`.  It declares the spec feature it serves (``feature``; None for the core
passes that always run), what it ``requires`` and ``provides`` (capabilities such as
``attention_lifted``), and its ``stage``.  :func:`plan_passes` orders the requested passes with a
networkx topological sort of stage order plus requires -> provides edges; a cycle or a missing
provider is an error.  :class:`PassManager` runs them: for each pass it counts nodes, times the
pass, lints the graph, recompiles, optionally dumps the graph text, and records a frozen
:class:`PassResult` in ``program.history``.  A pass that matches nothing where the spec asked for
it is an error, never a silent no-op.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import networkx as nx
import torch
import torch.fx as fx

from accelc.capture import ModelInfo
from accelc.errors import AccelcError

# Stages, in order.  Passes of an earlier stage always run before passes of a later one.
STAGES = ("canonicalize", "lift", "cache", "feature", "finalize", "lower")


@dataclass(frozen=True)
class PassResult:
    """What one pass did (kept in ``program.history`` and printed by ``accelc compile``)."""

    name: str
    matches: int
    nodes_before: int
    nodes_after: int
    seconds: float
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "matches": self.matches,
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "seconds": round(self.seconds, 4),
            "notes": list(self.notes),
        }


@dataclass
class Program:
    """The graphs being compiled and the facts the runtime needs about them.

    gm: the main graph (prefill/decode/verify).  graphs: extra entry points a pass may add
    (e.g. ``draft`` for early-exit self-speculation).  inputs: the runtime contract, the names of
    the main graph's placeholders in order.  meta: per-feature facts the runtime reads
    (e.g. ``meta["tsp"]``).  history: one PassResult per pass run.
    """

    gm: fx.GraphModule
    info: ModelInfo
    graphs: dict[str, fx.GraphModule] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    history: list[PassResult] = field(default_factory=list)

    def prefill_graph(self) -> fx.GraphModule:
        """The graph the runtime uses for a fresh prompt (created from ``gm`` on first use).

        Prefill-only rewrites (token selection, KV compression, block-sparse prefill) go here,
        so decode and speculative verification keep running the main graph untouched.
        """
        if "prefill" not in self.graphs:
            from accelc.fx_utils import copy_graph_module

            self.graphs["prefill"] = copy_graph_module(self.gm)
        return self.graphs["prefill"]

    @property
    def inputs(self) -> list[str]:
        return [n.target for n in self.gm.graph.nodes if n.op == "placeholder"]


@dataclass
class PassContext:
    """Everything a pass may read besides the graph: the spec, the eager model (for calibration)."""

    spec: Any
    model: torch.nn.Module | None = None
    tokenizer: Any = None
    device: torch.device = torch.device("cpu")
    dump_dir: Path | None = None


@dataclass(frozen=True)
class Outcome:
    """What a pass's ``apply`` returns: how many sites it rewrote, and notes for the report."""

    matches: int
    notes: tuple[str, ...] = ()


class Pass(ABC):
    """Base class of every pass.  Subclasses set the class attributes and write ``apply`` only."""

    name: ClassVar[str]
    stage: ClassVar[str] = "feature"
    feature: ClassVar[str | None] = None  # spec feature served (see Spec.features()); None = core
    requires: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[tuple[str, ...]] = ()
    # A pass the spec asked for must match at least one site; core passes may legitimately match 0.
    must_match: ClassVar[bool] = True

    def __init__(self, spec: Any = None):
        self.spec = spec

    def applies(self, spec: Any) -> bool:
        """Whether this pass is part of the plan for ``spec`` (features: when requested)."""
        return self.feature is None or self.feature in spec.features()

    @abstractmethod
    def apply(self, program: Program, ctx: PassContext) -> Outcome:
        """Rewrite ``program`` in place; return the number of matches and notes."""


_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: add a pass to the registry (duplicate names are an error)."""
    name = getattr(cls, "name", None)
    if not name:
        raise TypeError(f"{cls.__qualname__} must set a `name`")
    if cls.stage not in STAGES:
        raise TypeError(f"{cls.__qualname__}.stage must be one of {STAGES}, got {cls.stage!r}")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"pass name {name!r} is already registered by {_REGISTRY[name].__qualname__}")
    _REGISTRY[name] = cls
    return cls


def registry() -> dict[str, type[Pass]]:
    """All registered passes by name (imports every module of ``accelc.passes`` once)."""
    import importlib
    import pkgutil

    import accelc.passes as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"accelc.passes.{info.name}")
    return dict(_REGISTRY)


def feature_passes() -> dict[str, type[Pass]]:
    """Spec feature name -> the pass that serves it."""
    return {cls.feature: cls for cls in registry().values() if cls.feature is not None}


def order_passes(classes: list[type[Pass]]) -> list[type[Pass]]:
    """Topologically order passes: stage order, then requires -> provides edges.

    Raises AccelcError for a requirement nobody in the plan provides, or a cycle.
    """
    g = nx.DiGraph()
    names = {c.name: c for c in classes}
    g.add_nodes_from(names)
    providers: dict[str, list[str]] = {}
    for c in classes:
        for cap in c.provides:
            providers.setdefault(cap, []).append(c.name)
    for c in classes:
        for req in c.requires:
            if req not in providers:
                raise AccelcError(
                    f"pass {c.name}", f"requires {req!r} but no pass in the plan provides it",
                    f"planned passes: {', '.join(sorted(names))}",
                )
            for p in providers[req]:
                if p != c.name:
                    g.add_edge(p, c.name)
    for a in classes:
        for b in classes:
            if STAGES.index(a.stage) < STAGES.index(b.stage):
                g.add_edge(a.name, b.name)
    try:
        order = list(nx.lexicographical_topological_sort(g, key=lambda n: (STAGES.index(names[n].stage), n)))
    except nx.NetworkXUnfeasible:
        cycle = nx.find_cycle(g)
        raise AccelcError("pass plan", f"passes depend on each other in a cycle: {cycle}", "fix their requires/provides") from None
    return [names[n] for n in order]


def plan_passes(spec: Any) -> list[Pass]:
    """The ordered passes for ``spec``: the core passes plus one per requested feature.

    A requested feature that no registered pass serves is a clear "not implemented yet" error.
    """
    from accelc.errors import NotImplementedYet

    reg = registry()
    served = feature_passes()
    for feat in spec.features():
        if feat not in served:
            raise NotImplementedYet(
                f"spec {spec_key(feat)}",
                "is valid but not implemented yet in this version of accelc",
                f"remove the section to compile; implemented features: {', '.join(sorted(served)) or 'none'}",
            )
    chosen = [cls for cls in reg.values() if cls(spec).applies(spec)]
    return [cls(spec) for cls in order_passes(chosen)]


_FEATURE_KEYS = {
    "token_selection": "prefill.token_selection",
    "kv_compression": "kv_cache.compression",
    "sparse_attention": "attention.sparse",
    "speculative": "decode.speculative",
}


def spec_key(feature: str) -> str:
    """The spec key path of a feature name."""
    return _FEATURE_KEYS.get(feature, feature)


def count_nodes(gm: fx.GraphModule) -> int:
    return sum(1 for _ in gm.graph.nodes)


class PassManager:
    """Runs an ordered list of passes over a Program with bookkeeping (see module docstring)."""

    def __init__(self, passes: list[Pass], ctx: PassContext, progress=None):
        self.passes = passes
        self.ctx = ctx
        self.progress = progress  # optional callable(name) for a progress display

    def run(self, program: Program) -> Program:
        if self.ctx.dump_dir is not None:
            self.ctx.dump_dir.mkdir(parents=True, exist_ok=True)
            self._dump(program, 0, "captured")
        for i, p in enumerate(self.passes, start=1):
            if self.progress is not None:
                self.progress(p.name)
            before = count_nodes(program.gm)
            t0 = time.perf_counter()
            try:
                outcome = p.apply(program, self.ctx)
                for gm in (program.gm, *program.graphs.values()):
                    gm.graph.lint()
                    gm.recompile()
            except AccelcError:
                raise
            except Exception as e:
                done = [r.name for r in program.history]
                raise AccelcError(
                    f"pass {p.name}",
                    f"failed with {type(e).__name__}: {e}",
                    f"passes run before it: {', '.join(done) or 'none'}; rerun with --dump DIR to inspect the graphs",
                ) from e
            if outcome.matches == 0 and p.feature is not None and p.must_match:
                raise AccelcError(
                    f"pass {p.name}",
                    f"matched nothing in the graph although the spec asks for {spec_key(p.feature)}",
                    "the captured model has no site this pass can rewrite; check the model architecture and the spec's layers",
                )
            res = PassResult(p.name, outcome.matches, before, count_nodes(program.gm), time.perf_counter() - t0, tuple(outcome.notes))
            program.history.append(res)
            if self.ctx.dump_dir is not None:
                self._dump(program, i, p.name)
        return program

    def _dump(self, program: Program, i: int, name: str) -> None:
        d = self.ctx.dump_dir
        assert d is not None
        (d / f"{i:02d}_{name}.txt").write_text(str(program.gm.graph))
        for gname, gm in program.graphs.items():
            (d / f"{i:02d}_{name}.{gname}.txt").write_text(str(gm.graph))
