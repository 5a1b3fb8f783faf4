"""Model-free drafters: prompt lookup against a brute-force search, Token Recycling's adjacency
updates, static tree and tree mask, and an end-to-end tree draft + greedy tree verification."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from accelc.runtime.speculative.drafts import (
    Drafter,
    DraftTree,
    PromptLookupDrafter,
    TokenRecyclingDrafter,
    static_tree_shape,
)
from accelc.runtime.speculative.verify import verify_tree_greedy


def lookup(rows: list[list[int]], gamma: int, ngram_max: int = 3, ngram_min: int = 1, pad: int = 0):
    """Right-pad rows into a (B, T) context and run the drafter; returns (tokens, lengths) lists."""
    total = max(len(r) for r in rows)
    context = torch.tensor([r + [pad] * (total - len(r)) for r in rows])
    lengths = torch.tensor([len(r) for r in rows])
    proposal = PromptLookupDrafter(ngram_max, ngram_min).propose(context, lengths, gamma)
    assert proposal.probs is None and proposal.tokens.shape == (len(rows), gamma)
    return proposal.tokens.tolist(), proposal.lengths.tolist()


def brute_force_lookup(row: list[int], gamma: int, ngram_max: int, ngram_min: int) -> list[int]:
    """The documented rule, written as plain loops: most recent earlier match of the longest
    suffix n-gram, continuation copied LZ77-style."""
    length = len(row)
    for n in range(ngram_max, ngram_min - 1, -1):
        if n >= length:
            continue
        suffix = row[length - n :]
        for j in range(length - n - 1, -1, -1):
            if row[j : j + n] == suffix:
                out = []
                for k in range(gamma):
                    src = j + n + k
                    out.append(row[src] if src < length else out[src - length])
                return out
    return []


def test_prompt_lookup_finds_most_recent_match():
    tokens, lengths = lookup([[7, 1, 2, 8, 9, 1, 2, 5, 6, 0, 1, 2]], gamma=3, ngram_max=2)
    assert lengths == [3] and tokens == [[5, 6, 0]]  # after the later "1 2", not the first


def test_prompt_lookup_prefers_longest_ngram():
    # "2 3" last occurred before 4; the 3-gram "1 2 3" only at the start, followed by 9
    row = [1, 2, 3, 9, 9, 5, 2, 3, 4, 4, 1, 2, 3]
    tokens, _ = lookup([row], gamma=2, ngram_max=3)
    assert tokens == [[9, 9]]
    tokens, _ = lookup([row], gamma=2, ngram_max=2)
    assert tokens == [[4, 4]]


def test_prompt_lookup_respects_ngram_min():
    row = [5, 1, 2, 3, 6, 3]  # only the 1-gram "3" recurs
    assert lookup([row], gamma=2, ngram_max=3, ngram_min=1) == ([[6, 3]], [2])
    assert lookup([row], gamma=2, ngram_max=3, ngram_min=2) == ([[0, 0]], [0])


def test_prompt_lookup_no_match_proposes_nothing():
    assert lookup([[1, 2, 3, 4], [5]], gamma=3) == ([[0, 0, 0], [0, 0, 0]], [0, 0])


def test_prompt_lookup_copies_periodically_past_the_end():
    tokens, lengths = lookup([[4, 1, 2, 1, 2]], gamma=5, ngram_max=2)
    assert lengths == [5] and tokens == [[1, 2, 1, 2, 1]]


def test_prompt_lookup_ignores_padding():
    # row 1's padding (value 3) would match its suffix "3" if it were read
    tokens, lengths = lookup([[1, 3, 2, 3, 9, 9], [8, 3]], gamma=2, ngram_max=1, pad=3)
    assert lengths == [2, 0] and tokens[1] == [0, 0]


@settings(max_examples=150, deadline=None)
@given(
    rows=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=14), min_size=1, max_size=4),
    gamma=st.integers(0, 6),
    ngrams=st.tuples(st.integers(1, 4), st.integers(0, 3)).map(lambda t: (t[0] + t[1], t[0])),
    pad=st.integers(0, 3),
)
def test_prompt_lookup_matches_brute_force(rows, gamma, ngrams, pad):
    ngram_max, ngram_min = ngrams
    tokens, lengths = lookup(rows, gamma, ngram_max, ngram_min, pad)
    for row, got, got_len in zip(rows, tokens, lengths):
        expected = brute_force_lookup(row, gamma, ngram_max, ngram_min)
        if gamma == 0:
            assert got_len == 0
            continue
        assert got_len == len(expected) and got[:got_len] == expected


def test_prompt_lookup_validates_arguments():
    with pytest.raises(ValueError, match="ngram"):
        PromptLookupDrafter(ngram_max=1, ngram_min=2)
    with pytest.raises(ValueError, match="lengths"):
        PromptLookupDrafter().propose(torch.zeros(1, 4, dtype=torch.long), torch.tensor([5]), 2)


def test_drafters_follow_the_protocol():
    assert isinstance(PromptLookupDrafter(), Drafter)
    assert isinstance(TokenRecyclingDrafter(16), Drafter)


# --------------------------------------------------------------------------- Token Recycling


def test_adjacency_fits_in_two_megabytes():
    drafter = TokenRecyclingDrafter(49152, successors=8)
    assert drafter.adjacency.dtype == torch.int32 and drafter.adjacency.shape == (49152, 8)
    assert drafter.adjacency.numel() * drafter.adjacency.element_size() < 2 * 1024**2


def test_adjacency_starts_as_repeat_guess():
    drafter = TokenRecyclingDrafter(6, successors=3)
    assert drafter.adjacency.tolist() == [[v] * 3 for v in range(6)]


def test_observe_replaces_rows_with_topk_of_logits():
    gen = torch.Generator().manual_seed(0)
    vocab, k = 12, 4
    drafter = TokenRecyclingDrafter(vocab, successors=k)
    before = drafter.adjacency.clone()
    tokens = torch.tensor([[3, 5, 3, 7], [1, 9, 2, 2]])
    logits = torch.randn(2, 4, vocab, generator=gen)
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    drafter.observe(tokens, logits, mask)
    top = logits.topk(k, dim=-1).indices
    expected = before.clone()
    for b, s in [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]:  # row-major: the last write wins
        expected[tokens[b, s]] = top[b, s].int()
    assert torch.equal(drafter.adjacency, expected)
    assert drafter.adjacency[3].tolist() == top[0, 2].tolist()  # second occurrence of token 3
    assert drafter.adjacency[2].tolist() == before[2].tolist()  # masked positions are ignored


def test_static_tree_shape():
    parents, ranks, depth = static_tree_shape(successors=8, tree_width=8, depth=3)
    assert parents.shape[0] == 1 + 3 * 8
    assert [int((depth == d).sum()) for d in range(4)] == [1, 8, 8, 8]
    assert bool((parents[1:] < torch.arange(1, 25)).all())
    level2 = sorted((int(ranks[parents[s]]), int(ranks[s])) for s in range(25) if depth[s] == 2)
    assert level2 == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (2, 0), (3, 0)]
    small = static_tree_shape(successors=2, tree_width=8, depth=2)
    assert [int((small[2] == d).sum()) for d in range(3)] == [1, 2, 4]  # limited by successors


def _ancestors(parents: list[int], node: int) -> set[int]:
    out = {node}
    while parents[node] >= 0:
        node = parents[node]
        out.add(node)
    return out


@settings(max_examples=25, deadline=None)
@given(
    successors=st.integers(1, 4),
    tree_width=st.integers(1, 6),
    depth=st.integers(0, 4),
    seed=st.integers(0, 1000),
)
def test_propose_tree_follows_adjacency_and_mask_is_ancestry(successors, tree_width, depth, seed):
    vocab = 9
    drafter = TokenRecyclingDrafter(vocab, successors, tree_width, depth)
    gen = torch.Generator().manual_seed(seed)
    drafter.adjacency = torch.randint(0, vocab, (vocab, successors), generator=gen, dtype=torch.int32)
    tree = drafter.propose_tree(torch.tensor([0, 4, 8]))
    parents, ranks = tree.parents.tolist(), drafter.ranks.tolist()
    assert tree.tokens[:, 0].tolist() == [0, 4, 8]
    for s in range(1, tree.size):
        assert torch.equal(tree.tokens[:, s], drafter.adjacency[tree.tokens[:, parents[s]], ranks[s]].long())
    mask = tree.tree_mask()
    for i in range(tree.size):
        assert {j for j in range(tree.size) if mask[i, j]} == _ancestors(parents, i)
    leaves = [s for s in range(tree.size) if s not in parents]
    paths = [[n for n in p if n >= 0] for p in tree.paths.tolist()]
    assert sorted(p[-1] for p in paths) == sorted(leaves)
    for p in paths:
        assert p[0] == 0 and all(parents[b] == a for a, b in zip(p, p[1:]))


def test_propose_tree_depth_truncates_to_a_prefix():
    drafter = TokenRecyclingDrafter(10, successors=4, tree_width=5, depth=4)
    full, short = drafter.propose_tree(torch.tensor([2])), drafter.propose_tree(torch.tensor([2]), depth=2)
    assert int(short.depth.max()) == 2
    assert torch.equal(short.tokens, full.tokens[:, : short.size])


def test_propose_is_the_rank0_chain():
    drafter = TokenRecyclingDrafter(5, successors=2)
    drafter.adjacency[:, 0] = torch.tensor([1, 2, 3, 4, 0], dtype=torch.int32)
    proposal = drafter.propose(torch.tensor([[0, 3, 0], [1, 1, 1]]), torch.tensor([2, 3]), gamma=3)
    assert proposal.tokens.tolist() == [[4, 0, 1], [2, 3, 4]]
    assert proposal.lengths.tolist() == [3, 3] and proposal.probs is None


def test_tree_rejects_bad_structure():
    with pytest.raises(ValueError, match="precede"):
        DraftTree(torch.zeros(1, 3, dtype=torch.long), torch.tensor([-1, 2, 0]), torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match="root"):
        DraftTree(torch.zeros(1, 2, dtype=torch.long), torch.tensor([0, 0]), torch.tensor([0, 1]))


def test_recycling_learns_a_deterministic_target_end_to_end():
    """Target: next token = (3 t + 1) mod V.  After observing its logits on a text that visits
    every token, the tree's rank-0 chain is the target's continuation, so greedy tree verification
    accepts the full depth and emits the target's tokens."""
    vocab, depth = 11, 4

    def target_logits(tokens: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot((3 * tokens + 1) % vocab, vocab).float() + 0.01 * tokens[..., None]

    drafter = TokenRecyclingDrafter(vocab, successors=3, tree_width=4, depth=depth)
    text = torch.arange(vocab)[None, :]
    drafter.observe(text, target_logits(text))
    tree = drafter.propose_tree(torch.tensor([5, 0]))
    result = verify_tree_greedy(tree, target_logits(tree.tokens).argmax(-1))
    assert result.accepted.tolist() == [depth, depth]
    for b, start in enumerate([5, 0]):
        expected, t = [], start
        for _ in range(depth + 1):
            t = (3 * t + 1) % vocab
            expected.append(t)
        assert result.tokens[b].tolist() == expected


# ------------------------------------------------------------------------ prompt-lookup trees
def _brute_continuations(row: list[int], depth: int, ngram_min: int, cap: int = 16) -> dict[tuple, float]:
    """Every root-to-node path of the lookup tree with its weight, by brute force."""
    n = len(row)
    paths: dict[tuple, float] = {}
    for s in range(n - 1):
        if row[s] != row[-1]:
            continue
        match = 1
        while match < cap and s - match >= 0 and match < n and row[s - match] == row[n - 1 - match]:
            match += 1
        if match < ngram_min:
            continue
        period = n - 1 - s
        cont = [row[s + 1 + j % period] for j in range(depth)]
        for j in range(1, depth + 1):
            paths[tuple(cont[:j])] = paths.get(tuple(cont[:j]), 0.0) + 2.0 ** match
    return paths


@settings(max_examples=150, deadline=None)
@given(row=st.lists(st.integers(0, 4), min_size=1, max_size=40), depth=st.integers(0, 5), ngram_min=st.integers(1, 3))
def test_lookup_tree_candidates_match_brute_force(row, depth, ngram_min):
    """The candidate tree holds exactly the distinct continuations of every earlier occurrence of
    the last token (matching at least ngram_min tokens), in BFS order, with their summed weights."""
    drafter = PromptLookupDrafter(3, ngram_min) if ngram_min <= 3 else None
    ctx = torch.tensor([row + [0, 0]])
    (cand,) = drafter.tree_candidates(ctx, torch.tensor([len(row)]), torch.tensor([depth]))
    paths = {}
    for i in range(len(cand)):
        node, path = i + 1, []
        while node:
            path.append(cand.tokens[node - 1])
            assert cand.parents[node - 1] < node
            node = cand.parents[node - 1]
        paths[tuple(reversed(path))] = cand.weight[i]
        assert cand.depth[i] == len(path)
    assert paths == _brute_continuations(row, depth, ngram_min)
    assert cand.depth == sorted(cand.depth)
    total = sum(w for p, w in paths.items() if len(p) == 1)
    for i in range(len(cand)):
        parent = cand.parents[i]
        assert cand.share[i] == pytest.approx(cand.weight[i] / (total if parent == 0 else cand.weight[parent - 1]))


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_per_row_trees_verify_like_each_row_alone(data):
    """A batch of per-row trees (padded with dead nodes) verifies every row exactly as that row's
    tree alone; dead nodes are never accepted."""
    batch = data.draw(st.integers(1, 3))
    rows, alone = [], []
    for _ in range(batch):
        size = data.draw(st.integers(0, 6))
        parents = [data.draw(st.integers(0, i)) for i in range(size)]  # node i + 1 hangs off 0..i
        toks = data.draw(st.lists(st.integers(0, 2), min_size=size, max_size=size))
        rows.append((toks, parents))
    roots = torch.tensor(data.draw(st.lists(st.integers(0, 2), min_size=batch, max_size=batch)))
    tree = DraftTree.from_rows(roots, rows)
    argmax = torch.tensor(data.draw(st.lists(st.lists(st.integers(0, 2), min_size=tree.size, max_size=tree.size),
                                             min_size=batch, max_size=batch)))
    res = verify_tree_greedy(tree, argmax)
    for b, (toks, parents) in enumerate(rows):
        n = len(toks) + 1
        depth = [0] * n
        for i, p in enumerate(parents, start=1):
            depth[i] = depth[p] + 1
        single = DraftTree(torch.tensor([[int(roots[b])] + toks]), torch.tensor([-1] + parents), torch.tensor(depth))
        one = verify_tree_greedy(single, argmax[b:b + 1, :n])
        assert int(res.accepted[b]) == int(one.accepted[0])
        k = int(one.accepted[0]) + 1
        assert res.tokens[b, :k].tolist() == one.tokens[0, :k].tolist()
        assert res.path[b, :k].tolist() == one.path[0, :k].tolist()
    mask = tree.tree_mask()
    assert mask.shape == (batch, tree.size, tree.size)
