"""The sympy cost model: hand-computed values on a toy config, brute-force pair counts, invariants
(keep=1 => speedup 1) and monotonicity (less kept => more speedup), and ``accelc explain``."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import sympy as sp
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from accelc.cost import (
    DH_,
    V_,
    Dims,
    block_sparse_pairs,
    causal_pairs,
    evaluate,
    kept,
    predict,
    spec_speedup,
    streaming_pairs,
    tsp_speedup,
    tsp_speedup_linear,
)
from accelc.errors import AccelcError
from accelc.kernels.streaming import streaming_visible
from accelc.spec import load_spec

# Toy model: P = 2*8*(2+2)*4 + 2*2*4*8 + 6*8*16 = 1152 FLOPs per token per layer; attention 4*H*Dh = 32 per pair;
# W = 8*4*4 + 2*4*8 + 3*8*16 = 576 weights per layer; LM head 2*d*V = 160 FLOPs, d*V = 80 weights.
TOY = SimpleNamespace(num_hidden_layers=4, hidden_size=8, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                      intermediate_size=16, vocab_size=10)
# SmolLM2-135M's shape (no weights needed).
SMOL = SimpleNamespace(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                       intermediate_size=1536, vocab_size=49152)
FAST = settings(max_examples=25, deadline=None)


def spec(**sections):
    return load_spec({"accelc": 1, **sections})


def tsp(layer, keep, window=8):
    return {"prefill": {"token_selection": {"layer": layer, "keep": keep, "window": window}}}


def snapkv(keep, method="snapkv", window=8):
    return {"kv_cache": {"compression": {"method": method, "keep": keep, "window": window}}}


def sparse(*entries):
    return {"attention": {"sparse": list(entries)}}


# ------------------------------------------------------------------------------- hand-computed values
def test_baseline_costs_by_hand():
    p = predict(spec(), None, TOY, 8)
    layer = 8 * 1152 + 32 * 36  # 8 tokens, 36 causal pairs
    assert p.prefill_flops[0] == p.prefill_flops[1] == 4 * layer + 160 == 41632
    assert p.decode_bytes[0] == (4 * 576 + 80 + 4 * 2 * 4 * 8) * 4 == 10560
    assert p.kv_bytes[0] == 4 * 2 * 4 * 8 * 4
    assert (p.prefill_speedup, p.decode_speedup, p.kv_memory_ratio) == (1.0, 1.0, 1.0)


def test_token_selection_by_hand():
    p = predict(spec(**tsp(1, 0.5, window=2)), None, TOY, 8)
    full = 8 * 1152 + 32 * 36
    kept6 = 6 * 1152 + 32 * 21  # layers 2, 3 on ceil(0.5 * 8) + window 2 = 6 tokens (21 causal pairs)
    scoring = 2 * 2 * 4 * 2 * 8  # 2 H Dh w N
    assert p.prefill_flops[1] == 2 * full + 2 * kept6 + scoring + 160 == 36320
    assert p.prefill_speedup == pytest.approx(41632 / 36320)
    assert p.decode_bytes[1] == (4 * 576 + 80 + 2 * 4 * (8 + 8 + 6 + 6)) * 4
    assert p.kv_memory_ratio == pytest.approx(28 / 32)
    assert p.ideal["tsp_speedup_linear"] == pytest.approx(1 / (2 / 4 + 2 / 4 * 0.5))


def test_sliding_window_layers_by_hand():
    """Layers 0 and 2 attend through a window of 3 (Gemma 3 style layer_types): a query sees
    min(i + 1, 3) keys; decode reads 3 cached entries of those layers and stores all of them."""
    windowed = SimpleNamespace(**vars(TOY), sliding_window=3, max_position_embeddings=64,
                               layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
    p = predict(spec(), None, windowed, 8)
    assert p.prefill_flops[0] == 2 * (8 * 1152 + 32 * 36) + 2 * (8 * 1152 + 32 * 21) + 160  # 21 = 1+2+3*6
    assert p.decode_bytes[0] == (4 * 576 + 80 + 2 * 4 * (8 + 8 + 3 + 3)) * 4
    assert p.kv_bytes[0] == predict(spec(), None, TOY, 8).kv_bytes[0]  # the cache keeps every entry
    wide = SimpleNamespace(**{**vars(windowed), "sliding_window": 64})  # a window as long as the context is full
    assert predict(spec(), None, wide, 8).prefill_flops == predict(spec(), None, TOY, 8).prefill_flops


def test_kv_compression_by_hand():
    p = predict(spec(**snapkv(0.25, window=1)), None, TOY, 8)
    assert p.kv_memory_ratio == pytest.approx(3 / 8)  # ceil(0.25 * 8) = 2 entries + the window of 1 per layer
    assert p.decode_bytes[1] == (4 * 576 + 80 + 4 * 2 * 4 * 3) * 4
    assert p.prefill_flops[1] == 41632 + 4 * (2 * 2 * 4 * 1 * 8)  # scoring by 1 window query per layer


def test_streaming_quest_block_sparse_by_hand():
    s = predict(spec(**sparse({"method": "streaming", "sink": 1, "local": 2})), None, TOY, 8)
    assert s.prefill_flops[1] == 4 * (8 * 1152 + 32 * 21) + 160  # min(i+1, 3) summed over 8 queries = 21
    assert s.kv_memory_ratio == pytest.approx(3 / 8)
    q = predict(spec(**sparse({"method": "quest", "page": 2, "top_pages": 1})), None, TOY, 8)
    assert q.decode_bytes[1] == (4 * 576 + 80 + 4 * 2 * 4 * (2 + 4)) * 4  # 1 page of 2 + 4 pages of min/max keys
    assert q.kv_memory_ratio == pytest.approx(12 / 8)  # metadata is stored on top of the cache
    b = predict(spec(**sparse({"method": "block_sparse", "block": 16, "top_blocks": 1})), None, TOY, 64)
    # n_b = 4 blocks, T = 1 + 1 + 1 = 3: one 16x16 block skipped; estimates 2 H Dh n_b(n_b+1)/2 = 160
    assert b.prefill_flops[1] == 4 * (64 * 1152 + 32 * (64 * 65 // 2 - 256) + 160) + 160


def test_speculative_by_hand():
    lookup = predict(spec(decode={"speculative": {"draft": "prompt_lookup", "gamma": 2}}), None, TOY, 8, acceptance=0.5)
    assert lookup.draft_cost == 0.0
    assert lookup.spec_speedup == pytest.approx((1 - 0.5**3) / 0.5)
    assert lookup.decode_speedup == pytest.approx(lookup.spec_speedup)
    ee = predict(spec(decode={"speculative": {"draft": "early_exit", "exit_layer": 2, "gamma": 2}}), None, TOY, 8, acceptance=0.5)
    assert ee.draft_cost == pytest.approx((2 * 576 + 80 + 2 * 4 * 16) / (4 * 576 + 80 + 2 * 4 * 32))
    assert ee.spec_speedup == pytest.approx((1 - 0.5**3) / (0.5 * (2 * ee.draft_cost + 1)))
    assert predict(spec(decode={"speculative": {"draft": "prompt_lookup"}}), None, TOY, 8).spec_speedup is None
    small = predict(spec(decode={"speculative": {"draft": "early_exit", "exit_layer": 2, "gamma": 2, "draft_vocab": 4}}),
                    None, TOY, 8, acceptance=0.5)
    assert small.draft_cost == pytest.approx((2 * 576 + 8 * 4 + 2 * 4 * 16) / (4 * 576 + 80 + 2 * 4 * 32))  # head 8 x 4
    assert any("draft head over 4 tokens" in a for a in small.assumptions)


def test_adaptive_gamma_takes_the_best_fixed_gamma():
    p = predict(spec(decode={"speculative": {"draft": "early_exit", "exit_layer": 1, "gamma": "adaptive", "gamma_max": 6}}),
                None, TOY, 8, acceptance=0.8)
    best = max(float(spec_speedup(0.8, g, p.draft_cost)) for g in range(1, 7))
    assert p.spec_speedup == pytest.approx(best)


# ------------------------------------------------------------------------------- brute force
def _brute_pairs(n: int, visible) -> int:
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    return int(visible(i, j).sum())


@FAST
@given(n=st.integers(1, 80), sink=st.integers(0, 6), local=st.integers(1, 30))
def test_streaming_pairs_equal_the_explicit_mask(n, sink, local):
    brute = _brute_pairs(n, lambda i, j: streaming_visible(j, i, sink, local))
    assert streaming_pairs(sp.Integer(n), sink + local) == brute
    assert causal_pairs(sp.Integer(n)) == _brute_pairs(n, lambda i, j: j <= i)


@FAST
@given(nb=st.integers(1, 12), block=st.sampled_from([1, 2, 4]), t=st.integers(1, 6))
def test_block_sparse_pairs_equal_a_block_count(nb, block, t):
    n = nb * block
    qb, kb = torch.arange(n)[:, None] // block, torch.arange(n)[None, :] // block
    # the kept key blocks of query block i: the last min(i + 1, t) of its causal ones are as many as any choice
    brute = _brute_pairs(n, lambda i, j: (j <= i) & (kb >= qb - t + 1))
    assert block_sparse_pairs(sp.Integer(n), block, t) == brute


def test_kept_matches_the_runtime_count():
    from accelc.ops import kept_count

    for n, keep, window, floor in [(10, 0.2, 8, 0), (100, 0.2, 8, 0), (5, 0.5, 8, 0), (100, 30, 8, 0), (100, 3, 8, 0),
                                   (7, 1.0, 2, 0), (100, 0.1, 8, 40), (1000, 0.1, 8, 40), (30, 0.1, 8, 40)]:
        frac, budget = (1.0, keep) if isinstance(keep, int) else (keep, 0)
        ref = int(kept_count(torch.tensor([n]), frac, budget, window, floor=floor)[0])
        assert kept(sp.Integer(n), keep, window, floor) == ref
    # the floor lifts short prompts only: 10% of 100 -> 40 (+ 8), 10% of 1000 = 100 (+ 8), 30 -> all
    assert [int(kept_count(torch.tensor([n]), 0.1, 0, 8, floor=40)[0]) for n in (100, 1000, 30)] == [48, 108, 30]


# ------------------------------------------------------------------------------- exact TSP formula
def test_tsp_formula_matches_predict_and_its_linear_limit():
    n, layer, r = 2000, 15, 0.2  # 400 top tokens + the window of 8
    p = predict(spec(**tsp(layer, r)), None, SMOL, n)
    dims = Dims.from_config(SMOL)
    ideal = float(tsp_speedup(layer, sp.Rational(1, 5), n, 8).subs(dims.values()))
    scoring = 2 * 9 * 64 * 8 * n
    assert p.prefill_flops[1] - scoring == pytest.approx(p.prefill_flops[0] / ideal, rel=1e-12)
    assert p.ideal["tsp_speedup_ideal"] == pytest.approx(ideal)
    no_attention_no_head = tsp_speedup(w=0).subs({DH_: 0, V_: 0})  # the linear limit has no window
    assert sp.simplify(no_attention_no_head - tsp_speedup_linear()) == 0


def test_formulas_evaluate_to_the_prediction_at_other_lengths():
    s = spec(**tsp(15, 0.2), **snapkv(0.1))
    p = predict(s, None, SMOL, 1024, 1024)
    q = predict(s, None, SMOL, 4096, 8192)
    assert evaluate(p.formulas["prefill_speedup"], N=4096) == pytest.approx(q.prefill_speedup)
    assert evaluate(p.formulas["decode_speedup"], C=8192) == pytest.approx(q.decode_speedup)
    with pytest.raises(AccelcError, match="needs values for N"):
        evaluate(p.formulas["prefill_speedup"])


# ------------------------------------------------------------------------------- invariants
@pytest.mark.parametrize("sections", [tsp(15, 1.0), snapkv(1.0), {**tsp(3, 1.0), **snapkv(1.0)}])
def test_keep_one_is_speedup_one(sections):
    p = predict(spec(**sections), None, SMOL, 1000)
    assert (p.decode_speedup, p.kv_memory_ratio) == (1.0, 1.0)
    assert p.prefill_speedup == pytest.approx(1.0, abs=1e-4)  # TSP still scores the tokens; compression skips
    if "prefill" not in sections:
        assert p.prefill_speedup == 1.0


def test_covering_settings_change_nothing_but_overheads():
    n = 500
    budget = predict(spec(**snapkv(n)), None, SMOL, n)
    assert budget.decode_speedup == budget.kv_memory_ratio == budget.prefill_speedup == 1.0  # nothing dropped, no scoring
    tsp_budget = predict(spec(**tsp(15, n)), None, SMOL, n)
    assert tsp_budget.decode_speedup == tsp_budget.kv_memory_ratio == 1.0
    assert tsp_budget.prefill_speedup == pytest.approx(1.0, abs=1e-3)  # selection still scores
    stream = predict(spec(**sparse({"method": "streaming", "sink": 4, "local": n})), None, SMOL, n)
    assert (stream.prefill_speedup, stream.decode_speedup, stream.kv_memory_ratio) == (1.0, 1.0, 1.0)
    quest = predict(spec(**sparse({"method": "quest", "page": 16, "top_pages": 32})), None, SMOL, n)
    assert quest.decode_speedup == 1.0


def test_pyramidkv_budgets_average_to_the_requested_keep():
    snap = predict(spec(**snapkv(0.1)), None, SMOL, 8192)
    pyr = predict(spec(**snapkv(0.1, method="pyramidkv")), None, SMOL, 8192)
    assert snap.kv_memory_ratio == pytest.approx((820 + 8) / 8192, abs=1e-6)  # ceil(0.1 N) + the window
    assert pyr.kv_memory_ratio == pytest.approx((820 + 8) / 8192, abs=2e-3)  # per-layer ceil rounding


# ------------------------------------------------------------------------------- monotonicity
keeps = st.floats(0.01, 1.0, allow_nan=False)
lengths = st.integers(64, 8192)


@FAST
@given(a=keeps, b=keeps, n=lengths, layer=st.integers(0, 28))
def test_less_tsp_keep_means_more_prefill_speedup(a, b, n, layer):
    lo, hi = sorted((a, b))
    p_lo = predict(spec(**tsp(layer, lo)), None, SMOL, n)
    p_hi = predict(spec(**tsp(layer, hi)), None, SMOL, n)
    assert p_lo.prefill_speedup >= p_hi.prefill_speedup * (1 - 1e-12)
    assert p_lo.kv_memory_ratio <= p_hi.kv_memory_ratio * (1 + 1e-12)


@FAST
@given(a=keeps, b=keeps, c=lengths, method=st.sampled_from(["snapkv", "pyramidkv"]))
def test_less_kv_keep_means_more_decode_speedup_and_less_memory(a, b, c, method):
    lo, hi = sorted((a, b))
    p_lo = predict(spec(**snapkv(lo, method)), None, SMOL, c)
    p_hi = predict(spec(**snapkv(hi, method)), None, SMOL, c)
    assert p_lo.decode_speedup >= p_hi.decode_speedup * (1 - 1e-12)
    assert p_lo.kv_memory_ratio <= p_hi.kv_memory_ratio * (1 + 1e-12)
    assert p_hi.decode_speedup >= 1.0 and p_hi.kv_memory_ratio <= 1.0


@FAST
@given(a=st.integers(1, 64), b=st.integers(1, 64), c=lengths)
def test_fewer_quest_pages_mean_more_decode_speedup(a, b, c):
    lo, hi = sorted((a, b))
    assume(16 * hi < c)  # once the pages cover the cache, the whole cache is read without metadata
    q = lambda t: predict(spec(**sparse({"method": "quest", "page": 16, "top_pages": t})), None, SMOL, c).decode_speedup  # noqa: E731
    assert q(lo) >= q(hi)


@FAST
@given(a=st.integers(1, 4096), b=st.integers(1, 4096), n=lengths, heads=st.sampled_from(["all", [0, 1, 2], "auto"]))
def test_shorter_streaming_window_means_more_speedup(a, b, n, heads):
    lo, hi = sorted((a, b))
    s = lambda local: predict(spec(**sparse({"method": "streaming", "sink": 4, "local": local, "heads": heads})), None, SMOL, n)  # noqa: E731
    p_lo, p_hi = s(lo), s(hi)
    assert p_lo.prefill_speedup >= p_hi.prefill_speedup * (1 - 1e-12)
    assert p_lo.decode_speedup >= p_hi.decode_speedup * (1 - 1e-12)


@FAST
@given(a=st.integers(1, 16), b=st.integers(1, 16), nb=st.integers(1, 64))
def test_fewer_top_blocks_mean_more_prefill_speedup(a, b, nb):
    lo, hi = sorted((a, b))
    s = lambda t: predict(spec(**sparse({"method": "block_sparse", "block": 64, "top_blocks": t})), None, SMOL, 64 * nb)  # noqa: E731
    assert s(lo).prefill_speedup >= s(hi).prefill_speedup


@FAST
@given(a=st.floats(0, 0.999), b=st.floats(0, 0.999), gamma=st.integers(1, 8), c=st.floats(0, 1))
def test_speculative_speedup_grows_with_acceptance_and_shrinks_with_draft_cost(a, b, gamma, c):
    lo, hi = sorted((a, b))
    f = lambda alpha, cost: float(spec_speedup(sp.Float(alpha), gamma, sp.Float(cost)))  # noqa: E731
    assert f(lo, c) <= f(hi, c) * (1 + 1e-12)
    assert f(lo, c) >= f(lo, min(1.0, c + 0.1)) * (1 - 1e-12)
    assert f(0.0, c) == pytest.approx(1 / (gamma * c + 1))


# ------------------------------------------------------------------------------- api
def test_prediction_is_json_serialisable_and_explains_its_assumptions():
    p = predict(spec(**sparse({"method": "streaming", "local": 64, "heads": "auto"})), None, SMOL, 256)
    d = json.loads(json.dumps(p.to_dict()))
    assert d["prefill_speedup"] == p.prefill_speedup and "prefill_speedup" in d["formulas"]
    assert any("auto" in a for a in p.assumptions)


def test_bad_arguments_are_errors():
    with pytest.raises(AccelcError, match="acceptance"):
        predict(spec(), None, TOY, 8, acceptance=1.5)
    with pytest.raises(AccelcError, match=">= 1"):
        predict(spec(), None, TOY, 0)
    with pytest.raises(AccelcError, match="out of range"):
        predict(spec(**tsp(3, 0.5)), None, TOY, 8)


def test_dtype_bytes_come_from_model_info():
    info = SimpleNamespace(dtype=torch.bfloat16)
    assert Dims.from_config(TOY, info).dtype_bytes == 2
    p = predict(spec(), info, TOY, 8)
    assert p.decode_bytes[0] == (4 * 576 + 80 + 4 * 2 * 4 * 8) * 2


def test_explain_cli_json_and_text(tmp_path, capsys):
    from accelc.cli import main

    path = tmp_path / "tsp.yaml"
    path.write_text("accelc: 1\nprefill:\n  token_selection: {layer: 1, keep: 0.5}\n")
    with pytest.raises(SystemExit) as e:
        main(["explain", str(path), "--model", "tiny", "--seq-len", "256", "--json"])
    assert e.value.code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prefill_speedup"] > 1.0 and out["kv_memory_ratio"] < 1.0
    assert "kept_fraction(N, 1/2, 8)" in out["formulas"]["prefill_speedup"]
    with pytest.raises(SystemExit) as e:
        main(["explain", str(path), "--model", "tiny", "--seq-len", "256", "--plain"])
    text = capsys.readouterr().out
    assert e.value.code == 0 and "prefill speedup" in text and "tsp_speedup_linear" in text
    bad = tmp_path / "bad.yaml"
    bad.write_text("accelc: 1\nprefill:\n  token_selection: {layer: 3, keep: 0.5}\n")
    with pytest.raises(SystemExit) as e:
        main(["explain", str(bad), "--model", "tiny"])
    assert e.value.code == 2 and "layer" in capsys.readouterr().err
    assert math.isfinite(out["decode_speedup"])
