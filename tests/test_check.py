"""``accelc check``: planning the suites, judging bounds, exit codes, JUnit XML, the shipped example
spec and CI workflow."""
from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from accelc.bench import BenchReport
from accelc.check import CI_SETTINGS, judge, parse_overrides, plan
from accelc.errors import AccelcError
from accelc.spec import Check, load_spec

ROOT = Path(__file__).resolve().parents[1]
# Tiny settings for every suite, so that an end-to-end check takes seconds on the tiny model.
TINY_SETTINGS = ["prefill.lengths=32", "prefill.repeats=1", "decode.contexts=16", "decode.new_tokens=4", "decode.repeats=1",
                 "passkey.lengths=300", "passkey.trials=2", "passkey.new_tokens=2", "ppl.chunk=32", "ppl.chunks=1"]


def checks(*items, **sections):
    return load_spec({"accelc": 1, **sections, "checks": list(items)})


def report(metric: str, *entries: dict) -> BenchReport:
    rep = BenchReport("decode", "s.yaml", "identity", "tiny", [])
    for e in entries:
        rep.add_metric(metric, **e)
    return rep


# ------------------------------------------------------------------------------------- plan
def test_plan_runs_each_suite_once_at_the_asked_lengths():
    spec = checks({"metric": "prefill_speedup", "min": 1.1, "seq_len": 2048}, {"metric": "prefill_speedup", "min": 1.0, "seq_len": 512},
                  {"metric": "kv_memory_ratio", "max": 0.2, "seq_len": 4096}, {"metric": "identical_tokens"},
                  {"metric": "ppl_increase", "max": 0.1, "seq_len": 256})
    p = plan(spec, parse_overrides(["prefill.repeats=1", "decode.new_tokens=8"]))
    assert set(p) == {"prefill", "decode", "ppl"}
    assert p["prefill"] == {**CI_SETTINGS["prefill"], "lengths": (512, 2048), "repeats": 1}
    assert p["decode"]["contexts"] == (1024, 4096)  # identical_tokens names no length: the CI default stays
    assert p["decode"]["new_tokens"] == 8 and p["ppl"]["chunk"] == 256
    assert plan(spec, parse_overrides(["prefill.lengths=128"]))["prefill"]["lengths"] == (128, 512, 2048)


@pytest.mark.parametrize("spec, overrides, match", [
    ({"accelc": 1}, [], "has no checks"),
    ({"accelc": 1, "checks": [{"metric": "ppl_increase", "min_vs_baseline": 1.0}]}, [], "already relative"),
    ({"accelc": 1, "checks": [{"metric": "accepted_length", "min": 1.5}]}, [], "needs speculative decoding"),
    ({"accelc": 1, "checks": [{"metric": "ppl_increase", "max": 0.1, "seq_len": 128},
                              {"metric": "ppl_increase", "max": 0.1, "seq_len": 256}]}, [], "one value"),
    ({"accelc": 1, "checks": [{"metric": "prefill_speedup", "min": 1}]}, ["nope.x=1"], "unknown suite 'nope'"),
])
def test_plan_rejects_bad_input(spec, overrides, match):
    with pytest.raises(AccelcError, match=match):
        plan(load_spec(spec), parse_overrides(overrides))


def test_overrides_need_a_suite_prefix():
    with pytest.raises(AccelcError, match="SUITE.KEY=VALUE"):
        parse_overrides(["repeats=1"])


# ------------------------------------------------------------------------------------- judge
def test_judge_bounds():
    rep = report("decode_speedup", {"x": 512, "value": 1.3, "baseline": 1.0, "predicted": 1.4},
                 {"x": 1024, "value": 1.6, "baseline": 1.0})
    ok = judge(Check(metric="decode_speedup", min=1.5), rep)  # no seq_len: the longest length
    assert ok.passed and ok.at == 1024 and ok.value == 1.6
    low = judge(Check(metric="decode_speedup", min=1.5, seq_len=512), rep)
    assert not low.passed and "1.3 < min 1.5" in low.message and low.predicted == 1.4
    assert not judge(Check(metric="decode_speedup", max=1.2, seq_len=512), rep).passed
    assert judge(Check(metric="decode_speedup", min_vs_baseline=1.25, seq_len=512), rep).passed
    missing = judge(Check(metric="decode_speedup", min=1.0, seq_len=64), rep)
    assert not missing.passed and "not measured" in missing.message
    assert not judge(Check(metric="decode_speedup", min=0.0), report("decode_speedup", {"x": 1, "value": math.nan})).passed


