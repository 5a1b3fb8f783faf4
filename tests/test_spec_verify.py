"""Speculative verification: greedy equivalence at T=0, losslessness at T>0 (chi-square against the
target, with a negative control), block >= token-wise acceptance, per-row draft lengths, trees.

The toy "models" are tables: one random next-token distribution per prefix (up to gamma tokens), for
the target (p) and the drafter (q).  Exact references enumerate every draft block.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from accelc.runtime.sampling import SamplingParams, probs_from_logits
from accelc.runtime.speculative.drafts import DraftTree
from accelc.runtime.speculative.verify import (
    VerifyResult,
    verify_block,
    verify_greedy,
    verify_tokenwise,
    verify_tree_greedy,
)

VERIFIERS = {"tokenwise": verify_tokenwise, "block": verify_block}
SAMPLES = 20_000
ALPHA = 1e-3  # significance level of every chi-square test (and of the negative controls)


class TableModel:
    """A next-token distribution per prefix of length 0..max_len over a vocabulary of V tokens."""

    def __init__(self, vocab: int, max_len: int, seed: int, sharpness: float = 1.5):
        gen = torch.Generator().manual_seed(seed)
        self.vocab = vocab
        self.offsets = [sum(vocab**k for k in range(length)) for length in range(max_len + 2)]
        weights = (-torch.rand(self.offsets[-1], vocab, generator=gen, dtype=torch.float64).log()) ** sharpness
        self.table = weights / weights.sum(-1, keepdim=True)

    @classmethod
    def perturbed(cls, base: "TableModel", seed: int, noise: float = 0.5) -> "TableModel":
        """A drafter close to `base`: (1 - noise) * base + noise * a random table."""
        model = cls(base.vocab, len(base.offsets) - 2, seed)
        model.table = (1 - noise) * base.table + noise * model.table
        return model

    @classmethod
    def constant(cls, dist: list[float], max_len: int) -> "TableModel":
        model = cls(len(dist), max_len, seed=0)
        model.table[:] = torch.tensor(dist, dtype=torch.float64)
        return model

    def probs(self, prefix: torch.Tensor) -> torch.Tensor:
        """prefix (B, L) int64 -> (B, V) float64."""
        length = prefix.shape[1]
        powers = self.vocab ** torch.arange(length - 1, -1, -1)
        ids = self.offsets[length] + (prefix.long() * powers).sum(1)
        return self.table[ids]

    def seq_prob(self, seq: tuple[int, ...]) -> float:
        return math.prod(float(self.probs(torch.tensor([seq[:k]]))[0, seq[k]]) for k in range(len(seq)))


def draft_block(draft: TableModel, batch: int, gamma: int, gen: torch.Generator, greedy: bool = False):
    """Sample (or argmax) gamma drafts per row: tokens (B, gamma), q (B, gamma, V) float64."""
    tokens = torch.zeros(batch, 0, dtype=torch.long)
    dists = []
    for _ in range(gamma):
        q = draft.probs(tokens)
        nxt = q.argmax(-1) if greedy else torch.multinomial(q, 1, generator=gen).squeeze(1)
        dists.append(q)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
    probs = torch.stack(dists, 1) if dists else torch.zeros(batch, 0, draft.vocab, dtype=torch.float64)
    return tokens, probs


def target_block(target: TableModel, tokens: torch.Tensor) -> torch.Tensor:
    """(B, gamma) drafts -> (B, gamma + 1, V) target distributions after each draft prefix."""
    return torch.stack([target.probs(tokens[:, :k]) for k in range(tokens.shape[1] + 1)], 1).float()


def emitted_prefix(result: VerifyResult, target: TableModel, length: int, gen: torch.Generator) -> torch.Tensor:
    """The first `length` tokens of each row's output (continued by sampling the target when a row
    emitted fewer), as cell ids in [0, V**length)."""
    emitted = result.accepted + 1
    seq = torch.zeros(result.tokens.shape[0], length, dtype=torch.long)
    for k in range(length):
        from_target = torch.multinomial(target.probs(seq[:, :k]), 1, generator=gen).squeeze(1)
        own = result.tokens[:, k] if k < result.tokens.shape[1] else from_target
        seq[:, k] = torch.where(emitted > k, own, from_target)
    return (seq * target.vocab ** torch.arange(length - 1, -1, -1)).sum(1)


def chi_square_pvalue(cells: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness of fit of observed cell ids against cell probabilities; cells expected < 5 times
    are pooled into one."""
    n = cells.numel()
    observed = torch.bincount(cells, minlength=probs.numel()).double()
    expected = probs.double() * n
    small = expected < 5
    if small.any():
        observed = torch.cat([observed[~small], observed[small].sum()[None]])
        expected = torch.cat([expected[~small], expected[small].sum()[None]])
    stat = ((observed - expected) ** 2 / expected.clamp_min(1e-12)).sum()
    dof = observed.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


