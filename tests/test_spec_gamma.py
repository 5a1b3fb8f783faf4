"""Draft-length policies: traces of the fixed and heuristic schedules, the adaptive policy's
calibration and stopping rule, and its throughput against the best fixed gamma in simulation."""
from __future__ import annotations

import pytest
import torch

from accelc.runtime.speculative.gamma import (
    AdaptiveGamma,
    FixedGamma,
    GammaPolicy,
    HeuristicGamma,
    make_gamma_policy,
)

VOCAB = 10


def probs_with_confidence(confidence: float | list[float]) -> torch.Tensor:
    """(V,) or (B, V) distributions whose max probability is `confidence` (>= 1 / V)."""
    conf = torch.as_tensor(confidence, dtype=torch.float32).reshape(-1, 1)
    probs = ((1 - conf) / (VOCAB - 1)).expand(-1, VOCAB).clone()
    probs[:, :1] = conf
    return probs[0] if isinstance(confidence, float) else probs


def drafts_until_stop(policy: GammaPolicy, confidences: list[float] | None = None) -> int:
    """Run the engine's drafting loop for one row; returns the number of drafts."""
    gamma = policy.next_gamma()
    for step in range(1, gamma + 1):
        probs = None if confidences is None else probs_with_confidence(confidences[step - 1])
        if not policy.keep_drafting(step, probs):
            return step
    return gamma


def test_fixed_gamma_trace():
    policy = FixedGamma(3)
    for accepted in (0, 3, 1):
        assert policy.next_gamma() == 3
        assert drafts_until_stop(policy) == 3
        policy.update(3, accepted)
    assert [policy.keep_drafting(s) for s in (1, 2, 3)] == [True, True, False]


def test_heuristic_gamma_trace():
    """+2 when every draft is accepted, -1 otherwise, within [1, gamma_max] (HF assisted generation)."""
    policy = HeuristicGamma(start=4, gamma_max=8)
    trace = []
    for all_accepted in (True, True, True, False, False, False, False, False, False, False, True):
        gamma = policy.next_gamma()
        trace.append(gamma)
        assert drafts_until_stop(policy) == gamma
        policy.update(gamma, gamma if all_accepted else gamma - 1)
    trace.append(policy.next_gamma())
    assert trace == [4, 6, 8, 8, 7, 6, 5, 4, 3, 2, 1, 3]


def test_heuristic_gamma_batch_and_empty_proposals():
    policy = HeuristicGamma(start=4, gamma_max=8)
    policy.update(torch.tensor([4, 4]), torch.tensor([4, 4]))
    assert policy.next_gamma() == 6
    policy.update(torch.tensor([6, 6]), torch.tensor([6, 2]))
    assert policy.next_gamma() == 5
    policy.update(torch.tensor([0, 0]), torch.tensor([0, 0]))  # nothing drafted: no evidence
    assert policy.next_gamma() == 5


def test_heuristic_gamma_floor_is_one():
    policy = HeuristicGamma(start=1, gamma_max=2)
    policy.update(1, 0)
    assert policy.next_gamma() == 1


def test_adaptive_drafts_to_gamma_max_before_cost_is_known():
    policy = AdaptiveGamma(gamma_max=5)
    assert drafts_until_stop(policy, [0.11] * 5) == 5
    assert drafts_until_stop(policy, None) == 5


def test_adaptive_stops_at_low_confidence_once_calibrated():
    """Drafts at confidence 0.9 are always accepted and those at 0.3 never: with drafting costing
    0.3 of a verification, a 0.3-confidence draft ends the row, a 0.9 one does not."""
    policy = AdaptiveGamma(gamma_max=8, cost_ratio=0.3)
    for _ in range(30):
        for step, conf in enumerate([0.9, 0.9, 0.3], start=1):
            policy.keep_drafting(step, probs_with_confidence(conf))
        policy.update(3, 2)
    assert float(policy.acceptance(torch.tensor(0.9))) > 0.9
    assert float(policy.acceptance(torch.tensor(0.3))) < 0.1
    assert drafts_until_stop(policy, [0.9] * 8) >= 4
    assert drafts_until_stop(policy, [0.3] * 8) == 1
    assert drafts_until_stop(policy, [0.9, 0.9, 0.3, 0.9, 0.9, 0.9, 0.9, 0.9]) == 3


def test_adaptive_rows_stop_independently():
    policy = AdaptiveGamma(gamma_max=8, cost_ratio=0.2)
    keep = policy.keep_drafting_batch(1, probs_with_confidence([0.99, 0.12]), batch=2)
    assert keep.tolist() == [True, False]


def test_adaptive_update_counts_only_verified_drafts():
    """Accepted drafts are successes, the first rejected one a failure, later ones unobserved."""
    policy = AdaptiveGamma(gamma_max=8)
    trials, successes = policy.trials.clone(), policy.successes.clone()
    confidences = [0.15, 0.35, 0.55, 0.75]
    for step, conf in enumerate(confidences, start=1):
        policy.keep_drafting(step, probs_with_confidence(conf))
    policy.update(4, 1)
    bins = [int(c * AdaptiveGamma.bins) for c in confidences]
    assert (policy.trials - trials)[bins].tolist() == [1, 1, 0, 0]
    assert (policy.successes - successes)[bins].tolist() == [1, 0, 0, 0]
    assert float((policy.trials - trials).sum()) == 2


