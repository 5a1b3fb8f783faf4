"""``torch.compile(model, backend="accelc", options={"spec": ...})``: accelc as a Dynamo backend.

The backend is registered through the ``torch_dynamo_backends`` entry point in ``pyproject.toml``,
so after ``pip install`` the user never imports accelc: Dynamo loads
:func:`accelc_backend` by name on the first compiled call and passes ``options`` as a keyword
(``torch._TorchCompileWrapper`` forwards ``options=`` to every backend that is not Inductor).

For each graph Dynamo hands over (HF's forward with its own ``DynamicCache``):

1. **to ATen** -- the Dynamo graph is retraced with ``make_fx(pre_dispatch=True)`` on Dynamo's
   own fake inputs: the same ATen IR as :func:`accelc.capture.capture` (``aten.linear``,
   ``aten.scaled_dot_product_attention`` kept whole), so accelc's passes apply unchanged;
2. **passes** -- :class:`~accelc.passes.canonicalize.Canonicalize`, then
   :class:`~accelc.passes.lift_attention.LiftCausalSDPA`: every SDPA that is provably causal
   attention of a whole sequence (HF's prefill without padding) becomes ``accelc::attention``;
   masked or cached attention (decode steps, padded batches, sliding windows) stays ATen;
3. **AOTAutograd** -- ``aot_module_simplified`` functionalizes and decomposes the rest (the accelc
   op is opaque to it), and its forward compiler **lowers** each ``accelc::attention`` to the
   kernel for the device (Triton on CUDA, the torch reference on CPU; ``accelc.kernels.dispatch``).

Runtime-level features of a spec cannot live inside HF's ``generate`` loop: KV compression
across steps and speculative decoding need accelc's own KV cache and engine, and so do token
selection and sparse attention (their rewrites read and write that cache).  A spec asking for them
is an :class:`AccelcError` that points to ``accelc.compile(model, spec).generate``.

Grad mode: the accelc ops have no autograd formula, so a graph that needs gradients skips step 2
(it compiles exactly like ``aot_eager``).

Recompilations are Dynamo's (measured on a tiny Llama with transformers 5, tests/test_backend.py):
HF ``generate`` compiles a static prefill graph and a static decode graph, then Dynamo's automatic
dynamic shapes add one decode graph with a dynamic cache length (second decode step) and one
prefill graph with a dynamic prompt length (second prompt length): 4 graphs in all, none after that
for any prompt length or number of decode steps.  ``torch.compile(..., dynamic=True)`` compiles
2 (one prefill, one decode).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor

from accelc.errors import AccelcError, NotImplementedYet

log = logging.getLogger(__name__)

OPTIONS: dict[str, str] = {"spec": "a spec file path, a dict or an accelc.spec.Spec (default: the identity spec `accelc: 1`)"}
"""The keys ``torch.compile(..., options=...)`` accepts, with what each takes."""

_USE_ENGINE = "use accelc.compile(model, spec).generate(...), which runs accelc's own KV cache and decode loop"
RUNTIME_ONLY: dict[str, str] = {
    "kv_compression": "kv_cache.compression keeps a compressed KV cache across decode steps",
    "speculative": "decode.speculative drafts and verifies tokens across decode steps",
}
"""Spec features that only exist in accelc's engine (they change what happens between forwards)."""
NOT_YET: dict[str, str] = {
    "token_selection": "prefill.token_selection writes fewer KV entries for later layers into accelc's cache",
    "sparse_attention": "attention.sparse selects KV entries of accelc's cache at each decode step",
}
"""Spec features whose rewrites need accelc's cache plumbing; the backend does not apply them yet."""


def backend_spec(options: Mapping[str, Any] | None):
    """The validated :class:`accelc.spec.Spec` of ``torch.compile``'s ``options``.

    options: None (identity spec) or a mapping with the keys in :data:`OPTIONS`.  Raises
    :class:`AccelcError` for an unknown key, an invalid spec, or a feature the backend cannot apply.
    """
    from accelc.spec import Spec, load_spec

    if options is None:
        return Spec.identity()
    if not isinstance(options, Mapping):
        raise AccelcError("torch.compile options", f"expected a dict, got {type(options).__name__}", 'use options={"spec": "specs/x.yaml"}')
    for key in options:
        if key not in OPTIONS:
            raise AccelcError(f"torch.compile options.{key}", "unknown option", f"accelc's options: {', '.join(f'{k} ({v})' for k, v in OPTIONS.items())}")
    spec = Spec.identity() if options.get("spec") is None else load_spec(options["spec"])
    check_backend_features(spec)
    return spec


def check_backend_features(spec) -> None:
    """Raise :class:`AccelcError` for every feature of ``spec`` the backend cannot apply (see module docstring)."""
    from accelc.pass_manager import spec_key

    for feat in spec.features():
        if feat in RUNTIME_ONLY:
            raise AccelcError(f"spec {spec_key(feat)}", f"is a runtime feature that torch.compile cannot apply: {RUNTIME_ONLY[feat]}", _USE_ENGINE)
        if feat in NOT_YET:
            raise NotImplementedYet(f"spec {spec_key(feat)}", f"is not applied by the torch.compile backend yet: {NOT_YET[feat]}", _USE_ENGINE)


