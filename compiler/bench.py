"""``accelc bench``: side-by-side measurements in one run, reported as ratios.

Each suite runs the spec's compiled model and its references (HF ``generate`` on the same eager
model, and the baseline spec compiled the same way) interleaved, several repeats, median taken, so
that the machine's noise hits every column alike.  Results: a JSON document (schema below), a
markdown table and a PNG plot in ``--out``.

JSON schema (``bench.json``)::

    {"suite": str, "spec": str, "baseline": str, "model": str, "machine": {...},
     "rows": [{"setting": str, <column>: number, ...}], "columns": [str], "ratios": {name: column/column},
     "notes": [str]}
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from accelc.errors import AccelcError


@dataclass
class BenchReport:
    suite: str
    spec: str
    baseline: str
    model: str
    columns: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    ratios: dict[str, list[str]] = field(default_factory=dict)  # name -> [numerator column, denominator column]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "suite": self.suite,
            "spec": self.spec,
            "baseline": self.baseline,
            "model": self.model,
            "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "platform": platform.platform()},
            "columns": self.columns,
            "rows": self.rows,
            "ratios": self.ratios,
            "notes": self.notes,
        }

    def markdown(self) -> str:
        cols = ["setting", *self.columns, *self.ratios]
        lines = [f"| {' | '.join(cols)} |", f"|{'---|' * len(cols)}"]
        for r in self.rows:
            cells = [str(r["setting"])]
            for c in self.columns:
                v = r.get(c)
                cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
            for name in self.ratios:
                v = r.get(name)
                cells.append(f"{v:.2f}x" if isinstance(v, float) else "-")
            lines.append(f"| {' | '.join(cells)} |")
        return "\n".join(lines)

    def add_row(self, setting: str, values: dict[str, float]) -> None:
        row: dict[str, Any] = {"setting": setting, **values}
        for name, (num, den) in self.ratios.items():
            if values.get(num) and values.get(den):
                row[name] = values[num] / values[den]
        self.rows.append(row)


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


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
    """Greedy HF generate of exactly ``n`` new tokens: (tokens, ttft_s, decode tokens/s)."""
    st = _Timestamps()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             streamer=st, pad_token_id=model.config.pad_token_id or 0, **kw)
    ttft = st.times[0] - t0
    rate = (len(st.times) - 1) / (st.times[-1] - st.times[0]) if len(st.times) > 1 else float("nan")
    return out[0, ids.shape[1]:].tolist(), ttft, rate


def corpus_text() -> str:
    """Real English text shipped with Python (pydoc's topic help), for prompts of any length."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def prompt_ids(tokenizer, n_tokens: int, offset: int = 0) -> list[int]:
    ids = tokenizer.encode(corpus_text(), add_special_tokens=False)
    if n_tokens + offset > len(ids):
        raise AccelcError("bench", f"corpus has only {len(ids)} tokens, {n_tokens + offset} asked")
    return ids[offset : offset + n_tokens]


# ---------------------------------------------------------------------------------- suites
def suite_decode(cm, base_cm, loaded, report: BenchReport, *, contexts=(256, 1024), new_tokens=64, repeats=3, progress=None) -> None:
    """Decode tokens/s at each context: HF generate vs the baseline engine vs the spec's engine."""
    report.columns = ["hf_tok_s", "baseline_tok_s", "spec_tok_s", "identical_tokens"]
    report.ratios = {"baseline_vs_hf": ["baseline_tok_s", "hf_tok_s"], "spec_vs_hf": ["spec_tok_s", "hf_tok_s"], "spec_vs_baseline": ["spec_tok_s", "baseline_tok_s"]}
    for ctx in contexts:
        ids = prompt_ids(loaded.tokenizer, ctx)
        t = torch.tensor([ids])
        hf, base, spec = [], [], []
        same = True
        for r in range(repeats):
            if progress:
                progress(f"decode ctx {ctx}: repeat {r + 1}/{repeats}")
            ref, _, rate = hf_generate_timed(loaded.model, t, new_tokens)
            hf.append(rate)
            rb = base_cm.engine.generate([ids], max_new_tokens=new_tokens, eos=False)
            base.append(rb.stats["decode_tokens_per_s"])
            rs = cm.engine.generate([ids], max_new_tokens=new_tokens, eos=False)
            spec.append(rs.stats["decode_tokens_per_s"])
            same = same and rb.tokens[0] == ref
        report.add_row(f"ctx {ctx}", {"hf_tok_s": _median(hf), "baseline_tok_s": _median(base), "spec_tok_s": _median(spec), "identical_tokens": same})
    report.notes.append(f"greedy, {new_tokens} new tokens, median of {repeats} interleaved repeats; identical_tokens: baseline engine == HF generate")


SUITES: dict[str, Callable] = {"decode": suite_decode}


def run_bench(spec_path, model: str, suite: str, baseline_path, out_dir: Path | None, progress=None, **kw) -> BenchReport:
    from accelc.compiled import compile_model
    from accelc.models import load_model
    from accelc.spec import load_spec

    if suite not in SUITES:
        raise AccelcError("--suite", f"unknown suite {suite!r}", f"choose one of: {', '.join(SUITES)}")
    spec = load_spec(spec_path)
    base = load_spec(baseline_path) if baseline_path else load_spec({"accelc": 1})
    if progress:
        progress(f"loading model {model}")
    loaded = load_model(model, progress=False)
    cm = compile_model(loaded, spec)
    base_cm = compile_model(loaded, base)
    rep = BenchReport(suite, str(spec_path), str(baseline_path or "identity"), model, [])
    SUITES[suite](cm, base_cm, loaded, rep, progress=progress, **kw)
    if out_dir is not None:
        write_report(rep, out_dir)
    return rep


def write_report(rep: BenchReport, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    j = out_dir / f"{rep.suite}.json"
    j.write_text(json.dumps(rep.to_dict(), indent=2, default=str))
    m = out_dir / f"{rep.suite}.md"
    m.write_text(rep.markdown() + "\n\n" + "\n".join(f"- {n}" for n in rep.notes) + "\n")
    p = out_dir / f"{rep.suite}.png"
    plot_report(rep, p)
    return [j, m, p]


def plot_report(rep: BenchReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_cols = [c for c in rep.columns if all(isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool) for r in rep.rows)]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    x = range(len(rep.rows))
    w = 0.8 / max(1, len(num_cols))
    for i, c in enumerate(num_cols):
        ax.bar([xi + i * w for xi in x], [r[c] for r in rep.rows], width=w, label=c)
    ax.set_xticks([xi + 0.4 - w / 2 for xi in x])
    ax.set_xticklabels([r["setting"] for r in rep.rows])
    ax.set_title(f"accelc bench --suite {rep.suite}: {Path(rep.spec).name} ({rep.model})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
