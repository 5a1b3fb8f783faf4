"""The speculative engine loop: lossless at T=0 for every draft x gamma policy x verification (tiny
model, drawn prompts; SmolLM2 on HumanEval prompts), the target distribution at T>0 (chi-square,
with a negative control), rollback and tree compaction against a cache built without the rejected
tokens, statistics, and the CLI's ``generate --json``."""
from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import accelc
from accelc.runtime.sampling import SamplingParams, probs_from_logits
from accelc.runtime.speculative import loop as loop_mod
from accelc.runtime.speculative.loop import (
    CalibratedGamma,
    ExitLayerChooser,
    NodeCalibration,
    SpeculativeEngine,
    VerifyCost,
    compact_path,
    suffix_match_length,
)
from accelc.runtime.speculative.verify import VerifyResult

DRAFTS = {
    "early_exit": {"draft": "early_exit", "exit_layer": 2},
    "early_exit_adaptive": {"draft": "early_exit", "exit_layer": "adaptive"},
    "prompt_lookup": {"draft": "prompt_lookup", "ngram_max": 3, "ngram_min": 1},
    "prompt_lookup_tree": {"draft": "prompt_lookup", "ngram_max": 3, "ngram_min": 1, "tree_nodes": 8},
    "token_recycling": {"draft": "token_recycling", "successors": 4, "tree_width": 4},
}
GAMMAS = (3, "heuristic", "adaptive")
VERIFIES = ("token", "block")
TINY = dict(initializer_range=0.2)


def spec_for(draft: str, gamma, verify: str, gamma_max: int = 6, **extra) -> dict:
    return {"accelc": 1, "decode": {"speculative": {**DRAFTS[draft], "gamma": gamma, "gamma_max": gamma_max, "verify": verify, **extra}}}


@pytest.fixture(scope="module")
def tiny_model():
    return accelc.load_model("tiny", seed=0, **TINY)


@pytest.fixture(scope="module")
def compiled(tiny_model):
    """Compiled speculative models of the tiny Llama, one per (draft, gamma, verify), built lazily."""
    cache: dict[tuple, object] = {}

    def get(draft: str, gamma, verify: str):
        key = (draft, gamma, verify)
        if key not in cache:
            cache[key] = accelc.compile(tiny_model, accelc.load_spec(spec_for(draft, gamma, verify)))
        return cache[key]

    return get


def fresh(cm):
    """``cm`` with its engine's learned state (shared by greedy calls) reset, for tests of one run."""
    cm.engine.learned = None
    return cm


@pytest.fixture(scope="module")
def plain(tiny_model):
    return accelc.compile(tiny_model, accelc.load_spec({"accelc": 1}))


# Prompts over a few token ids repeat themselves, so prompt lookup finds matches and the tiny
# model's greedy output (which falls into loops) gets accepted drafts.
prompt_lists = st.lists(st.lists(st.integers(3, 12), min_size=1, max_size=10), min_size=1, max_size=3)


@pytest.mark.parametrize("draft,gamma,verify", list(itertools.product(DRAFTS, GAMMAS, VERIFIES)))
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompts=prompt_lists, new_tokens=st.integers(1, 24))
def test_lossless_greedy_every_combination(compiled, plain, draft, gamma, verify, prompts, new_tokens):
    """T=0: every row emits exactly the plain greedy tokens of the same graph (batch, EOS ignored)."""
    cm = compiled(draft, gamma, verify)
    ref = plain.engine.generate(prompts, max_new_tokens=new_tokens, eos=False)
    out = cm.engine.generate(prompts, max_new_tokens=new_tokens, eos=False)
    assert out.tokens == ref.tokens
    assert all(len(t) == new_tokens for t in out.tokens)


