"""The speculative decoding loop: one engine for every drafter, lossless at every temperature.

Each step drafts up to gamma tokens per row after the row's *pending* token (the last emitted
token, not yet in the KV cache) and verifies them in ONE forward of the target model:

    draft   early exit: passes of the draft graph (first k layers + exit head) over pending,
            d_1, ..., each row keeping a draft while the gamma policy includes it (for
            ``adaptive``: after seeing the draft's confidence); the verification then runs only
            the layers from the exit on (the tail graph), reusing the drafted layers
            (:meth:`SpeculativeEngine._early_exit_step`);
            prompt lookup / token recycling chain: model-free proposals cut by the same policy;
            token recycling tree (T = 0): a static tree of candidates from the adjacency matrix.
    verify  forward [pending, d_1..d_g] at positions pos..pos+g (a tree: all nodes, position
            pos + depth, attention along ``tree_mask``) -> logits at every position;
            T = 0: greedy matching (:func:`verify_greedy` / :func:`verify_tree_greedy`);
            T > 0: token-wise (Leviathan et al. 2023) or block verification (Sun et al. 2024)
            of the sampled drafts against the target distributions.
    commit  rows keep their accepted drafts plus one extra token (the correction or bonus):
            rollback resets the per-row cache lengths to the snapshot + kept entries
            (:meth:`KVCache.restore`, nothing copied); after a tree only the few entries of the
            accepted path are moved into contiguous slots (:func:`compact_path`).

Rows of a batch accept different lengths; a finished row keeps its cache (it commits nothing).
At T = 0 every row emits exactly the tokens of plain greedy decoding with the same graph; at
T > 0 the emitted tokens are distributed as samples of the target (the verifiers' guarantee).

Adaptive draft length: ``gamma: adaptive`` is :class:`~accelc.runtime.speculative.gamma.AdaptiveGamma`
(draft confidence vs measured cost) for early exit and Token Recycling; for prompt lookup, whose
drafts carry no distribution, :class:`CalibratedGamma` uses the length of the matched context as
the confidence (Token Recycling: one bucket) and may draft nothing where drafting does not pay.  Every adaptive choice charges a drafted token its marginal verification cost too
(:class:`VerifyCost`): on a CPU a forward of 9 tokens costs about 2.2 decode steps, on a GPU about 1.
What is learned (calibrations, costs, the adjacency matrix) is kept across greedy ``generate``
calls; a sampled generation starts afresh so that a seed reproduces it.

Adaptive exit layer (``exit_layer: adaptive``; DEL, Zarch et al. 2025, "DEL: Context-Aware
Dynamic Exit Layer for Efficient Self-Speculative Decoding"): DEL picks the exit layer that
maximises the expected tokens per unit of time from per-layer acceptance rates.  Our verification
forward does not expose intermediate layers, so :class:`ExitLayerChooser` estimates each
candidate's acceptance from the steps drafted with it and explores with an upper confidence
bound (UCB1, Auer et al. 2002) instead of DEL's shadow acceptance of all layers.
"""
from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from accelc.runtime.cache import KVCache
from accelc.runtime.engine import Engine, GenerationResult, _cut_at_stop, _hits_stop
from accelc.runtime.pystack import deep_stack
from accelc.runtime.sampling import SamplingParams, choose, probs_from_logits, sample
from accelc.runtime.speculative.drafts import DraftTree, LookupCandidates, PromptLookupDrafter, Proposal, TokenRecyclingDrafter
from accelc.runtime.speculative.gamma import AdaptiveGamma, GammaPolicy, make_gamma_policy
from accelc.runtime.speculative.verify import VerifyResult, verify_block, verify_greedy, verify_tokenwise, verify_tree_greedy

__all__ = ["CalibratedGamma", "ExitLayerChooser", "SpecStats", "SpeculativeEngine", "VerifyCost", "compact_path",
           "suffix_match_length"]


# ---------------------------------------------------------------------------------- bookkeeping
class VerifyCost:
    """Seconds of a verification forward as a line in its width: t(S) ~= base + per_token * S.

    Fitted by least squares over the last ``window`` forwards, so that a drafted token is charged
    its marginal verification cost as well as its drafting cost (on a CPU the forward of 9 tokens
    costs about twice the forward of one; on a GPU about the same).
    """

    def __init__(self, window: int = 64):
        self.window = window
        self.samples: list[tuple[int, float]] = []
        self._line: tuple[float, float] | None = None

    def observe(self, width: int, seconds: float) -> None:
        """One verification forward of ``width`` tokens per row took ``seconds``."""
        self.samples.append((width, seconds))
        del self.samples[: -self.window]
        self._line = None

    def line(self) -> tuple[float, float]:
        """(base, per_token) in seconds; per_token is 0 until two widths were seen (cached until
        the next observation: the loop asks several times per step)."""
        if self._line is None:
            self._line = self._fit()
        return self._line

    def _fit(self) -> tuple[float, float]:
        n = len(self.samples)
        if n == 0:
            return 0.0, 0.0
        w_mean = sum(w for w, _ in self.samples) / n
        t_mean = sum(t for _, t in self.samples) / n
        var = sum((w - w_mean) ** 2 for w, _ in self.samples)
        if var == 0:
            return t_mean, 0.0
        slope = max(0.0, sum((w - w_mean) * (t - t_mean) for w, t in self.samples) / var)
        return t_mean - slope * w_mean, slope


class ExitLayerChooser:
    """DEL-style choice of the exit layer among the compiled candidates (module docstring).

    Per layer l: acceptance a_l = (successes + 1) / (trials + 2) counted per verified draft (the
    accepted drafts and the first rejected one), the measured seconds c_l of one draft-graph pass
    and v_l of the verification from the exit on.  The chosen layer maximises
    E_l / ((gamma + 1) c_l + v_l)  with E_l = (1 - a^(gamma+1)) / (1 - a) the expected tokens per
    step, where a is a_l raised by the UCB1 bonus sqrt(2 ln N / n_l); an untried layer is tried
    first (deepest first).
    """

    def __init__(self, layers: Sequence[int]):
        self.layers = sorted(layers)
        self.trials = {k: 0.0 for k in self.layers}
        self.successes = {k: 0.0 for k in self.layers}
        self.cost = {k: None for k in self.layers}  # type: dict[int, float | None]
        self.tail = {k: None for k in self.layers}  # type: dict[int, float | None]

    def choose(self, gamma: int) -> int:
        """The exit layer for the next step (up to gamma drafts)."""
        untried = [k for k in self.layers if self.cost[k] is None]
        if untried:
            return untried[-1]
        total = sum(self.trials.values()) + 1.0
        best, best_score = self.layers[0], -1.0
        for k in self.layers:
            a = (self.successes[k] + 1.0) / (self.trials[k] + 2.0)
            a = min(0.999, a + math.sqrt(2.0 * math.log(total) / (self.trials[k] + 1.0)))
            expected = (1.0 - a ** (gamma + 1)) / (1.0 - a)
            score = expected / ((gamma + 1) * float(self.cost[k]) + max(float(self.tail[k]), 1e-9))
            if score > best_score:
                best, best_score = k, score
        return best

    def update(self, layer: int, proposed: torch.Tensor, accepted: torch.Tensor, seconds_per_pass: float,
               tail_seconds: float, shadow: torch.Tensor | None = None) -> None:
        """proposed, accepted: (B,) int64 drafts per row of the step drafted from ``layer``;
        seconds_per_pass: one draft-graph pass; tail_seconds: the verification from the exit on;
        shadow: acceptance probabilities of first drafts computed but not proposed (each one more
        trial)."""
        rejected = (accepted < proposed).double()
        self.successes[layer] += float(accepted.sum())
        self.trials[layer] += float(accepted.sum() + rejected.sum())
        if shadow is not None:
            self.successes[layer] += float(shadow.sum())
            self.trials[layer] += float(shadow.numel())
        for store, value in ((self.cost, seconds_per_pass), (self.tail, tail_seconds)):
            old = store[layer]
            store[layer] = value if old is None else 0.8 * old + 0.2 * value

    def acceptance(self) -> dict[int, float | None]:
        """Observed per-draft acceptance per layer (None for a layer never verified)."""
        return {k: round(self.successes[k] / self.trials[k], 4) if self.trials[k] else None for k in self.layers}