def test_adaptive_counts_shadow_drafts():
    """Declined first drafts (observe_shadow) are trials in their confidence bin, weighted by
    their acceptance probability."""
    policy = AdaptiveGamma(gamma_max=4)
    trials, successes = policy.trials.clone(), policy.successes.clone()
    policy.observe_shadow(torch.tensor([0.15, 0.95, 0.95]), torch.tensor([0.0, 1.0, 0.5]))
    assert (policy.trials - trials).tolist() == [0, 1, 0, 0, 0, 0, 0, 0, 0, 2]
    assert (policy.successes - successes).tolist() == pytest.approx([0, 0, 0, 0, 0, 0, 0, 0, 0, 1.5])


def test_adaptive_calibration_follows_observed_acceptance():
    """Prior: acceptance = confidence; after many drafts at 0.95 accepted half of the time the
    predicted acceptance there moves to about 0.5."""
    policy = AdaptiveGamma(gamma_max=2)
    assert float(policy.acceptance(torch.tensor(0.95))) == pytest.approx(0.95)
    for round_ in range(400):
        policy.keep_drafting(1, probs_with_confidence(0.95))
        policy.update(1, round_ % 2)
    assert float(policy.acceptance(torch.tensor(0.95))) == pytest.approx(0.5, abs=0.02)


def test_adaptive_observe_cost_is_running_mean():
    policy = AdaptiveGamma(gamma_max=4)
    policy.observe_cost(0.01, 0.1)
    policy.observe_cost(0.03, 0.1)
    assert policy.cost_ratio == pytest.approx(0.2)


def _simulated_throughput(policy: GammaPolicy, conf: torch.Tensor, kept: torch.Tensor, cost: float) -> float:
    """Tokens per verification-forward unit over rounds; conf (R, gmax) draft confidences, kept
    (R, gmax) bool whether each draft would be accepted."""
    tokens, time = 0.0, 0.0
    for t in range(conf.shape[0]):
        drafted = drafts_until_stop(policy, conf[t].tolist())
        accepted = int(kept[t, :drafted].long().cumprod(0).sum())
        policy.update(drafted, accepted)
        tokens += accepted + 1
        time += 1 + drafted * cost
    return tokens / time


def _best_fixed_throughput(kept: torch.Tensor, cost: float) -> float:
    leading = kept.long().cumprod(1).sum(1)  # accepted run length with gamma = gmax
    rounds, gmax = kept.shape
    return max(float((leading.clamp(max=g) + 1).sum()) / (rounds * (1 + g * cost)) for g in range(1, gmax + 1))


@pytest.mark.parametrize(
    ("scenario", "cost"),
    [("calibrated", 0.2), ("overconfident", 0.05), ("bimodal", 0.2)],
)
def test_adaptive_within_5_percent_of_best_fixed(scenario, cost):
    """A drafter whose confidences come from Beta(3, 1) (or a 0.97/0.2 mixture) and whose drafts
    are accepted with probability c (or c^2: overconfident); the adaptive policy, told only the
    cost ratio, reaches >= 95% of the best fixed gamma's throughput (it is usually above it)."""
    gen = torch.Generator().manual_seed(7)
    rounds, gmax = 1200, 8
    if scenario == "bimodal":
        conf = torch.where(torch.rand(rounds, gmax, generator=gen) < 0.8, 0.97, 0.2)
    else:
        conf = torch.rand(rounds, gmax, generator=gen).pow(1 / 3).clamp(0.1, 1.0)  # Beta(3, 1)
    accept_prob = conf**2 if scenario == "overconfident" else conf
    kept = torch.rand(rounds, gmax, generator=gen) < accept_prob
    adaptive = _simulated_throughput(AdaptiveGamma(gmax, cost_ratio=cost), conf, kept, cost)
    assert adaptive >= 0.95 * _best_fixed_throughput(kept, cost)


def test_make_gamma_policy():
    assert isinstance(make_gamma_policy(3, 8), FixedGamma) and make_gamma_policy(3, 8).next_gamma() == 3
    heuristic = make_gamma_policy("heuristic", 2)
    assert isinstance(heuristic, HeuristicGamma) and heuristic.next_gamma() == 2
    adaptive = make_gamma_policy("adaptive", 6)
    assert isinstance(adaptive, AdaptiveGamma) and adaptive.next_gamma() == 6
    for bad in (0, 9, "sometimes", True):
        with pytest.raises(ValueError, match="gamma"):
            make_gamma_policy(bad, 8)


def test_adaptive_include_decides_after_seeing_each_draft():
    """include_batch (early exit with reused layers): keep draft n iff
    P_n (1 + (n - 1) r) > r (1 + sum_{k<n} P_k), with P_n from the calibrated confidence."""
    policy = AdaptiveGamma(gamma_max=4, cost_ratio=0.6)
    sure, unsure = torch.tensor([[0.99, 0.01]]), torch.tensor([[0.5, 0.5]])
    # P_1 = a(0.99) ~ 0.95 > 0.6: kept; then a 0.5-confidence draft: P_2 ~ 0.95 * 0.55 ~ 0.52,
    # 0.52 * 1.6 = 0.84 < 0.6 * 1.95 = 1.17: not kept
    assert policy.include_batch(1, sure, 1).tolist() == [True]
    assert policy.include_batch(2, unsure, 1).tolist() == [False]
    free = AdaptiveGamma(gamma_max=3, cost_ratio=0.0)  # drafting costs nothing: keep everything
    assert all(free.include_batch(n, unsure, 2).tolist() == [True, True] for n in (1, 2, 3))
    rows = AdaptiveGamma(gamma_max=4, cost_ratio=0.6)  # rows decide independently (a(0.5) = 0.55 < 0.6)
    assert rows.include_batch(1, torch.cat([sure, unsure]), 2).tolist() == [True, False]
    rows.update(torch.tensor([1, 0]), torch.tensor([1, 0]))  # only the kept, verified draft counts
    assert rows.trials.sum().item() == pytest.approx(2.0 * rows.bins + 1)
