"""Verification of draft tokens against the target model (speculative decoding).

Model-free: every function takes tensors the engine already has (the draft tokens, the draft
distributions if any, and the target distributions of the one verification forward) and returns
how many draft tokens each row keeps plus one extra token.  All functions are vectorised over the
batch, and rows may carry fewer real draft tokens than the block width (``draft_len``).

* :func:`verify_tokenwise` -- speculative sampling of Leviathan et al. 2023 ("Fast Inference from
  Transformers via Speculative Decoding") and Chen et al. 2023 ("Accelerating Large Language Model
  Decoding with Speculative Sampling").
* :func:`verify_block` -- block verification of Sun et al. 2024 ("Block Verification Accelerates
  Speculative Decoding", ICLR 2025, Algorithm 2).
* :func:`verify_greedy` and :func:`verify_tree_greedy` -- the temperature-0 fast paths (a chain of
  drafts, and the candidate tree of Token Recycling).

Both sampling verifiers are lossless: the emitted tokens are distributed exactly as samples from
the target distributions.  The target distributions must come from
:func:`accelc.runtime.sampling.probs_from_logits`; at temperature 0 they are one-hot vectors and
both verifiers reduce to greedy matching (accept while draft == argmax, then emit the argmax).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from accelc.runtime.speculative.drafts import DraftTree

__all__ = [
    "TreeVerifyResult",
    "VerifyResult",
    "verify_block",
    "verify_greedy",
    "verify_tokenwise",
    "verify_tree_greedy",
]

_TINY = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of verifying one block of drafts per row.

    accepted: (B,) int64 -- number of draft tokens kept in each row (0 .. draft_len_b).
    tokens: (B, gamma + 1) int64 -- the kept draft tokens, then the extra token (the correction on
        a rejection, the bonus token when every draft was kept) at position ``accepted[b]``; the
        positions after it hold -1.  Row b emits ``tokens[b, : accepted[b] + 1]``.
    """

    accepted: torch.Tensor
    tokens: torch.Tensor


@dataclass(frozen=True)
class TreeVerifyResult:
    """Outcome of verifying a draft tree per row.

    accepted: (B,) int64 -- number of draft nodes kept (the depth of the accepted node).
    path: (B, D + 1) int64 -- node indices of the accepted root-to-node path, root (0) first, then
        -1; these are the tree positions whose KV entries the engine keeps.
    tokens: (B, D + 1) int64 -- tokens of the kept nodes (root excluded), then the bonus token (the
        target argmax at the accepted node) at position ``accepted[b]``, then -1.
    """

    accepted: torch.Tensor
    path: torch.Tensor
    tokens: torch.Tensor


def verify_tokenwise(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
    draft_len: torch.Tensor | None = None,
) -> VerifyResult:
    """Token-wise speculative sampling (Leviathan et al. 2023, Chen et al. 2023).

    Draft token i is kept with probability min(1, p_i(x_i) / q_i(x_i)) as long as all the tokens
    before it were kept; at the first rejection the extra token is drawn from the residual
    norm(max(0, p_i - q_i)); when all ``draft_len_b`` drafts are kept it is drawn from
    p_{draft_len_b} (the bonus token).

    draft_tokens: (B, gamma) int64 -- the drafts x_1..x_gamma.
    draft_probs: (B, gamma, V) float or None -- q_i, the distribution x_i was drawn from; None for
        a deterministic drafter (q_i is the one-hot of x_i: prompt lookup, Token Recycling, greedy
        early exit).
    target_probs: (B, gamma + 1, V) float -- p_i, the target distribution after the context and
        x_1..x_{i-1} (from ``probs_from_logits``).
    generator: torch.Generator on the tensors' device, or None for the global one.
    draft_len: (B,) int64 in [0, gamma] or None (= gamma) -- real drafts per row; row b keeps at most
        draft_len_b tokens and the entries after them are ignored.
    """
    lens = _validate(draft_tokens, draft_probs, target_probs, draft_len)
    target = target_probs.float()
    p_tok, q_tok = _probs_of_drafts(draft_tokens, draft_probs, target)
    u = torch.rand(p_tok.shape, generator=generator, device=p_tok.device)
    # u * q < p  <=>  u < p / q, with q = 0 (a draft outside q's support) accepted iff p > 0.
    kept = (u * q_tok < p_tok) & _real(lens, draft_tokens.shape[1])
    accepted = kept.long().cumprod(dim=1).sum(dim=1)
    extra = _sample_extra(draft_tokens, draft_probs, target, accepted, lens, None, generator)
    return _result(draft_tokens, accepted, extra)


