"""``accelc bench``: side-by-side measurements in one run, reported as ratios next to the cost model.

Each suite runs the spec's compiled model and its references (the baseline spec compiled the same
way, and for timings the eager HF model) interleaved, several repeats, median taken, so that the
machine's noise hits every column alike.  Speed suites put the prediction of :mod:`accelc.cost`
next to every measured ratio.

Suites (``SUITES``; ``accelc.bench_spec`` adds ``spec`` when present):

* ``prefill`` -- time to first token at 512/1024/2048 prompt tokens of real text (:func:`corpus_text`):
  HF forward vs baseline engine vs spec engine; predicted vs measured speedup.
* ``decode`` -- decode tokens/s at each context (4096 and beyond with ``contexts=4096``), KV-cache
  bytes after prefill, whether the tokens equal the baseline's (and the baseline's equal HF's).
* ``passkey`` -- passkey retrieval (a random 5-digit key hidden at a depth of filler text, chat
  template, greedy): accuracy per length and depth, spec vs baseline, fixed seeds.
* ``ppl`` -- perplexity on English text shipped with Python (``pydoc_data.topics``), computed
  through the engines: prefill of a prefix, then the rest of the chunk in one step with logits at
  every position.

A suite is ``fn(cm, base_cm, loaded, report, *, progress=None, **settings)``; its keyword defaults
are its settings (``accelc bench --set lengths=512,1024``).  Outputs in ``--out DIR``:
``<suite>.json``, ``<suite>.md`` and one PNG per plot; ``accelc report DIR`` re-renders the markdown
and PNGs from the JSON files alone.

JSON schema (``<suite>.json``)::

    {"accelc_bench": 1,                       # schema version
     "suite": str, "spec": str, "baseline": str, "model": str,
     "machine": {"cpu_count", "torch_threads", "torch", "platform"},
     "settings": {name: value},               # the suite's keyword settings as run
     "x_label": str,                          # what row["x"] measures (tokens, context, ...)
     "columns": [str],                        # measured columns, in table order
     "ratios": {name: [numerator column, denominator column]},
     "derived": [str],                        # columns computed after the ratios (predicted, measured/predicted)
     "rows": [{"setting": str, "x": number | null, <column>: number | bool | null, <ratio>: number}],
     "summary": {metric: [{"x": number | null, "value": number | bool,
                           "baseline": number | null, "predicted": number | null}]},   # read by `accelc check`
     "series": {name: {"x": [number], "xlabel": str, "lines": {label: [number]}}},
     "plots": [{"file": str, "title": str, "kind": "line" | "bar", "x": str | null, "y": [str],
                "series": str | null, "xlabel": str, "ylabel": str, "logx": bool, "ylim": [lo, hi] | null}],
     "notes": [str]}

``summary`` metrics are those of :data:`accelc.spec.METRICS`; a plugin suite reports
``spec_speedup`` and ``accepted_length`` there (:meth:`BenchReport.add_metric`), and
``series["acceptance_per_position"]`` is drawn like any other series.  The decode suite reports
them too for a speculative spec (from ``stats["speculative"]``: ``tokens_per_step`` is the accepted
length, ``acceptance_rate`` feeds the cost model's prediction).
"""
from __future__ import annotations

import functools
import importlib
import inspect
import json
import math
import os
import platform
import random
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from accelc.errors import AccelcError

SCHEMA_VERSION = 1
Progress = Optional[Callable[[str], None]]


# ------------------------------------------------------------------------------------------ report
@dataclass
class Plot:
    """One PNG: row columns against ``x`` (a row key; None = one bar group per row) or a named series."""

    file: str
    title: str
    kind: str = "line"
    x: Optional[str] = "x"
    y: list[str] = field(default_factory=list)
    series: Optional[str] = None
    xlabel: str = ""
    ylabel: str = ""
    logx: bool = False
    ylim: Optional[list[float]] = None


