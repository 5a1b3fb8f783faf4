"""Capture a HF causal LM as an FX graph of ATen ops (DESIGN.md, "Capture and custom ops").

``torch.export.export(model, (), kwargs={input_ids, position_ids}, dynamic_shapes=..., strict=False)``
with a dynamic batch and sequence dimension, then :meth:`ExportedProgram.module` (parameters become
``get_attr`` nodes).  The pytree plumbing and the shape guards of ``ExportedProgram.module()`` are
removed: the passes and the runtime call the graph positionally/by keyword with plain tensors and
check shapes themselves.  Each node keeps ``nn_module_stack``, from which :func:`layer_of` reads the
decoder layer index (``model.layers.N``).

Sliding-window layers (Gemma 3's ``sliding_attention`` layers, Mistral v0.1, Qwen2 with
``use_sliding_window``) are read from the config into :attr:`ModelInfo.windows`, which
``lift_attention`` turns into windowed attention ops.  :func:`check_attention` refuses (before
exporting) the attention variants accelc's ops do not compute: other layer types (chunked,
bidirectional), attention-logit soft-capping.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from accelc.errors import AccelcError

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class ModelInfo:
    """What passes and the runtime need to know about the captured model (from its config)."""

    model_type: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_positions: int
    dtype: torch.dtype
    device: torch.device
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    windows: tuple[int, ...] = ()
    """Per decoder layer: its sliding window (query ``p`` sees keys ``p - w < j <= p``), 0 for full
    causal attention (also when the window covers ``max_positions``); empty means all full."""

    def window(self, layer: int) -> int:
        """Layer ``layer``'s sliding window, 0 for full causal attention."""
        return self.windows[layer] if self.windows else 0

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "ModelInfo":
        cfg = model.config
        n_heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
        eos = cfg.eos_token_id
        gen = getattr(model, "generation_config", None)
        if gen is not None and gen.eos_token_id is not None:
            eos = gen.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
        p = next(model.parameters())
        return cls(
            model_type=cfg.model_type,
            n_layers=cfg.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=getattr(cfg, "num_key_value_heads", None) or n_heads,
            head_dim=head_dim,
            hidden_size=cfg.hidden_size,
            vocab_size=cfg.vocab_size,
            max_positions=getattr(cfg, "max_position_embeddings", 2048),
            dtype=p.dtype,
            device=p.device,
            eos_token_ids=eos_ids,
            pad_token_id=int(pad),
            windows=tuple(w or 0 for w in attention_windows(cfg)),
        )


@dataclass
class Captured:
    """The captured graph plus what was learned while capturing it."""

    gm: fx.GraphModule
    info: ModelInfo
    seconds: float
    notes: list[str] = field(default_factory=list)


def layer_of(node: fx.Node) -> int | None:
    """The decoder layer index a node belongs to (from ``nn_module_stack``), or None."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, _cls in reversed(list(stack.values())):
        m = _LAYER_RE.search(path)
        if m:
            return int(m.group(1))
    if "accelc_layer" in node.meta:
        return node.meta["accelc_layer"]
    return None


def attention_windows(config: Any) -> list[int | None]:
    """Per decoder layer, the sliding-window size HF applies to it (None: full causal attention).

    Reads ``layer_types`` (``full_attention`` / ``sliding_attention``, as Qwen2 and Gemma 3 set it)
    and ``sliding_window`` (every layer of Mistral when there are no layer types).  A window at
    least as long as ``max_position_embeddings`` never hides a key, so it counts as full attention.
    Any other layer type (chunked, bidirectional, ...) is an :class:`AccelcError`.
    """
    window = getattr(config, "sliding_window", None)
    context = getattr(config, "max_position_embeddings", None)
    if window is not None and context is not None and window >= context:
        window = None
    types = getattr(config, "layer_types", None)
    if types is None:
        return [window] * int(config.num_hidden_layers)
    out: list[int | None] = []
    for i, kind in enumerate(types):
        if kind == "full_attention":
            out.append(None)
        elif kind == "sliding_attention":
            out.append(window)
        else:
            raise AccelcError(
                f"capture {config.model_type}", f"layer {i} has attention type {kind!r}",
                "accelc supports full_attention and sliding_attention layers",
            )
    return out


def check_attention(config: Any) -> None:
    """Raise :class:`AccelcError` unless every layer's attention is one accelc's ops compute.

    Supported: causal attention over the whole context or through a sliding window
    (:func:`attention_windows`), any scale.  Refused: other layer types, soft-capped attention
    logits (``attn_logit_softcapping``, Gemma 2 style), bidirectional attention.
    """
    attention_windows(config)
    where = f"capture {config.model_type}"
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise AccelcError(where, f"attention logits are soft-capped (attn_logit_softcapping={config.attn_logit_softcapping})",
                          "accelc's attention ops compute plain softmax attention; set attn_logit_softcapping to null")
    if getattr(config, "use_bidirectional_attention", False):
        raise AccelcError(where, "the layers attend bidirectionally (use_bidirectional_attention=True)",
                          "accelc compiles causal language models only")


def _strip_export_plumbing(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop pytree flattening, the guard call and unused placeholders; plain positional codegen."""
    g = gm.graph
    for node in list(g.nodes):
        if node.op == "call_module" and str(node.target) == "_guards_fn":
            g.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    for node in list(g.nodes):
        if node.op == "placeholder" and not node.users:
            g.erase_node(node)
    out = g.output_node()
    (res,) = out.args
    if isinstance(res, (tuple, list)):
        if len(res) != 1:
            raise AccelcError("capture", f"expected the model to return logits only, got {len(res)} outputs")
        out.args = (res[0],)
    g._codegen = fx.graph.CodeGen()
    g.lint()
    # A fresh GraphModule: ExportedProgram.module() installs input-check hooks on its instance.
    return fx.GraphModule(gm, g, class_name="AccelcGraph")


def capture(model: torch.nn.Module, *, example_len: int = 16, max_len: int | None = None) -> Captured:
    """Export ``model`` (a HF causal LM) to an FX GraphModule of ATen ops.

    The graph takes ``input_ids (B, S) int64`` and ``position_ids (B, S) int64`` and returns
    ``logits (B, S, V)``; B and S are dynamic.  Raises :class:`AccelcError` for attention variants
    accelc does not compute (:func:`check_attention`) and naming the construct that ``torch.export``
    could not handle.
    """
    check_attention(model.config)
    info = ModelInfo.from_model(model)
    max_len = max_len or max(info.max_positions, example_len + 1)
    ids = torch.zeros((2, example_len), dtype=torch.long, device=info.device)
    pos = torch.arange(example_len, device=info.device).expand(2, example_len).contiguous()
    B = torch.export.Dim("batch", min=1, max=1024)
    S = torch.export.Dim("seq", min=1, max=max_len)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            ep = torch.export.export(
                model,
                (),
                kwargs={"input_ids": ids, "position_ids": pos, "use_cache": False},
                dynamic_shapes={"input_ids": {0: B, 1: S}, "position_ids": {0: B, 1: S}, "use_cache": None},
                strict=False,
            )
    except Exception as e:  # export failures are user-facing: name the construct
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AccelcError(
            f"capture {type(model).__name__}",
            f"torch.export failed: {type(e).__name__}: {first[:300]}",
            "accelc captures HF causal LMs that export with strict=False; see `accelc compile --help` for supported architectures",
        ) from None
    gm = _strip_export_plumbing(ep.module())
    return Captured(gm=gm, info=info, seconds=time.perf_counter() - t0)
