"""Bench suites on the tiny model (tiny settings): rows, predictions next to measurements, the
passkey prompt, perplexity against HF, JSON/markdown/PNG output and ``accelc report``."""
from __future__ import annotations

import json
import math

import pytest
import torch

from accelc.bench import (
    BenchContext,
    chunk_nll,
    parse_settings,
    passkey_correct,
    passkey_trial,
    prompt_ids,
    render_dir,
    run_suite,
    suite_settings,
    write_report,
)
from accelc.errors import AccelcError


@pytest.fixture(scope="module")
def ctx(tiny):
    """The identity spec against the identity baseline on the tiny model (compiled twice)."""
    import accelc

    identity = accelc.load_spec({"accelc": 1})
    return BenchContext(accelc.compile(tiny, identity), accelc.compile(tiny, identity), tiny, "identity.yaml", "identity")


def assert_png(path) -> None:
    """A real plot: 800x450 pixels, not a blank canvas."""
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    assert img.shape[:2] == (450, 800)
    assert float(img[..., :3].std()) > 0.05


# ------------------------------------------------------------------------------------- prefill
def test_prefill_suite_puts_the_prediction_next_to_the_measurement(ctx, tmp_path):
    rep = run_suite(ctx, "prefill", lengths=(16, 48), repeats=1)
    assert [r["x"] for r in rep.rows] == [16, 48]
    for r in rep.rows:
        assert all(r[c] > 0 for c in ("hf_ttft_s", "baseline_ttft_s", "spec_ttft_s"))
        assert r["spec_speedup"] == pytest.approx(r["baseline_ttft_s"] / r["spec_ttft_s"])
        assert r["predicted_speedup"] == 1.0  # identity vs identity
        assert r["measured_vs_predicted"] == pytest.approx(r["spec_speedup"])
    assert [e["x"] for e in rep.summary["prefill_speedup"]] == [16, 48]
    assert rep.settings == {"lengths": (16, 48), "repeats": 1, "hf": True}
    paths = write_report(rep, tmp_path)
    assert {p.name for p in paths} == {"prefill.json", "prefill.md", "prefill_ttft.png", "prefill_speedup.png"}
    for p in paths:
        if p.suffix == ".png":
            assert_png(p)
    md = (tmp_path / "prefill.md").read_text()
    assert "| predicted_speedup | measured_vs_predicted |" in md and "![prefill_ttft.png](prefill_ttft.png)" in md


def test_report_rerenders_markdown_and_plots_from_json_alone(ctx, tmp_path):
    write_report(run_suite(ctx, "ppl", chunk=32, chunks=2), tmp_path)
    md = (tmp_path / "ppl.md").read_text()
    for p in tmp_path.glob("*"):
        if p.suffix != ".json":
            p.unlink()
    written = render_dir(tmp_path)
    assert {p.name for p in written} == {"ppl.md", "ppl.png"}
    assert (tmp_path / "ppl.md").read_text() == md
    assert_png(tmp_path / "ppl.png")


def test_report_of_a_directory_without_bench_json_is_an_error(tmp_path):
    (tmp_path / "other.json").write_text('{"a": 1}')
    with pytest.raises(AccelcError, match="no accelc bench JSON"):
        render_dir(tmp_path)
    with pytest.raises(AccelcError, match="no such directory"):
        render_dir(tmp_path / "missing")


# ------------------------------------------------------------------------------------- decode
def test_decode_suite_identity_tokens_and_memory(ctx):
    rep = run_suite(ctx, "decode", contexts=(12, 20), new_tokens=5, repeats=1)
    for r in rep.rows:
        assert r["spec_eq_baseline"] is True and r["baseline_eq_hf"] is True
        assert r["kv_ratio"] == 1.0 and r["predicted_kv_ratio"] == 1.0 and r["predicted_speedup"] == 1.0
        assert r["baseline_tok_s"] > 0 and r["spec_tok_s"] > 0
    assert [e["value"] for e in rep.summary["identical_tokens"]] == [True, True]
    assert "spec_speedup" not in rep.summary  # no speculative section


