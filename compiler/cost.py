"""The analytic cost model: FLOPs and bytes of a spec as sympy expressions (``accelc explain``).

Every quantity is a closed formula in the model's dimensions and the lengths, so a prediction can
be read, differentiated or evaluated at any length without running anything::

    L layers, d hidden, H / H_kv query / KV heads, D_h head dim, I MLP width, V vocab, e bytes per
    element, B batch; N prompt length (prefill), C context length (tokens cached at decode).

Per decoder layer and token the projections cost ``P = 2·d·(H + 2·H_kv)·D_h + 2·H·D_h·d + 6·d·I``
FLOPs (q/k/v, o, SwiGLU gate/up/down) and hold ``W = d·(H + 2·H_kv)·D_h + H·D_h·d + 3·d·I`` weights;
attention costs ``4·H·D_h`` FLOPs per (query, key) pair (QKᵀ and PV), ``n(n+1)/2`` pairs for a causal
sequence of n tokens.  Prefill computes the LM head at one position (``2·d·V``).  Decode is taken as
memory-bound: one step reads all weights (``L·W + d·V``) plus the KV entries it attends to
(``2·H_kv·D_h`` elements per token per layer); prefill as compute-bound.  Speedups are ratios of
these costs, baseline over spec.

What each spec section changes (the same rules the passes implement):

* **token selection** (FastKV TSP, Jo et al. 2025): layers ``> l`` process ``k(N)`` tokens,
  ``k(n) = min(n, ceil(r·n) + min(w, n))`` for a fraction r (a budget replaces ``ceil(r·n)``),
  as :func:`accelc.ops.kept_count`; the scoring by the last w queries costs ``2·H·D_h·w·N``.  With the
  LM head and attention's ``N²`` term the exact ideal ratio is :func:`tsp_speedup`; its linear limit is
  ``1 / (l'/L + (1 - l'/L)·r)`` with ``l' = l + 1`` layers on all tokens.
* **KV compression** (SnapKV, Li et al. 2024; PyramidKV, Cai et al. 2024): a compressed layer stores
  ``k_j(n_j)`` of its ``n_j`` tokens (the top ones plus the window); PyramidKV's per-layer keeps decrease
  linearly with depth and average to the requested one (``accelc.passes.kv_compress.layer_keeps``).
* **sliding-window layers** (the model's own, e.g. Gemma 3's local layers): a query sees
  ``min(i+1, window)`` keys; the cache keeps every entry, a decode step reads the last ``window``.
* **streaming heads** (StreamingLLM, Xiao et al. 2024; DuoAttention): a query sees ``min(i+1, s)``
  keys with ``s = sink + local``; a KV head whose query heads all stream stores and reads ``min(n, s)``.
* **block-sparse prefill** (MInference, Jiang et al. 2024): each query block attends to at most
  ``T = top + sink + local`` key blocks, so ``b²·(n_b - T)(n_b - T + 1)/2`` pairs are skipped
  (``n_b = ceil(n/b)``; exact when b divides n).
* **Quest** (Tang et al. 2024): decode reads ``top_pages·page`` tokens plus one token-equivalent of
  key min/max metadata per page once the cache is longer than the selection.
* **speculative decoding** (Leviathan et al. 2023): expected speedup
  ``(1 - α^(γ+1)) / ((1 - α)(γ·c + 1))`` from the acceptance rate α, draft length γ and the draft's
  cost relative to a target step c (early exit at layer k: the bytes of k layers and the LM head;
  prompt lookup / Token Recycling: 0).  Verifying γ+1 tokens is taken to cost one decode step.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import sympy as sp

from accelc.errors import AccelcError

__all__ = [
    "N", "C", "ALPHA", "GAMMA", "DRAFT_COST", "Dims", "Prediction", "predict", "tsp_speedup",
    "tsp_speedup_linear", "spec_speedup", "causal_pairs", "streaming_pairs", "block_sparse_pairs", "kept",
    "kept_fraction", "kept_budget", "evaluate",
]

# ----------------------------------------------------------------------------------------- symbols
N = sp.Symbol("N", integer=True, positive=True)  # prompt length at prefill
C = sp.Symbol("C", integer=True, positive=True)  # tokens in the cache at decode
ALPHA = sp.Symbol("alpha", positive=True)  # speculative acceptance rate
GAMMA = sp.Symbol("gamma", integer=True, positive=True)  # draft length
DRAFT_COST = sp.Symbol("c", nonnegative=True)  # draft step cost / target step cost
B_ = sp.Symbol("B", integer=True, positive=True)
L_, D_, H_, HKV_, DH_, I_, V_, E_ = sp.symbols("L d H H_kv D_h I V e", integer=True, positive=True)
P_ = sp.Symbol("P", positive=True)  # projection FLOPs per token per layer
W_ = sp.Symbol("W", positive=True)  # weights per layer

LINEAR_FLOPS = 2 * D_ * (H_ + 2 * HKV_) * DH_ + 2 * H_ * DH_ * D_ + 6 * D_ * I_
LAYER_WEIGHTS = D_ * (H_ + 2 * HKV_) * DH_ + H_ * DH_ * D_ + 3 * D_ * I_
PAIR_FLOPS = 4 * H_ * DH_  # QK^T and PV per (query, key) pair, all heads
KV_PER_TOKEN = 2 * HKV_ * DH_  # K and V elements per token per layer


# -------------------------------------------------------------------------------- building blocks
def causal_pairs(n: sp.Expr) -> sp.Expr:
    """(query, key) pairs of causal attention over ``n`` tokens: n(n+1)/2."""
    return n * (n + 1) / 2


def streaming_pairs(n: sp.Expr, span: int) -> sp.Expr:
    """Pairs when query i sees ``min(i + 1, span)`` keys (span = sink + local)."""
    s = sp.Integer(span)
    return sp.Piecewise((causal_pairs(n), n <= s), (causal_pairs(s) + (n - s) * s, True))


def block_sparse_pairs(n: sp.Expr, block: int, blocks: int) -> sp.Expr:
    """Pairs when each query block attends to at most ``blocks`` of its causal key blocks."""
    nb = sp.ceiling(n / block)
    skipped = sp.Piecewise(((nb - blocks) * (nb - blocks + 1) / 2, nb > blocks), (0, True))
    return causal_pairs(n) - block**2 * skipped


def _kept_eval(n: sp.Expr, amount: sp.Expr, window: sp.Expr, fraction: bool, floor: sp.Expr = sp.Integer(0)) -> sp.Expr | None:
    """Value of a kept count once ``n`` is a number (None keeps the call unevaluated, for printing)."""
    if fraction and amount == 1:
        return n
    if not (n.is_Integer and amount.is_Number and window.is_Integer and floor.is_Integer):
        return None
    c = sp.Max(sp.ceiling(amount * n), floor) if fraction else amount
    return sp.Min(n, c + sp.Min(window, n))


class kept_fraction(sp.Function):  # noqa: N801 - the class name is how formulas print
    """``kept_fraction(n, r, w[, f]) = min(n, max(ceil(r·n), f) + min(w, n))``: tokens a fraction r
    keeps, at least f top ones (``min_keep``), plus the window."""

    nargs = (3, 4)

    @classmethod
    def eval(cls, n, r, w, f=sp.Integer(0)):  # noqa: D102 - sympy hook
        return _kept_eval(n, r, w, True, f)


class kept_budget(sp.Function):  # noqa: N801 - the class name is how formulas print
    """``kept_budget(n, b, w) = min(n, b + min(w, n))``: tokens a budget of b keeps (+ the window)."""

    @classmethod
    def eval(cls, n, b, w):  # noqa: D102 - sympy hook
        return _kept_eval(n, b, w, False)


def kept(n: sp.Expr, keep: int | float, window: int, floor: int = 0) -> sp.Expr:
    """Tokens kept of ``n`` by a fraction (float) or a budget (int), plus the window, at most ``n``.

    Mirrors :func:`accelc.ops.kept_count`; stays a named call (``kept_fraction(N, 1/5, 8)``) until
    ``n`` is a number, so formulas print short.
    """
    if isinstance(keep, int):
        return kept_budget(n, sp.Integer(keep), sp.Integer(window))
    if floor:
        return kept_fraction(n, _rational(keep), sp.Integer(window), sp.Integer(floor))
    return kept_fraction(n, _rational(keep), sp.Integer(window))


def spec_speedup(alpha: sp.Expr, gamma: sp.Expr, c: sp.Expr) -> sp.Expr:
    """Expected speculative-decoding speedup (Leviathan et al. 2023, Thm. 3.8 with cost ratio c)."""
    return (1 - alpha ** (gamma + 1)) / ((1 - alpha) * (gamma * c + 1))


_L_TSP = sp.Symbol("l", integer=True, nonnegative=True)  # token-selection layer
_R_TSP = sp.Symbol("r", positive=True)  # kept ratio
_W_TSP = sp.Symbol("w", integer=True, nonnegative=True)  # observation window (always kept)
_F_TSP = sp.Symbol("f", integer=True, nonnegative=True)  # min_keep: fewest top tokens kept


def tsp_speedup(l_: sp.Expr = _L_TSP, r: sp.Expr = _R_TSP, n: sp.Expr = N, w: sp.Expr = _W_TSP,
                f: sp.Expr = sp.Integer(0)) -> sp.Expr:
    """Exact ideal prefill speedup of TSP after layer ``l`` keeping ``max(r·n, f) + w`` tokens, in symbols.

    Full prefill over (layers 0..l on n tokens + layers l+1..L-1 on the r·n top tokens, at least f,
    plus the window w), both with the LM head at one position; the selection overhead is left out.
    """
    def layers(count: sp.Expr, t: sp.Expr) -> sp.Expr:
        return count * (t * P_ + PAIR_FLOPS * causal_pairs(t))

    head = 2 * D_ * V_
    return (layers(L_, n) + head) / (layers(l_ + 1, n) + layers(L_ - l_ - 1, sp.Max(r * n, f) + w) + head)


def tsp_speedup_linear(l_: sp.Expr = _L_TSP, r: sp.Expr = _R_TSP) -> sp.Expr:
    """The projections-only limit of :func:`tsp_speedup`: 1 / (l'/L + (1 - l'/L)·r), l' = l + 1."""
    lp = l_ + 1
    return 1 / (lp / L_ + (1 - lp / L_) * r)