@dataclass
class SpecStats:
    """Per-generation statistics of the speculative loop (``GenerationResult.stats["speculative"]``)."""

    draft: str
    gamma_max: int
    steps: int = 0
    row_steps: int = 0
    accepted: int = 0
    proposed: int = 0
    draft_s: float = 0.0
    verify_s: float = 0.0
    reached: list[int] = field(default_factory=list)  # [j]: row-steps that proposed >= j + 1 drafts
    kept: list[int] = field(default_factory=list)  # [j]: row-steps that kept >= j + 1 drafts
    gamma_trace: list[int] = field(default_factory=list)
    exit_trace: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.reached = [0] * self.gamma_max
        self.kept = [0] * self.gamma_max

    def record(self, proposed: torch.Tensor, accepted: torch.Tensor, active: torch.Tensor, width: int) -> None:
        """proposed, accepted: (B,) int64; active: (B,) bool rows that were still generating."""
        p, a = proposed[active], accepted[active]
        self.steps += 1
        self.row_steps += int(active.sum())
        self.proposed += int(p.sum())
        self.accepted += int(a.sum())
        j = torch.arange(1, self.gamma_max + 1)
        reached = (p[:, None].cpu() >= j).sum(0).tolist()
        kept = (a[:, None].cpu() >= j).sum(0).tolist()
        self.reached = [x + y for x, y in zip(self.reached, reached)]
        self.kept = [x + y for x, y in zip(self.kept, kept)]
        self.gamma_trace.append(width)

    def to_dict(self) -> dict[str, Any]:
        per_pos = [round(k / r, 4) if r else None for k, r in zip(self.kept, self.reached)]
        while per_pos and per_pos[-1] is None:
            per_pos.pop()
        rs = max(1, self.row_steps)
        out = {
            "draft": self.draft,
            "steps": self.steps,
            "accepted_mean": round(self.accepted / rs, 4),
            "tokens_per_step": round((self.accepted + self.row_steps) / rs, 4),
            "acceptance_rate": round(self.accepted / self.proposed, 4) if self.proposed else None,
            "proposed_mean": round(self.proposed / rs, 4),
            "per_position_acceptance": per_pos,
            "per_position_counts": {"reached": self.reached, "kept": self.kept},
            "draft_s": round(self.draft_s, 4),
            "verify_s": round(self.verify_s, 4),
            "draft_fraction": round(self.draft_s / (self.draft_s + self.verify_s), 4) if self.draft_s + self.verify_s > 0 else None,
            "gamma_trace": self.gamma_trace,
        }
        if self.exit_trace:
            out["exit_layer_trace"] = self.exit_trace
        out.update(self.extra)
        return out


def compact_path(cache: KVCache, base: Sequence[torch.Tensor], path: torch.Tensor) -> None:
    """Move the KV entries of an accepted tree path into contiguous slots.

    After a tree forward, row b of layer i holds node s at slot ``base[i][b] + s``.  The path's
    j-th node (root first) moves to slot ``base[i][b] + j``; only these (B, W) entries per layer are
    read and written.  base: per layer (B,) int64 lengths before the forward (the snapshot);
    path: (B, W) int64 node indices, -1 after the accepted node (those slots receive junk beyond the
    committed length).  Sources never precede destinations (BFS order: a node at depth j has index
    >= j) and all are read before any is written.
    """
    width = path.shape[1]
    src_off = path.clamp(min=0)
    dst_off = torch.arange(width, device=path.device)
    if bool((src_off == dst_off).all()):
        return
    for layer, start in zip(cache.layers, base):
        src = start[:, None] + src_off
        dst = start[:, None] + dst_off
        for store in (cache.k, cache.v):
            t = store[layer]
            index = src[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3])
            t.scatter_(2, dst[:, None, :, None].expand_as(index), t.gather(2, index))


# ---------------------------------------------------------------------------------- row state
@dataclass
class _Rows:
    """What the loop tracks per row.  context: (B, T) prompt + emitted tokens (right-padded),
    length: (B,) real tokens in context, pending: (B,) last emitted token (not in the cache yet),
    pos: (B,) its position, finished: (B,) bool."""

    out: list[list[int]]
    context: torch.Tensor
    length: torch.Tensor
    pending: torch.Tensor
    pos: torch.Tensor
    finished: torch.Tensor
    max_new: int

    def budget(self) -> torch.Tensor:
        """(B,) drafts a row may still propose so that a step emits no more than its remaining
        tokens (0 for finished rows)."""
        left = torch.tensor([self.max_new - len(o) for o in self.out], device=self.pos.device)
        return torch.where(self.finished, 0, (left - 1).clamp(min=0))