def verify_block(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
    draft_len: torch.Tensor | None = None,
) -> VerifyResult:
    """Block verification (Sun et al. 2024, "Block Verification Accelerates Speculative Decoding",
    Algorithm 2): lossless, and its expected number of kept drafts is never below token-wise.

    With p_i = target_probs[:, i] and q_i = draft_probs[:, i] (draft L = draft_len_b per row):

    * running weights  w_0 = 1,  w_i = min(1, w_{i-1} p_{i-1}(x_i) / q_{i-1}(x_i))  (0-based p, q);
    * stop probabilities  h_L = w_L  and, for i < L,
      h_i = rho_i / (rho_i + 1 - w_i)  with  rho_i = sum_x max(0, w_i p_i(x) - q_i(x));
    * draw eta_1..eta_L ~ U(0, 1) and keep tau = the largest i with eta_i < h_i (0 if none): the
      decision looks at the whole block, so a late draft that the target likes can rescue an early
      one that token-wise verification would have rejected;
    * the extra token comes from p_L if tau = L, else from the modified residual
      norm(max(0, w_tau p_tau - q_tau)).

    Arguments and shapes are those of :func:`verify_tokenwise`.
    """
    lens = _validate(draft_tokens, draft_probs, target_probs, draft_len)
    target = target_probs.float()
    p_tok, q_tok = _probs_of_drafts(draft_tokens, draft_probs, target)
    weights = _block_weights(p_tok, q_tok)
    stop = _block_stop_probs(draft_tokens, draft_probs, target, weights, lens)
    eta = torch.rand(p_tok.shape, generator=generator, device=p_tok.device)
    always = torch.ones(eta.shape[0], 1, dtype=torch.bool, device=eta.device)  # h_0 = 1
    stops = torch.cat([always, eta < stop[:, 1:]], dim=1)
    positions = torch.arange(stops.shape[1], device=stops.device)
    accepted = torch.where(stops, positions, 0).amax(dim=1)
    weight = weights.gather(1, accepted[:, None]).squeeze(1)
    extra = _sample_extra(draft_tokens, draft_probs, target, accepted, lens, weight, generator)
    return _result(draft_tokens, accepted, extra)


def verify_greedy(
    draft_tokens: torch.Tensor,
    target_argmax: torch.Tensor,
    draft_len: torch.Tensor | None = None,
) -> VerifyResult:
    """Temperature-0 verification: keep drafts while they equal the target argmax, then emit it.

    draft_tokens: (B, gamma) int64.
    target_argmax: (B, gamma + 1) int64 -- argmax of the target logits after x_1..x_{i-1}.
    draft_len: (B,) int64 in [0, gamma] or None (= gamma).
    """
    batch, gamma = draft_tokens.shape
    if target_argmax.shape != (batch, gamma + 1):
        raise ValueError(
            f"target_argmax must be (B, gamma + 1) = {(batch, gamma + 1)}, got {tuple(target_argmax.shape)}"
        )
    lens = _lengths(draft_len, batch, gamma, draft_tokens.device)
    match = (draft_tokens == target_argmax[:, :gamma]) & _real(lens, gamma)
    accepted = match.long().cumprod(dim=1).sum(dim=1)
    extra = target_argmax.gather(1, accepted[:, None]).squeeze(1)
    return _result(draft_tokens, accepted, extra)