def _rational(x: float) -> sp.Expr:
    """A float as the exact fraction the user wrote (0.2 -> 1/5); a computed one (PyramidKV) as a Float."""
    text = repr(float(x))
    return sp.Rational(text) if len(text) <= 8 else sp.Float(x)


# ------------------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class Dims:
    """The model dimensions the cost model needs (from a transformers config and/or ModelInfo)."""

    n_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    dtype_bytes: int = 4
    windows: tuple[int, ...] = ()  # per layer: sliding-window size, 0 for full attention

    @classmethod
    def from_config(cls, config: Any, info: Any = None) -> "Dims":
        """Dims of ``config`` (a transformers config); ``info`` (ModelInfo) gives the dtype when known."""
        heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
        dtype_bytes = info.dtype.itemsize if info is not None else 4  # accelc loads fp32 by default
        return cls(
            n_layers=int(config.num_hidden_layers),
            hidden=int(config.hidden_size),
            heads=heads,
            kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(head_dim),
            intermediate=int(config.intermediate_size),
            vocab=int(config.vocab_size),
            dtype_bytes=int(dtype_bytes),
            windows=_windows(config),
        )

    def values(self) -> dict[sp.Symbol, int]:
        """Substitution of every dimension symbol (P and W included)."""
        base = {L_: self.n_layers, D_: self.hidden, H_: self.heads, HKV_: self.kv_heads, DH_: self.head_dim,
                I_: self.intermediate, V_: self.vocab, E_: self.dtype_bytes}
        return {**base, P_: LINEAR_FLOPS.xreplace(base), W_: LAYER_WEIGHTS.xreplace(base)}


