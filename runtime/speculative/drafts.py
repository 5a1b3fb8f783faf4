"""Model-free drafters for speculative decoding.

Every drafter follows one :class:`Drafter` protocol (as vLLM's proposers do): ``propose`` returns a
:class:`Proposal` of up to gamma tokens per row, and ``observe`` lets a drafter learn from the
logits of every target forward.  The early-exit self-drafter (model based) lives with the engine
and implements the same protocol.

* :class:`PromptLookupDrafter` -- n-gram lookup in the prompt and the generated text (Saxena 2023,
  "Prompt Lookup Decoding"; HF ``prompt_lookup_num_tokens``).
* :class:`TokenRecyclingDrafter` -- Luo et al. 2024, "Turning Trash into Treasure: Accelerating
  Inference of Large Language Models with Token Recycling": an adjacency matrix of the top-k
  successors of every token, refreshed from the logits of every forward, expanded into a static
  tree of candidates (:class:`DraftTree`) that the target verifies in one forward with a tree mask.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

__all__ = [
    "DraftTree",
    "Drafter",
    "LookupCandidates",
    "PromptLookupDrafter",
    "Proposal",
    "TokenRecyclingDrafter",
    "static_tree_shape",
]


@dataclass(frozen=True)
class Proposal:
    """Draft tokens for one verification step.

    tokens: (B, gamma) int64 -- row b's drafts are ``tokens[b, : lengths[b]]``; later entries are
        padding (token 0, a valid id so the row can run through the model and be ignored).
    lengths: (B,) int64 in [0, gamma] -- real drafts per row (the ``draft_len`` of the verifiers).
    probs: (B, gamma, V) float or None -- the distribution each draft was drawn from; None for a
        deterministic drafter (the verifiers then use the one-hot of the draft).
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    probs: torch.Tensor | None = None


