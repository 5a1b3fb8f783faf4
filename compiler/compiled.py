"""``accelc.compile(model, spec) -> CompiledModel``: spec -> plan -> capture -> passes -> runtime."""
from __future__ import annotations

import time
import weakref
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from accelc.capture import Captured, ModelInfo, capture
from accelc.errors import AccelcError
from accelc.fx_utils import copy_graph_module
from accelc.pass_manager import PassContext, PassManager, Program, plan_passes

_CAPTURES: "weakref.WeakKeyDictionary[torch.nn.Module, Captured]" = weakref.WeakKeyDictionary()


def _captured(model: torch.nn.Module) -> tuple[fx.GraphModule, ModelInfo, float, bool]:
    """A fresh copy of ``model``'s captured graph (exported once per model per process)."""
    hit = model in _CAPTURES
    if not hit:
        _CAPTURES[model] = capture(model)
    c = _CAPTURES[model]
    return copy_graph_module(c.gm), c.info, c.seconds, hit


class CompiledModel:
    """A model compiled by accelc: the rewritten graph(s), the report, and ``generate``."""

    def __init__(self, program: Program, spec, tokenizer, model: torch.nn.Module, name: str, capture_s: float, cached: bool):
        self.program = program
        self.spec = spec
        self.tokenizer = tokenizer
        self.model = model
        self.name = name
        self.info = program.info
        self.capture_s = capture_s
        self.capture_cached = cached
        from accelc.runtime.engine import Engine

        self.engine = Engine(self)
        if spec.decode is not None and spec.decode.speculative is not None:  # speculative decoding loop
            from accelc.runtime.speculative.loop import SpeculativeEngine

            self.engine = SpeculativeEngine(self)

    @property
    def report(self) -> dict[str, Any]:
        info = self.info
        return {
            "model": self.name,
            "architecture": info.model_type,
            "layers": info.n_layers,
            "heads": info.n_heads,
            "kv_heads": info.n_kv_heads,
            "head_dim": info.head_dim,
            "features": self.spec.features(),
            "capture_s": round(self.capture_s, 3),
            "capture_cached": self.capture_cached,
            "backend": self.program.meta.get("backend"),
            "passes": [r.to_dict() for r in self.program.history],
            "graph_inputs": self.program.inputs,
        }

    def generate(self, prompts, max_new_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                 top_k: int | None = None, seed: int | None = None, chat: bool = False, stop=None, **kw):
        """Generate text; unset sampling arguments come from the spec's ``decode`` section."""
        from accelc.runtime.sampling import SamplingParams

        d = self.spec.decode
        params = SamplingParams(
            temperature=temperature if temperature is not None else (d.temperature if d else 0.0),
            top_p=top_p if top_p is not None else (d.top_p if d else 1.0),
            top_k=top_k if top_k is not None else (d.top_k if d else 0),
            seed=seed if seed is not None else (d.seed if d else None),
        )
        n = max_new_tokens if max_new_tokens is not None else (d.max_new_tokens if d else 128)
        stops = stop if stop is not None else (list(d.stop) if d else [])
        return self.engine.generate(prompts, max_new_tokens=n, sampling=params, chat=chat, stop=stops, **kw)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.engine.forward(input_ids)


def _check_supported(hf: torch.nn.Module, name: str) -> None:
    from accelc.models import SUPPORTED_ARCHITECTURES

    mt = getattr(hf.config, "model_type", None)
    if mt not in SUPPORTED_ARCHITECTURES:
        raise AccelcError(f"model {name}", f"architecture {mt!r} is not supported", f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}")


def compile_model(model, spec=None, *, dump: str | Path | None = None, device: torch.device | str | None = None, progress=None) -> CompiledModel:
    """Compile ``model`` (a :class:`accelc.models.LoadedModel` or a HF causal LM) with ``spec``."""
    from accelc.spec import Spec, load_spec

    spec = Spec.identity() if spec is None else load_spec(spec)
    tokenizer, name = None, type(model).__name__
    if hasattr(model, "model") and hasattr(model, "tokenizer") and not isinstance(model, torch.nn.Module):
        tokenizer, name, hf = model.tokenizer, model.name, model.model
    elif isinstance(model, torch.nn.Module):
        hf = model
    else:
        raise AccelcError("compile", f"expected a loaded model or a HF causal LM, got {type(model).__name__}", "use accelc.load_model('llama')")
    _check_supported(hf, name)
    spec.check_model(hf.config, source=getattr(spec, "source", None))
    passes = plan_passes(spec)
    if progress is not None:
        progress("capture")
    gm, info, capture_s, cached = _captured(hf)
    program = Program(gm=gm, info=info)
    dev = torch.device(device) if device is not None else info.device
    ctx = PassContext(spec=spec, model=hf, tokenizer=tokenizer, device=dev, dump_dir=Path(dump) if dump else None)
    PassManager(passes, ctx, progress=progress).run(program)
    return CompiledModel(program, spec, tokenizer, hf, name, capture_s, cached)