def _windows(config: Any) -> tuple[int, ...]:
    """Per layer, the sliding window the model attends through (0: full causal attention)."""
    from accelc.capture import attention_windows

    try:
        return tuple(w or 0 for w in attention_windows(config))
    except AccelcError:
        return ()


# ---------------------------------------------------------------------------------- the spec, per layer
@dataclass(frozen=True)
class _LayerPlan:
    """What the spec does to one decoder layer (numbers only; hashable so equal layers group)."""

    after_tsp: bool = False
    tsp_here: bool = False
    compress_keep: int | float | None = None
    compress_window: int = 0
    compress_floor: int = 0
    stream_span: int | None = None  # sink + local
    stream_q: float = 0.0  # fraction of query heads that stream (prefill compute)
    stream_kv: float = 0.0  # fraction of KV heads whose whole group streams (decode bytes, memory)
    block: tuple[int, int] | None = None  # (block size, key blocks per query block)
    quest: tuple[int, int] | None = None  # (page, top_pages)
    window: int = 0  # sliding-window layer (Gemma 3 local layers, Mistral v0.1): keys within the window


def _stream_fractions(heads: Any, n_heads: int, n_kv: int) -> tuple[float, float, Optional[str]]:
    """(query-head fraction, KV-head fraction, assumption) of a streaming entry's ``heads``."""
    if heads == "all":
        return 1.0, 1.0, None
    if heads == "auto":
        return 0.5, 0.5, "streaming heads 'auto': half of the heads assumed to stream (LServe's split)"
    group = n_heads // n_kv
    listed = set(heads)
    full = sum(all(g * group + i in listed for i in range(group)) for g in range(n_kv))
    return len(listed) / n_heads, full / n_kv, None


