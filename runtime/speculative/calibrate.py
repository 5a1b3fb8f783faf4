"""Calibrated early-exit heads: a linear adapter from layer k's residual stream to the last layer's.

A vanilla checkpoint was never trained to decode from an intermediate layer: the final norm and
the LM head expect the residual stream of the *last* layer.  The adapter maps the hidden state
after the first k layers onto an estimate of that stream,

    h_final ~= h_k @ A + b          A: (C, C), b: (C,)

fitted once by ridge-regularised least squares over the model's own hidden states on a calibration
text (the idea of a learned linear shortcut between layers, Din et al. 2023, "Jump to
Conclusions: Short-Cutting Transformers With Linear Transformations"; used here as the exit head of
self-speculative decoding, LayerSkip / Elhoushi et al. 2024, without any training of the model).
Both sides are divided by their RMS first: the final RMSNorm discards the scale of the residual
stream anyway, and without it the few massive-activation dimensions of the residual stream
dominate the squared error.  Since RMSNorm is scale invariant, ``norm(h_k @ A + b)`` on the unscaled
state then differs from the fitted map only through b; b is fitted on the scaled states and the
draft graph rescales h_k before applying the adapter (see :mod:`accelc.passes.early_exit`).

Fitting SmolLM2-135M on 8192 tokens takes ~20 s on a CPU (one forward; a (C+1)^2 system per exit
layer).  The fit needs that much text: 577 unknowns per output dimension; on held-out HumanEval
continuations top-1 agreement at layers 24 / 26 / 28 is 0.73 / 0.80 / 0.78 with 2048 calibration
tokens, 0.75 / 0.83 / 0.89 with 8192 and no better with 16384.  The result is cached on disk
under ``accelc.models.cache_dir() / "exit_adapters"`` keyed by a fingerprint of the weights, the
exit layer and the calibration settings.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["ExitAdapter", "calibration_ids", "exit_adapters", "fit_exit_adapters", "model_fingerprint"]

CALIBRATION_TOKENS = 8192
WINDOW = 256
SKIP = 4  # first positions of every window (attention-sink tokens with outlier activations)
RIDGE = 1e-2


@dataclass(frozen=True)
class ExitAdapter:
    """``h_final / rms(h_final) ~= (h_k / rms(h_k)) @ weight + bias``.

    weight: (C, C) float32; bias: (C,) float32; r2: fraction of the variance of the target explained
    on the calibration tokens (a diagnostic for the report).
    """

    weight: torch.Tensor
    bias: torch.Tensor
    r2: float


def _rms_normalise(h: torch.Tensor) -> torch.Tensor:
    """h (T, C) -> h / rms(h) row-wise."""
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the config and the weights (name, shape and a float64 sum per tensor)."""
    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, p in model.state_dict().items():
        digest.update(f"{name}{tuple(p.shape)}{float(p.double().sum()):.10e}".encode())
    return digest.hexdigest()[:16]