@pytest.mark.parametrize("draft", list(DRAFTS))
def test_drafts_get_accepted_on_repetitive_text(compiled, plain, draft):
    """The lossless tests exercise acceptance, not only rejection: each drafter gets drafts kept."""
    prompts = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [9, 10, 11, 9, 10, 11, 9]]
    res = compiled(draft, 3, "token").engine.generate(prompts, max_new_tokens=40, eos=False)
    assert res.tokens == plain.engine.generate(prompts, max_new_tokens=40, eos=False).tokens
    sp = res.stats["speculative"]
    assert sp["accepted_mean"] > 0
    assert sp["tokens_per_step"] == pytest.approx(1 + sp["accepted_mean"], abs=1e-3)


def test_eos_and_stop_strings_match_plain(compiled, plain):
    """EOS inside an accepted block ends the row there, as plain decoding does; stop strings too."""
    prompts = [[5, 6, 7, 8, 5, 6, 7, 8], [3, 4]]
    eos_id = plain.engine.generate(prompts, max_new_tokens=12, eos=False).tokens[0][5]
    cm = compiled("prompt_lookup", 3, "token")
    info = cm.engine.info
    object.__setattr__(info, "eos_token_ids", (eos_id,))
    try:
        for engine in (plain.engine, cm.engine):
            engine.info = info
        ref = plain.engine.generate(prompts, max_new_tokens=12)
        out = cm.engine.generate(prompts, max_new_tokens=12)
    finally:
        object.__setattr__(info, "eos_token_ids", (2,))
    assert out.tokens == ref.tokens
    assert out.tokens[0][-1] == eos_id and len(out.tokens[0]) <= 6
    text = plain.engine.generate(["abcabc"], max_new_tokens=10).texts[0]
    if len(text) > 3:
        stop = [text[2:4]]
        assert cm.engine.generate(["abcabc"], max_new_tokens=10, stop=stop).tokens == plain.engine.generate(["abcabc"], max_new_tokens=10, stop=stop).tokens


# --------------------------------------------------------------------------------- T > 0
VOCAB, LENGTH, SAMPLES = 4, 4, 4000
SMALL = dict(vocab_size=VOCAB, initializer_range=0.4)  # peaked enough that every drafter gets drafts kept


def exact_continuations(plain_cm, prompt: list[int], params: SamplingParams) -> torch.Tensor:
    """(V^L,) probability of every continuation of LENGTH tokens under the target, in base-V order."""
    seqs = torch.tensor(list(itertools.product(range(VOCAB), repeat=LENGTH)))
    ids = torch.cat([torch.tensor(prompt).expand(len(seqs), -1), seqs], dim=1)
    probs = probs_from_logits(plain_cm.engine.forward(ids).double(), params)  # (N, P + L, V)
    p = len(prompt)
    steps = probs[:, p - 1 : p - 1 + LENGTH].gather(-1, seqs[..., None]).squeeze(-1)
    return steps.prod(dim=1)