# ------------------------------------------------------------------------------------- passkey
def test_passkey_prompt_places_the_key_at_the_depth_and_length(tiny):
    tok = tiny.tokenizer
    unit = len(tok.encode("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ",
                          add_special_tokens=False))
    for length, depth in [(1500, 0.0), (1500, 0.5), (3000, 0.25), (3000, 1.0)]:
        t = passkey_trial(tok, length, depth, seed=3)
        assert abs(t.tokens - length) <= unit // 2 + 1
        needle = t.text.index(f"The pass key is {t.key}.")
        after = t.text[needle:].count("The grass is green")
        before = t.text[:needle].count("The grass is green")
        assert before / (before + after) == pytest.approx(t.placed)
        assert abs(t.placed - depth) <= 0.5 / (before + after) + 1e-9
        assert t.text.endswith("What is the pass key? The pass key is") and len(t.key) == 5
    assert passkey_trial(tok, 1500, 0.5, seed=3).key == passkey_trial(tok, 800, 0.1, seed=3).key
    with pytest.raises(AccelcError, match="depth"):
        passkey_trial(tok, 1500, 1.5, seed=0)


@pytest.mark.parametrize("answer, ok", [("The pass key is 12345.", True), ("12345", True), (" 1234", False),
                                        ("123456", False), ("no idea", False), ("7 then 12345", False)])
def test_passkey_answer_is_judged_by_its_first_number(answer, ok):
    assert passkey_correct(answer, "12345") is ok


def test_passkey_suite_identity_spec_scores_like_the_baseline(ctx):
    rep = run_suite(ctx, "passkey", lengths=(300, 500), trials=3, depths=(0.0, 1.0), new_tokens=2, batch=2)
    assert [r["trials"] for r in rep.rows] == [3, 3]
    for r in rep.rows:
        assert r["spec_accuracy"] == r["baseline_accuracy"] and 0.0 <= r["spec_accuracy"] <= 1.0
    overall = rep.summary["passkey_accuracy"][-1]
    assert overall["x"] is None and overall["value"] == overall["baseline"]
    assert rep.series["accuracy_by_depth"]["x"] == [0.0, 1.0]


# ------------------------------------------------------------------------------------- ppl
@pytest.mark.parametrize("prefix", [0, 1, 20])
def test_chunk_nll_equals_the_hf_cross_entropy(ctx, tiny, prefix):
    ids = prompt_ids(tiny.tokenizer, 40, offset=1000)
    nll, count = chunk_nll(ctx.cm.engine, ids, prefix)
    t = torch.tensor([ids])
    with torch.inference_mode():
        logits = tiny.model(t).logits[0]
    start = max(prefix, 1)
    ref = torch.nn.functional.cross_entropy(logits[start - 1 : -1], t[0, start:], reduction="sum")
    assert count == len(ids) - start
    assert nll == pytest.approx(float(ref), rel=1e-5)


def test_ppl_suite_identity_has_no_increase(ctx):
    rep = run_suite(ctx, "ppl", chunk=32, chunks=3, prefix=8)
    assert [r["setting"] for r in rep.rows] == ["chunk 1", "chunk 2", "chunk 3", "all"]
    all_row = rep.rows[-1]
    assert all_row["scored_tokens"] == 3 * 24
    assert math.isfinite(all_row["baseline_ppl"]) and all_row["baseline_ppl"] > 1
    assert rep.summary["ppl_increase"] == [{"x": 32, "value": 0.0, "baseline": 0.0, "predicted": None}]
    with pytest.raises(AccelcError, match="prefix"):
        chunk_nll(ctx.cm.engine, [5, 6, 7], 2)


