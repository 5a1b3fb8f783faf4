"""Draft-length (gamma) policies for speculative decoding.

One interface, called by the engine around every speculative step:

* ``next_gamma()`` before drafting: the most drafts any row may propose in this step;
* ``keep_drafting(step, draft_probs_row)`` after each drafted token (``step`` = drafts so far,
  from 1): False stops the row (``keep_drafting_batch`` is the same for (B, V) rows at once);
* ``update(proposed, accepted)`` after verification.

Policies: :class:`FixedGamma`; :class:`HeuristicGamma` (HF assisted generation's schedule);
:class:`AdaptiveGamma` (stops each row when one more draft no longer pays for itself, from the
draft's confidence calibrated online against the observed acceptance -- SpecKV-style).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal

import torch

__all__ = ["AdaptiveGamma", "FixedGamma", "GammaPolicy", "HeuristicGamma", "make_gamma_policy"]


class GammaPolicy(ABC):
    """How many tokens to draft."""

    @abstractmethod
    def next_gamma(self) -> int:
        """The most drafts per row for the next step (>= 1)."""

    @abstractmethod
    def keep_drafting_batch(self, step: int, draft_probs: torch.Tensor | None, batch: int) -> torch.Tensor:
        """After ``step`` drafts: (B,) bool, True = draft another token in that row.

        draft_probs: (B, V) the distribution draft ``step`` was drawn from, or None for a
        deterministic drafter; batch: B.  The engine stops a row at its first False.
        """

    def keep_drafting(self, step: int, draft_probs_row: torch.Tensor | None = None) -> bool:
        """Single-row form of :meth:`keep_drafting_batch`; draft_probs_row: (V,) or None."""
        rows = None if draft_probs_row is None else draft_probs_row[None, :]
        return bool(self.keep_drafting_batch(step, rows, 1)[0])

    def update(self, proposed: int | torch.Tensor, accepted: int | torch.Tensor) -> None:
        """After verification: proposed and accepted drafts, ints or (B,) int64 per row."""


class FixedGamma(GammaPolicy):
    """Always ``gamma`` drafts."""

    def __init__(self, gamma: int):
        if gamma < 1:
            raise ValueError(f"gamma must be >= 1, got {gamma}")
        self.gamma = gamma

    def next_gamma(self) -> int:
        return self.gamma

    def keep_drafting_batch(self, step: int, draft_probs: torch.Tensor | None, batch: int) -> torch.Tensor:
        return torch.full((batch,), step < self.gamma, dtype=torch.bool)


class HeuristicGamma(GammaPolicy):
    """HF assisted generation's schedule: +2 after a step where every draft was accepted, -1
    otherwise, kept in [1, gamma_max].  With a batch, "every draft" means every row's drafts; a
    step that proposed nothing (e.g. no prompt-lookup match) leaves gamma unchanged."""

    def __init__(self, start: int = 4, gamma_max: int = 8):
        if not 1 <= start <= gamma_max:
            raise ValueError(f"need 1 <= start <= gamma_max, got start={start}, gamma_max={gamma_max}")
        self.gamma = start
        self.gamma_max = gamma_max

    def next_gamma(self) -> int:
        return self.gamma

    def keep_drafting_batch(self, step: int, draft_probs: torch.Tensor | None, batch: int) -> torch.Tensor:
        return torch.full((batch,), step < self.gamma, dtype=torch.bool)

    def update(self, proposed: int | torch.Tensor, accepted: int | torch.Tensor) -> None:
        total_proposed = int(torch.as_tensor(proposed).sum())
        if total_proposed == 0:
            return
        if int(torch.as_tensor(accepted).sum()) == total_proposed:
            self.gamma = min(self.gamma + 2, self.gamma_max)
        else:
            self.gamma = max(self.gamma - 1, 1)


class AdaptiveGamma(GammaPolicy):
    """Stop each row when one more draft is expected to lower the step's throughput.

    Rule.  Let r = (time of one draft token) / (time of one verification forward), measured by the
    engine (:meth:`observe_cost`).  A step with n drafts costs 1 + n r verification-forward units
    and emits 1 + sum_{k<=n} P_k tokens in expectation, where P_k is the probability that drafts
    1..k are all accepted.  Drafting token n + 1 raises the throughput iff

        P_{n+1}  >  r (1 + sum_{k<=n} P_k) / (1 + n r)          (break-even)

    P_k = prod_{j<=k} a(c_j) from the per-token acceptance a(c) predicted from the draft's
    confidence c_j (the max probability of draft j's distribution), and P_{n+1} ~ P_n * a_mean
    (the next draft's confidence is unknown before drafting it).  So a row stops as soon as a
    low-confidence draft makes the chain unlikely to survive -- SpecKV's confidence threshold, with
    the threshold derived from measured acceptance and cost instead of tuned.

    Calibration.  a(c) is a table over 10 equal confidence bins, each starting at a Beta prior of
    two pseudo-observations with mean = the bin's confidence (a calibrated drafter is accepted
    about as often as it is confident), then counting, after every verification, the drafts that
    were accepted (successes) and the first rejected one (a failure; later drafts are unobserved).
    a_mean is the overall acceptance rate (same prior).  Nothing is tuned per model: before the
    engine reports a cost, r = ``cost_ratio`` (None -> 0: draft up to ``gamma_max``).  A
    deterministic drafter (draft_probs None) has confidence 1.
    """

    bins = 10

    def __init__(self, gamma_max: int = 8, cost_ratio: float | None = None):
        if gamma_max < 1:
            raise ValueError(f"gamma_max must be >= 1, got {gamma_max}")
        if cost_ratio is not None and cost_ratio < 0:
            raise ValueError(f"cost_ratio must be >= 0, got {cost_ratio}")
        self.gamma_max = gamma_max
        self.cost_ratio = 0.0 if cost_ratio is None else float(cost_ratio)
        self._cost_samples = 0
        centers = (torch.arange(self.bins, dtype=torch.float64) + 0.5) / self.bins
        self.trials = torch.full((self.bins,), 2.0, dtype=torch.float64)
        self.successes = 2.0 * centers
        self._confidences: list[torch.Tensor] = []  # one (B,) tensor per drafted token this step
        self._survive = torch.ones(1, dtype=torch.float64)  # P_n per row
        self._expected = torch.ones(1, dtype=torch.float64)  # 1 + sum_k P_k per row

    def next_gamma(self) -> int:
        return self.gamma_max

    def acceptance(self, confidence: torch.Tensor) -> torch.Tensor:
        """Predicted per-token acceptance a(c): confidence (...,) in [0, 1] -> (...,) float64."""
        index = (confidence.double() * self.bins).long().clamp(0, self.bins - 1)
        return (self.successes / self.trials)[index]

    @property
    def mean_acceptance(self) -> float:
        """Overall acceptance rate of verified drafts (with the prior)."""
        return float(self.successes.sum() / self.trials.sum())

    def observe_cost(self, draft_seconds_per_token: float, verify_seconds: float) -> None:
        """Fold one measured step into r = draft time per token / verification time (running mean)."""
        if verify_seconds <= 0 or draft_seconds_per_token < 0:
            return
        self._cost_samples += 1
        ratio = draft_seconds_per_token / verify_seconds
        self.cost_ratio += (ratio - self.cost_ratio) / self._cost_samples

    def _observe(self, step: int, draft_probs: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Start the step's bookkeeping at step 1; record and return draft ``step``'s confidence (batch,)."""
        if step == 1:
            self._confidences = []
            self._survive = torch.ones(batch, dtype=torch.float64)
            self._expected = torch.ones(batch, dtype=torch.float64)
        confidence = torch.ones(batch) if draft_probs is None else draft_probs.detach().float().amax(dim=-1).cpu()
        self._confidences.append(confidence)
        return confidence

    def keep_drafting_batch(self, step: int, draft_probs: torch.Tensor | None, batch: int) -> torch.Tensor:
        confidence = self._observe(step, draft_probs, batch)
        self._survive = self._survive * self.acceptance(confidence)
        self._expected = self._expected + self._survive
        if step >= self.gamma_max:
            return torch.zeros(batch, dtype=torch.bool)
        r = self.cost_ratio
        gain = self._survive * self.mean_acceptance
        return gain > r * self._expected / (1.0 + step * r)

    def include_batch(self, step: int, draft_probs: torch.Tensor | None, batch: int) -> torch.Tensor:
        """(batch,) bool: keep draft ``step`` (whose distribution is ``draft_probs``), decided after
        seeing it -- for drafters whose next draft costs the same as verifying this one (early exit
        with reused layers: keeping d_n costs one more pass, drafting d_{n+1} with it comes free).

        Keeping d_n adds P_n = P_{n-1} a(c_n) expected tokens for one more cost unit r, so it
        raises the throughput iff  P_n (1 + (n - 1) r) > r (1 + sum_{k<n} P_k).  Call with
        step = 1, 2, ... in order; a row that was not kept must not be asked again this step."""
        confidence = self._observe(step, draft_probs, batch)
        survive = self._survive * self.acceptance(confidence)
        r = self.cost_ratio
        keep = survive * (1.0 + (step - 1) * r) > r * self._expected
        if step > self.gamma_max:
            keep[:] = False
        self._survive = torch.where(keep, survive, self._survive)
        self._expected = torch.where(keep, self._expected + survive, self._expected)
        return keep

    def observe_shadow(self, confidence: torch.Tensor, accepted: torch.Tensor) -> None:
        """Count first drafts that were computed but not proposed: their confidences (n,) and
        acceptance probabilities (n,) in [0, 1] (1 / 0 at T = 0), as the engine reads them off the
        verification of the pending token.  Without them a bin whose drafts are always declined
        would never learn that it now pays."""
        index = (confidence.double() * self.bins).long().clamp(0, self.bins - 1)
        self.trials += torch.bincount(index, minlength=self.bins).double()
        self.successes += torch.bincount(index, weights=accepted.double(), minlength=self.bins)

    def update(self, proposed: int | torch.Tensor, accepted: int | torch.Tensor) -> None:
        if not self._confidences:
            return
        confidences = torch.stack(self._confidences, dim=1)  # (B, n)
        batch, drafted = confidences.shape
        proposed_t = torch.as_tensor(proposed).reshape(-1).expand(batch).cpu()
        accepted_t = torch.as_tensor(accepted).reshape(-1).expand(batch).cpu()
        step = torch.arange(drafted)[None, :]
        success = step < accepted_t[:, None]
        verified = success | ((step == accepted_t[:, None]) & (step < proposed_t[:, None]))
        index = (confidences.double() * self.bins).long().clamp(0, self.bins - 1)
        self.trials += torch.bincount(index[verified], minlength=self.bins).double()
        self.successes += torch.bincount(index[success], minlength=self.bins).double()
        self._confidences = []


def make_gamma_policy(spec_value: int | Literal["heuristic", "adaptive"], gamma_max: int) -> GammaPolicy:
    """The policy named by the spec's ``decode.speculative.gamma`` (an int, "heuristic" or
    "adaptive"), bounded by ``gamma_max``."""
    if isinstance(spec_value, bool):
        raise ValueError(f"gamma must be an int >= 1, 'heuristic' or 'adaptive', got {spec_value!r}")
    if isinstance(spec_value, int):
        if not 1 <= spec_value <= gamma_max:
            raise ValueError(f"gamma must be in [1, gamma_max={gamma_max}], got {spec_value}")
        return FixedGamma(spec_value)
    if spec_value == "heuristic":
        return HeuristicGamma(start=min(4, gamma_max), gamma_max=gamma_max)
    if spec_value == "adaptive":
        return AdaptiveGamma(gamma_max=gamma_max)
    raise ValueError(f"gamma must be an int >= 1, 'heuristic' or 'adaptive', got {spec_value!r}")