def chi_square_pvalue(cells: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness of fit of cell ids to cell probabilities; cells expected < 5 times pooled."""
    observed = torch.bincount(cells, minlength=probs.numel()).double()
    expected = probs.double() * cells.numel()
    small = expected < 5
    if small.any():
        observed = torch.cat([observed[~small], observed[small].sum()[None]])
        expected = torch.cat([expected[~small], expected[small].sum()[None]])
    stat = ((observed - expected) ** 2 / expected).sum()
    dof = observed.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


@pytest.fixture(scope="module")
def small_model():
    return accelc.load_model("tiny", seed=3, **SMALL)


def sample_cells(model, draft: str, verify: str, seed: int, prompt=(1, 2, 3, 1, 2), **extra) -> tuple[torch.Tensor, dict]:
    cm = accelc.compile(model, accelc.load_spec({"accelc": 1, "decode": {"temperature": 1.0, "speculative": {
        **DRAFTS[draft], "gamma": 3, "gamma_max": 3, "verify": verify, **extra}}}))
    prompt = list(prompt)
    res = cm.engine.generate([prompt] * SAMPLES, max_new_tokens=LENGTH, eos=False, sampling=SamplingParams(temperature=1.0, seed=seed))
    toks = torch.tensor(res.tokens)
    cells = (toks * VOCAB ** torch.arange(LENGTH - 1, -1, -1)).sum(1)
    return cells, res.stats["speculative"]


@pytest.mark.parametrize("draft,verify", list(itertools.product(["early_exit", "prompt_lookup", "token_recycling"], VERIFIES)))
def test_sampling_matches_target_distribution(small_model, draft, verify):
    """T=1: emitted continuations follow the target model's distribution (chi-square, alpha 1e-3)."""
    plain_cm = accelc.compile(small_model, accelc.load_spec({"accelc": 1}))
    target = exact_continuations(plain_cm, [1, 2, 3, 1, 2], SamplingParams(temperature=1.0))
    cells, stats = sample_cells(small_model, draft, verify, seed=7)
    assert stats["accepted_mean"] > 0.2  # drafts were kept: the check covers the accept path
    assert chi_square_pvalue(cells, target) > 1e-3


def test_sampling_with_a_draft_vocabulary_matches_target_distribution(small_model):
    """T=1, early exit drafting over 2 of the 4 tokens (draft_vocab: 1 + the context's token 1):
    the draft distribution is zero elsewhere and the output still follows the target."""
    plain_cm = accelc.compile(small_model, accelc.load_spec({"accelc": 1}))
    prompt = (1, 1, 1, 1, 1)
    target = exact_continuations(plain_cm, list(prompt), SamplingParams(temperature=1.0))
    cells, stats = sample_cells(small_model, "early_exit", "block", seed=11, prompt=prompt, draft_vocab=1)
    assert stats["accepted_mean"] > 0.1
    assert chi_square_pvalue(cells, target) > 1e-3


@pytest.mark.parametrize("gamma", [3, "adaptive"])
def test_draft_vocabulary_is_lossless_and_drafts_only_its_tokens(tiny_model, plain, gamma, monkeypatch):
    """draft_vocab: K scores the K lowest ids plus the context's tokens; greedy output unchanged."""
    cm = accelc.compile(tiny_model, accelc.load_spec(spec_for("early_exit", gamma, "block", draft_vocab=8)))
    prompts = [[5, 6, 40, 41, 5, 6, 40, 41, 5], [9, 200, 9, 200, 9]]
    heads = []
    original = SpeculativeEngine._draft_head

    def spy(self, rows):
        out = original(self, rows)
        heads.append(out[2].tolist())
        return out

    monkeypatch.setattr(SpeculativeEngine, "_draft_head", spy)
    res = cm.engine.generate(prompts, max_new_tokens=30, eos=False)
    assert res.tokens == plain.engine.generate(prompts, max_new_tokens=30, eos=False).tokens
    assert heads and all(ids[:8] == list(range(8)) for ids in heads)
    emitted = {t for row in res.tokens for t in row}
    assert {9, 40, 41, 200} <= set(heads[0][8:]) <= {9, 40, 41, 200} | emitted  # context tokens above K
    assert all(len(ids) == len(set(ids)) for ids in heads)
    assert set(heads[0]) <= set(heads[-1])  # emitted tokens join the context, hence the draft vocabulary


def test_negative_control_accept_all_verifier_is_detected(small_model, monkeypatch):
    """The distribution test has power through the loop: a verifier that keeps every draft fails it."""

    def accept_all(drafts, q, target, gen=None, lens=None):
        lens = torch.full((drafts.shape[0],), drafts.shape[1]) if lens is None else lens
        extra = torch.multinomial(target[torch.arange(drafts.shape[0]), lens], 1, generator=gen).squeeze(1)
        tokens = torch.cat([drafts, torch.full_like(extra[:, None], -1)], dim=1)
        tokens[torch.arange(drafts.shape[0]), lens] = extra
        return VerifyResult(accepted=lens, tokens=tokens)

    monkeypatch.setattr(loop_mod, "verify_tokenwise", accept_all)
    plain_cm = accelc.compile(small_model, accelc.load_spec({"accelc": 1}))
    target = exact_continuations(plain_cm, [1, 2, 3, 1, 2], SamplingParams(temperature=1.0))
    cells, _ = sample_cells(small_model, "early_exit", "token", seed=7)
    assert chi_square_pvalue(cells, target) < 1e-6


def test_sampling_deterministic_when_seeded(compiled, monkeypatch):
    """A seed reproduces a sampled generation even though the adaptive policies learn from costs:
    seeded runs learn from modeled costs, so a clock running at another speed changes nothing."""
    cm = compiled("early_exit", "adaptive", "block")
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=11)
    a = cm.engine.generate([[5, 6, 7]], max_new_tokens=16, sampling=params, eos=False)
    b = cm.engine.generate([[5, 6, 7]], max_new_tokens=16, sampling=params, eos=False)
    assert a.tokens == b.tokens
    ticks = iter(range(10**6))
    monkeypatch.setattr(loop_mod.time, "perf_counter", lambda: next(ticks) ** 1.5 * 1e-3)  # a jittery, slowing clock
    c = cm.engine.generate([[5, 6, 7]], max_new_tokens=16, sampling=params, eos=False)
    assert c.tokens == a.tokens