def target_cell_probs(target: TableModel, length: int) -> torch.Tensor:
    return torch.tensor([target.seq_prob(s) for s in itertools.product(range(target.vocab), repeat=length)])


def run_verifier(verifier, target: TableModel, draft: TableModel, gamma: int, deterministic: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    tokens, q = draft_block(draft, SAMPLES, gamma, gen, greedy=deterministic)
    result = verifier(tokens, None if deterministic else q.float(), target_block(target, tokens), gen)
    return result, gen


def brute_force_greedy(draft: list[int], argmax: list[int], length: int) -> tuple[int, list[int]]:
    kept = 0
    while kept < length and draft[kept] == argmax[kept]:
        kept += 1
    return kept, draft[:kept] + [argmax[kept]] + [-1] * (len(draft) - kept)


def exact_reference(target: TableModel, draft: TableModel, gamma: int, block: bool):
    """Enumerate every draft block; returns (E[accepted], {emitted tuple: probability}), written
    directly from Leviathan et al. 2023 (token-wise) and Sun et al. 2024 Algorithm 2 (block)."""
    vocab, expected, out = target.vocab, 0.0, {}
    for xs in itertools.product(range(vocab), repeat=gamma):
        p = [target.probs(torch.tensor([xs[:i]]))[0] for i in range(gamma + 1)]
        q = [draft.probs(torch.tensor([xs[:i]]))[0] for i in range(gamma)]
        p_draft = math.prod(float(q[i][xs[i]]) for i in range(gamma))
        for tau, prob, extra in _stops(p, q, xs, block):
            expected += p_draft * prob * tau
            for x in range(vocab):
                key = xs[:tau] + (x,)
                out[key] = out.get(key, 0.0) + p_draft * prob * float(extra[x])
    return expected, out


def _stops(p, q, xs, block):
    """(tau, P(tau | drafts), extra-token distribution) for one draft block."""
    gamma = len(xs)

    def residual(i, w):
        r = (w * p[i] - q[i]).clamp_min(0)
        return r / r.sum() if r.sum() > 0 else p[i]

    if not block:
        reach = 1.0
        for i in range(gamma):
            a = min(1.0, float(p[i][xs[i]] / q[i][xs[i]]))
            yield i, reach * (1 - a), residual(i, 1.0)
            reach *= a
        yield gamma, reach, p[gamma]
        return
    w = [1.0]
    for i in range(gamma):
        w.append(min(1.0, w[-1] * float(p[i][xs[i]] / q[i][xs[i]])))
    h = [1.0]
    for i in range(1, gamma):
        rho = float((w[i] * p[i] - q[i]).clamp_min(0).sum())
        h.append(rho / (rho + 1 - w[i]) if rho + 1 - w[i] > 0 else 1.0)
    h.append(w[gamma])
    later_rejected = 1.0
    for tau in range(gamma, -1, -1):
        yield tau, h[tau] * later_rejected, (p[gamma] if tau == gamma else residual(tau, w[tau]))
        later_rejected *= 1 - h[tau]


# --------------------------------------------------------------------------- temperature 0


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 4),
    gamma=st.integers(0, 5),
    vocab=st.integers(2, 6),
    seed=st.integers(0, 2**31 - 1),
    deterministic=st.booleans(),
)
def test_greedy_all_verifiers_equal_brute_force(batch, gamma, vocab, seed, deterministic):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, gamma + 1, vocab, generator=gen)
    argmax = logits.argmax(-1)
    random_tokens = torch.randint(0, vocab, (batch, gamma), generator=gen)
    use_argmax = torch.rand(batch, gamma, generator=gen) < 0.7
    drafts = torch.where(use_argmax, argmax[:, :gamma], random_tokens)
    draft_len = torch.randint(0, gamma + 1, (batch,), generator=gen)
    draft_probs = None if deterministic else torch.rand(batch, gamma, vocab, generator=gen).softmax(-1)
    target = probs_from_logits(logits, SamplingParams(temperature=0.0))
    results = [
        verify_greedy(drafts, argmax, draft_len),
        verify_tokenwise(drafts, draft_probs, target, gen, draft_len),
        verify_block(drafts, draft_probs, target, gen, draft_len),
    ]
    for b in range(batch):
        kept, tokens = brute_force_greedy(drafts[b].tolist(), argmax[b].tolist(), int(draft_len[b]))
        for result in results:
            assert int(result.accepted[b]) == kept
            assert result.tokens[b].tolist() == tokens


