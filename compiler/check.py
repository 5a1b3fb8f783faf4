"""``accelc check``: the spec's ``checks:`` as a CI gate.

Each check names a metric of :data:`accelc.spec.METRICS` and bounds it::

    checks:
      - {metric: prefill_speedup, min: 1.4, seq_len: 2048}      # spec TTFT speedup over the baseline
      - {metric: passkey_accuracy, min_vs_baseline: 1.0}        # spec accuracy / baseline accuracy
      - {metric: ppl_increase, max: 0.05}                       # spec ppl / baseline ppl - 1
      - {metric: identical_tokens}                              # greedy tokens equal the baseline's

Every suite a check needs runs once (:data:`SUITE_OF`), with small CI settings (:data:`CI_SETTINGS`,
overridable with ``--set suite.key=value``); the checks' ``seq_len`` values are the lengths measured
(plus the suite's own when a check names none).  A value is read from the suite report's ``summary`` at ``seq_len`` (else the suite's
overall entry, else its longest length).  ``min`` / ``max`` bound the value, ``min_vs_baseline`` bounds
value / baseline value (0/0 counts as 1).  The outcome is a table, a JUnit XML file and the exit
status: 0 every check holds, 1 some fail, 2 bad input (raised as :class:`AccelcError`).
"""
from __future__ import annotations

import math
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from accelc.bench import BenchReport, Progress, prepare, run_suite, suite_settings, suites, write_report
from accelc.errors import AccelcError

SUITE_OF: dict[str, str] = {
    "prefill_speedup": "prefill", "decode_speedup": "decode", "kv_memory_ratio": "decode", "identical_tokens": "decode",
    "spec_speedup": "spec", "accepted_length": "spec", "passkey_accuracy": "passkey", "ppl_increase": "ppl",
}
FALLBACK_SUITE = {"spec": "decode"}  # when the `spec` suite is not installed, decode measures speculation too
LENGTH_KEY: dict[str, str] = {"prefill": "lengths", "decode": "contexts", "passkey": "lengths", "ppl": "chunk"}
CI_SETTINGS: dict[str, dict[str, Any]] = {
    "prefill": {"lengths": (1024,), "repeats": 3, "hf": False},
    "decode": {"contexts": (1024,), "new_tokens": 32, "repeats": 3, "hf": False},
    "passkey": {"lengths": (300, 1000), "trials": 10},
    "ppl": {"chunk": 512, "chunks": 2},
}
NO_BASELINE_RATIO = ("ppl_increase",)  # already relative to the baseline


@dataclass
class CheckResult:
    """One check's verdict; ``at`` is the length it was read at (None: over all lengths)."""

    metric: str
    bound: str
    suite: str
    at: Optional[int]
    value: Any
    baseline: Optional[float]
    predicted: Optional[float]
    passed: bool
    message: str
    seconds: float = 0.0


@dataclass
class CheckRun:
    """All verdicts of one ``accelc check`` and the bench reports they came from."""

    spec: str
    model: str
    results: list[CheckResult]
    reports: dict[str, BenchReport] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, "model": self.model, "passed": self.passed, "seconds": round(self.seconds, 3),
                "checks": [asdict(r) for r in self.results],
                "settings": {name: rep.settings for name, rep in self.reports.items()}}


# ------------------------------------------------------------------------------------------ plan
def _suite_for(metric: str, available: dict[str, Any]) -> str:
    name = SUITE_OF[metric]
    return name if name in available else FALLBACK_SUITE.get(name, name)


def _validate(spec: Any, source: str) -> None:
    """Bad-input errors that only ``check`` can see (the spec itself is valid)."""
    if not spec.checks:
        raise AccelcError(source, "the spec has no checks", "add e.g. `checks: [{metric: prefill_speedup, min: 1.2}]`")
    speculative = bool(spec.decode and spec.decode.speculative)
    for i, c in enumerate(spec.checks):
        where = f"{source}: checks[{i}]"
        if c.metric in NO_BASELINE_RATIO and c.min_vs_baseline is not None:
            raise AccelcError(where, f"{c.metric} is already relative to the baseline; min_vs_baseline does not apply", "use max (or min)")
        if c.metric in ("spec_speedup", "accepted_length") and not speculative:
            raise AccelcError(where, f"{c.metric} needs speculative decoding, the spec has no decode.speculative", "add it or drop the check")