def _plan(spec: Any, dims: Dims) -> tuple[list[_LayerPlan], list[str]]:
    """Per-layer plans of ``spec`` for ``dims`` and the assumptions made on the way."""
    n = dims.n_layers
    fields: list[dict[str, Any]] = [{} for _ in range(n)]
    notes: list[str] = []
    ts = spec.prefill.token_selection if spec.prefill else None
    if ts is not None:
        if ts.layer > n - 2:
            raise AccelcError("prefill.token_selection.layer", f"{ts.layer} is out of range for {n} layers", f"use 0-{n - 2}")
        fields[ts.layer]["tsp_here"] = True
        for j in range(ts.layer + 1, n):
            fields[j]["after_tsp"] = True
    kc = spec.kv_cache.compression if spec.kv_cache else None
    if kc is not None:
        from accelc.passes.kv_compress import layer_keeps

        layers = kc.layers.resolve(n, where="kv_cache.compression.layers")
        for j, keep in zip(layers, layer_keeps(kc.method, kc.keep, len(layers))):
            fields[j].update(compress_keep=keep, compress_window=kc.window, compress_floor=kc.min_keep)
    for j, w in enumerate(dims.windows[:n]):
        if w:
            fields[j]["window"] = w
    for entry in spec.attention.sparse if spec.attention else []:
        for j in entry.layers.resolve(n, where="attention.sparse.layers"):
            if entry.method == "streaming":
                q, kv, note = _stream_fractions(entry.heads, dims.heads, dims.kv_heads)
                fields[j].update(stream_span=entry.sink + entry.local, stream_q=q, stream_kv=kv)
                if note and note not in notes:
                    notes.append(note)
            elif entry.method == "block_sparse":
                fields[j]["block"] = (entry.block, entry.top_blocks + entry.sink_blocks + entry.local_blocks)
            else:
                fields[j]["quest"] = (entry.page, entry.top_pages)
    return [_LayerPlan(**f) for f in fields], notes


@dataclass(frozen=True)
class _LayerCost:
    """One layer's costs for a prompt of ``n`` tokens (sympy expressions in n)."""

    flops: sp.Expr  # prefill FLOPs: projections + attention + selection overhead
    stored: sp.Expr  # KV token-equivalents stored per KV head (Quest metadata included)
    read: sp.Expr  # KV token-equivalents read by one decode step per KV head


def _layer_cost(p: _LayerPlan, n: sp.Expr, ts: Any) -> _LayerCost:
    """Costs of one layer under plan ``p`` for a prompt of ``n`` tokens; ``ts``: the spec's token selection."""
    tokens = kept(n, ts.keep, ts.window, ts.min_keep) if p.after_tsp else n
    if p.compress_keep is None:
        full = tokens
    elif isinstance(p.compress_keep, int):
        full = kept(tokens, p.compress_keep, p.compress_window)
    else:  # a fraction of the prompt (ops.compress_cache), capped by what the layer holds
        full = sp.Min(tokens, kept(n, p.compress_keep, p.compress_window, p.compress_floor))
    stored, read = _kv_tokens(p, full)
    return _LayerCost(_prefill_flops(p, n, tokens, full, ts), stored, read)