def test_perfect_match():
    argmax = torch.tensor([[3, 1, 4, 1, 5]])
    result = verify_greedy(argmax[:, :4], argmax)
    assert result.accepted.tolist() == [4]
    assert result.tokens.tolist() == [[3, 1, 4, 1, 5]]


def test_early_mismatch():
    argmax = torch.tensor([[3, 1, 4, 1, 5]])
    drafts = torch.tensor([[2, 1, 4, 1]])
    target = torch.nn.functional.one_hot(argmax, 6).float()
    for result in (
        verify_greedy(drafts, argmax),
        verify_tokenwise(drafts, None, target),
        verify_block(drafts, None, target),
    ):
        assert result.accepted.tolist() == [0]
        assert result.tokens.tolist() == [[3, -1, -1, -1, -1]]


def test_late_mismatch_keeps_prefix():
    argmax = torch.tensor([[3, 1, 4, 1, 5]])
    result = verify_greedy(torch.tensor([[3, 1, 0, 1]]), argmax)
    assert result.accepted.tolist() == [2]
    assert result.tokens.tolist() == [[3, 1, 4, -1, -1]]


# --------------------------------------------------------------------------- per-row draft lengths


@pytest.mark.parametrize("name", VERIFIERS)
def test_draft_len_respected(name):
    """q = p: every real draft is accepted, so each row keeps exactly draft_len_b tokens and its
    extra token comes from the target after them."""
    gen = torch.Generator().manual_seed(0)
    batch, gamma, vocab = 512, 4, 5
    model = TableModel(vocab, gamma, seed=1)
    tokens, q = draft_block(model, batch, gamma, gen)
    draft_len = torch.arange(batch) % (gamma + 1)
    target = target_block(model, tokens)
    result = VERIFIERS[name](tokens, q.float(), target, gen, draft_len)
    assert torch.equal(result.accepted, draft_len)
    positions = torch.arange(gamma + 1)[None, :]
    kept = positions < draft_len[:, None]
    assert torch.equal(result.tokens[:, :gamma][kept[:, :gamma]], tokens[kept[:, :gamma]])
    assert bool((result.tokens[positions > draft_len[:, None]] == -1).all())


@pytest.mark.parametrize("name", VERIFIERS)
def test_zero_draft_len_samples_first_target(name):
    gen = torch.Generator().manual_seed(2)
    target = TableModel(4, 2, seed=3)
    tokens, q = draft_block(TableModel(4, 2, seed=4), SAMPLES, 2, gen)
    no_drafts = torch.zeros(SAMPLES, dtype=torch.long)
    result = VERIFIERS[name](tokens, q.float(), target_block(target, tokens), gen, no_drafts)
    assert bool((result.accepted == 0).all())
    assert chi_square_pvalue(result.tokens[:, 0], target.probs(torch.zeros(1, 0, dtype=torch.long))[0]) > ALPHA


@pytest.mark.parametrize("name", VERIFIERS)
def test_deterministic_when_seeded(name):
    model, draft = TableModel(5, 3, seed=5), TableModel(5, 3, seed=6)
    first, _ = run_verifier(VERIFIERS[name], model, draft, 3, False, seed=11)
    again, _ = run_verifier(VERIFIERS[name], model, draft, 3, False, seed=11)
    other, _ = run_verifier(VERIFIERS[name], model, draft, 3, False, seed=12)
    assert torch.equal(first.tokens, again.tokens)
    assert not torch.equal(first.tokens, other.tokens)


def test_rejects_bad_shapes():
    tokens = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="target_probs"):
        verify_tokenwise(tokens, None, torch.rand(2, 3, 5))
    with pytest.raises(ValueError, match="draft_probs"):
        verify_block(tokens, torch.rand(2, 3, 4), torch.rand(2, 4, 5))
    with pytest.raises(ValueError, match="draft_len"):
        verify_greedy(tokens, torch.zeros(2, 4, dtype=torch.long), torch.tensor([1, 4]))


# --------------------------------------------------------------------------- T > 0: lossless