# --------------------------------------------------------------------------------- rollback
def assert_cache_equals_rebuilt(plain_cm, cache, prompts: list[list[int]], outputs: list[list[int]]) -> None:
    """Every layer's committed entries equal those of a fresh prefill of prompt + emitted tokens
    except the pending (last) one, row by row."""
    for b, (p, out) in enumerate(zip(prompts, outputs)):
        seq = p + out[:-1]
        ref = plain_cm.engine.new_cache(1, len(seq))
        n = len(seq)
        plain_cm.engine.step(ref, torch.tensor([seq]), torch.arange(n)[None], torch.tensor([n]), torch.tensor([[n - 1]]))
        for layer in cache.layers:
            assert int(cache.lens[layer][b]) == n
            torch.testing.assert_close(cache.k[layer][b, :, :n], ref.k[layer][0, :, :n], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(cache.v[layer][b, :, :n], ref.v[layer][0, :, :n], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("draft", ["early_exit", "prompt_lookup", "token_recycling"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_rollback_leaves_cache_as_if_rejected_tokens_never_ran(compiled, plain, draft, temperature):
    cm = fresh(compiled(draft, 3, "block"))
    prompts = [[5, 6, 7, 8, 5, 6, 7], [9, 10, 9, 10, 9, 10, 9, 10, 11, 12], [4]]
    res, cache = cm.engine.run(prompts, 20, SamplingParams(temperature=temperature, seed=3))
    sp = res.stats["speculative"]
    assert sp["acceptance_rate"] is not None and sp["acceptance_rate"] < 1.0  # something was rolled back
    assert_cache_equals_rebuilt(plain, cache, prompts, res.tokens)


def test_compact_path_moves_only_the_path(tiny_model):
    """Tree compaction: entries of the accepted path land in consecutive slots; others untouched."""
    from accelc.runtime.cache import KVCache

    info = accelc.compile(tiny_model, accelc.load_spec({"accelc": 1})).info
    cache = KVCache(info, 2, 16)
    for layer in cache.layers:
        cache.k[layer].normal_()
        cache.v[layer].normal_()
    before = {layer: (cache.k[layer].clone(), cache.v[layer].clone()) for layer in cache.layers}
    base = [torch.tensor([2, 5]) for _ in cache.layers]
    path = torch.tensor([[0, 2, 5, -1], [0, 1, 3, 7]])
    compact_path(cache, base, path)
    for layer in cache.layers:
        k0, v0 = before[layer]
        for b, row in enumerate(path.tolist()):
            for j, node in enumerate(row):
                if node >= 0:
                    assert torch.equal(cache.k[layer][b, :, base[0][b] + j], k0[b, :, base[0][b] + node])
                    assert torch.equal(cache.v[layer][b, :, base[0][b] + j], v0[b, :, base[0][b] + node])
            assert torch.equal(cache.k[layer][b, :, : base[0][b]], k0[b, :, : base[0][b]])


# --------------------------------------------------------------------------------- stats, CLI
def test_stats_report_acceptance_and_time_split(compiled):
    res = fresh(compiled("prompt_lookup", "heuristic", "token")).engine.generate([[5, 6, 7, 5, 6, 7, 5]], max_new_tokens=24, eos=False)
    sp = res.stats["speculative"]
    for key in ("accepted_mean", "tokens_per_step", "per_position_acceptance", "draft_s", "verify_s", "gamma_trace", "steps"):
        assert key in sp
    assert all(0.0 <= a <= 1.0 for a in sp["per_position_acceptance"] if a is not None)
    assert len(sp["gamma_trace"]) == sp["steps"]
    assert res.stats["accepted_length"] == pytest.approx(sp["tokens_per_step"])
    assert sp["steps"] < 24  # fewer target forwards than tokens


def test_adaptive_exit_layer_traces_candidates(compiled):
    res = fresh(compiled("early_exit_adaptive", 3, "token")).engine.generate([[5, 6, 7, 8]], max_new_tokens=20, eos=False)
    sp = res.stats["speculative"]
    assert set(sp["exit_layer_trace"]) <= set(compiled("early_exit_adaptive", 3, "token").program.meta["speculative"]["exit_layers"])
    assert len(set(sp["exit_layer_trace"])) >= 2  # every candidate is tried


def test_learned_state_shared_by_greedy_calls_only(compiled):
    """Greedy calls keep learning (the adjacency matrix persists, as in Token Recycling); a sampled
    call starts afresh and leaves the shared state alone."""
    cm = fresh(compiled("token_recycling", "adaptive", "token"))
    cm.engine.generate([[5, 6, 7, 5, 6, 7]], max_new_tokens=12, eos=False)
    learned = cm.engine.learned
    adjacency = learned.recycler.adjacency.clone()
    assert not torch.equal(adjacency, torch.arange(adjacency.shape[0], dtype=adjacency.dtype)[:, None].expand_as(adjacency))
    cm.engine.generate([[9, 10, 11]], max_new_tokens=12, eos=False, sampling=SamplingParams(temperature=1.0, seed=0))
    assert cm.engine.learned is learned and torch.equal(learned.recycler.adjacency, adjacency)
    cm.engine.generate([[9, 10, 11]], max_new_tokens=12, eos=False)
    assert cm.engine.learned is learned and not torch.equal(learned.recycler.adjacency, adjacency)


def test_adaptive_early_exit_decodes_plainly_when_drafting_does_not_pay(compiled, plain):
    """gamma: adaptive with a draft that costs more than it can save: only exploration steps draft."""
    from accelc.runtime.speculative.loop import VerifyCost as Cost

    cm = fresh(compiled("early_exit", "adaptive", "token"))
    learned = cm.engine.learned = cm.engine._fresh_learned()
    learned.draft_cost[2] = 10.0  # seconds per draft token
    learned.costs[1] = Cost()
    learned.costs[1].observe(1, 0.001)
    prompts = [[5, 6, 7, 8]]
    res = cm.engine.generate(prompts, max_new_tokens=40, eos=False)
    assert res.tokens == plain.engine.generate(prompts, max_new_tokens=40, eos=False).tokens
    sp = res.stats["speculative"]
    drafting_steps = sum(1 for g in sp["gamma_trace"] if g > 0)
    assert drafting_steps <= -(-sp["steps"] // SpeculativeEngine.EXPLORE_EVERY)


def test_declined_first_drafts_still_teach_the_confidence_bins(compiled, plain):
    """A first draft the adaptive policy computes but declines is scored against the target token
    that the step verifies anyway (a "shadow" trial): the bins keep learning while nothing is
    proposed, and the output stays plain greedy.  (Drafting costs more than it saves, so the head
    runs on the exploration steps and whenever the measured costs say a confident draft pays.)"""
    from accelc.runtime.speculative.loop import VerifyCost as Cost

    cm = fresh(compiled("early_exit", "adaptive", "token"))
    learned = cm.engine.learned = cm.engine._fresh_learned()
    learned.draft_cost[2] = 10.0  # every draft declined: only exploration steps run the head
    learned.costs[1] = Cost()
    learned.costs[1].observe(1, 0.001)
    include, firsts = learned.policy.include_batch, []

    def decline(step, probs, batch):  # every draft computed is declined
        firsts.append(step == 1)
        return include(step, probs, batch) & False

    learned.policy.include_batch = decline
    trials, successes = learned.policy.trials.clone(), learned.policy.successes.clone()
    prompts = [[5, 6, 7, 8]]
    res = cm.engine.generate(prompts, max_new_tokens=40, eos=False)
    assert res.tokens == plain.engine.generate(prompts, max_new_tokens=40, eos=False).tokens
    sp = res.stats["speculative"]
    assert sp["proposed_mean"] == 0.0
    assert sum(firsts) == len(firsts) >= -(-sp["steps"] // SpeculativeEngine.EXPLORE_EVERY)  # at least the exploration steps
    added, hits = learned.policy.trials - trials, learned.policy.successes - successes
    assert float(added.sum()) == len(firsts)  # one shadow trial per declined first draft
    assert bool((hits >= 0).all() and (hits <= added).all()) and float(hits.sum()) == float(hits.sum().round())


def test_shadow_outcomes_are_acceptance_probabilities():
    """T = 0: 1 when the draft is the target's argmax; T > 0: min(1, p(d) / q(d)) (Leviathan)."""
    target = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    first = torch.tensor([1, 2, 2])
    conf = torch.tensor([0.9, 0.4, 0.7])
    rows = torch.tensor([True, True, False])
    c, a = SpeculativeEngine._shadow_outcomes(first, None, target, SamplingParams(temperature=0.0), conf, rows)
    assert c.tolist() == pytest.approx([0.9, 0.4]) and a.tolist() == [1.0, 0.0]
    sampling = SamplingParams(temperature=1.0)
    q = torch.tensor([[0.2, 0.2, 0.6], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]])
    p = probs_from_logits(target, sampling)
    c, a = SpeculativeEngine._shadow_outcomes(first, q, target, sampling, conf, torch.ones(3, dtype=torch.bool))
    expect = [min(1.0, float(p[b, first[b]] / q[b, first[b]])) for b in range(3)]
    assert a.tolist() == pytest.approx(expect) and expect[0] == 1.0 and expect[1] < 1.0


def test_exit_layer_chooser_counts_shadow_trials():
    chooser = ExitLayerChooser([4, 8])
    chooser.update(8, torch.tensor([0]), torch.tensor([0]), 0.1, 0.5, shadow=torch.tensor([1.0, 0.0, 0.5]))
    assert chooser.trials[8] == 3 and chooser.successes[8] == 1.5
    assert chooser.acceptance()[8] == pytest.approx(0.5)


def test_verify_cost_fits_a_line():
    cost = VerifyCost()
    for w in (1, 3, 5, 9, 1, 9):
        cost.observe(w, 0.01 + 0.002 * w)
    base, per = cost.line()
    assert base == pytest.approx(0.01) and per == pytest.approx(0.002)


@settings(max_examples=50, deadline=None)
@given(rows=st.lists(st.lists(st.integers(0, 2), min_size=2, max_size=14), min_size=1, max_size=3), data=st.data())
def test_suffix_match_length_brute_force(rows, data):
    T = max(len(r) for r in rows)
    context = torch.tensor([r + [0] * (T - len(r)) for r in rows])
    lengths = torch.tensor([len(r) for r in rows])
    start = torch.tensor([data.draw(st.integers(-1, len(r) - 1)) for r in rows])
    got = suffix_match_length(context, lengths, start, cap=8).tolist()
    for b, r in enumerate(rows):
        s, n = int(start[b]), 0
        while s > 0 and n < 8 and s - 1 - n >= 0 and r[s - 1 - n] == r[len(r) - 1 - n]:
            n += 1
        assert got[b] == (n if s > 0 else 0)


def test_calibrated_gamma_drafts_by_calibrated_acceptance():
    policy = CalibratedGamma.for_match_length(gamma_max=8)
    match = torch.tensor([1, 10])
    for _ in range(30):  # short matches always rejected, long ones always kept
        policy.update(torch.tensor([1]), torch.tensor([4]), torch.tensor([0]))
        policy.update(torch.tensor([10]), torch.tensor([8]), torch.tensor([8]))
    g = policy.choose(match, base=0.05, per_token=0.01).tolist()
    assert g[0] == 0 and g[1] == 8
    prior = CalibratedGamma.for_match_length(gamma_max=8)  # L = 3: prior acceptance 0.75
    cheap, costly = (prior.choose(torch.tensor([3]), base=0.05, per_token=c).item() for c in (0.001, 0.5))
    assert costly < cheap  # a costly verification: draft less
    single = CalibratedGamma.single(gamma_max=4, prior=0.05)  # a drafter that is rarely right: decode plainly
    assert single.choose(torch.tensor([1]), base=0.05, per_token=0.01, extra=0.02).item() == 0


def test_lookup_tree_holds_every_earlier_continuation_and_stays_lossless(compiled, plain):
    """Prompts whose last tokens recur with different continuations: the tree verifies all of them
    at once (widths > the chain's), and the output stays the plain greedy one for a batch."""
    cm = fresh(compiled("prompt_lookup_tree", 3, "token"))
    prompts = [[5, 6, 7, 8, 5, 6, 9, 10, 5, 6], [9, 10, 11, 9, 10, 12, 9, 10]]
    ref = plain.engine.generate(prompts, max_new_tokens=30, eos=False)
    res = cm.engine.generate(prompts, max_new_tokens=30, eos=False)
    assert res.tokens == ref.tokens
    cands = cm.engine.lookup.tree_candidates(torch.tensor([prompts[0]]), torch.tensor([10]), torch.tensor([2]))
    assert sorted(cands[0].tokens[:2]) == [7, 9]                # both continuations of "5 6"


def test_node_calibration_grows_the_tree_by_calibrated_probability():
    """Nodes are taken from the root in decreasing P while they pay for their verification; a
    child is never taken without its parent and never counts as likelier than it."""
    from accelc.runtime.speculative.drafts import LookupCandidates

    cand = LookupCandidates(tokens=[1, 2, 3, 4], parents=[0, 0, 1, 3], depth=[1, 1, 2, 3],
                            weight=[8.0, 2.0, 8.0, 8.0], share=[0.8, 0.2, 1.0, 1.0], match=[8, 1, 8, 8])
    cal = NodeCalibration()
    keys = cal.keys(cand)
    assert len(set(keys)) == 4
    cal.successes.view(-1)[torch.tensor(keys)] = torch.tensor([0.9, 0.05, 0.95, 0.8]) * cal.trials.view(-1)[torch.tensor(keys)]
    picked, got = cal.choose(cand, base=1.0, per_token=0.1, limit=8)
    assert picked == [0, 2, 3] and got == [keys[i] for i in picked]      # the 0.05 node does not pay
    assert cal.choose(cand, base=1.0, per_token=0.1, limit=2)[0] == [0, 2]
    assert cal.choose(cand, base=0.1, per_token=1.0, limit=8)[0] == []  # a node costs more than it brings
    cal.update(keys[:2], [True, False])
    assert cal.trials.view(-1)[keys[1]] == 3.0


def test_calibrated_gamma_learns_acceptance_per_position():
    """Copied continuations either fail at once or run on: half the steps reject the first draft,
    the others keep all 8.  A single rate (~0.9 per token after the first failure weighs in) would
    stop early; the per-position table knows a draft that survived its first token survives."""
    policy = CalibratedGamma.single(gamma_max=8)
    for _ in range(40):
        policy.update(torch.tensor([1, 1]), torch.tensor([8, 8]), torch.tensor([0, 8]))
    a = policy.acceptance(torch.tensor([1]))[0]
    assert a[0] == pytest.approx(0.5, abs=0.03) and bool((a[1:] > 0.95).all())
    # cheap verification: the whole chain pays; expensive per token: still all or nothing, never a middle length
    assert policy.choose(torch.tensor([1]), base=0.05, per_token=0.001).item() == 8
    assert policy.choose(torch.tensor([1]), base=0.05, per_token=0.2).item() in (0, 8)
    policy.update(torch.tensor([1]), torch.tensor([0]), torch.tensor([0]))  # a row that drafted nothing: no trial
    assert policy.trials[0, 0].item() == pytest.approx(2.0 + 80)


def test_exit_layer_chooser_explores_then_exploits():
    chooser = ExitLayerChooser([4, 8])
    assert chooser.choose(3) == 8
    chooser.update(8, torch.tensor([3]), torch.tensor([0]), 0.1, 0.5)
    assert chooser.choose(3) == 4
    for _ in range(50):
        chooser.update(4, torch.tensor([3]), torch.tensor([3]), 0.1, 0.7)
        chooser.update(8, torch.tensor([3]), torch.tensor([0]), 0.1, 0.5)
    assert chooser.choose(3) == 4
    assert chooser.acceptance()[8] == 0.0


def test_cli_generate_json_shows_speculative_stats(tmp_path, capsys):
    from accelc.cli import main

    spec = tmp_path / "lookup.yaml"
    spec.write_text("accelc: 1\ndecode:\n  speculative: {draft: prompt_lookup, gamma: 4}\n")
    with pytest.raises(SystemExit) as exc:
        main(["generate", str(spec), "--model", "tiny", "--prompt", "abcabcabc", "--max-new-tokens", "12", "--json"])
    assert exc.value.code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["stats"]["speculative"]["draft"] == "prompt_lookup"
    assert math.isfinite(data["stats"]["speculative"]["tokens_per_step"])


def test_engine_dispatch(compiled, plain):
    assert isinstance(compiled("prompt_lookup", 3, "token").engine, SpeculativeEngine)
    assert not isinstance(plain.engine, SpeculativeEngine)


# --------------------------------------------------------------------------------- SmolLM2
def test_smollm2_lossless_on_humaneval_prompts(smollm2):
    """Real model, 5 HumanEval prompts in one batch (rows accept different lengths): every draft
    equals plain greedy, each with another gamma policy and verification (the full draft x gamma x
    verify product runs on the tiny model above).  Kept short: 16 tokens, gamma_max 4, a narrow tree."""
    from accelc.bench_spec import humaneval_prompts

    prompts = humaneval_prompts(5)
    plain_cm = accelc.compile(smollm2, accelc.load_spec({"accelc": 1}))
    ref = plain_cm.engine.generate(prompts, max_new_tokens=16, eos=False)
    drafts = {"early_exit": {"draft": "early_exit", "exit_layer": 20}, "prompt_lookup": {"draft": "prompt_lookup"},
              "token_recycling": {"draft": "token_recycling", "tree_width": 2}}
    for i, draft in enumerate(drafts):
        sp = {**drafts[draft], "gamma": GAMMAS[i], "gamma_max": 4, "verify": VERIFIES[i % 2]}
        cm = accelc.compile(smollm2, accelc.load_spec({"accelc": 1, "decode": {"speculative": sp}}))
        out = cm.engine.generate(prompts, max_new_tokens=16, eos=False)
        assert out.tokens == ref.tokens, (draft, sp["gamma"])