@runtime_checkable
class Drafter(Protocol):
    """What the engine needs from a drafter."""

    def propose(self, context: torch.Tensor, lengths: torch.Tensor, gamma: int) -> Proposal:
        """context: (B, T) int64 prompt + generated tokens, right-padded; lengths: (B,) int64 real
        tokens per row; gamma: the most drafts per row.  Returns a (B, gamma) :class:`Proposal`."""
        ...

    def observe(self, tokens: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Learn from a target forward: tokens (B, S) int64 the forward's input tokens, logits
        (B, S, V) its output (the next-token logits after each input), mask (B, S) bool or None
        (True = a real position)."""
        ...


@dataclass(frozen=True)
class DraftTree:
    """A tree of candidate tokens per row: one shape shared by all rows, or one shape per row.

    tokens: (B, S) int64 -- the token of every node; node 0 is the root (the last committed token,
        not yet in the KV cache), nodes are in BFS order (a parent precedes its children).
    parents: (S,) int64 shared by the rows, or (B, S) one tree per row -- the parent node of every
        node, -1 for the root.
    depth: like ``parents`` -- distance from the root (position offset of the node in the sequence).
    live: (B, S) bool or None (all live) -- False marks padding nodes of a row whose tree is
        smaller than S; they hang off the root and are never accepted.
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    depth: torch.Tensor
    live: torch.Tensor | None = None

    def __post_init__(self) -> None:
        size = self.parents.shape[-1]
        per_row = self.parents.dim() == 2
        if (self.tokens.dim() != 2 or self.tokens.shape[1] != size or self.depth.shape != self.parents.shape
                or self.parents.dim() not in (1, 2) or (per_row and self.parents.shape[0] != self.tokens.shape[0])):
            raise ValueError(
                f"tokens must be (B, S), parents and depth (S,) or (B, S); got {tuple(self.tokens.shape)}, "
                f"{tuple(self.parents.shape)}, {tuple(self.depth.shape)}"
            )
        if self.live is not None and (self.live.shape != self.tokens.shape or self.live.dtype != torch.bool):
            raise ValueError(f"live must be bool {tuple(self.tokens.shape)}, got {self.live.dtype} {tuple(self.live.shape)}")
        parents, depth = self.parents.reshape(-1, size), self.depth.reshape(-1, size)
        if size == 0 or bool((parents[:, 0] != -1).any()) or bool((depth[:, 0] != 0).any()):
            raise ValueError("node 0 must be the root: parents[0] = -1 and depth[0] = 0")
        rest = parents[:, 1:]
        if bool(((rest < 0) | (rest >= torch.arange(1, size))).any()):
            raise ValueError("every non-root node's parent must precede it (BFS order)")
        if bool((depth[:, 1:] != depth.gather(1, rest) + 1).any()):
            raise ValueError("depth must be the parent's depth + 1")

    @classmethod
    def from_rows(cls, roots: torch.Tensor, rows: list[tuple[list[int], list[int]]]) -> "DraftTree":
        """A per-row tree from each row's non-root nodes: ``rows[b] = (tokens, parents)`` in BFS
        order, parents indexing the row's nodes with the root as 0.  Rows are padded to the widest
        with dead nodes (children of the root, ``live`` False).  roots: (B,) int64 root tokens."""
        size = 1 + max((len(t) for t, _ in rows), default=0)
        batch = len(rows)
        tokens = torch.zeros(batch, size, dtype=torch.long)
        parents = torch.zeros(batch, size, dtype=torch.long)
        depth = torch.ones(batch, size, dtype=torch.long)
        live = torch.zeros(batch, size, dtype=torch.bool)
        parents[:, 0], depth[:, 0], live[:, 0] = -1, 0, True
        for b, (toks, pars) in enumerate(rows):
            n = len(toks)
            if n:
                tokens[b, 1:n + 1] = torch.tensor(toks, dtype=torch.long)
                parents[b, 1:n + 1] = torch.tensor(pars, dtype=torch.long)
                live[b, 1:n + 1] = True
                row_depth = [0] * (n + 1)
                for i, par in enumerate(pars, start=1):
                    row_depth[i] = row_depth[par] + 1
                depth[b, :n + 1] = torch.tensor(row_depth, dtype=torch.long)
        tokens[:, 0] = roots.cpu()
        dev = roots.device
        return cls(tokens.to(dev), parents.to(dev), depth.to(dev), live.to(dev))

    @property
    def size(self) -> int:
        """Number of nodes S (root included)."""
        return int(self.parents.shape[-1])

    def tree_mask(self) -> torch.Tensor:
        """(S, S) bool, or (B, S, S) for per-row trees: [i, j] is True when node j is node i or one
        of its ancestors (the attention mask of the verification forward: node i attends to its
        root-to-node path)."""
        parents = self.parents.reshape(-1, self.size).cpu()
        mask = torch.eye(self.size, dtype=torch.bool).repeat(parents.shape[0], 1, 1)
        for node in range(1, self.size):
            mask[:, node] |= mask[torch.arange(parents.shape[0]), parents[:, node]]
        mask = mask.to(self.parents.device)
        return mask[0] if self.parents.dim() == 1 else mask

    @property
    def paths(self) -> torch.Tensor:
        """(P, max_depth + 1) int64: node indices of every root-to-leaf path (root first), -1 padded
        (shared trees only)."""
        if self.parents.dim() != 1:
            raise ValueError("paths: only for a tree shared by all rows")
        is_parent = torch.zeros(self.size, dtype=torch.bool)
        is_parent[self.parents[1:]] = True
        leaves = (~is_parent).nonzero().squeeze(1)
        on_path = self.tree_mask()[leaves]  # (P, S)
        index = torch.arange(self.size)
        ordered = torch.where(on_path, index, self.size).sort(dim=1).values[:, : int(self.depth.max()) + 1]
        return torch.where(ordered < self.size, ordered, -1)


@dataclass
class LookupCandidates:
    """One row's candidate tree from every earlier occurrence of its last token (non-root nodes in
    BFS order; node i of the lists is tree node i + 1, the root is node 0).

    tokens, parents: the nodes; depth: distance from the root; weight: sum over the occurrences
    whose continuation passes through the node of 2 ** (match length, at most ``cap``); share:
    weight / the parent's weight (the root's weight is the total); match: the longest match
    length among those occurrences.
    """

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)
    weight: list[float] = field(default_factory=list)
    share: list[float] = field(default_factory=list)
    match: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)