def plan(spec: Any, overrides: dict[str, dict[str, Any]] | None = None, source: str = "spec") -> dict[str, dict[str, Any]]:
    """Settings per suite to run for ``spec.checks``: CI defaults, then ``overrides``, plus every check's seq_len."""
    _validate(spec, source)
    available = suites()
    overrides = overrides or {}
    for name in overrides:
        if name not in available:
            raise AccelcError(f"--set {name}.*", f"unknown suite {name!r}", f"suites: {', '.join(available)}")
    out: dict[str, dict[str, Any]] = {}
    asked: dict[str, set[int]] = {}
    unpinned: set[str] = set()
    for c in spec.checks:
        name = _suite_for(c.metric, available)
        if name not in available:
            raise AccelcError(f"{source}: {c.metric}", f"needs the {name!r} bench suite, which is not installed", f"suites: {', '.join(available)}")
        out.setdefault(name, {**CI_SETTINGS.get(name, {}), **overrides.get(name, {})})
        if c.seq_len is None:
            unpinned.add(name)
        else:
            asked.setdefault(name, set()).add(c.seq_len)
    for name, lengths in asked.items():
        key = LENGTH_KEY.get(name)
        if key is not None:
            keep = name in unpinned or key in overrides.get(name, {})  # lengths asked for on the command line stay
            out[name][key] = _lengths(name, key, out[name].get(key, suite_settings(name)[key]), lengths, keep)
    return out


def _lengths(suite: str, key: str, current: Any, asked: set[int], keep_current: bool) -> Any:
    """The value of a suite's length setting that measures every length in ``asked``.

    A tuple setting gets the asked lengths (plus its current ones when ``keep_current``: some check
    names no length, or the command line set them); a scalar one (ppl's chunk) measures one length.
    """
    if isinstance(suite_settings(suite)[key], tuple):
        current = tuple(current) if isinstance(current, (tuple, list)) else (current,)
        return tuple(sorted(asked | (set(current) if keep_current else set())))
    if len(asked) > 1:
        raise AccelcError(f"checks ({suite})", f"{key} is measured at one value, the checks ask for {sorted(asked)}",
                          "use one seq_len for these checks")
    return next(iter(asked))


# ------------------------------------------------------------------------------------------ judge
def _entry(rep: BenchReport, metric: str, at: int | None) -> dict[str, Any] | None:
    entries = rep.summary.get(metric, [])
    if at is not None:
        return next((e for e in entries if e["x"] == at), None)
    overall = [e for e in entries if e["x"] is None]
    if overall:
        return overall[-1]
    return max(entries, key=lambda e: e["x"]) if entries else None


def _bound_text(c: Any) -> str:
    parts = [f">= {c.min:g}" if c.min is not None else "", f"<= {c.max:g}" if c.max is not None else "",
             f"/ baseline >= {c.min_vs_baseline:g}" if c.min_vs_baseline is not None else ""]
    return " and ".join(p for p in parts if p) or "identical"


def _vs_baseline(value: float, baseline: float | None) -> float:
    if baseline is None:
        return math.nan
    if baseline == 0:
        return 1.0 if value == 0 else math.inf
    return value / baseline


def judge(c: Any, rep: BenchReport, seconds: float = 0.0) -> CheckResult:
    """The verdict of check ``c`` (an :class:`accelc.spec.Check`) on the suite report ``rep``."""
    bound = _bound_text(c)
    base = CheckResult(c.metric, bound, rep.suite, c.seq_len, None, None, None, False, "", seconds)
    if c.metric == "identical_tokens":
        entries = [e for e in rep.summary.get(c.metric, []) if c.seq_len is None or e["x"] == c.seq_len]
        if not entries:
            return _replace(base, message=f"not measured by suite {rep.suite!r}" + (f" at {c.seq_len}" if c.seq_len else ""))
        same = all(bool(e["value"]) for e in entries)
        return _replace(base, value=same, passed=same, message="tokens equal the baseline's" if same else "tokens differ from the baseline's")
    e = _entry(rep, c.metric, c.seq_len)
    if e is None:
        return _replace(base, message=f"not measured by suite {rep.suite!r}" + (f" at {c.seq_len}" if c.seq_len else ""))
    value = float(e["value"])
    base = _replace(base, at=e["x"], value=value, baseline=e.get("baseline"), predicted=e.get("predicted"))
    failures = []
    if math.isnan(value):
        failures.append("the value is NaN")
    if c.min is not None and not value >= c.min:
        failures.append(f"{value:.4g} < min {c.min:g}")
    if c.max is not None and not value <= c.max:
        failures.append(f"{value:.4g} > max {c.max:g}")
    if c.min_vs_baseline is not None:
        ratio = _vs_baseline(value, e.get("baseline"))
        if not ratio >= c.min_vs_baseline:
            failures.append(f"value/baseline {ratio:.4g} < {c.min_vs_baseline:g}")
    return _replace(base, passed=not failures, message="; ".join(failures) or "holds")