# ------------------------------------------------------------------------------------- settings
def test_settings_parse_and_are_checked_against_the_suite(ctx):
    assert parse_settings(["lengths=32,64", "hf=false", "repeats=2", "name=x"]) == {
        "lengths": [32, 64], "hf": False, "repeats": 2, "name": "x"}
    assert run_suite(ctx, "prefill", lengths=[16], repeats=1, hf=False).settings["lengths"] == (16,)
    assert "hf_ttft_s" not in run_suite(ctx, "prefill", lengths=16, repeats=1, hf=False).columns
    with pytest.raises(AccelcError, match="has no setting 'length'"):
        run_suite(ctx, "prefill", length=(16,))
    with pytest.raises(AccelcError, match="takes one value"):
        run_suite(ctx, "ppl", chunk=[16, 32])
    with pytest.raises(AccelcError, match="unknown suite"):
        suite_settings("nope")
    with pytest.raises(AccelcError, match="KEY=VALUE"):
        parse_settings(["lengths"])


def test_bench_cli_writes_json_and_the_report_command_rerenders(tmp_path, capsys):
    from accelc.cli import main

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["bench", "specs/baseline.yaml", "--model", "tiny", "--suite", "prefill", "--set", "lengths=16",
              "--repeats", "1", "--out", str(out), "--json"])
    assert e.value.code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["accelc_bench"] == 1 and data["suite"] == "prefill" and data["settings"]["lengths"] == [16]
    assert json.loads((out / "prefill.json").read_text())["rows"] == data["rows"]
    with pytest.raises(SystemExit) as e:
        main(["report", str(out)])
    assert e.value.code == 0 and "prefill_speedup.png" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["bench", "specs/baseline.yaml", "--model", "tiny", "--suite", "nope"])
    assert e.value.code == 2 and "unknown suite 'nope'" in capsys.readouterr().err


def test_decode_suite_reports_speculation_and_draws_acceptance_per_position(tiny, tmp_path):
    import accelc
    from accelc.errors import NotImplementedYet

    spec = accelc.load_spec({"accelc": 1, "decode": {"speculative": {"draft": "prompt_lookup", "gamma": 3, "gamma_max": 3}}})
    try:
        cm = accelc.compile(tiny, spec)
    except NotImplementedYet:
        pytest.skip("speculative decoding is not built yet")
    ctx = BenchContext(cm, accelc.compile(tiny, accelc.load_spec({"accelc": 1})), tiny, "lookup.yaml", "identity")
    rep = run_suite(ctx, "decode", contexts=(24,), new_tokens=12, repeats=1, hf=False)
    row = rep.rows[0]
    assert row["spec_eq_baseline"] is True  # greedy speculation is lossless
    assert 1.0 <= row["accepted_length"] <= 4.0
    assert rep.summary["spec_speedup"][0]["value"] == row["spec_vs_baseline"]
    lines = rep.series["acceptance_per_position"]["lines"]["ctx 24"]
    assert len(lines) <= 3 and all(0.0 <= a <= 1.0 for a in lines)
    paths = write_report(rep, tmp_path)
    assert tmp_path / "decode_acceptance.png" in paths
    assert_png(tmp_path / "decode_acceptance.png")