class PromptLookupDrafter:
    """Prompt lookup decoding: draft by copying what followed an earlier occurrence of the last n
    tokens (n from ``ngram_max`` down to ``ngram_min``; the first n with a match wins).

    Choices (documented because they change what is drafted):
    * the **most recent** earlier occurrence is used -- recent text (the current function, the
      loop the model is in) predicts the next tokens better than the start of the prompt;
    * the continuation is copied LZ77-style: when it runs into the end of the context it continues
      with the tokens it has just drafted, so a match with period P < gamma still drafts gamma
      tokens (repetitive text, the common failure mode of greedy decoding, drafts at full width);
    * rows whose last n-gram never occurred before (for every n) propose 0 tokens.
    """

    def __init__(self, ngram_max: int = 3, ngram_min: int = 1):
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got ngram_min={ngram_min}, ngram_max={ngram_max}")
        self.ngram_max = ngram_max
        self.ngram_min = ngram_min

    def propose(self, context: torch.Tensor, lengths: torch.Tensor, gamma: int, start: torch.Tensor | None = None) -> Proposal:
        """context: (B, T) int64, right-padded; lengths: (B,) int64; gamma >= 0; start: (B,) the
        :meth:`continuation_start` when the caller already has it.  Returns a deterministic
        (B, gamma) :class:`Proposal` (probs None)."""
        _check_context(context, lengths, gamma)
        lengths = lengths.to(device=context.device, dtype=torch.long)
        if start is None:
            start = self.continuation_start(context, lengths)  # (B,), -1 = no match
        found = start >= 0
        period = (lengths - start).clamp(min=1)  # tokens between the match and the end
        steps = torch.arange(gamma, device=context.device)
        index = start.clamp(min=0)[:, None] + steps[None, :] % period[:, None]
        tokens = context.gather(1, index.clamp(max=context.shape[1] - 1))
        tokens = torch.where(found[:, None], tokens, 0)
        return Proposal(tokens=tokens, lengths=torch.where(found, gamma, 0), probs=None)

    def tree_candidates(self, context: torch.Tensor, lengths: torch.Tensor, depth: torch.Tensor, cap: int = 16,
                        occurrences: int = 64) -> list[LookupCandidates]:
        """Candidate trees for tree verification (SuffixDecoding-style, on prompt + generated text).

        Every earlier occurrence s of a row's last token whose match -- the number L of tokens
        ending at s that equal the tokens ending the context, at most ``cap`` -- is at least
        ``ngram_min`` contributes its continuation (up to ``depth[b]`` tokens, LZ77-style past the
        end as in :meth:`propose`) with weight 2 ** L; the ``occurrences`` longest matches (the most
        recent on ties) are kept.  Continuations sharing a prefix share nodes, so the tree holds
        every distinct continuation and the weights say how often, and after how long a match,
        each one followed.

        context: (B, T) int64; lengths: (B,) int64; depth: (B,) int64 the deepest node per row.
        """
        out = []
        steps = torch.arange(1, cap, device=context.device)
        for b in range(context.shape[0]):
            n, d = int(lengths[b]), int(depth[b])
            cand = LookupCandidates()
            out.append(cand)
            if n < 2 or d < 1:
                continue
            row = context[b, :n]
            occ = (row[:-1] == row[-1]).nonzero().squeeze(1)  # earlier positions of the last token
            if occ.numel() == 0:
                continue
            before = occ[:, None] - steps[None, :]
            same = (before >= 0) & (row[before.clamp(min=0)] == row[(n - 1 - steps).clamp(min=0)][None, :]) & (steps < n)[None, :]
            match = 1 + same.long().cumprod(dim=1).sum(dim=1)
            keep = match >= self.ngram_min
            occ, match = occ[keep], match[keep]
            if occ.numel() == 0:
                continue
            order = torch.argsort(match * n + occ, descending=True)[:occurrences]
            occ, match = occ[order], match[order]
            period = (n - 1 - occ).clamp(min=1)
            offsets = torch.arange(d, device=context.device)
            conts = row[occ[:, None] + 1 + offsets[None, :] % period[:, None]].tolist()
            index: dict[tuple[int, ...], int] = {}
            total = 0.0
            for cont, m in zip(conts, match.tolist()):
                w = float(2 ** m)
                total += w
                parent = 0
                for j in range(d):
                    key = tuple(cont[: j + 1])
                    node = index.get(key)
                    if node is None:
                        node = len(cand.tokens) + 1
                        index[key] = node
                        cand.tokens.append(cont[j])
                        cand.parents.append(parent)
                        cand.depth.append(j + 1)
                        cand.weight.append(0.0)
                        cand.match.append(m)
                    cand.weight[node - 1] += w
                    cand.match[node - 1] = max(cand.match[node - 1], m)
                    parent = node
            # dict insertion is depth-first per continuation: reorder to BFS (by depth, stable)
            _to_bfs(cand)
            cand.share = [w / (total if p == 0 else cand.weight[p - 1]) for w, p in zip(cand.weight, cand.parents)]
        return out

    def observe(self, tokens: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Prompt lookup does not learn from logits."""

    def continuation_start(self, context: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B,) int64: index right after the most recent earlier match of the longest matching
        n-gram suffix, -1 where none."""
        batch, total = context.shape
        start = torch.full((batch,), -1, dtype=torch.long, device=context.device)
        for n in range(self.ngram_max, self.ngram_min - 1, -1):
            if total < n + 1:
                continue
            suffix_at = lengths - n  # (B,) where the last n-gram starts
            offsets = torch.arange(n, device=context.device)
            suffix = context.gather(1, (suffix_at.clamp(min=0)[:, None] + offsets).clamp(max=total - 1))
            windows = context.unfold(1, n, 1)  # (B, T - n + 1, n)
            where = torch.arange(windows.shape[1], device=context.device)
            # an earlier window: it starts before the suffix, so a continuation token follows it
            hit = (windows == suffix[:, None, :]).all(dim=-1) & (where[None, :] < suffix_at[:, None])
            last = torch.where(hit, where, -1).amax(dim=1)
            start = torch.where((start < 0) & (last >= 0), last + n, start)
        return start


def static_tree_shape(successors: int, tree_width: int, depth: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The static candidate tree of :class:`TokenRecyclingDrafter`.

    A node is a path of successor ranks (r_1, .., r_d) from the root; its prior is
    prod_k 1 / (r_k + 1) (a Zipf guess of how often the rank-r successor is the right one).  Level 1
    holds the root's ``min(successors, tree_width)`` best successors; every deeper level keeps the
    ``tree_width`` children (of the kept nodes of the level above) with the highest prior, ties in
    BFS order.  With the defaults (8, 8, depth d) that is 1 + 8 d nodes; level 2 holds the rank
    paths (0,0) (0,1) (0,2) (0,3) (1,0) (1,1) (2,0) (3,0).

    Returns parents (S,) int64 (-1 root), ranks (S,) int64 (successor rank within the parent's row
    of the adjacency matrix, 0 for the root) and depth (S,) int64, in BFS order.
    """
    if successors < 1 or tree_width < 1 or depth < 0:
        raise ValueError(f"need successors >= 1, tree_width >= 1, depth >= 0; got {successors}, {tree_width}, {depth}")
    parents, ranks, depths, priors = [-1], [0], [0], [1.0]
    level = [0]
    for d in range(1, depth + 1):
        candidates = [(priors[p] / (r + 1), p, r) for p in level for r in range(successors)]
        order = sorted(range(len(candidates)), key=lambda i: (-candidates[i][0], i))[:tree_width]
        level = []
        for i in sorted(order):  # keep BFS order: by parent, then rank
            prior, parent, rank = candidates[i]
            level.append(len(parents))
            parents.append(parent)
            ranks.append(rank)
            depths.append(d)
            priors.append(prior)
    return torch.tensor(parents), torch.tensor(ranks), torch.tensor(depths)


class TokenRecyclingDrafter:
    """Token Recycling (Luo et al. 2024, "Turning Trash into Treasure: Accelerating Inference of
    Large Language Models with Token Recycling").

    State: ``adjacency`` (V, successors) int32, row v = the top-``successors`` next tokens the target
    predicted the last time it read token v (the candidates every forward computes and throws
    away).  Initialised to v itself (a repeat guess) and refreshed by :meth:`observe` from every
    forward's logits.  For V = 49152 and 8 successors it takes 1.5 MiB.

    :meth:`propose_tree` expands the last token through the adjacency into the static tree of
    :func:`static_tree_shape` (``tree_width`` nodes per level, up to ``depth`` levels);
    :meth:`propose` returns its rank-0 chain, for the linear verifiers.
    """

    def __init__(
        self,
        vocab_size: int,
        successors: int = 8,
        tree_width: int = 8,
        depth: int = 6,
        device: torch.device | str = "cpu",
    ):
        if vocab_size < 1 or not 1 <= successors <= vocab_size:
            raise ValueError(f"need vocab_size >= 1 and 1 <= successors <= vocab_size, got {vocab_size}, {successors}")
        self.vocab_size = vocab_size
        self.successors = successors
        self.depth = depth
        self.parents, self.ranks, self.node_depth = static_tree_shape(successors, tree_width, depth)
        tokens = torch.arange(vocab_size, dtype=torch.int32, device=device)
        self.adjacency = tokens[:, None].repeat(1, successors).contiguous()

    def observe(self, tokens: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Replace the adjacency rows of the observed tokens with the top-k of their logits.

        tokens: (B, S) int64 the forward's input tokens (prefill, verification chain or tree nodes);
        logits: (B, S, V) the target's logits at those positions; mask: (B, S) bool or None (True =
        a real position).  A token seen several times keeps its last occurrence (row-major order).
        """
        if logits.shape[:2] != tokens.shape or logits.shape[-1] != self.vocab_size:
            raise ValueError(
                f"logits must be (B, S, V={self.vocab_size}) for tokens {tuple(tokens.shape)}, "
                f"got {tuple(logits.shape)}"
            )
        flat = tokens.reshape(-1).to(self.adjacency.device)
        top = logits.reshape(-1, self.vocab_size).topk(self.successors, dim=-1).indices.to(self.adjacency.device)
        if mask is not None:
            keep = mask.reshape(-1).to(self.adjacency.device)
            flat, top = flat[keep], top[keep]
        if flat.numel() == 0:
            return
        order = torch.argsort(flat, stable=True)
        ordered = flat[order]
        last = torch.ones_like(ordered, dtype=torch.bool)
        last[:-1] = ordered[1:] != ordered[:-1]
        chosen = order[last]
        self.adjacency[flat[chosen]] = top[chosen].to(torch.int32)

    def propose_tree(self, last_tokens: torch.Tensor, depth: int | None = None) -> DraftTree:
        """last_tokens: (B,) int64 the last committed token per row; depth: the deepest level to
        keep (e.g. the step's gamma), None = the drafter's depth.  Returns a :class:`DraftTree`
        with tokens (B, S) on the adjacency's device."""
        depth = self.depth if depth is None else min(depth, self.depth)
        size = int((self.node_depth <= depth).sum())
        parents, ranks = self.parents[:size], self.ranks[:size]
        node_depth = self.node_depth[:size]
        device = self.adjacency.device
        tokens = torch.zeros(last_tokens.shape[0], size, dtype=torch.long, device=device)
        tokens[:, 0] = last_tokens.to(device)
        for level in range(1, depth + 1):
            nodes = (node_depth == level).nonzero().squeeze(1)
            parent_tokens = tokens[:, parents[nodes].to(device)]
            tokens[:, nodes.to(device)] = self.adjacency[parent_tokens, ranks[nodes].to(device)].long()
        return DraftTree(tokens=tokens, parents=parents, depth=node_depth)

    def propose(self, context: torch.Tensor, lengths: torch.Tensor, gamma: int) -> Proposal:
        """The rank-0 chain from each row's last token: context (B, T) int64, lengths (B,) int64,
        gamma >= 0 -> a deterministic (B, gamma) :class:`Proposal` with every row at gamma."""
        _check_context(context, lengths, gamma)
        device = self.adjacency.device
        current = context.gather(1, (lengths.long() - 1).clamp(min=0)[:, None]).squeeze(1).to(device)
        tokens = torch.zeros(context.shape[0], gamma, dtype=torch.long, device=device)
        for step in range(gamma):
            current = self.adjacency[current, 0].long()
            tokens[:, step] = current
        return Proposal(tokens=tokens, lengths=torch.full_like(lengths.long(), gamma), probs=None)


def _check_context(context: torch.Tensor, lengths: torch.Tensor, gamma: int) -> None:
    """Validate propose() arguments: context (B, T), lengths (B,) in [1, T], gamma >= 0."""
    if context.dim() != 2 or lengths.shape != (context.shape[0],):
        raise ValueError(
            f"context must be (B, T) and lengths (B,), got {tuple(context.shape)} and {tuple(lengths.shape)}"
        )
    if bool(((lengths < 1) | (lengths > context.shape[1])).any()):
        raise ValueError(f"lengths must be in [1, T={context.shape[1]}], got {lengths.tolist()}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")


def _to_bfs(cand: LookupCandidates) -> None:
    """Reorder a candidate tree's nodes by depth (stable), renumbering the parents."""
    order = sorted(range(len(cand.tokens)), key=lambda i: cand.depth[i])
    new = {old + 1: pos + 1 for pos, old in enumerate(order)}
    new[0] = 0
    cand.tokens = [cand.tokens[i] for i in order]
    cand.parents = [new[cand.parents[i]] for i in order]
    cand.depth = [cand.depth[i] for i in order]
    cand.weight = [cand.weight[i] for i in order]
    cand.match = [cand.match[i] for i in order]