def verify_tree_greedy(tree: DraftTree, target_argmax: torch.Tensor) -> TreeVerifyResult:
    """Temperature-0 verification of a draft tree (Token Recycling, Luo et al. 2024).

    A node is kept when its token equals the target argmax at its parent and its parent is kept
    (the root, the last committed token, is always kept).  The accepted node is the deepest kept
    node (ties -> lowest index); the bonus token is the target argmax at it.

    tree: a :class:`DraftTree` with S nodes, ``tokens`` (B, S), shared or per-row shape; dead
        (not ``live``) nodes are never kept.
    target_argmax: (B, S) int64 -- argmax of the target logits at every tree node (the forward ran
        with ``tree.tree_mask()``).
    """
    batch, size = tree.tokens.shape
    if target_argmax.shape != (batch, size):
        raise ValueError(f"target_argmax must be (B, S) = {(batch, size)}, got {tuple(target_argmax.shape)}")
    device = tree.tokens.device
    parents = tree.parents.to(device).expand(batch, size)
    depth = tree.depth.to(device).expand(batch, size)
    ancestors = tree.tree_mask().to(device).expand(batch, size, size)  # [b, i, j] = j is an ancestor-or-self of i
    match = tree.tokens == target_argmax.gather(1, parents.clamp(min=0))
    if tree.live is not None:
        match &= tree.live.to(device)
    match[:, 0] = True
    kept = ~((~match)[:, None, :] & ancestors).any(dim=-1)  # (B, S)
    index = torch.arange(size, device=device)
    score = torch.where(kept, depth * size + (size - 1 - index), -1)
    best = score.argmax(dim=1)  # (B,)
    accepted = depth.gather(1, best[:, None]).squeeze(1)
    width = int(depth.max()) + 1
    on_path = ancestors[torch.arange(batch, device=device), best]  # (B, S); parents precede children
    path = torch.where(on_path, index, size).sort(dim=1).values[:, :width]
    path = torch.where(path < size, path, -1)
    drafted = tree.tokens.gather(1, path[:, 1:].clamp(min=0))
    bonus = target_argmax.gather(1, best[:, None])
    tokens = torch.cat([drafted, torch.full_like(bonus, -1)], dim=1)
    tokens = _place_extra(tokens, accepted, bonus.squeeze(1))
    return TreeVerifyResult(accepted=accepted, path=path, tokens=tokens)


def _validate(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    draft_len: torch.Tensor | None,
) -> torch.Tensor:
    """Check shapes; return the per-row draft lengths (B,) int64."""
    if draft_tokens.dim() != 2:
        raise ValueError(f"draft_tokens must be (B, gamma), got {tuple(draft_tokens.shape)}")
    batch, gamma = draft_tokens.shape
    if target_probs.dim() != 3 or target_probs.shape[:2] != (batch, gamma + 1):
        raise ValueError(
            f"target_probs must be (B, gamma + 1, V) with (B, gamma) = {(batch, gamma)}, "
            f"got {tuple(target_probs.shape)}"
        )
    if draft_probs is not None and draft_probs.shape != (batch, gamma, target_probs.shape[2]):
        raise ValueError(
            f"draft_probs must be (B, gamma, V) = {(batch, gamma, target_probs.shape[2])}, "
            f"got {tuple(draft_probs.shape)}"
        )
    return _lengths(draft_len, batch, gamma, draft_tokens.device)


def _lengths(draft_len: torch.Tensor | None, batch: int, gamma: int, device: torch.device) -> torch.Tensor:
    """draft_len (B,) or None -> (B,) int64 in [0, gamma]."""
    if draft_len is None:
        return torch.full((batch,), gamma, dtype=torch.long, device=device)
    lens = draft_len.to(device=device, dtype=torch.long)
    if lens.shape != (batch,) or bool(((lens < 0) | (lens > gamma)).any()):
        raise ValueError(f"draft_len must be (B,) = ({batch},) with values in [0, {gamma}], got {draft_len.tolist()}")
    return lens


def _real(lens: torch.Tensor, gamma: int) -> torch.Tensor:
    """(B,) lengths -> (B, gamma) bool, True at the real draft positions."""
    return torch.arange(gamma, device=lens.device)[None, :] < lens[:, None]