class CalibratedGamma:
    """Adaptive gamma for the model-free drafters (``gamma: adaptive`` with prompt lookup or Token
    Recycling): their drafts carry no distribution, so the confidence of a draft is a bucket --
    for prompt lookup the length L of the context suffix that matches the text before the copied
    continuation (SpecKV's idea -- draft less when confidence is low -- with the match length as
    the confidence; on HumanEval continuations of SmolLM2 the mean number of kept drafts grows from
    0.6 of 8 at L = 1 to about 7 of 8 at L >= 10), for Token Recycling one bucket (the acceptance
    of a tree level).

    Per bucket and draft position j the conditional acceptance a_j = P(draft j kept | drafts
    1..j-1 kept) = successes / trials starts at a prior (two pseudo-observations) and counts the
    kept drafts and the first rejected one of every verified step.  Acceptance is not geometric:
    a copied continuation that survives its first token tends to survive the next ones too, so a
    per-position table drafts long where a single rate would stop early.  Each row then drafts the
    g in [0, gamma_max] maximising expected tokens per second,
    (1 + sum_{j<=g} prod_{i<=j} a_i)  /  (base + per_token (g + 1) + extra g),
    with the verification cost line of :class:`VerifyCost` (``extra``: the cost of the other nodes
    of a tree level, or of drafting).  g = 0 is allowed: where drafting does not pay (a wide
    verification on a CPU, a drafter that is rarely right) the loop decodes plainly.

    priors: (K,) prior acceptance per bucket; keys given to the methods are 1..K (clamped).
    """

    def __init__(self, gamma_max: int, priors: torch.Tensor):
        self.gamma_max = gamma_max
        prior = priors.double()[:, None].expand(-1, max(1, gamma_max))
        self.trials = torch.full(prior.shape, 2.0, dtype=torch.float64)
        self.successes = 2.0 * prior.clone()

    @classmethod
    def for_match_length(cls, gamma_max: int, buckets: int = 10) -> "CalibratedGamma":
        """Buckets L = 1..buckets (longer matches share the last), prior L / (L + 1)."""
        length = torch.arange(1, buckets + 1, dtype=torch.float64)
        return cls(gamma_max, length / (length + 1.0))

    @classmethod
    def single(cls, gamma_max: int, prior: float = 0.5) -> "CalibratedGamma":
        return cls(gamma_max, torch.tensor([prior]))

    def _bucket(self, keys: torch.Tensor) -> torch.Tensor:
        return keys.cpu().long().clamp(1, self.trials.shape[0]) - 1

    def acceptance(self, keys: torch.Tensor) -> torch.Tensor:
        """(B, gamma_max) float64 predicted conditional acceptance per position for bucket keys (B,)."""
        return (self.successes / self.trials)[self._bucket(keys)]

    def choose(self, keys: torch.Tensor, base: float, per_token: float, extra: float = 0.0) -> torch.Tensor:
        """(B,) int64 drafts per row (keys (B,) int64; costs in seconds)."""
        a = self.acceptance(keys)[:, : self.gamma_max]
        expected = torch.cat([torch.ones(a.shape[0], 1, dtype=a.dtype), 1 + a.cumprod(dim=1).cumsum(dim=1)], dim=1)
        g = torch.arange(self.gamma_max + 1, dtype=torch.float64)[None, :]
        cost = max(base, 1e-9) + per_token * (g + 1) + extra * g
        return (expected / cost).argmax(dim=1).to(keys.device)

    def update(self, keys: torch.Tensor, proposed: torch.Tensor, accepted: torch.Tensor) -> None:
        """keys, proposed, accepted: (B,) int64 of the verified step's rows that drafted."""
        if keys.numel() == 0:
            return
        idx = self._bucket(keys)
        p, a = proposed.cpu().long()[:, None], accepted.cpu().long()[:, None]
        j = torch.arange(self.trials.shape[1])[None, :]
        kept = (j < a).double()
        tried = kept + ((j == a) & (a < p)).double()
        self.successes.index_add_(0, idx, kept)
        self.trials.index_add_(0, idx, tried)


class NodeCalibration:
    """Which candidates of a prompt-lookup tree (``tree_nodes: N``) to verify, with ``gamma: adaptive``.

    A candidate node is described by a bucket: its longest match length (1..8, longer ones share
    the last), its depth (1..8) and its share of its parent's weight (three bins: it is one of
    several continuations, the main one, or the only one).  Per bucket P(node on the accepted
    path) = successes / trials starts at a prior (two pseudo-observations) and counts every
    verified node.  A row then grows its tree from the root, always taking the likeliest node
    of the frontier (a node's P capped by its parent's), while one more node raises the expected
    tokens per second: P * cost > per_token * expected (expected = 1 + sum of the chosen P,
    cost = base + per_token * (1 + chosen), the :class:`VerifyCost` line), up to ``N`` nodes.
    A node's P is not conditional: it is calibrated directly on how often nodes of its bucket were
    accepted, so an uncertain tree stays small and a verbatim copy grows deep.
    """

    MATCH, DEPTH, SHARE = 8, 8, 3

    def __init__(self, prior: float = 0.5):
        shape = (self.MATCH, self.DEPTH, self.SHARE)
        self.trials = torch.full(shape, 2.0, dtype=torch.float64)
        self.successes = torch.full(shape, 2.0 * prior, dtype=torch.float64)

    def keys(self, cand: LookupCandidates) -> list[int]:
        """Flat bucket index of every node of ``cand``."""
        out = []
        for m, d, sh in zip(cand.match, cand.depth, cand.share):
            share = 0 if sh < 0.5 else (1 if sh < 1.0 else 2)
            out.append(((min(m, self.MATCH) - 1) * self.DEPTH + min(d, self.DEPTH) - 1) * self.SHARE + share)
        return out

    def choose(self, cand: LookupCandidates, base: float, per_token: float, limit: int) -> tuple[list[int], list[int]]:
        """Chosen node indices of ``cand`` (0-based, ascending = BFS order) and their buckets."""
        if not len(cand) or limit < 1:
            return [], []
        keys = self.keys(cand)
        p = (self.successes / self.trials).reshape(-1)[torch.tensor(keys)].tolist()
        children: dict[int, list[int]] = {}
        for i, parent in enumerate(cand.parents):
            children.setdefault(parent - 1, []).append(i)
        # grow from the root: always the most likely node of the frontier; a node is never more
        # likely than its parent (its P is capped by the parent's)
        frontier = [(-p[i], i) for i in children.get(-1, [])]
        heapq.heapify(frontier)
        expected, cost = 1.0, max(base, 1e-9) + per_token
        chosen: list[int] = []
        while frontier and len(chosen) < limit:
            neg, i = heapq.heappop(frontier)
            if -neg * cost <= per_token * expected:
                break
            chosen.append(i)
            expected -= neg
            cost += per_token
            for c in children.get(i, []):
                heapq.heappush(frontier, (-min(p[c], -neg), c))
        picked = sorted(chosen)
        return picked, [keys[i] for i in picked]

    def update(self, keys: list[int], kept: list[bool]) -> None:
        if keys:
            idx = torch.tensor(keys)
            self.trials.view(-1).index_add_(0, idx, torch.ones(len(keys), dtype=torch.float64))
            self.successes.view(-1).index_add_(0, idx, torch.tensor(kept, dtype=torch.float64))


def _subtree(cand: LookupCandidates, picked: list[int]) -> tuple[list[int], list[int]]:
    """(tokens, parents) of the chosen nodes (ascending, parents chosen) renumbered from the root 0."""
    number = {i: j + 1 for j, i in enumerate(picked)}
    return [cand.tokens[i] for i in picked], [number.get(cand.parents[i] - 1, 0) for i in picked]


def suffix_match_length(context: torch.Tensor, lengths: torch.Tensor, start: torch.Tensor, cap: int = 16) -> torch.Tensor:
    """(B,) int64: how many tokens before ``start`` equal the last tokens of the context (the
    lookup match extended backwards, at most ``cap``); 0 where start < 0 (no match).

    context: (B, T) int64; lengths: (B,) real tokens; start: (B,) index right after the match.
    """
    i = torch.arange(cap, device=context.device)[None, :]
    before = start[:, None] - 1 - i
    tail = lengths[:, None] - 1 - i
    same = context.gather(1, before.clamp(min=0)) == context.gather(1, tail.clamp(min=0))
    ok = same & (before >= 0) & (start[:, None] > 0)
    return ok.long().cumprod(dim=1).sum(dim=1)