def _prefill_flops(p: _LayerPlan, n: sp.Expr, tokens: sp.Expr, full: sp.Expr, ts: Any) -> sp.Expr:
    """Projections and attention over the layer's ``tokens``, plus any selection's scoring."""
    if p.window:  # a query sees the keys of the last `window` positions
        pairs = streaming_pairs(tokens, p.window)
    else:
        pairs = block_sparse_pairs(tokens, *p.block) if p.block else causal_pairs(tokens)
    if p.stream_span is not None:
        q = _rational(p.stream_q)
        pairs = (1 - q) * pairs + q * streaming_pairs(tokens, p.stream_span)
    extra = sp.Integer(0)
    if p.tsp_here:
        extra += 2 * H_ * DH_ * ts.window * n  # window queries score every token (even when all are kept)
    if p.compress_keep is not None:  # scores only when something is dropped
        extra += sp.Piecewise((2 * H_ * DH_ * p.compress_window * tokens, sp.StrictLessThan(full, tokens)), (0, True))
    if p.block:
        extra += 2 * H_ * DH_ * causal_pairs(sp.ceiling(tokens / p.block[0]))  # pooled block estimates
    return tokens * P_ + PAIR_FLOPS * pairs + extra


def _kv_tokens(p: _LayerPlan, full: sp.Expr) -> tuple[sp.Expr, sp.Expr]:
    """(stored, read per decode step) KV token-equivalents per KV head, of ``full`` cached tokens."""
    read, meta = full, sp.Integer(0)
    if p.window:  # the cache keeps every entry; a decode step reads the window's
        read = sp.Min(full, p.window)
    if p.quest:
        page, top = p.quest
        meta = sp.ceiling(full / page)  # key min/max per page = one token of K+V
        read = sp.Piecewise((full, full <= page * top), (page * top + meta, True))
    if p.stream_span is None:
        return full + meta, read
    f, short = _rational(p.stream_kv), sp.Min(full, p.stream_span)
    return (1 - f) * (full + meta) + f * short, (1 - f) * read + f * short


def _sums(plans: list[_LayerPlan], ts: Any, n: sp.Expr) -> _LayerCost:
    """Per-layer costs summed over ``plans`` (equal layers grouped, so formulas stay short)."""
    flops, stored, read = sp.Integer(0), sp.Integer(0), sp.Integer(0)
    for plan, count in Counter(plans).items():
        c = _layer_cost(plan, n, ts)
        flops += count * c.flops
        stored += count * c.stored
        read += count * c.read
    return _LayerCost(flops, stored, read)


def _totals(plans: list[_LayerPlan], ts: Any, n: sp.Expr) -> tuple[sp.Expr, sp.Expr, sp.Expr]:
    """(prefill FLOPs, KV elements stored, decode bytes per step) of the whole model for length ``n``."""
    s = _sums(plans, ts, n)
    prefill = B_ * (s.flops + 2 * D_ * V_)
    kv = B_ * KV_PER_TOKEN * s.stored
    decode = E_ * (L_ * W_ + D_ * V_ + B_ * KV_PER_TOKEN * s.read)
    return prefill, kv, decode