def _probs_of_drafts(
    draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(p_i(x_i), q_i(x_i)), each (B, gamma) float32; q is 1 for a deterministic drafter."""
    gamma = draft_tokens.shape[1]
    index = draft_tokens.clamp(0, target.shape[-1] - 1)[..., None]  # padding may be -1
    p_tok = target[:, :gamma].gather(-1, index).squeeze(-1)
    if draft_probs is None:
        return p_tok, torch.ones_like(p_tok)
    return p_tok, draft_probs.float().gather(-1, index).squeeze(-1)


def _draft_dist_at(
    draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None, position: torch.Tensor, vocab: int
) -> torch.Tensor:
    """q at one position per row: position (B,) int64 -> (B, V) float32 (zeros past the drafts)."""
    batch, gamma = draft_tokens.shape
    if gamma == 0:
        return torch.zeros(batch, vocab, device=draft_tokens.device)
    safe = position.clamp(max=gamma - 1)
    if draft_probs is None:
        token = draft_tokens.gather(1, safe[:, None]).squeeze(1).clamp(0, vocab - 1)
        dist = torch.nn.functional.one_hot(token, vocab).float()
    else:
        dist = draft_probs[torch.arange(batch, device=safe.device), safe].float()
    return dist * (position < gamma)[:, None]


def _block_weights(p_tok: torch.Tensor, q_tok: torch.Tensor) -> torch.Tensor:
    """Running weights w (B, gamma + 1): w_0 = 1, w_i = min(1, w_{i-1} p(x_i) / q(x_i))."""
    ratio = p_tok / q_tok.clamp_min(_TINY)
    weights = [p_tok.new_ones(p_tok.shape[0])]
    for i in range(p_tok.shape[1]):
        weights.append(torch.clamp(weights[-1] * ratio[:, i], max=1.0))
    return torch.stack(weights, dim=1)


def _block_stop_probs(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target: torch.Tensor,
    weights: torch.Tensor,
    lens: torch.Tensor,
) -> torch.Tensor:
    """Stop probabilities h (B, gamma + 1) of block verification (h_0 = 1, h_L = w_L, 0 after L)."""
    batch, gamma = draft_tokens.shape
    vocab = target.shape[-1]
    stop = [weights.new_ones(batch)]
    for i in range(1, gamma):
        q_i = _draft_dist_at(draft_tokens, draft_probs, torch.full_like(lens, i), vocab)
        rho = (weights[:, i, None] * target[:, i] - q_i).clamp_min(0.0).sum(dim=-1)
        denom = rho + (1.0 - weights[:, i])
        # denom = 0 only where w_i = 1 and q_i = p_i: a state that stops with probability 0.
        stop.append(torch.where(denom > 0, rho / denom.clamp_min(_TINY), 1.0).clamp(0.0, 1.0))
    stop.append(weights.new_ones(batch))
    h = torch.stack(stop, dim=1)[:, : gamma + 1]
    positions = torch.arange(gamma + 1, device=h.device)[None, :]
    h = torch.where(positions == lens[:, None], weights, h)
    return torch.where(positions > lens[:, None], 0.0, h)


def _sample_extra(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target: torch.Tensor,
    accepted: torch.Tensor,
    lens: torch.Tensor,
    weight: torch.Tensor | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The extra token (B,) int64: from p_tau when every real draft was kept, otherwise from the
    residual norm(max(0, weight * p_tau - q_tau)) (weight = 1 for token-wise verification)."""
    rows = torch.arange(target.shape[0], device=target.device)
    p = target[rows, accepted]  # (B, V)
    q = _draft_dist_at(draft_tokens, draft_probs, accepted, target.shape[-1])
    scaled = p if weight is None else weight[:, None] * p
    residual = (scaled - q).clamp_min(0.0)
    # A zero residual has probability 0 of being reached; fall back to p to stay well defined.
    use_target = (accepted == lens) | (residual.sum(dim=-1) <= 0)
    dist = torch.where(use_target[:, None], p, residual)
    return torch.multinomial(dist, 1, generator=generator).squeeze(1)


def _result(draft_tokens: torch.Tensor, accepted: torch.Tensor, extra: torch.Tensor) -> VerifyResult:
    """Assemble (B, gamma + 1) tokens: kept drafts, the extra token, then -1."""
    pad = torch.full((draft_tokens.shape[0], 1), -1, dtype=draft_tokens.dtype, device=draft_tokens.device)
    padded = torch.cat([draft_tokens, pad], dim=1)
    return VerifyResult(accepted=accepted, tokens=_place_extra(padded, accepted, extra))


def _place_extra(tokens: torch.Tensor, accepted: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
    """tokens (B, W): keep [:accepted], put extra (B,) at accepted, -1 after."""
    positions = torch.arange(tokens.shape[1], device=tokens.device)[None, :]
    out = torch.where(positions < accepted[:, None], tokens, -1)
    return torch.where(positions == accepted[:, None], extra[:, None], out)