@dataclass
class _Learned:
    """What the loop learns while generating: the gamma policy's calibration, the exit-layer and
    lookup acceptance estimates, the Token Recycling adjacency and the verification cost per batch
    size.  Greedy generations share one across ``generate`` calls (the output does not depend on
    it); a sampled generation starts from a fresh one so that its seed reproduces it."""

    policy: GammaPolicy
    chooser: ExitLayerChooser | None
    calibrated: CalibratedGamma | None
    recycler: TokenRecyclingDrafter | None
    nodes: NodeCalibration | None = None
    costs: dict[int, VerifyCost] = field(default_factory=dict)
    draft_cost: dict[int, float] = field(default_factory=dict)  # exit layer -> seconds per draft token


@dataclass
class _Run:
    """Per-generation state shared by the steps of one ``run``."""

    sampling: SamplingParams
    gen: torch.Generator | None
    policy: GammaPolicy
    chooser: ExitLayerChooser | None
    calibrated: CalibratedGamma | None
    recycler: TokenRecyclingDrafter | None
    draft_cost: dict[int, float]
    stats: SpecStats
    cost: VerifyCost
    eos_ids: set[int]
    stop: Sequence[str]
    on_token: Callable[[int, int], None] | None
    nodes: NodeCalibration | None = None
    modeled: bool = False  # learn from modeled costs instead of the clock (seeded sampling)
    # early exit: (confidence, acceptance probability) of the first drafts this step computed but
    # did not propose, set by _early_exit_step for _learn (see SpeculativeEngine._shadow_outcomes)
    shadow: tuple[torch.Tensor, torch.Tensor] | None = None