def _replace(r: CheckResult, **kw) -> CheckResult:
    return CheckResult(**{**asdict(r), **kw})


# ------------------------------------------------------------------------------------------ run
def run_checks(spec_path, model: str, *, baseline_path=None, overrides: dict[str, dict[str, Any]] | None = None,
               out_dir: Path | None = None, progress: Progress = None) -> CheckRun:
    """Run every suite the spec's checks need (once each) and judge each check."""
    from accelc.spec import load_spec

    t0 = time.perf_counter()
    spec = load_spec(spec_path)
    settings = plan(spec, overrides, str(spec_path))
    ctx = prepare(spec_path, model, baseline_path, progress)
    reports, seconds = {}, {}
    for name, s in settings.items():
        t = time.perf_counter()
        reports[name] = run_suite(ctx, name, progress, **s)
        seconds[name] = time.perf_counter() - t
        if out_dir is not None:
            write_report(reports[name], Path(out_dir))
    available = suites()
    results = []
    for c in spec.checks:
        name = _suite_for(c.metric, available)
        results.append(judge(c, reports[name], seconds[name]))
    return CheckRun(str(spec_path), ctx.loaded.name, results, reports, time.perf_counter() - t0)


def parse_overrides(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """``["prefill.lengths=512,1024"]`` -> ``{"prefill": {"lengths": [512, 1024]}}``."""
    from accelc.bench import parse_settings

    out: dict[str, dict[str, Any]] = {}
    for key, value in parse_settings(items).items():
        suite, dot, name = key.partition(".")
        if not dot or not name:
            raise AccelcError(f"--set {key}", "expected SUITE.KEY=VALUE", "e.g. --set prefill.lengths=512")
        out.setdefault(suite, {})[name] = value
    return out


# ------------------------------------------------------------------------------------------ output
def junit_xml(run: CheckRun) -> str:
    """JUnit XML: one testsuite, one testcase per check (time = its suite's run time)."""
    failures = sum(not r.passed for r in run.results)
    root = ET.Element("testsuites", name="accelc check", tests=str(len(run.results)), failures=str(failures), errors="0",
                      time=f"{run.seconds:.3f}")
    suite = ET.SubElement(root, "testsuite", name=f"accelc check {run.spec} --model {run.model}", tests=str(len(run.results)),
                          failures=str(failures), errors="0", skipped="0", time=f"{run.seconds:.3f}")
    props = ET.SubElement(suite, "properties")
    for name, value in (("spec", run.spec), ("model", run.model)):
        ET.SubElement(props, "property", name=name, value=value)
    classname = f"accelc.check.{Path(run.spec).stem}"
    for r in run.results:
        at = f"@{r.at}" if r.at is not None else ""
        case = ET.SubElement(suite, "testcase", classname=classname, name=f"{r.metric}{at} {r.bound}", time=f"{r.seconds:.3f}")
        ET.SubElement(case, "system-out").text = _describe(r)
        if not r.passed:
            ET.SubElement(case, "failure", message=r.message, type="CheckFailed").text = _describe(r)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def _describe(r: CheckResult) -> str:
    return (f"{r.metric} = {_fmt(r.value)} (baseline {_fmt(r.baseline)}, predicted {_fmt(r.predicted)}) "
            f"from suite {r.suite}; bound {r.bound}: {r.message}")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def table(run: CheckRun):
    """A rich Table of the verdicts (metric, at, bound, measured, baseline, predicted, result)."""
    from rich.table import Table

    t = Table(title=f"accelc check {run.spec} --model {run.model}")
    for col in ("metric", "at", "bound", "measured", "baseline", "predicted", "result", "detail"):
        t.add_column(col)
    for r in run.results:
        t.add_row(r.metric, _fmt(r.at) if r.at is not None else "all", r.bound, _fmt(r.value), _fmt(r.baseline),
                  _fmt(r.predicted), "[green]PASS[/green]" if r.passed else "[red]FAIL[/red]", r.message)
    return t