def _device_of(example_inputs: Sequence[Any]) -> torch.device:
    """The device of the first tensor input (CPU when there is none)."""
    return next((x.device for x in example_inputs if isinstance(x, torch.Tensor)), torch.device("cpu"))


def _needs_grad(example_inputs: Sequence[Any]) -> bool:
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs)


def to_aten(gm: fx.GraphModule) -> fx.GraphModule | None:
    """Retrace a Dynamo graph into pre-dispatch ATen IR on its own fake inputs (None if it has none).

    Pre-dispatch keeps the ops accelc's passes match (``aten.linear``, whole
    ``aten.scaled_dot_product_attention``); nodes carry ``meta["val"]`` with Dynamo's symbolic shapes.
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    vals = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
    modes = {v.fake_mode for v in vals if isinstance(v, FakeTensor)}
    if not vals or any(v is None for v in vals) or len(modes) != 1:
        return None
    with modes.pop():
        return make_fx(gm, pre_dispatch=True)(*vals)


def run_graph_passes(gm: fx.GraphModule, spec, device: torch.device) -> fx.GraphModule:
    """Canonicalize and lift causal attention in an ATen graph; the pass history is logged."""
    from accelc.pass_manager import PassContext, PassManager, Program
    from accelc.passes.canonicalize import Canonicalize
    from accelc.passes.lift_attention import LiftCausalSDPA

    program = Program(gm=gm, info=None)  # a Dynamo graph has no ModelInfo; these passes do not read it
    PassManager([Canonicalize(spec), LiftCausalSDPA(spec)], PassContext(spec=spec, device=device)).run(program)
    for r in program.history:
        log.info("accelc backend: %s: %d matches (%s)", r.name, r.matches, "; ".join(r.notes))
    return program.gm


def attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``accelc::attention`` lowered to the torch reference kernel.

    q: (B, H, S, D); k, v: (B, Hkv, S, D).  Returns (B, H, S, D), causal.
    """
    return _attention(q, k, v, scale, "torch")


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``accelc::attention`` lowered to the Triton kernel (CUDA); shapes as :func:`attention_torch`."""
    return _attention(q, k, v, scale, "triton")


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, backend: str) -> torch.Tensor:
    from accelc.kernels.dispatch import lookup

    B, _, S, _ = q.shape
    kv_len = torch.full((B,), S, dtype=torch.long, device=q.device)
    return lookup("attention", prefer=backend)(q, k, v, kv_len, scale, None)


def lower_attention(gm: fx.GraphModule, device: torch.device) -> int:
    """Bind every ``accelc::attention`` call of ``gm`` to the kernel for ``device``; returns the count."""
    from accelc.kernels.dispatch import lookup

    triton_ok = lookup("attention", device) is not lookup("attention", prefer="torch")
    target = attention_triton if triton_ok else attention_torch
    n = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.accelc.attention.default:
            node.target = target
            n += 1
    if n:
        gm.recompile()
        log.info("accelc backend: lowered %d accelc.attention calls to %s kernels", n, "triton" if triton_ok else "torch")
    return n


def _forward_compiler(device: torch.device) -> Callable:
    from functorch.compile import make_boxed_func

    from accelc.runtime.pystack import deep_stack

    def compile_fw(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        lower_attention(gm, device)
        # one FX forward frame per model call: run it below a roomy frame (accelc.runtime.pystack)
        return make_boxed_func(deep_stack(gm))

    return compile_fw


def accelc_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Callable:
    """The Dynamo backend (see the module docstring).

    gm: the graph Dynamo captured; example_inputs: its inputs (tensors, SymInts); kwargs: what
    ``torch.compile`` forwards, ``options`` (see :data:`OPTIONS`) and ``mode`` (must be unset).
    Returns the compiled callable.  Raises :class:`AccelcError` for bad options or a spec feature
    the backend cannot apply.
    """
    from torch._functorch.aot_autograd import aot_module_simplified

    unknown = sorted(set(kwargs) - {"options", "mode"})
    if unknown:
        raise AccelcError("torch.compile", f"unexpected backend arguments {unknown}", 'pass options={"spec": ...}')
    if kwargs.get("mode") not in (None, "default"):
        raise AccelcError("torch.compile mode", f"{kwargs['mode']!r} has no meaning for accelc", 'describe the compilation in the spec: options={"spec": ...}')
    spec = backend_spec(kwargs.get("options"))
    device = _device_of(example_inputs)
    if not _needs_grad(example_inputs):
        aten = to_aten(gm)
        if aten is not None:
            gm = run_graph_passes(aten, spec, device)
    return aot_module_simplified(gm, example_inputs, fw_compiler=_forward_compiler(device))


__all__ = ["OPTIONS", "RUNTIME_ONLY", "NOT_YET", "accelc_backend", "backend_spec", "check_backend_features",
           "lower_attention", "run_graph_passes", "to_aten", "attention_torch", "attention_triton"]