@dataclass
class BenchReport:
    """A suite's results (see the module docstring for the JSON form)."""

    suite: str
    spec: str
    baseline: str
    model: str
    columns: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    ratios: dict[str, list[str]] = field(default_factory=dict)  # name -> [numerator column, denominator column]
    notes: list[str] = field(default_factory=list)
    derived: list[str] = field(default_factory=list)
    summary: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    series: dict[str, dict[str, Any]] = field(default_factory=dict)
    plots: list[Plot] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    x_label: str = "setting"
    machine: dict[str, Any] = field(default_factory=lambda: {
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "platform": platform.platform()})

    def to_dict(self) -> dict[str, Any]:
        return {
            "accelc_bench": SCHEMA_VERSION, "suite": self.suite, "spec": self.spec, "baseline": self.baseline,
            "model": self.model, "machine": self.machine, "settings": self.settings, "x_label": self.x_label,
            "columns": self.columns, "ratios": self.ratios, "derived": self.derived, "rows": self.rows,
            "summary": self.summary, "series": self.series, "plots": [asdict(p) for p in self.plots], "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BenchReport":
        """Inverse of :meth:`to_dict` (for ``accelc report``)."""
        keys = ("suite", "spec", "baseline", "model", "columns", "rows", "ratios", "notes", "derived", "summary",
                "series", "settings", "x_label", "machine")
        return cls(**{k: d[k] for k in keys if k in d}, plots=[Plot(**p) for p in d.get("plots", [])])

    def add_row(self, setting: str, values: dict[str, Any], x: float | None = None) -> dict[str, Any]:
        """Append a row; ratio columns are computed from ``values`` (left out when a side is 0/None)."""
        row: dict[str, Any] = {"setting": setting, "x": x, **values}
        for name, (num, den) in self.ratios.items():
            if values.get(num) and values.get(den):
                row[name] = values[num] / values[den]
        self.rows.append(row)
        return row

    def add_metric(self, metric: str, value: float | bool, x: float | None = None, baseline: float | None = None,
                   predicted: float | None = None) -> None:
        """Record a value ``accelc check`` can gate (metric names as in :data:`accelc.spec.METRICS`)."""
        self.summary.setdefault(metric, []).append({"x": x, "value": value, "baseline": baseline, "predicted": predicted})

    def markdown(self) -> str:
        cols = ["setting", *self.columns, *self.ratios, *self.derived]
        lines = [f"| {' | '.join(cols)} |", f"|{'---|' * len(cols)}"]
        for r in self.rows:
            cells = [str(r["setting"])]
            cells += [_cell(r.get(c)) for c in self.columns]
            cells += [f"{r[n]:.2f}x" if isinstance(r.get(n), float) else "-" for n in self.ratios]
            cells += [_cell(r.get(c)) for c in self.derived]
            lines.append(f"| {' | '.join(cells)} |")
        return "\n".join(lines)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3g}"
    return str(v)


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


# ------------------------------------------------------------------------------------------ inputs
class _Timestamps:
    """A HF ``generate`` streamer that records when each new token arrives."""

    def __init__(self):
        self.times: list[float] = []
        self._first = True

    def put(self, value):
        if self._first:  # the prompt
            self._first = False
            return
        self.times.append(time.perf_counter())

    def end(self):
        pass


def hf_generate_timed(model, ids: torch.Tensor, n: int, **kw) -> tuple[list[int], float, float]:
    """Greedy HF generate of exactly ``n`` new tokens from ids (1, S): (tokens, ttft_s, decode tokens/s)."""
    st = _Timestamps()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             streamer=st, pad_token_id=model.config.pad_token_id or 0, **kw)
    ttft = st.times[0] - t0
    rate = (len(st.times) - 1) / (st.times[-1] - st.times[0]) if len(st.times) > 1 else float("nan")
    return out[0, ids.shape[1]:].tolist(), ttft, rate