# ---------------------------------------------------------------------------------- the engine
class SpeculativeEngine(Engine):
    """An :class:`Engine` whose generation loop is speculative (``spec.decode.speculative``).

    ``generate`` (inherited: validation, tokenisation) runs :meth:`run`; ``self.plain`` is a plain
    :class:`Engine` on the same compiled graph (the reference for losslessness and benchmarks).
    The Token Recycling adjacency matrix persists across ``generate`` calls, as in the paper.
    """

    def __init__(self, compiled):
        super().__init__(compiled)
        self.sp = compiled.spec.decode.speculative
        self.plan = compiled.program.meta.get("speculative", {})
        self.plain = Engine(compiled)
        graphs = lambda kind: {  # noqa: E731  exit layer -> (graph, input names)
            k: (compiled.program.graphs[name], self.plan["inputs"][name]) for k, name in self.plan.get(kind, {}).items()}
        self.drafts, self.lowers, self.tails = graphs("graphs"), graphs("lower"), graphs("tail")
        self._head_ids: torch.Tensor | None = None  # rows of the LM head gathered for the draft head
        self._head: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.lookup = PromptLookupDrafter(self.sp.ngram_max, self.sp.ngram_min) if self.sp.draft == "prompt_lookup" else None
        self.learned: _Learned | None = None  # shared by greedy generations
        # streaming heads attend by position windows, not along a tree: Token Recycling then
        # verifies its rank-0 chain instead of the tree
        attention = compiled.spec.attention
        self.tree_verify = not (attention and any(e.method == "streaming" for e in attention.sparse))
        self.lookup_tree = self.lookup is not None and self.sp.tree_nodes > 0 and self.tree_verify

    def _fresh_learned(self) -> _Learned:
        sp = self.sp
        recycler = None
        if sp.draft == "token_recycling":
            recycler = TokenRecyclingDrafter(self.info.vocab_size, successors=min(sp.successors, self.info.vocab_size),
                                             tree_width=sp.tree_width, depth=sp.gamma_max, device=self.info.device)
        return _Learned(
            policy=make_gamma_policy(sp.gamma, sp.gamma_max),
            chooser=ExitLayerChooser(list(self.drafts)) if len(self.drafts) > 1 else None,
            calibrated=self._calibrated_gamma(),
            recycler=recycler,
            nodes=NodeCalibration() if self.lookup_tree and sp.gamma == "adaptive" else None,
        )

    def _calibrated_gamma(self) -> CalibratedGamma | None:
        if self.sp.gamma != "adaptive" or self.sp.draft == "early_exit":
            return None
        if self.lookup is not None:
            return CalibratedGamma.for_match_length(self.sp.gamma_max)
        return CalibratedGamma.single(self.sp.gamma_max)

    # ------------------------------------------------------------------ entry points
    def _generate_ids(self, prompts, max_new_tokens, sampling, stop, eos, on_token) -> GenerationResult:
        return self.run(prompts, max_new_tokens, sampling, stop, eos, on_token)[0]

    @deep_stack
    @torch.inference_mode()
    def run(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        sampling: SamplingParams,
        stop: Sequence[str] = (),
        eos: bool = True,
        on_token: Callable[[int, int], None] | None = None,
    ) -> tuple[GenerationResult, KVCache]:
        """Generate from token-id prompts; returns the result and the final KV cache (whose
        committed entries are those of prompt + emitted tokens minus each row's pending token)."""
        dev = self.info.device
        B = len(prompts)
        if sampling.greedy:
            self.learned = self.learned or self._fresh_learned()
            learned = self.learned
        else:
            learned = self._fresh_learned()
        st = _Run(
            sampling=sampling, gen=sampling.generator(dev) if not sampling.greedy else None, policy=learned.policy,
            chooser=learned.chooser, calibrated=learned.calibrated, recycler=learned.recycler, draft_cost=learned.draft_cost,
            stats=SpecStats(self.sp.draft, self.sp.gamma_max), cost=learned.costs.setdefault(B, VerifyCost()),
            eos_ids=set(self.info.eos_token_ids) if eos else set(), stop=stop, on_token=on_token,
            modeled=not sampling.greedy and sampling.seed is not None, nodes=learned.nodes,
        )
        t0 = time.perf_counter()
        cache, rows, logits = self._prefill(prompts, max_new_tokens, st.recycler)
        kv_after_prefill = cache.nbytes_used()
        first = choose(logits[:, -1], sampling, st.gen)
        t_first = time.perf_counter()
        self._commit(rows, first[:, None], torch.ones(B, dtype=torch.long, device=dev), st)
        while not bool(rows.finished.all()):
            self._step(cache, rows, st)
        t_end = time.perf_counter()

        decode_s = t_end - t_first
        after_first = sum(max(0, len(o) - 1) for o in rows.out)
        stats = st.stats
        if st.chooser is not None:
            stats.extra["exit_layer_acceptance"] = st.chooser.acceptance()
        res_stats = {
            "batch": B,
            "ttft_s": round(t_first - t0, 4),
            "prefill_s": round(t_first - t0, 4),
            "decode_s": round(decode_s, 4),
            "new_tokens": sum(len(o) for o in rows.out),
            "decode_tokens_per_s": round(after_first / decode_s, 3) if decode_s > 0 and after_first else None,
            "kv_cache_bytes": cache.nbytes_used(),
            "kv_cache_bytes_after_prefill": kv_after_prefill,
            "accepted_length": round((stats.accepted + stats.row_steps) / max(1, stats.row_steps), 4),
            "speculative": stats.to_dict(),
        }
        texts = [_cut_at_stop(self.decode(o), stop) for o in rows.out]
        return GenerationResult(texts, rows.out, [len(p) for p in prompts], res_stats), cache

    # ------------------------------------------------------------------ phases
    def _prefill(self, prompts: list[list[int]], max_new: int, recycler: TokenRecyclingDrafter | None) -> tuple[KVCache, _Rows, torch.Tensor]:
        """Prefill every prompt (right-padded batch) as the plain engine does (the prefill graph,
        then streaming eviction and trimming); returns the cache, the row state and the logits
        (B, 1, V) at each row's last prompt token."""
        dev = self.info.device
        B = len(prompts)
        lens = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=dev)
        S = int(lens.max())
        extra = self.sp.gamma_max + 1 if recycler is None else recycler.parents.shape[0]
        if self.lookup_tree:
            extra = max(extra, self.sp.tree_nodes + 1)
        ctx = torch.full((B, S + max_new + 1), self.info.pad_token_id, dtype=torch.long, device=dev)
        for b, p in enumerate(prompts):
            ctx[b, : len(p)] = torch.tensor(p, dtype=torch.long)
        cache = self.new_cache(B, S + max_new + extra)
        pos = torch.arange(S, device=dev).expand(B, S)
        logits = self.step(cache, ctx[:, :S], pos, lens, (lens - 1).unsqueeze(1), prefill=True)
        cache.evict(slack=0)
        cache.trim(max_new + extra)
        if recycler is not None:
            recycler.observe(ctx.gather(1, (lens - 1)[:, None]), logits)
        # pending/pos describe the last prompt token until the first token is committed
        rows = _Rows(out=[[] for _ in range(B)], context=ctx, length=lens.clone(), pending=lens.new_zeros(B),
                     pos=lens - 1, finished=torch.zeros(B, dtype=torch.bool, device=dev), max_new=max_new)
        return cache, rows, logits

    def _step(self, cache: KVCache, rows: _Rows, st: _Run) -> None:
        """One draft + verify + commit step for every row."""
        budget = rows.budget()
        active = ~rows.finished
        gamma = max(0, min(st.policy.next_gamma(), int(budget.max())))
        t0 = time.perf_counter()
        layer, keys = None, None
        tree = st.recycler is not None and st.sampling.greedy and self.tree_verify
        depth = self._tree_depth(st, gamma, rows.pos.shape[0]) if tree and gamma > 0 else 0
        looked = None
        if self.lookup_tree and st.sampling.greedy and gamma > 0:
            looked = self._lookup_tree_step(cache, rows, gamma, budget, active, st)
        if looked is not None:
            t1 = looked[4]
            proposed, res_acc, tokens, forward_width = looked[:4]
            width = int(proposed.max())
        elif depth > 0:
            t1 = time.perf_counter()
            proposed, res_acc, tokens, forward_width = self._tree_step(cache, rows, depth, active, st.recycler)
            width, keys = depth, torch.ones_like(proposed)
        else:
            if self.drafts:
                layer = self._pick_exit(st)
                g = gamma if self._early_exit_pays(st, layer) else 0
                proposal, res, t1 = self._early_exit_step(cache, rows, g, budget, st, layer, active)
            else:  # (a tree the policy cut to depth 0, or an empty lookup tree, is a plain step)
                proposal, keys = self._draft_model_free(rows, 0 if tree or self.lookup_tree and st.sampling.greedy else gamma,
                                                        budget, st)
                t1 = time.perf_counter()
                res = self._verify_chain(cache, rows, proposal, st, active)
            proposed = proposal.lengths
            res_acc, tokens = res.accepted, res.tokens
            width = int(proposed.max()) if proposed.numel() else 0
            forward_width = width + 1
        t2 = time.perf_counter()
        st.stats.draft_s += t1 - t0
        st.stats.verify_s += t2 - t1
        draft_s, verify_s = (t1 - t0, t2 - t1) if not st.modeled else self._modeled_costs(layer, width, forward_width)
        self._learn(st, proposed, res_acc, active, layer, keys, width, forward_width, draft_s, verify_s,
                    depth > 0 and looked is None)
        self._commit(rows, tokens, res_acc + 1, st)
        cache.evict()

    def _learn(self, st: _Run, proposed: torch.Tensor, accepted: torch.Tensor, active: torch.Tensor, layer: int | None,
               keys: torch.Tensor | None, width: int, forward_width: int, draft_s: float, verify_s: float, tree: bool) -> None:
        """Feed one verified step to the statistics, the cost model and the adaptive policies
        (keys: the :class:`CalibratedGamma` bucket of each row, None when nothing was drafted;
        draft_s / verify_s: measured seconds, or modeled ones, see :meth:`_modeled_costs`)."""
        st.cost.observe(forward_width, verify_s)
        drafted = max(1, width)
        proposed = torch.where(active, proposed, 0)
        accepted = torch.where(active, accepted, 0)
        st.policy.update(proposed, accepted)
        base, per_token = st.cost.line()
        if layer is not None:
            # early exit: forward_width draft-graph passes, then the tail verifies forward_width tokens
            pass_s = draft_s / forward_width
            old = st.draft_cost.get(layer)
            st.draft_cost[layer] = pass_s if old is None else 0.8 * old + 0.2 * pass_s
            shadow, st.shadow = st.shadow, None
            if isinstance(st.policy, AdaptiveGamma):  # one more draft: a pass + a tail token; none: a pass + the tail
                st.policy.observe_cost(st.draft_cost[layer] + per_token, st.draft_cost[layer] + base + per_token)
                if shadow is not None:
                    st.policy.observe_shadow(*shadow)
            if st.chooser is not None:
                st.chooser.update(layer, proposed, accepted, pass_s, verify_s, None if shadow is None else shadow[1])
                st.stats.exit_trace.append(layer)
        elif isinstance(st.policy, AdaptiveGamma):
            nodes = self.sp.tree_width if tree else 1
            st.policy.observe_cost(draft_s / drafted + per_token * nodes, base + per_token)
        if st.calibrated is not None and keys is not None:
            real = active & (keys > 0) & (proposed > 0)
            st.calibrated.update(keys[real], proposed[real], accepted[real])
        st.stats.record(proposed, accepted, active, width)

    # A verification forward of w tokens costs about 1 + VERIFY_SLOPE (w - 1) decode steps with the
    # native CPU linear kernel (measured: 9 tokens ~ 1.5 steps); the model stands in for the clock
    # when a seed must reproduce a sampled generation.
    VERIFY_SLOPE = 0.06

    def _modeled_costs(self, layer: int | None, width: int, forward_width: int) -> tuple[float, float]:
        """(draft, verification) cost of one step in decode-step units, without a clock.

        Sampled generation with a seed must give the same tokens every time, but the adaptive
        policies (gamma, exit layer) choose from the costs they observe, and measured seconds differ
        from run to run.  Seeded sampling therefore learns from this deterministic model instead:
        a forward of w tokens costs ``1 + VERIFY_SLOPE (w - 1)`` times the share of the weights it
        reads; an early-exit step makes ``forward_width`` passes of the draft graph (the first
        ``layer`` layers, plus the draft head for all but the last) and verifies with the rest of
        the model (:meth:`_exit_shares`); model-free drafts cost nothing.
        """
        verify = 1.0 + self.VERIFY_SLOPE * max(0, forward_width - 1)
        if layer is None:
            return 0.0, verify
        lower, head = self._exit_shares(layer)
        return forward_width * lower + width * head, verify * (1.0 - lower)

    def _exit_shares(self, layer: int) -> tuple[float, float]:
        """(weights of the first ``layer`` layers, weights of the draft head) / weights of a full step."""
        if not hasattr(self, "_shares"):
            model = self.cm.model
            decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
            per_layer = [sum(p.numel() for p in blk.parameters()) for blk in decoder.layers]
            head = model.get_output_embeddings().weight.numel()
            total = sum(per_layer) + head
            rows = self.plan.get("draft_vocab") or self.info.vocab_size
            self._shares = {k: (sum(per_layer[:k]) / total, head * min(1.0, rows / self.info.vocab_size) / total)
                            for k in range(len(per_layer) + 1)}
        return self._shares[layer]

    # ------------------------------------------------------------------ drafting
    def _keep_mask(self, policy: GammaPolicy, step: int, probs: torch.Tensor | None, batch: int) -> torch.Tensor:
        return policy.keep_drafting_batch(step, probs, batch).to(self.info.device)

    def _draft_model_free(self, rows: _Rows, gamma: int, budget: torch.Tensor, st: _Run) -> tuple[Proposal, torch.Tensor | None]:
        """Prompt lookup, or Token Recycling's rank-0 chain (T > 0), cut per row by the gamma policy.

        Returns the proposal and each row's :class:`CalibratedGamma` bucket (B,): for prompt lookup
        the suffix match length (0: no match), for Token Recycling 1."""
        B = rows.pos.shape[0]
        if gamma == 0:
            return Proposal(rows.pos.new_zeros(B, 0), rows.pos.new_zeros(B)), None
        if self.lookup is None:
            prop = st.recycler.propose(rows.context, rows.length, gamma)
            keys = torch.ones_like(rows.length)
        else:
            start = self.lookup.continuation_start(rows.context, rows.length)
            prop = self.lookup.propose(rows.context, rows.length, gamma, start=start)
            # the match behind the proposal, extended backwards (the drafter's own search)
            keys = suffix_match_length(rows.context, rows.length, start)
        limit = torch.minimum(prop.lengths, budget)
        if st.calibrated is not None:
            base, per_token = st.cost.line()
            return Proposal(prop.tokens, torch.minimum(limit, st.calibrated.choose(keys, base, per_token))), keys
        lens = torch.zeros_like(limit)
        alive = torch.ones(B, dtype=torch.bool, device=limit.device)
        for step in range(1, gamma + 1):
            lens += (alive & (step <= limit)).long()
            alive &= self._keep_mask(st.policy, step, None, B)
            if not bool((alive & (step < limit)).any()):
                break
        return Proposal(prop.tokens, lens, None), keys

    EXPLORE_EVERY = 16

    def _early_exit_pays(self, st: _Run, layer: int) -> bool:
        """With ``gamma: adaptive``: whether to run the draft head at all this step.

        A draft costs one more pass of the first ``layer`` layers, which the step makes anyway for
        the token it verifies, so trying costs only the draft head; :meth:`AdaptiveGamma.include_batch`
        then keeps a draft only when its confidence predicts that it pays.  The head is skipped
        when not even the most reliable confidence bin is accepted often enough to pay for a draft
        (acceptance <= the policy's cost ratio, from the measured pass and verification costs);
        gating on the *mean* acceptance instead would also drop the confident drafts that do pay.
        Every ``EXPLORE_EVERY``-th step drafts anyway so that the estimates keep up; the other
        policies always draft."""
        if not isinstance(st.policy, AdaptiveGamma) or layer not in st.draft_cost or st.stats.steps % self.EXPLORE_EVERY == 0:
            return True
        best = float((st.policy.successes / st.policy.trials).max())
        return best > st.policy.cost_ratio

    def _pick_exit(self, st: _Run) -> int:
        if st.chooser is None:
            return next(iter(self.drafts))
        return st.chooser.choose(st.policy.next_gamma())

    def _draft_head(self, rows: _Rows) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(weight, bias, token ids of its rows or None = the whole vocabulary) of the draft head.

        With ``draft_vocab: K`` the head scores the K lowest token ids (a BPE vocabulary lists
        merges by frequency) plus every token of the rows' contexts (prompt and output so far);
        a target token outside that set is simply never drafted, which costs acceptance, not
        correctness.  The rows are gathered once per step from the packed LM head."""
        weight = getattr(self.cm.program.gm, self.plan["head_weight"])
        bias = getattr(self.cm.program.gm, self.plan["head_bias"]) if self.plan.get("head_bias") else None
        k = self.plan.get("draft_vocab")
        if not k or k >= weight.shape[0]:
            return weight, bias, None
        seen = rows.context[torch.arange(rows.context.shape[1], device=rows.length.device)[None, :] < rows.length[:, None]]
        extra = torch.unique(seen[seen >= k])
        ids = torch.cat([torch.arange(k, device=weight.device), extra.to(weight.device)])
        if self._head_ids is None or not torch.equal(self._head_ids, ids):
            self._head_ids = ids
            self._head = (torch.cat([weight[:k], weight[extra]]), None if bias is None else bias[ids])
        return self._head[0], self._head[1], ids

    @staticmethod
    def _call(entry: tuple[Any, list[str]], feeds: dict[str, torch.Tensor], **given: Any) -> Any:
        """Run a cut graph (graph, input names) with the given inputs and cache feeds it takes."""
        graph, names = entry
        return graph(**{n: given[n] if n in given else feeds[n] for n in names if n in given or n in feeds})

    def _early_exit_step(self, cache: KVCache, rows: _Rows, gamma: int, budget: torch.Tensor, st: _Run, layer: int,
                         active: torch.Tensor) -> tuple[Proposal, VerifyResult, float]:
        """Draft up to gamma tokens per row from the first ``layer`` layers, verify them with the
        rest of the model, reusing the drafted layers (LayerSkip's self-speculation).

        Pass j runs the draft graph on [pending, d_1, ...][j]: it writes that token's cache entries
        of the layers below the exit (exactly what the full model would write), returns the
        residual stream at the exit and, through the draft head, d_{j+1}.  A row keeps d_{j+1} when
        the gamma policy includes it (for ``adaptive``, after seeing its confidence); the next pass
        runs only if some row kept its draft (the last pass skips the head: ``lower`` graph).  The
        tail graph then runs the layers from the exit on over all passes' residual streams in one
        forward and gives the target logits at every drafted position: verification as usual, and
        rollback resets every layer's lengths.  Returns (proposal, verification, end of drafting).
        """
        sampling, policy = st.sampling, st.policy
        B = rows.pos.shape[0]
        dev = rows.pos.device
        weight, bias, ids = self._draft_head(rows)
        head = {"draft_head_weight": weight} if bias is None else {"draft_head_weight": weight, "draft_head_bias": bias}
        snap = cache.snapshot()
        tokens = torch.zeros(B, max(gamma, 0), dtype=torch.long, device=dev)
        lens = torch.zeros(B, dtype=torch.long, device=dev)
        probs: list[torch.Tensor] = []
        hidden: list[torch.Tensor] = []
        alive = budget > 0
        cur = rows.pending
        ones = torch.ones(B, dtype=torch.long, device=dev)
        zero_idx = torch.zeros(B, 1, dtype=torch.long, device=dev)
        adaptive = isinstance(policy, AdaptiveGamma)
        first_conf = None
        j = 0
        while True:
            drafting = j < gamma and bool(alive.any())
            cache.ensure(1)
            feeds = cache.inputs()
            common = dict(input_ids=cur[:, None], position_ids=(rows.pos + j)[:, None], q_len=ones, tree_mask=None,
                          logits_index=zero_idx)
            if not drafting:
                hidden.append(self._call(self.lowers[layer], feeds, **common))
                break
            logits, h = self._call(self.drafts[layer], feeds, **common, **head)
            hidden.append(h)
            logits = logits[:, 0]
            if sampling.greedy:
                pick = logits.argmax(-1)
                conf = logits.float().softmax(-1) if adaptive else None
            else:
                q = probs_from_logits(logits, sampling)
                pick = sample(q, st.gen)
                conf = q
                probs.append(q if ids is None else q.new_zeros(B, self.info.vocab_size).index_copy_(1, ids, q))
            cur = pick if ids is None else ids[pick]
            tokens[:, j] = cur
            if j == 0:
                first_conf = conf.float().amax(-1).cpu() if conf is not None else torch.ones(B)
            keep = policy.include_batch(j + 1, conf, B).to(dev) if adaptive else torch.ones_like(alive)
            alive = alive & keep & (lens < budget)
            lens += alive.long()
            j += 1
            if not bool(alive.any()):
                break
        t_draft = time.perf_counter()
        width = len(hidden)
        drafts = tokens[:, : width - 1]
        ids_in = torch.cat([rows.pending[:, None], drafts], dim=1)
        pos = rows.pos[:, None] + torch.arange(width, device=dev)
        cache.ensure(width, layers=list(range(layer, self.info.n_layers)))
        logits = self._call(self.tails[layer], cache.inputs(), exit_hidden=torch.cat(hidden, dim=1), input_ids=ids_in,
                            position_ids=pos, q_len=torch.full((B,), width, dtype=torch.long, device=dev), tree_mask=None,
                            logits_index=torch.arange(width, device=dev).expand(B, width))
        q_all = torch.stack(probs, dim=1)[:, : width - 1] if probs else None
        res = self._verify_logits(drafts, q_all, logits, lens, st)
        cache.restore(snap, torch.where(active, res.accepted + 1, 0))
        left_out = active & (lens == 0) & (budget > 0)
        if first_conf is not None and bool(left_out.any()):  # (_learn consumes and clears st.shadow every step)
            st.shadow = self._shadow_outcomes(tokens[:, 0], probs[0] if probs else None, logits[:, 0], st.sampling, first_conf,
                                              left_out)
        return Proposal(drafts, lens, None), res, t_draft

    @staticmethod
    def _shadow_outcomes(first: torch.Tensor, q: torch.Tensor | None, target_logits: torch.Tensor, sampling: SamplingParams,
                         confidence: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(confidence, acceptance probability) of the first drafts that rows left out.

        A row whose gamma policy declined its first draft d still verifies the pending token, and
        the tail's logits at that position are the target distribution p that d would have been
        verified against: d would have been accepted with probability 1[d = argmax p] at T = 0 and
        min(1, p(d) / q(d)) at T > 0.  Feeding these outcomes to the confidence bins and the exit
        layer chooser keeps them learning while the policy drafts nothing, at no extra forward (the
        decisions only shape later proposals, which verification keeps lossless)."""
        if sampling.greedy:
            accept = (target_logits.argmax(-1) == first).double()
        else:
            p = probs_from_logits(target_logits, sampling)
            pick = first[:, None]
            accept = (p.gather(1, pick) / q.gather(1, pick).clamp_min(1e-30)).clamp(max=1.0)[:, 0].double()
        keep = rows.cpu()
        return confidence[keep], accept.cpu()[keep]

    def _tree_depth(self, st: _Run, gamma: int, batch: int) -> int:
        """Tree depth for this step, at most gamma and the drafter's depth: with ``gamma:
        adaptive`` the :class:`CalibratedGamma` choice for one tree level of ``tree_width`` nodes
        (0 = decode plainly); otherwise the deepest level any row's policy still wants."""
        assert st.recycler is not None
        limit = min(gamma, st.recycler.depth)
        if st.calibrated is not None:
            base, per_token = st.cost.line()
            width = min(self.sp.tree_width, st.recycler.successors)
            best = st.calibrated.choose(torch.ones(1, dtype=torch.long), base, per_token, per_token * (width - 1))
            return min(limit, int(best[0]))
        depth = 0
        alive = torch.ones(batch, dtype=torch.bool)
        for step in range(1, limit + 1):
            depth = step
            alive &= st.policy.keep_drafting_batch(step, None, batch).cpu()
            if not bool(alive.any()):
                break
        return depth

    # ------------------------------------------------------------------ verification
    def _forward(self, cache: KVCache, ids: torch.Tensor, pos: torch.Tensor, tree_mask: torch.Tensor | None = None) -> torch.Tensor:
        """All-position logits (B, W, V) of W new tokens per row (cache lengths advance by W)."""
        B, W = ids.shape
        index = torch.arange(W, device=ids.device).expand(B, W)
        q_len = torch.full((B,), W, dtype=torch.long, device=ids.device)
        return self.step(cache, ids, pos, q_len, index, tree_mask=tree_mask)

    def _verify_logits(self, drafts: torch.Tensor, q: torch.Tensor | None, logits: torch.Tensor, lengths: torch.Tensor,
                       st: _Run) -> VerifyResult:
        """Verify a chain of drafts (B, W) against the target logits (B, W + 1, V): greedy matching
        at T = 0, else token-wise or block verification with the drafts' distributions q."""
        if st.sampling.greedy:
            return verify_greedy(drafts, logits.argmax(-1), lengths)
        verify = verify_block if self.sp.verify == "block" else verify_tokenwise
        return verify(drafts, q, probs_from_logits(logits, st.sampling), st.gen, lengths)

    def _verify_chain(self, cache: KVCache, rows: _Rows, proposal: Proposal, st: _Run, active: torch.Tensor) -> VerifyResult:
        """Verify [pending, drafts] in one forward and roll the cache back to the kept entries."""
        width = int(proposal.lengths.max()) if proposal.lengths.numel() else 0
        drafts = proposal.tokens[:, :width]
        ids = torch.cat([rows.pending[:, None], drafts], dim=1)
        pos = rows.pos[:, None] + torch.arange(width + 1, device=ids.device)
        snap = cache.snapshot()
        logits = self._forward(cache, ids, pos)
        q = proposal.probs[:, :width] if proposal.probs is not None else None
        res = self._verify_logits(drafts, q, logits, proposal.lengths, st)
        cache.restore(snap, torch.where(active, res.accepted + 1, 0))
        if st.recycler is not None:
            real = torch.arange(width + 1, device=ids.device)[None, :] <= proposal.lengths[:, None]
            st.recycler.observe(ids, logits, real)
        return res

    def _tree_step(self, cache: KVCache, rows: _Rows, depth: int, active: torch.Tensor, recycler: TokenRecyclingDrafter):
        """Token Recycling at T = 0: verify the candidate tree in one forward, keep the accepted
        path.  Returns (proposed (B,), accepted (B,), tokens (B, depth + 1), forward width)."""
        tree = recycler.propose_tree(rows.pending, depth)
        res, logits = self._verify_tree(cache, rows, tree, active)
        recycler.observe(tree.tokens, logits)
        proposed = torch.full((rows.pos.shape[0],), depth, dtype=torch.long, device=rows.pos.device)
        return proposed, res.accepted, res.tokens, tree.size

    def _verify_tree(self, cache: KVCache, rows: _Rows, tree: DraftTree, active: torch.Tensor):
        """Verify a draft tree (shared or per-row shape) rooted at each row's pending token in one
        forward with its tree mask at T = 0; move the accepted path's cache entries into place and
        roll back the rest.  Returns (the :class:`TreeVerifyResult`, the logits (B, S, V))."""
        dev = rows.pos.device
        mask = tree.tree_mask().to(dev)
        mask = mask.expand(rows.pos.shape[0], -1, -1) if mask.dim() == 2 else mask
        pos = rows.pos[:, None] + tree.depth.to(dev)  # (S,) or (B, S) offsets
        snap = cache.snapshot()
        logits = self._forward(cache, tree.tokens, pos, tree_mask=mask)
        res = verify_tree_greedy(tree, logits.argmax(-1))
        compact_path(cache, snap.lens, res.path)
        cache.restore(snap, torch.where(active, res.accepted + 1, 0))
        return res, logits

    def _lookup_tree_step(self, cache: KVCache, rows: _Rows, gamma: int, budget: torch.Tensor, active: torch.Tensor,
                          st: _Run):
        """Prompt lookup at T = 0 with ``tree_nodes``: verify a tree of candidate continuations
        (:meth:`PromptLookupDrafter.tree_candidates`, cut by :class:`NodeCalibration` with ``gamma:
        adaptive``, else the ``tree_nodes`` heaviest nodes up to depth gamma) in one forward and
        keep the longest accepted path.  Returns (proposed (B,) tree depth per row, accepted (B,),
        tokens (B, W), forward width, time the drafting ended), or None when no row has a
        candidate (the caller then decodes plainly)."""
        depth = torch.where(active, budget.clamp(max=gamma), 0)
        cands = self.lookup.tree_candidates(rows.context, rows.length, depth)
        limit = self.sp.tree_nodes
        picks, keys = [], []
        base, per_token = st.cost.line()
        for cand in cands:
            if st.nodes is not None:
                picked, k = st.nodes.choose(cand, base, per_token, limit)
            else:
                picked, k = sorted(sorted(range(len(cand)), key=lambda i: -cand.weight[i])[:limit]), []
            picks.append(picked)
            keys.append(k)
        if not any(picks):
            return None
        tree = DraftTree.from_rows(rows.pending, [_subtree(c, p) for c, p in zip(cands, picks)])
        t_draft = time.perf_counter()
        res, _ = self._verify_tree(cache, rows, tree, active)
        if st.nodes is not None:
            for b, k in enumerate(keys):
                on_path = set(res.path[b].tolist())
                st.nodes.update(k, [j + 1 in on_path for j in range(len(k))])
        proposed = torch.tensor([max((cands[b].depth[i] for i in p), default=0) for b, p in enumerate(picks)],
                                device=rows.pos.device)
        return proposed, res.accepted, res.tokens, tree.size, t_draft

    # ------------------------------------------------------------------ emission
    def _commit(self, rows: _Rows, tokens: torch.Tensor, counts: torch.Tensor, st: _Run) -> None:
        """Emit ``tokens[b, :counts[b]]`` for every unfinished row with the plain loop's checks
        (EOS, stop strings, max_new_tokens, in token order); advance pending and position.

        tokens: (B, W) int64 (-1 padded); counts: (B,) int64 tokens each row would emit.
        """
        B, W = tokens.shape
        dev = tokens.device
        eos_ids, stop, on_token = st.eos_ids, st.stop, st.on_token
        j = torch.arange(W, device=dev)
        left = torch.tensor([rows.max_new - len(o) for o in rows.out], device=dev)
        n = torch.where(rows.finished, 0, torch.minimum(counts, left))
        done = (n >= left) & ~rows.finished
        if eos_ids:
            is_eos = torch.isin(tokens, torch.tensor(sorted(eos_ids), device=dev)) & (j[None, :] < n[:, None])
            first = torch.where(is_eos, j[None, :], W).amin(dim=1)
            done |= first < W
            n = torch.minimum(n, first + 1)
        toks, ns = tokens.tolist(), n.tolist()
        for b, out in enumerate(rows.out):
            if ns[b] and stop:
                ns[b], hit = self._until_stop(out, toks[b][: ns[b]], stop)
                done[b] |= hit
            else:
                out.extend(toks[b][: ns[b]])
            if on_token is not None:
                for t in toks[b][: ns[b]]:
                    on_token(b, t)
        n = torch.tensor(ns, device=dev)
        index = (rows.length[:, None] + j[None, :]).clamp(max=rows.context.shape[1] - 1)
        kept = rows.context.gather(1, index)
        rows.context.scatter_(1, index, torch.where(j[None, :] < n[:, None], tokens.clamp(min=0), kept))
        rows.length += n
        rows.pos += n
        last = tokens.gather(1, (n - 1).clamp(min=0)[:, None]).squeeze(1)
        rows.pending = torch.where(n > 0, last, rows.pending)
        rows.finished |= done

    def _until_stop(self, out: list[int], new: list[int], stop: Sequence[str]) -> tuple[int, bool]:
        """Append ``new`` to ``out`` one token at a time until a stop string appears in the decoded
        tail (as the plain loop checks); returns (tokens appended, whether a stop string hit)."""
        for k, t in enumerate(new, start=1):
            out.append(t)
            if _hits_stop(self.decode(out[-16:]), stop):
                return k, True
        return len(new), False