def _models(vocab: int, gamma: int, seed: int, deterministic: bool) -> tuple[TableModel, TableModel]:
    """A target and a drafter: an unrelated table when the drafter samples (many rejections, so the
    residuals matter), a perturbed target when it drafts its argmax (so that it is accepted)."""
    target = TableModel(vocab, gamma, seed)
    return target, TableModel.perturbed(target, seed + 1, noise=0.5 if deterministic else 1.0)


@pytest.mark.parametrize("deterministic", [False, True], ids=["draft_probs", "deterministic_draft"])
@pytest.mark.parametrize("name", VERIFIERS)
def test_approximates_target_distribution(name, deterministic):
    """The first emitted token and the first two emitted tokens follow the target (V=5, gamma=3),
    and so does the whole length-(gamma+1) output for V=4, gamma=2."""
    target, draft = _models(5, 3, 21, deterministic)
    result, gen = run_verifier(VERIFIERS[name], target, draft, 3, deterministic, seed=23)
    assert result.accepted.float().mean() > 0.5  # drafts are accepted often enough to matter
    for length in (1, 2):
        cells = emitted_prefix(result, target, length, gen)
        assert chi_square_pvalue(cells, target_cell_probs(target, length)) > ALPHA
    target, draft = _models(4, 2, 31, deterministic)
    result, gen = run_verifier(VERIFIERS[name], target, draft, 2, deterministic, seed=33)
    cells = emitted_prefix(result, target, 3, gen)
    assert chi_square_pvalue(cells, target_cell_probs(target, 3)) > ALPHA


def _accept_always(draft_tokens, draft_probs, target_probs, generator=None, draft_len=None):
    batch, gamma = draft_tokens.shape
    bonus = torch.multinomial(target_probs[:, gamma].float(), 1, generator=generator)
    return VerifyResult(torch.full((batch,), gamma), torch.cat([draft_tokens, bonus], 1))


def test_negative_control_detects_wrong_verifier():
    """The chi-square test has power: a verifier that accepts every draft fails it."""
    target, draft = _models(5, 3, 21, False)
    result, gen = run_verifier(_accept_always, target, draft, 3, False, seed=23)
    pvalues = [chi_square_pvalue(emitted_prefix(result, target, n, gen), target_cell_probs(target, n)) for n in (1, 2)]
    assert min(pvalues) < ALPHA


def _block_with_tokenwise_residual(draft_tokens, draft_probs, target_probs, generator=None, draft_len=None):
    """Block acceptance but the plain residual max(0, p - q): a plausible implementation slip."""
    import accelc.runtime.speculative.verify as verify

    original = verify._sample_extra

    def unweighted(*args):
        return original(*args[:5], None, args[6])

    verify._sample_extra = unweighted
    try:
        return verify_block(draft_tokens, draft_probs, target_probs, generator, draft_len)
    finally:
        verify._sample_extra = original


def _output_given_drafts_pvalue(verifier, block: bool) -> float:
    """One fixed draft block repeated over the batch: chi-square p-value of the joint histogram of
    (accepted length, extra token) against the exact algorithm (reference `_stops`)."""
    target = TableModel(4, 3, seed=81, sharpness=1.5)
    draft = TableModel(4, 3, seed=82, sharpness=1.5)
    xs = (2, 0, 3)  # a block where block verification often stops with w_tau < 1
    p = [target.probs(torch.tensor([xs[:i]]))[0] for i in range(4)]
    q = [draft.probs(torch.tensor([xs[:i]]))[0] for i in range(3)]
    joint = torch.zeros(4, 4, dtype=torch.float64)
    for tau, prob, extra in _stops(p, q, xs, block):
        joint[tau] += prob * extra
    tokens = torch.tensor([xs]).expand(SAMPLES, 3)
    q_block = torch.stack(q)[None].expand(SAMPLES, 3, 4).float()
    result = verifier(tokens, q_block, target_block(target, tokens), torch.Generator().manual_seed(83))
    extra = result.tokens.gather(1, result.accepted[:, None]).squeeze(1)
    return chi_square_pvalue(result.accepted * 4 + extra, joint.flatten())


@pytest.mark.parametrize("name", VERIFIERS)
def test_output_given_drafts_matches_reference(name):
    assert _output_given_drafts_pvalue(VERIFIERS[name], block=name == "block") > ALPHA


def test_negative_control_detects_unweighted_block_residual():
    assert _output_given_drafts_pvalue(_block_with_tokenwise_residual, block=True) < ALPHA


# --------------------------------------------------------------------------- block vs token-wise