def test_spec_suites_compare_against_plain_greedy_on_humaneval_prompts(tiny, tmp_path):
    """``--suite spec`` and ``--suite spec_gamma`` on the tiny model: lossless rows, a gamma policy
    per row, adaptive compared with the best fixed gamma, plots written."""
    import accelc

    spec = accelc.load_spec({"accelc": 1, "decode": {"speculative": {"draft": "prompt_lookup", "gamma": "adaptive", "gamma_max": 4}}})
    ctx = BenchContext(accelc.compile(tiny, spec), accelc.compile(tiny, accelc.load_spec({"accelc": 1})), tiny, "lookup.yaml", "identity")
    rep = run_suite(ctx, "spec", humaneval=2, chat=0, new_tokens=8, hf=False)
    assert [r["setting"] for r in rep.rows] == ["humaneval/0", "humaneval/1", "humaneval (all)"]
    assert all(r["spec_eq_baseline"] is True for r in rep.rows)
    assert rep.summary["identical_tokens"][0]["value"] is True and rep.summary["accepted_length"][0]["value"] >= 1.0
    gam = run_suite(ctx, "spec_gamma", gammas=(1, 2, 9), humaneval=2, new_tokens=8)
    assert [r["setting"] for r in gam.rows] == ["greedy", "gamma=1", "gamma=2", "gamma=heuristic", "gamma=adaptive"]
    rates = {r["setting"]: r["tok_s"] for r in gam.rows}
    best = max(rates["gamma=1"], rates["gamma=2"])
    assert gam.summary["adaptive_vs_best_fixed"][0]["value"] == pytest.approx(rates["gamma=adaptive"] / best)
    assert gam.summary["identical_tokens"][0]["value"] is True
    paths = write_report(gam, tmp_path)
    assert_png(tmp_path / "spec_gamma.png") and tmp_path / "spec_gamma.png" in paths
    with pytest.raises(AccelcError, match="no gamma"):
        run_suite(ctx, "spec_gamma", gammas=(9,), humaneval=1, new_tokens=4)


@pytest.fixture(scope="module")
def lookup_ctx(tiny):
    """Bench context: prompt lookup (gamma 2) against the identity spec on the tiny model."""
    import accelc

    spec = accelc.load_spec({"accelc": 1, "decode": {"speculative": {"draft": "prompt_lookup", "gamma": 2}}})
    return BenchContext(accelc.compile(tiny, spec), accelc.compile(tiny, accelc.load_spec({"accelc": 1})), tiny, "lookup.yaml", "identity")


@pytest.mark.parametrize("settings, message", [
    ({"humaneval": 0, "chat": 0}, "no prompts to run"),
    ({"humaneval": -1}, "humaneval must be a number of prompts from 0 to 164"),
    ({"humaneval": 1, "chat": 99}, "chat must be a number of prompts from 0 to"),
])
def test_spec_suite_prompt_counts_are_checked(lookup_ctx, settings, message):
    with pytest.raises(AccelcError, match=message):
        run_suite(lookup_ctx, "spec", new_tokens=4, hf=False, **settings)


def test_spec_suite_runs_chat_prompts_alone(lookup_ctx):
    rep = run_suite(lookup_ctx, "spec", humaneval=0, chat=1, new_tokens=6, hf=False)
    assert [r["setting"] for r in rep.rows] == ["chat/0", "chat (all)"]
    assert all(r["spec_eq_baseline"] is True for r in rep.rows)


def test_spec_exit_suite_reports_every_exit_layer(tiny, tmp_path, monkeypatch):
    """``--suite spec_exit`` on the tiny model: one row per exit layer with acceptances in [0, 1],
    a positive draft cost below a full step's and the predicted speedups; plots written."""
    import accelc

    monkeypatch.setenv("ACCELC_CACHE_DIR", str(tmp_path / "cache"))
    spec = accelc.load_spec({"accelc": 1, "decode": {"speculative": {"draft": "early_exit", "exit_layer": 2}}})
    ctx = BenchContext(accelc.compile(tiny, spec), accelc.compile(tiny, accelc.load_spec({"accelc": 1})), tiny, "self_spec.yaml", "identity")
    rep = run_suite(ctx, "spec_exit", humaneval=1, chat=0, new_tokens=6, repeats=1)
    n = tiny.config.num_hidden_layers
    assert [r["x"] for r in rep.rows] == list(range(1, n))
    for r in rep.rows:
        assert 0.0 <= r["acceptance_plain"] <= 1.0 and 0.0 <= r["acceptance_calibrated"] <= 1.0
        assert r["draft_cost"] > 0 and r["speedup_plain"] > 0
    write_report(rep, tmp_path)
    assert_png(tmp_path / "spec_exit_acceptance.png")