def test_judge_against_the_baseline_value():
    both_zero = report("passkey_accuracy", {"x": None, "value": 0.0, "baseline": 0.0})
    assert judge(Check(metric="passkey_accuracy", min_vs_baseline=1.0), both_zero).passed  # 0/0 counts as 1
    worse = report("passkey_accuracy", {"x": 300, "value": 0.6, "baseline": 0.8}, {"x": None, "value": 0.7, "baseline": 0.7})
    assert judge(Check(metric="passkey_accuracy", min_vs_baseline=1.0), worse).passed  # overall entry
    r = judge(Check(metric="passkey_accuracy", min_vs_baseline=1.0, seq_len=300), worse)
    assert not r.passed and "value/baseline 0.75 < 1" in r.message


def test_judge_identical_tokens():
    rep = report("identical_tokens", {"x": 16, "value": True}, {"x": 32, "value": False})
    assert judge(Check(metric="identical_tokens", seq_len=16), rep).passed
    assert not judge(Check(metric="identical_tokens"), rep).passed


# ------------------------------------------------------------------------------------- end to end
def _run(main, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


def _write(tmp_path: Path, name: str, spec: dict) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return path


def test_check_passes_when_every_bound_is_within_reach(tmp_path, capsys):
    from accelc.cli import main

    spec = _write(tmp_path, "ok.yaml", {"accelc": 1, "checks": [
        {"metric": "prefill_speedup", "min": 0.05},
        {"metric": "decode_speedup", "min": 0.05, "seq_len": 16},
        {"metric": "kv_memory_ratio", "max": 1.0},
        {"metric": "identical_tokens"},
        {"metric": "passkey_accuracy", "min_vs_baseline": 1.0},
        {"metric": "ppl_increase", "max": 1e-6},
    ]})
    junit, out = tmp_path / "junit" / "result.xml", tmp_path / "reports"
    argv = ["check", str(spec), "--model", "tiny", "--junit", str(junit), "--out", str(out), "--json"]
    for s in TINY_SETTINGS:
        argv += ["--set", s]
    assert _run(main, argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["passed"] is True and len(data["checks"]) == 6
    prefill = next(c for c in data["checks"] if c["metric"] == "prefill_speedup")
    assert prefill["predicted"] == 1.0 and prefill["at"] == 32
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("tests") == "6" and suite.get("failures") == "0"
    assert [c.get("name").split()[0] for c in suite.iter("testcase")] == [
        "prefill_speedup@32", "decode_speedup@16", "kv_memory_ratio@16", "identical_tokens", "passkey_accuracy", "ppl_increase@32"]
    assert not list(suite.iter("failure"))
    for name in ("prefill", "decode", "passkey", "ppl"):
        assert (out / f"{name}.json").is_file() and (out / f"{name}.md").is_file()
    assert "predicted_speedup" in (out / "prefill.md").read_text()
    assert all(p.stat().st_size > 5000 for p in out.glob("*.png"))


def test_check_fails_when_a_bound_is_out_of_reach(tmp_path, capsys):
    from accelc.cli import main

    spec = _write(tmp_path, "fail.yaml", {"accelc": 1, "checks": [
        {"metric": "prefill_speedup", "min": 100.0},
        {"metric": "ppl_increase", "max": 0.0},
    ]})
    junit = tmp_path / "result.xml"
    argv = ["check", str(spec), "--model", "tiny", "--junit", str(junit)]
    for s in TINY_SETTINGS:
        if s.startswith(("prefill.", "ppl.")):
            argv += ["--set", s]
    assert _run(main, argv) == 1
    text = capsys.readouterr().out
    assert "FAIL" in text and "PASS" in text and "1/2 checks hold" in text
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("failures") == "1"
    failed = [c for c in suite.iter("testcase") if c.find("failure") is not None]
    assert len(failed) == 1 and failed[0].get("name").startswith("prefill_speedup@32")
    assert "< min 100" in failed[0].find("failure").get("message")


def test_check_bad_input_exits_2(tmp_path, capsys):
    from accelc.cli import main

    assert _run(main, ["check", str(_write(tmp_path, "none.yaml", {"accelc": 1})), "--model", "tiny"]) == 2
    assert "has no checks" in capsys.readouterr().err
    assert _run(main, ["check", str(tmp_path / "missing.yaml"), "--model", "tiny"]) == 2


# ------------------------------------------------------------------------------------- shipped files
def test_shipped_example_spec_and_ci_workflow():
    from accelc.models import load_config

    spec = load_spec(ROOT / "specs" / "checked.yaml")
    assert {c.metric for c in spec.checks} >= {"prefill_speedup", "decode_speedup", "kv_memory_ratio", "passkey_accuracy", "ppl_increase"}
    plan(spec)  # the suites it needs exist and the lengths are consistent
    spec.check_model(load_config("llama"))  # the bundled model: layer indices fit
    workflow = yaml.safe_load((ROOT / "docs" / "ci-gate.yml").read_text())
    steps = [s.get("run", "") for job in workflow["jobs"].values() for s in job["steps"]]
    assert any("accelc check specs/checked.yaml" in s and "--junit" in s for s in steps)