def test_block_beats_tokenwise_on_paper_example():
    """Sun et al. 2024, Section 2: target (1/3, 2/3), draft (2/3, 1/3), gamma = 2 -> exact expected
    accepted lengths 10/9 (token-wise) and 11/9 (block)."""
    target = TableModel.constant([1 / 3, 2 / 3], 2)
    draft = TableModel.constant([2 / 3, 1 / 3], 2)
    for name, exact in (("tokenwise", 10 / 9), ("block", 11 / 9)):
        assert exact_reference(target, draft, 2, name == "block")[0] == pytest.approx(exact, abs=1e-12)
        result, _ = run_verifier(VERIFIERS[name], target, draft, 2, False, seed=41)
        mean, std = result.accepted.double().mean(), result.accepted.double().std()
        assert abs(float(mean) - exact) < 5 * float(std) / math.sqrt(SAMPLES)


@settings(max_examples=25, deadline=None)
@given(
    vocab=st.integers(2, 3),
    gamma=st.integers(1, 3),
    seed=st.integers(0, 10_000),
    sharpness=st.sampled_from([0.5, 1.5, 3.0]),
)
def test_block_expected_length_at_least_tokenwise_exact(vocab, gamma, seed, sharpness):
    """Exact enumeration: both references are lossless and block accepts at least as much."""
    target, draft = TableModel(vocab, gamma, seed, sharpness), TableModel(vocab, gamma, seed + 1, sharpness)
    block_len, block_out = exact_reference(target, draft, gamma, block=True)
    token_len, token_out = exact_reference(target, draft, gamma, block=False)
    assert block_len >= token_len - 1e-12
    for out in (block_out, token_out):
        # P(the output, continued by the target, starts with `full`) = the target's P(full)
        for full in itertools.product(range(vocab), repeat=gamma + 1):
            whole = target.seq_prob(full)
            covered = sum(
                out.get(full[: k + 1], 0.0) * whole / target.seq_prob(full[: k + 1]) for k in range(gamma + 1)
            )
            assert covered == pytest.approx(whole, abs=1e-9)


@pytest.mark.parametrize("name", VERIFIERS)
def test_accepted_length_matches_exact_reference(name):
    target, draft = TableModel(3, 3, seed=51), TableModel(3, 3, seed=52)
    exact, _ = exact_reference(target, draft, 3, block=name == "block")
    result, _ = run_verifier(VERIFIERS[name], target, draft, 3, False, seed=53)
    std = float(result.accepted.double().std())
    assert abs(float(result.accepted.double().mean()) - exact) < 5 * std / math.sqrt(SAMPLES)


# --------------------------------------------------------------------------- trees


@st.composite
def trees(draw):
    size = draw(st.integers(1, 12))
    parents = [-1] + [draw(st.integers(0, s - 1)) for s in range(1, size)]
    depth = [0] * size
    for s in range(1, size):
        depth[s] = depth[parents[s]] + 1
    batch = draw(st.integers(1, 3))
    vocab = draw(st.integers(2, 4))
    rows = st.lists(st.lists(st.integers(0, vocab - 1), min_size=size, max_size=size), min_size=batch, max_size=batch)
    tokens, argmax = draw(rows), draw(rows)
    return DraftTree(torch.tensor(tokens), torch.tensor(parents), torch.tensor(depth)), torch.tensor(argmax)


def _ancestors(parents: list[int], node: int) -> list[int]:
    chain = [node]
    while parents[chain[-1]] >= 0:
        chain.append(parents[chain[-1]])
    return chain[::-1]


@settings(max_examples=80, deadline=None)
@given(trees())
def test_tree_greedy_matches_brute_force_paths(tree_and_argmax):
    tree, argmax = tree_and_argmax
    parents = tree.parents.tolist()
    mask = tree.tree_mask()
    for i in range(tree.size):
        assert [j for j in range(tree.size) if mask[i, j]] == sorted(_ancestors(parents, i))
    result = verify_tree_greedy(tree, argmax)
    width = int(tree.depth.max()) + 1
    for b in range(tree.tokens.shape[0]):
        tok, arg = tree.tokens[b].tolist(), argmax[b].tolist()
        kept = [n for n in range(tree.size) if all(tok[m] == arg[parents[m]] for m in _ancestors(parents, n)[1:])]
        best = max(kept, key=lambda node: (int(tree.depth[node]), -node))
        path = _ancestors(parents, best)
        assert int(result.accepted[b]) == len(path) - 1
        assert result.path[b].tolist() == path + [-1] * (width - len(path))
        emitted = [tok[n] for n in path[1:]] + [arg[best]]
        assert result.tokens[b].tolist() == emitted + [-1] * (width - len(emitted))