# ---------------------------------------------------------------------------------------- prediction
@dataclass
class Prediction:
    """Predicted costs of a spec against the identity spec at one prompt length and context.

    ``formulas`` hold expressions in N (prefill), C (decode, memory) and alpha (speculative) with
    the model's dimensions substituted; ``symbolic`` the same before substitution (in L, d, H, ...).
    """

    seq_len: int
    context: int
    batch: int
    prefill_speedup: float
    decode_speedup: float
    kv_memory_ratio: float
    prefill_flops: tuple[float, float]  # (baseline, spec)
    decode_bytes: tuple[float, float]  # per decode step (baseline, spec), without speculation
    kv_bytes: tuple[float, float]  # KV cache after prefill of `context` tokens (baseline, spec)
    ideal: dict[str, float] = field(default_factory=dict)  # TSP's ideal ratios at seq_len (exact, linear)
    spec_speedup: Optional[float] = None  # speculative decoding, when the acceptance rate is known
    acceptance: Optional[float] = None
    gamma: Optional[int] = None
    draft_cost: Optional[float] = None
    formulas: dict[str, sp.Expr] = field(default_factory=dict)
    symbolic: dict[str, sp.Expr] = field(default_factory=dict)
    assumptions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: numbers as they are, formulas as sympy strings."""
        return {
            "seq_len": self.seq_len, "context": self.context, "batch": self.batch,
            "prefill_speedup": self.prefill_speedup, "decode_speedup": self.decode_speedup,
            "kv_memory_ratio": self.kv_memory_ratio, "ideal": dict(self.ideal), "spec_speedup": self.spec_speedup,
            "acceptance": self.acceptance, "gamma": self.gamma, "draft_cost": self.draft_cost,
            "prefill_flops": list(self.prefill_flops), "decode_bytes": list(self.decode_bytes),
            "kv_bytes": list(self.kv_bytes),
            "formulas": {k: str(v) for k, v in self.formulas.items()},
            "symbolic": {k: str(v) for k, v in self.symbolic.items()},
            "assumptions": list(self.assumptions),
        }


def _num(expr: sp.Expr, subs: dict) -> float:
    """``expr`` with ``subs`` put in (structural replacement: fast, and every call re-evaluates)."""
    return float(sp.N(expr.xreplace({k: sp.sympify(v) for k, v in subs.items()})))


def _draft_cost(spec_cfg: Any, plans: list[_LayerPlan], ts: Any, dims: Dims, notes: list[str]) -> sp.Expr:
    """Draft step cost / target step cost (bytes, in C) for the speculative section ``spec_cfg``."""
    if spec_cfg.draft != "early_exit":
        notes.append(f"{spec_cfg.draft} drafts are model-free: draft cost c = 0")
        return sp.Integer(0)
    k = spec_cfg.exit_layer
    if k == "adaptive":
        k = dims.n_layers // 2
        notes.append(f"exit_layer 'adaptive': the draft is assumed to run {k} of {dims.n_layers} layers")
    k = min(int(k), dims.n_layers)
    draft = _sums(plans[:k], ts, C).read
    target = _sums(plans, ts, C).read
    head = D_ * V_
    if getattr(spec_cfg, "draft_vocab", None):
        head = D_ * sp.Min(V_, sp.Integer(spec_cfg.draft_vocab))
        notes.append(f"draft head over {spec_cfg.draft_vocab} tokens (the context's tokens beyond them not counted)")
    notes.append("early exit: the verification reuses the drafted layers (g drafts: g + 1 passes of the first "
                 "layers, then the rest of the model once), which costs as much as drafting g and verifying g + 1 "
                 "tokens in one step when decode is memory-bound")
    return (k * W_ + head + B_ * KV_PER_TOKEN * draft) / (L_ * W_ + D_ * V_ + B_ * KV_PER_TOKEN * target)


def _best_gamma(alpha: float, c: float, gamma_max: int) -> int:
    """The draft length in 1..gamma_max with the highest expected speedup (ideal adaptive policy)."""
    return max(range(1, gamma_max + 1), key=lambda g: _speedup_value(alpha, g, c))


def _speedup_value(alpha: float, gamma: int, c: float) -> float:
    if alpha >= 1.0 - 1e-12:
        return (gamma + 1) / (gamma * c + 1)
    return (1 - alpha ** (gamma + 1)) / ((1 - alpha) * (gamma * c + 1))


def predict(spec: Any, info: Any, config: Any, seq_len: int, context: int | None = None, *, batch: int = 1,
            acceptance: float | None = None) -> Prediction:
    """Predict a spec's speedups over the identity spec.

    Args:
        spec: an :class:`accelc.spec.Spec`.
        info: the captured model's :class:`~accelc.capture.ModelInfo` (dtype), or None (fp32 assumed).
        config: the model's transformers config (dimensions; no weights needed).
        seq_len: prompt length N for prefill.
        context: tokens cached at decode C (default: ``seq_len``).
        batch: rows decoded together (weights are read once per step for all rows).
        acceptance: speculative acceptance rate α in [0, 1]; without it ``spec_speedup`` is None and
            ``decode_speedup`` covers the KV/attention savings only.
    """
    if seq_len < 1 or (context is not None and context < 1) or batch < 1:
        raise AccelcError("cost model", f"lengths and batch must be >= 1, got seq_len={seq_len}, context={context}, batch={batch}")
    if acceptance is not None and not 0.0 <= acceptance <= 1.0:
        raise AccelcError("cost model", f"acceptance must be in [0, 1], got {acceptance}")
    context = seq_len if context is None else context
    dims = Dims.from_config(config, info)
    plans, notes = _plan(spec, dims)
    ts = spec.prefill.token_selection if spec.prefill else None
    base_plans = [_LayerPlan(window=w) for w in (dims.windows or (0,) * dims.n_layers)]  # the model's own windows
    pf_b, _, _ = _totals(base_plans, None, N)
    pf_s, _, _ = _totals(plans, ts, N)
    _, kv_b, dec_b = _totals(base_plans, None, C)
    _, kv_s, dec_s = _totals(plans, ts, C)
    sym = {
        "P (projection FLOPs per token per layer)": LINEAR_FLOPS,
        "W (weights per layer)": LAYER_WEIGHTS,
        "prefill_flops_baseline": pf_b, "prefill_flops_spec": pf_s, "prefill_speedup": pf_b / pf_s,
        "decode_bytes_baseline": dec_b, "decode_bytes_spec": dec_s, "decode_speedup": dec_b / dec_s,
        "kv_elements_baseline": kv_b, "kv_elements_spec": kv_s, "kv_memory_ratio": kv_s / kv_b,
    }
    subs = {**dims.values(), B_: batch}
    spec_values: dict[sp.Symbol, sp.Expr] = {}
    if ts is not None:
        sym["tsp_speedup_ideal"] = tsp_speedup(f=_F_TSP) if ts.min_keep else tsp_speedup()
        sym["tsp_speedup_linear"] = tsp_speedup_linear()
        r = _rational(ts.keep) if isinstance(ts.keep, float) else sp.Min(1, sp.Integer(ts.keep) / N)
        spec_values = {_L_TSP: ts.layer, _R_TSP: r, _W_TSP: ts.window, _F_TSP: ts.min_keep}
    out = Prediction(
        seq_len=seq_len, context=context, batch=batch,
        prefill_speedup=_num(pf_b / pf_s, {**subs, N: seq_len}),
        decode_speedup=_num(dec_b / dec_s, {**subs, C: context}),
        kv_memory_ratio=_num(kv_s / kv_b, {**subs, C: context}),
        prefill_flops=(_num(pf_b, {**subs, N: seq_len}), _num(pf_s, {**subs, N: seq_len})),
        decode_bytes=(_num(dec_b, {**subs, C: context}), _num(dec_s, {**subs, C: context})),
        kv_bytes=(_num(kv_b * E_, {**subs, C: context}), _num(kv_s * E_, {**subs, C: context})),
        assumptions=["prefill compute-bound (FLOPs), decode memory-bound (bytes read per step)", *notes],
    )
    sd = spec.decode.speculative if spec.decode else None
    if sd is not None:
        _speculative(out, sd, plans, ts, dims, sym, subs, acceptance)
    out.symbolic = sym
    values = {k: sp.sympify(v) for k, v in {**subs, **spec_values}.items()}
    out.formulas = {k: v.xreplace(values) for k, v in sym.items() if not k.startswith(("P ", "W "))}
    if ts is not None:
        out.ideal = {k: _num(out.formulas[k], {N: seq_len}) for k in ("tsp_speedup_ideal", "tsp_speedup_linear")}
    return out


def _speculative(out: Prediction, sd: Any, plans: list[_LayerPlan], ts: Any, dims: Dims, sym: dict, subs: dict,
                 acceptance: float | None) -> None:
    """Fill the speculative part of ``out`` (and its formulas) from the spec's ``decode.speculative``."""
    c_expr = _draft_cost(sd, plans, ts, dims, out.assumptions)
    c = _num(c_expr, {**subs, C: out.context})
    out.draft_cost = c
    gamma = sd.gamma if isinstance(sd.gamma, int) else None
    if gamma is None and acceptance is not None:
        gamma = _best_gamma(acceptance, c, sd.gamma_max)
        out.assumptions.append(f"gamma {sd.gamma!r}: the best fixed gamma in 1..{sd.gamma_max} for alpha={acceptance} ({gamma})")
    out.assumptions.append("speculative: verifying gamma+1 tokens costs one decode step; chains, not trees")
    sym["draft_cost"] = c_expr
    sym["spec_speedup"] = spec_speedup(ALPHA, GAMMA if gamma is None else sp.Integer(gamma), DRAFT_COST)
    sym["spec_speedup"] = sym["spec_speedup"].xreplace({DRAFT_COST: sp.Float(c, 4)})
    if acceptance is not None:
        out.acceptance, out.gamma = acceptance, gamma
        out.spec_speedup = _speedup_value(acceptance, gamma, c)
        out.decode_speedup *= out.spec_speedup


def evaluate(expr: sp.Expr, **values: float) -> float:
    """A formula of :attr:`Prediction.formulas` at given lengths, e.g. ``evaluate(f, N=4096)``."""
    names = {s.name: s for s in expr.free_symbols}
    missing = set(names) - set(values)
    if missing:
        raise AccelcError("cost model", f"formula needs values for {', '.join(sorted(missing))}")
    return _num(expr, {names[k]: v for k, v in values.items() if k in names})