@functools.lru_cache(maxsize=1)
def corpus_text() -> str:
    """Real English text shipped with Python (pydoc's topic help), for prompts of any length."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


_CORPUS_IDS: dict[int, list[int]] = {}


def corpus_ids(tokenizer) -> list[int]:
    """:func:`corpus_text` tokenized (cached per tokenizer object)."""
    key = id(tokenizer)
    if key not in _CORPUS_IDS:
        _CORPUS_IDS[key] = list(tokenizer.encode(corpus_text(), add_special_tokens=False))
    return _CORPUS_IDS[key]


def prompt_ids(tokenizer, n_tokens: int, offset: int = 0) -> list[int]:
    """``n_tokens`` consecutive corpus tokens starting at ``offset``."""
    ids = corpus_ids(tokenizer)
    if n_tokens + offset > len(ids):
        raise AccelcError("bench", f"corpus has only {len(ids)} tokens, {n_tokens + offset} asked")
    return ids[offset : offset + n_tokens]


# -------------------------------------------------------------------------------------- prediction
def predicted(cm, base_cm, config, seq_len: int, context: int | None = None, acceptance: float | None = None) -> dict[str, float]:
    """Cost-model ratios of ``cm.spec`` over ``base_cm.spec`` (both relative to the identity spec).

    Returns ``prefill_speedup`` (FLOPs), ``decode_speedup`` (bytes per step, times the expected
    speculative speedup when ``acceptance`` is given) and ``kv_memory_ratio`` (KV bytes after
    prefill) at ``seq_len`` / ``context``.
    """
    from accelc.cost import predict

    s = predict(cm.spec, cm.info, config, seq_len, context, acceptance=acceptance)
    b = predict(base_cm.spec, base_cm.info, config, seq_len, context)
    return {
        "prefill_speedup": b.prefill_flops[1] / s.prefill_flops[1],
        "decode_speedup": s.decode_speedup / b.decode_speedup,
        "kv_memory_ratio": s.kv_bytes[1] / b.kv_bytes[1],
    }


# ------------------------------------------------------------------------------------------ suites
def _engine_ttft(engine, ids: list[int]) -> float:
    """Seconds for the engine to produce the first token of prompt ``ids`` (prefill + choice)."""
    t0 = time.perf_counter()
    engine.generate([ids], max_new_tokens=1, eos=False)
    return time.perf_counter() - t0


def _hf_ttft(model, ids: list[int]) -> float:
    """Seconds of the HF prefill forward (cache built, logits of the last position only)."""
    t = torch.tensor([ids])
    t0 = time.perf_counter()
    with torch.inference_mode():
        model(input_ids=t, logits_to_keep=1)
    return time.perf_counter() - t0


def suite_prefill(cm, base_cm, loaded, report: BenchReport, *, lengths=(512, 1024, 2048), repeats: int = 3,
                  hf: bool = True, progress: Progress = None) -> None:
    """Time to first token at each prompt length: HF forward vs baseline engine vs spec engine.

    One untimed warm-up per length, then ``repeats`` interleaved rounds (order rotated each round);
    medians reported with the cost model's predicted speedup next to the measured one.
    """
    runners: dict[str, Callable[[list[int]], float]] = {
        "baseline_ttft_s": lambda ids: _engine_ttft(base_cm.engine, ids),
        "spec_ttft_s": lambda ids: _engine_ttft(cm.engine, ids),
    }
    if hf:
        runners = {"hf_ttft_s": lambda ids: _hf_ttft(loaded.model, ids), **runners}
    report.columns = list(runners)
    report.ratios = {"spec_speedup": ["baseline_ttft_s", "spec_ttft_s"]}
    if hf:
        report.ratios["baseline_vs_hf"] = ["hf_ttft_s", "baseline_ttft_s"]
    report.derived = ["predicted_speedup", "measured_vs_predicted"]
    report.x_label = "prompt tokens"
    for n in lengths:
        ids = prompt_ids(loaded.tokenizer, n)
        times = _interleaved(runners, ids, repeats, lambda r: progress and progress(f"prefill {n} tokens: repeat {r}/{repeats}"))
        pred = predicted(cm, base_cm, loaded.config, n)["prefill_speedup"]
        row = report.add_row(f"{n} tokens", times, x=n)
        row["predicted_speedup"] = pred
        row["measured_vs_predicted"] = _ratio(row.get("spec_speedup", math.nan), pred)
        report.add_metric("prefill_speedup", row.get("spec_speedup", math.nan), x=n, baseline=1.0, predicted=pred)
    report.plots = [
        Plot("prefill_ttft.png", "Time to first token", y=list(runners), xlabel="prompt tokens", ylabel="seconds"),
        Plot("prefill_speedup.png", "Prefill speedup over the baseline: measured vs cost model",
             y=["spec_speedup", "predicted_speedup"], xlabel="prompt tokens", ylabel="x"),
    ]
    report.notes.append(f"median of {repeats} interleaved repeats after one warm-up; TTFT = prefill + first token choice; "
                        "predicted = cost-model FLOP ratio (accelc explain)")


def _interleaved(runners: dict[str, Callable[[Any], float]], arg: Any, repeats: int, tick: Callable[[int], Any]) -> dict[str, float]:
    """Median seconds per runner over ``repeats`` rounds (after one warm-up), order rotated per round."""
    names = list(runners)
    for name in names:
        runners[name](arg)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        tick(r + 1)
        for name in names[r % len(names):] + names[: r % len(names)]:
            samples[name].append(runners[name](arg))
    return {name: _median(v) for name, v in samples.items()}


def _kv_bytes(stats: dict[str, Any]) -> int:
    return int(stats.get("kv_cache_bytes_after_prefill", stats["kv_cache_bytes"]))


def suite_decode(cm, base_cm, loaded, report: BenchReport, *, contexts=(256, 1024), new_tokens: int = 64, repeats: int = 3,
                 hf: bool = True, progress: Progress = None) -> None:
    """Decode tokens/s at each context: HF generate vs the baseline engine vs the spec's engine.

    Also KV-cache bytes after prefill (spec / baseline, with the cost model's prediction), whether
    the spec's greedy tokens equal the baseline's, and (with ``hf``) whether the baseline's equal HF's.
    """
    report.columns = (["hf_tok_s"] if hf else []) + ["baseline_tok_s", "spec_tok_s", "baseline_kv_mb", "spec_kv_mb", "spec_eq_baseline"]
    report.columns += ["baseline_eq_hf"] if hf else []
    report.ratios = {"spec_vs_baseline": ["spec_tok_s", "baseline_tok_s"], "kv_ratio": ["spec_kv_mb", "baseline_kv_mb"]}
    if hf:
        report.ratios["baseline_vs_hf"] = ["baseline_tok_s", "hf_tok_s"]
    report.derived = ["predicted_speedup", "measured_vs_predicted", "predicted_kv_ratio"]
    report.x_label = "context tokens"
    speculative = bool(cm.spec.decode and cm.spec.decode.speculative)
    for ctx in contexts:
        ids = prompt_ids(loaded.tokenizer, ctx)
        vals = _decode_context(cm, base_cm, loaded, ids, new_tokens, repeats, hf, lambda r: progress and progress(f"decode ctx {ctx}: repeat {r}/{repeats}"))
        spec_stats = vals.pop("speculative", None)
        pred = predicted(cm, base_cm, loaded.config, ctx, ctx, acceptance=spec_stats and spec_stats["acceptance_rate"])
        row = report.add_row(f"ctx {ctx}", vals, x=ctx)
        row.update(predicted_speedup=pred["decode_speedup"], predicted_kv_ratio=pred["kv_memory_ratio"],
                   measured_vs_predicted=_ratio(row.get("spec_vs_baseline", math.nan), pred["decode_speedup"]))
        report.add_metric("decode_speedup", row.get("spec_vs_baseline", math.nan), x=ctx, baseline=1.0, predicted=pred["decode_speedup"])
        report.add_metric("kv_memory_ratio", row.get("kv_ratio", math.nan), x=ctx, baseline=1.0, predicted=pred["kv_memory_ratio"])
        report.add_metric("identical_tokens", bool(vals["spec_eq_baseline"]), x=ctx)
        if speculative:
            report.add_metric("spec_speedup", row.get("spec_vs_baseline", math.nan), x=ctx, baseline=1.0, predicted=pred["decode_speedup"])
        if spec_stats:
            row["accepted_length"] = spec_stats["tokens_per_step"]
            report.add_metric("accepted_length", spec_stats["tokens_per_step"], x=ctx, baseline=1.0)
            per_pos = spec_stats.get("per_position_acceptance") or []
            report.series.setdefault("acceptance_per_position", {"x": list(range(1, len(per_pos) + 1)), "xlabel": "draft position",
                                                                 "lines": {}})["lines"][f"ctx {ctx}"] = per_pos
    if any("accepted_length" in r for r in report.rows):
        report.derived.append("accepted_length")
    report.plots = [
        Plot("decode_tokens_per_s.png", "Decode throughput", y=[c for c in report.columns if c.endswith("_tok_s")],
             xlabel="context tokens", ylabel="tokens/s"),
        Plot("decode_speedup.png", "Decode speedup and KV memory: measured vs cost model",
             y=["spec_vs_baseline", "predicted_speedup", "kv_ratio", "predicted_kv_ratio"], xlabel="context tokens", ylabel="x"),
    ]
    if "acceptance_per_position" in report.series:
        report.plots.append(Plot("decode_acceptance.png", "Speculative acceptance per draft position", series="acceptance_per_position",
                                 xlabel="draft position", ylabel="P(accepted | reached)", ylim=[-0.05, 1.05]))
    report.notes.append(f"greedy, {new_tokens} new tokens, median of {repeats} interleaved repeats; KV MB after prefill; "
                        "predicted = cost-model bytes-per-step ratio (times the expected speculative speedup at the measured acceptance rate)")


def _decode_context(cm, base_cm, loaded, ids: list[int], new_tokens: int, repeats: int, hf: bool, tick) -> dict[str, Any]:
    """Medians of decode tokens/s at one context over interleaved repeats, KV MB, token equality,
    and the last run's speculative statistics (``GenerationResult.stats["speculative"]``) if any."""
    rates: dict[str, list[float]] = {"hf_tok_s": [], "baseline_tok_s": [], "spec_tok_s": []}
    same_base = same_hf = True
    out: dict[str, Any] = {}
    for r in range(repeats):
        tick(r + 1)
        if hf:
            ref, _, rate = hf_generate_timed(loaded.model, torch.tensor([ids]), new_tokens)
            rates["hf_tok_s"].append(rate)
        rb = base_cm.engine.generate([ids], max_new_tokens=new_tokens, eos=False)
        rs = cm.engine.generate([ids], max_new_tokens=new_tokens, eos=False)
        rates["baseline_tok_s"].append(rb.stats["decode_tokens_per_s"] or math.nan)
        rates["spec_tok_s"].append(rs.stats["decode_tokens_per_s"] or math.nan)
        same_base = same_base and rs.tokens[0] == rb.tokens[0]
        same_hf = same_hf and (not hf or rb.tokens[0] == ref)
        out.update(baseline_kv_mb=_kv_bytes(rb.stats) / 2**20, spec_kv_mb=_kv_bytes(rs.stats) / 2**20)
        if rs.stats.get("speculative"):
            out["speculative"] = rs.stats["speculative"]
    out.update({k: _median(v) for k, v in rates.items() if v}, spec_eq_baseline=same_base)
    if hf:
        out["baseline_eq_hf"] = same_hf
    return out


# ---------------------------------------------------------------------------------------- passkey
PASSKEY_INTRO = ("There is an important pass key hidden inside a lot of irrelevant text. "
                 "Find it and memorize it. I will quiz you about the pass key.\n")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyTrial:
    """One passkey prompt: the user message, its key, the depth asked for and where the needle landed
    (fraction of the filler before it), and the prompt's chat-token count."""

    text: str
    key: str
    depth: float
    placed: float
    tokens: int


def _chat_len(tokenizer, text: str) -> int:
    from accelc.runtime.engine import chat_ids

    return len(chat_ids(tokenizer, text))


def passkey_trial(tokenizer, length: int, depth: float, seed: int) -> PasskeyTrial:
    """A prompt of about ``length`` chat tokens with a 5-digit key (from ``seed``) at ``depth`` in [0, 1].

    The filler is whole sentences repeated; the needle sits between sentence groups, at the group
    boundary nearest to ``depth`` of the filler.
    """
    if not 0.0 <= depth <= 1.0:
        raise AccelcError("passkey", f"depth must be in [0, 1], got {depth}")
    key = str(random.Random(seed).randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    fixed = _chat_len(tokenizer, PASSKEY_INTRO + needle + PASSKEY_QUESTION)
    unit = len(tokenizer.encode(PASSKEY_FILLER, add_special_tokens=False))
    units = max(1, round((length - fixed) / unit))
    before = round(depth * units)
    text = PASSKEY_INTRO + PASSKEY_FILLER * before + needle + PASSKEY_FILLER * (units - before) + PASSKEY_QUESTION
    return PasskeyTrial(text, key, depth, before / units, _chat_len(tokenizer, text))


def passkey_correct(answer: str, key: str) -> bool:
    """The first number in the answer is the key."""
    m = re.search(r"\d+", answer)
    return m is not None and m.group(0) == key


def suite_passkey(cm, base_cm, loaded, report: BenchReport, *, lengths=(300, 1000, 2000), trials: int = 12,
                  depths=(0.25, 0.5, 0.75), new_tokens: int = 16, batch: int = 4, seed: int = 0, progress: Progress = None) -> None:
    """Passkey retrieval accuracy per length (``trials`` each, depths cycled), spec vs baseline, greedy.

    Trial t at length n hides key ``Random(seed + 7919·n + t)`` at ``depths[t % len(depths)]``;
    prompts are batched ``batch`` at a time through each engine with the chat template.  16 new
    tokens leave room for "The pass key is" before the digits (SmolLM2 spells a number digit by digit).
    """
    report.columns = ["prompt_tokens", "trials", "baseline_accuracy", "spec_accuracy"]
    report.ratios = {"spec_vs_baseline": ["spec_accuracy", "baseline_accuracy"]}
    report.x_label = "prompt tokens"
    by_depth: dict[str, dict[float, list[bool]]] = {"baseline": {}, "spec": {}}
    totals = {"baseline": [], "spec": []}
    for n in lengths:
        cases = [passkey_trial(loaded.tokenizer, n, depths[t % len(depths)], seed + 7919 * n + t) for t in range(trials)]
        hits = {}
        for name, c in (("baseline", base_cm), ("spec", cm)):
            hits[name] = _passkey_hits(c.engine, cases, new_tokens, batch, lambda i: progress and progress(f"passkey {n} tokens, {name}: {i}/{trials}"))
            totals[name] += hits[name]
            for case, ok in zip(cases, hits[name]):
                by_depth[name].setdefault(case.depth, []).append(ok)
        acc = {name: sum(h) / len(h) for name, h in hits.items()}
        report.add_row(f"~{n} tokens", {"prompt_tokens": round(statistics.mean(c.tokens for c in cases)), "trials": trials,
                                        "baseline_accuracy": acc["baseline"], "spec_accuracy": acc["spec"]}, x=n)
        report.add_metric("passkey_accuracy", acc["spec"], x=n, baseline=acc["baseline"])
    overall = {name: sum(h) / len(h) for name, h in totals.items()}
    report.add_metric("passkey_accuracy", overall["spec"], baseline=overall["baseline"])
    xs = sorted(by_depth["spec"])
    report.series["accuracy_by_depth"] = {"x": xs, "xlabel": "needle depth", "lines": {
        name: [sum(by_depth[name][d]) / len(by_depth[name][d]) for d in xs] for name in by_depth}}
    report.plots = [
        Plot("passkey_accuracy.png", "Passkey retrieval accuracy", y=["baseline_accuracy", "spec_accuracy"],
             xlabel="prompt tokens", ylabel="accuracy", ylim=[-0.05, 1.05]),
        Plot("passkey_depth.png", "Passkey accuracy by needle depth (all lengths)", series="accuracy_by_depth",
             xlabel="needle depth", ylabel="accuracy", ylim=[-0.05, 1.05]),
    ]
    report.notes.append(f"{trials} trials per length, depths {list(depths)} cycled, seed {seed}, greedy {new_tokens} tokens, "
                        f"chat template; correct = first number of the answer is the key; overall: baseline "
                        f"{overall['baseline']:.2f}, spec {overall['spec']:.2f}")


def _passkey_hits(engine, cases: list[PasskeyTrial], new_tokens: int, batch: int, tick) -> list[bool]:
    """Greedy answers of ``engine`` to every case (``batch`` prompts per call): correct or not."""
    hits: list[bool] = []
    for i in range(0, len(cases), batch):
        tick(i)
        group = cases[i : i + batch]
        res = engine.generate([c.text for c in group], max_new_tokens=new_tokens, chat=True)
        hits += [passkey_correct(text, c.key) for text, c in zip(res.texts, group)]
    return hits


# -------------------------------------------------------------------------------------------- ppl
@torch.inference_mode()
def chunk_nll(engine, ids: list[int], prefix: int) -> tuple[float, int]:
    """Summed negative log-likelihood of ``ids[prefix:]`` (or ``ids[1:]`` when prefix is 0) and the count.

    ``prefix > 0``: a fresh prefill of the first ``prefix`` tokens (prompt rewrites such as token
    selection and KV compression apply) gives the logits of token ``prefix``; one more step over the
    rest of the chunk gives the logits of every later token (logits_index = all its positions).
    ``prefix == 0``: one prefill with logits at every position.
    """
    n = len(ids)
    if not 0 <= prefix < n - 1:
        raise AccelcError("ppl", f"prefix must be in [0, {n - 2}] for a chunk of {n} tokens, got {prefix}")
    t = torch.tensor([ids], device=engine.info.device)
    pos = torch.arange(n, device=t.device)[None]
    cache = engine.new_cache(1, n)

    def step(a: int, b: int, index: torch.Tensor, prefill: bool) -> torch.Tensor:
        q_len = torch.tensor([b - a], device=t.device)
        return engine.step(cache, t[:, a:b], pos[:, a:b], q_len, index[None], prefill=prefill)[0]

    if prefix == 0:
        logits, targets = step(0, n, torch.arange(n - 1, device=t.device), True), t[0, 1:]
    else:
        first = step(0, prefix, torch.tensor([prefix - 1], device=t.device), True)
        rest = step(prefix, n, torch.arange(n - prefix - 1, device=t.device), False)
        logits, targets = torch.cat([first, rest]), t[0, prefix:]
    nll = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
    return float(nll), int(targets.numel())


def suite_ppl(cm, base_cm, loaded, report: BenchReport, *, chunk: int = 512, chunks: int = 4, prefix: int = -1,
              progress: Progress = None) -> None:
    """Perplexity of ``chunks`` chunks of ``chunk`` corpus tokens, spec vs baseline, through the engines.

    Chunks start at evenly spaced corpus offsets; ``prefix`` tokens (default half the chunk) are
    prefilled, the rest scored (see :func:`chunk_nll`).
    """
    prefix = chunk // 2 if prefix < 0 else prefix
    total = len(corpus_ids(loaded.tokenizer))
    stride = (total - chunk) // max(1, chunks - 1) if chunks > 1 else 0
    report.columns = ["scored_tokens", "baseline_ppl", "spec_ppl"]
    report.ratios = {"spec_vs_baseline": ["spec_ppl", "baseline_ppl"]}
    report.x_label = "chunk"
    sums = {"baseline": 0.0, "spec": 0.0}
    count = 0
    for i in range(chunks):
        if progress:
            progress(f"ppl chunk {i + 1}/{chunks}")
        ids = prompt_ids(loaded.tokenizer, chunk, offset=i * stride)
        (nb, k), (ns, _) = chunk_nll(base_cm.engine, ids, prefix), chunk_nll(cm.engine, ids, prefix)
        sums["baseline"] += nb
        sums["spec"] += ns
        count += k
        report.add_row(f"chunk {i + 1}", {"scored_tokens": k, "baseline_ppl": math.exp(nb / k), "spec_ppl": math.exp(ns / k)}, x=i + 1)
    ppl = {name: math.exp(s / count) for name, s in sums.items()}
    report.add_row("all", {"scored_tokens": count, "baseline_ppl": ppl["baseline"], "spec_ppl": ppl["spec"]})
    report.add_metric("ppl_increase", ppl["spec"] / ppl["baseline"] - 1.0, x=chunk, baseline=0.0)
    report.plots = [Plot("ppl.png", "Perplexity per chunk (pydoc_data.topics)", kind="bar", x=None,
                         y=["baseline_ppl", "spec_ppl"], ylabel="perplexity")]
    report.notes.append(f"{chunks} chunks of {chunk} tokens from pydoc_data.topics; {prefix} prefilled, the rest scored in one step; "
                        f"ppl_increase = spec/baseline - 1 = {ppl['spec'] / ppl['baseline'] - 1:+.4f}")


SUITES: dict[str, Callable] = {"prefill": suite_prefill, "decode": suite_decode, "passkey": suite_passkey, "ppl": suite_ppl}
_PLUGINS = ("accelc.bench_spec",)  # modules that register more suites into SUITES on import


def suites() -> dict[str, Callable]:
    """Every registered suite, plugins (``accelc.bench_spec``) loaded."""
    for name in _PLUGINS:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
    return SUITES


# ---------------------------------------------------------------------------------------- settings
def parse_settings(items: list[str] | None) -> dict[str, Any]:
    """``["lengths=512,1024", "hf=false"]`` -> ``{"lengths": [512, 1024], "hf": False}`` (YAML scalars)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise AccelcError(f"--set {item}", "expected KEY=VALUE", "e.g. --set lengths=512,1024")
        parts = [yaml.safe_load(p) for p in value.split(",")] if "," in value else yaml.safe_load(value)
        out[key.strip()] = parts
    return out


def suite_settings(name: str) -> dict[str, Any]:
    """The settings (keyword defaults) of suite ``name``."""
    fn = _suite(name)
    return {p.name: p.default for p in inspect.signature(fn).parameters.values()
            if p.kind is p.KEYWORD_ONLY and p.name != "progress"}


def _suite(name: str) -> Callable:
    table = suites()
    if name not in table:
        raise AccelcError("--suite", f"unknown suite {name!r}", f"choose one of: {', '.join(table)}")
    return table[name]


def _check_settings(name: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Settings for suite ``name`` with unknown keys rejected and scalars wrapped where a tuple is expected."""
    known = suite_settings(name)
    out = {}
    for key, value in settings.items():
        if key not in known:
            raise AccelcError(f"--set {key}", f"suite {name!r} has no setting {key!r}", f"its settings: {', '.join(known)}")
        if isinstance(known[key], tuple):
            out[key] = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        elif isinstance(value, (list, tuple)):
            raise AccelcError(f"--set {key}", f"takes one value, got {len(value)}", f"e.g. --set {key}={known[key]}")
        else:
            out[key] = value
    return out


# ------------------------------------------------------------------------------------------ running
@dataclass
class BenchContext:
    """The compiled spec and baseline on one loaded model, shared by the suites of one run."""

    cm: Any
    base_cm: Any
    loaded: Any
    spec_path: str
    baseline_path: str


def prepare(spec_path, model: str, baseline_path=None, progress: Progress = None) -> BenchContext:
    """Load ``model`` and compile the spec and the baseline (default: the identity spec)."""
    from accelc.compiled import compile_model
    from accelc.models import load_model
    from accelc.spec import load_spec

    spec = load_spec(spec_path)
    base = load_spec(baseline_path) if baseline_path else load_spec({"accelc": 1})
    if progress:
        progress(f"loading model {model}")
    loaded = load_model(model, progress=False)
    if progress:
        progress("compiling spec and baseline")
    name = str(spec_path) if isinstance(spec_path, (str, os.PathLike)) else spec.source
    return BenchContext(compile_model(loaded, spec), compile_model(loaded, base), loaded, name,
                        str(baseline_path) if baseline_path else "identity")


def run_suite(ctx: BenchContext, suite: str, progress: Progress = None, **settings) -> BenchReport:
    """Run one suite on a prepared context with ``settings`` (checked against the suite's keywords)."""
    fn = _suite(suite)
    settings = _check_settings(suite, settings)
    rep = BenchReport(suite, ctx.spec_path, ctx.baseline_path, ctx.loaded.name, [])
    rep.settings = {**suite_settings(suite), **settings}
    fn(ctx.cm, ctx.base_cm, ctx.loaded, rep, progress=progress, **settings)
    return rep


def run_bench(spec_path, model: str, suite: str, baseline_path, out_dir: Path | None, progress: Progress = None, **settings) -> BenchReport:
    """Compile, run ``suite`` and (with ``out_dir``) write its JSON, markdown and PNGs."""
    _suite(suite)
    _check_settings(suite, settings)
    rep = run_suite(prepare(spec_path, model, baseline_path, progress), suite, progress, **settings)
    if out_dir is not None:
        write_report(rep, out_dir)
    return rep


# ------------------------------------------------------------------------------------------ output
def write_report(rep: BenchReport, out_dir: Path) -> list[Path]:
    """``<suite>.json``, ``<suite>.md`` and the plots into ``out_dir``; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    j = out_dir / f"{rep.suite}.json"
    j.write_text(json.dumps(rep.to_dict(), indent=2, default=str) + "\n")
    return [j, *render(rep, out_dir)]


def render(rep: BenchReport, out_dir: Path) -> list[Path]:
    """Markdown and PNGs of ``rep`` (from the report alone, as ``accelc report`` does)."""
    pngs = [plot(rep, p, out_dir / p.file) for p in _plots(rep)]
    m = out_dir / f"{rep.suite}.md"
    m.write_text(markdown_document(rep, [p.name for p in pngs]))
    return [m, *pngs]


def _plots(rep: BenchReport) -> list[Plot]:
    """The report's plots, plus a default one per series no plot draws (and a bar chart if none)."""
    plots = list(rep.plots)
    drawn = {p.series for p in plots}
    for name, s in rep.series.items():
        if name not in drawn:
            plots.append(Plot(f"{rep.suite}_{name}.png", name.replace("_", " "), series=name, xlabel=s.get("xlabel", "")))
    if not plots:
        numeric = [c for c in rep.columns if all(_is_number(r.get(c)) for r in rep.rows)]
        plots.append(Plot(f"{rep.suite}.png", f"accelc bench --suite {rep.suite}", kind="bar", x=None, y=numeric))
    return plots


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def markdown_document(rep: BenchReport, images: list[str]) -> str:
    """The markdown page: title, table, notes, gated metrics, images."""
    lines = [f"# accelc bench --suite {rep.suite}", "",
             f"spec `{rep.spec}` vs baseline `{rep.baseline}` on `{rep.model}` "
             f"({rep.machine.get('cpu_count')} CPUs, torch {rep.machine.get('torch')})", "", rep.markdown(), ""]
    lines += [f"- {n}" for n in rep.notes]
    if rep.summary:
        lines += ["", "| metric | at | measured | baseline | predicted |", "|---|---|---|---|---|"]
        for metric, entries in rep.summary.items():
            lines += [f"| {metric} | {_cell(e['x']) if e['x'] is not None else 'all'} | {_cell(e['value'])} | "
                      f"{_cell(e.get('baseline'))} | {_cell(e.get('predicted'))} |" for e in entries]
    lines += ["", *[f"![{name}]({name})" for name in images]]
    return "\n".join(lines) + "\n"


def plot(rep: BenchReport, spec: Plot, path: Path) -> Path:
    """Draw one :class:`Plot` of ``rep`` into ``path`` (PNG, 800x450)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if spec.series is not None:
        s = rep.series[spec.series]
        for label, ys in s["lines"].items():
            (ax.bar if spec.kind == "bar" else ax.plot)(s["x"], ys, label=label, **({} if spec.kind == "bar" else {"marker": "o"}))
    elif spec.x is None or spec.kind == "bar":
        rows = [r for r in rep.rows if any(_is_number(r.get(c)) for c in spec.y)]
        w = 0.8 / max(1, len(spec.y))
        for i, c in enumerate(spec.y):
            ax.bar([k + i * w for k in range(len(rows))], [_num_or_nan(r.get(c)) for r in rows], width=w, label=c)
        ax.set_xticks([k + 0.4 - w / 2 for k in range(len(rows))])
        ax.set_xticklabels([str(r["setting"]) for r in rows])
    else:
        rows = [r for r in rep.rows if _is_number(r.get(spec.x))]
        for c in spec.y:  # cost-model columns dashed, next to the measured ones
            ax.plot([r[spec.x] for r in rows], [_num_or_nan(r.get(c)) for r in rows], marker="o", label=c,
                    linestyle="--" if c.startswith("predicted") else "-")
    if spec.logx:
        ax.set_xscale("log", base=2)
    if spec.ylim:
        ax.set_ylim(*spec.ylim)
    ax.set_title(f"{spec.title}\n{Path(rep.spec).name} vs {Path(rep.baseline).name} ({rep.model})", fontsize=10)
    ax.set_xlabel(spec.xlabel)
    ax.set_ylabel(spec.ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _num_or_nan(v: Any) -> float:
    return float(v) if _is_number(v) else math.nan


def render_dir(directory: Path) -> list[Path]:
    """Re-render markdown and PNGs from every bench JSON in ``directory`` (``accelc report``)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AccelcError(str(directory), "no such directory", "give the --out directory of `accelc bench` or `accelc check`")
    written: list[Path] = []
    for j in sorted(directory.glob("*.json")):
        try:
            data = json.loads(j.read_text())
        except json.JSONDecodeError as e:
            raise AccelcError(str(j), f"invalid JSON: {e.msg} at line {e.lineno}", "re-run the bench to rewrite it") from None
        if isinstance(data, dict) and data.get("accelc_bench") == SCHEMA_VERSION:
            written += render(BenchReport.from_dict(data), directory)
    if not written:
        raise AccelcError(str(directory), "holds no accelc bench JSON files", "run `accelc bench ... --out DIR` first")
    return written