def calibration_ids(model: torch.nn.Module, tokenizer: Any | None, n_tokens: int = CALIBRATION_TOKENS) -> torch.Tensor:
    """(W, WINDOW) int64 windows of the calibration text (:func:`accelc.bench.corpus_text`).

    tokenizer: the model's tokenizer, or None to load it from ``model.name_or_path`` when that is a
    local folder; otherwise (tiny test models) UTF-8 bytes are mapped into the vocabulary as the
    byte tokenizer of :mod:`accelc.models` does (ids wrapped when the vocabulary is smaller).
    """
    from accelc.bench import corpus_text

    text = corpus_text()
    vocab = int(model.config.vocab_size)
    source = str(getattr(model, "name_or_path", "") or "")
    if tokenizer is None and source and Path(source).is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
    if tokenizer is not None and getattr(tokenizer, "name_or_path", None) != "byte":
        ids = torch.tensor(tokenizer.encode(text[: 12 * n_tokens], add_special_tokens=False), dtype=torch.long)
    else:
        raw = torch.tensor(list(text[: 2 * n_tokens].encode("utf-8")), dtype=torch.long)
        ids = raw % max(1, vocab - 3) + 3
    usable = (min(len(ids), n_tokens) // WINDOW) * WINDOW
    if usable == 0:
        raise ValueError(f"calibration text too short: {len(ids)} tokens < one window of {WINDOW}")
    return ids[:usable].view(-1, WINDOW).clamp(max=vocab - 1)


def _decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return decoder.layers


@torch.no_grad()
def _hidden_states(model: torch.nn.Module, ids: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """Residual stream after the first k layers for k in ``layers`` (n_layers = last, pre-norm):
    ids (W, T) -> {k: (W * (T - SKIP), C) float64}."""
    blocks = _decoder_layers(model)
    store: dict[int, list[torch.Tensor]] = {k: [] for k in layers}

    def hook(k: int):
        def fn(_module, _inputs, output):
            h = output[0] if isinstance(output, (tuple, list)) else output
            store[k].append(h[:, SKIP:].reshape(-1, h.shape[-1]).double())
        return fn

    handles = [blocks[k - 1].register_forward_hook(hook(k)) for k in layers]
    try:
        for row in ids.to(next(model.parameters()).device):
            model(input_ids=row[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in store.items()}


def fit_exit_adapters(model: torch.nn.Module, exit_layers: list[int], ids: torch.Tensor, ridge: float = RIDGE) -> dict[int, ExitAdapter]:
    """Fit one adapter per exit layer by ridge least squares (one forward over ``ids`` (W, T)).

    Returns {k: ExitAdapter} mapping the RMS-normalised residual stream after k layers onto the
    RMS-normalised residual stream after the last layer (before the final norm).
    """
    n = int(model.config.num_hidden_layers)
    states = _hidden_states(model, ids, sorted(set(exit_layers) | {n}))
    target = _rms_normalise(states[n])
    out: dict[int, ExitAdapter] = {}
    for k in exit_layers:
        x = _rms_normalise(states[k])
        xb = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)  # (T, C + 1)
        gram = xb.T @ xb
        reg = ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
        reg[-1, -1] = 0.0  # the bias is not shrunk
        sol = torch.linalg.solve(gram + reg, xb.T @ target)  # (C + 1, C)
        resid = target - xb @ sol
        r2 = 1.0 - float(resid.pow(2).sum() / (target - target.mean(0)).pow(2).sum())
        out[k] = ExitAdapter(weight=sol[:-1].float().contiguous(), bias=sol[-1].float().contiguous(), r2=r2)
    return out


def exit_adapters(model: torch.nn.Module, exit_layers: list[int], tokenizer: Any | None = None,
                  cache_dir: Path | None = None) -> tuple[dict[int, ExitAdapter], bool]:
    """The adapters of ``exit_layers``, from the disk cache or fitted now.

    Returns ({k: ExitAdapter}, hit) where hit tells whether every adapter came from the cache.
    cache_dir: None -> ``accelc.models.cache_dir() / "exit_adapters"``.
    """
    from accelc.models import cache_dir as default_cache

    root = (cache_dir or default_cache() / "exit_adapters")
    settings = json.dumps({"tokens": CALIBRATION_TOKENS, "window": WINDOW, "skip": SKIP, "ridge": RIDGE, "v": 1})
    key = hashlib.sha256((model_fingerprint(model) + settings).encode()).hexdigest()[:16]
    paths = {k: root / f"{key}_exit{k}.pt" for k in exit_layers}
    cached = {k: torch.load(p) for k, p in paths.items() if p.is_file()}
    missing = [k for k in exit_layers if k not in cached]
    if missing:
        fitted = fit_exit_adapters(model, missing, calibration_ids(model, tokenizer))
        root.mkdir(parents=True, exist_ok=True)
        for k, ad in fitted.items():
            tmp = paths[k].with_suffix(".tmp")
            torch.save({"weight": ad.weight, "bias": ad.bias, "r2": ad.r2}, tmp)
            tmp.replace(paths[k])
            cached[k] = {"weight": ad.weight, "bias": ad.bias, "r2": ad.r2}
    adapters = {k: ExitAdapter(weight=d["weight"], bias=d["bias"], r2=float(d["r2"])) for k, d in cached.items()}
    return adapters, not missing
