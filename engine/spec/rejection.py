"""Rejection-sampled verification of sampled drafts: the emitted tokens follow the target's distribution."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from contracts.sampling import SamplingParams
from engine.sampler import fresh_generator, processed_probs, seeded_generator

# Drafters that sample seed their draws with (seed ^ DRAFT_SEED_SALT, position): the residual draw after a
# rejection must be independent of the draft it replaces, so the drafter never reuses the verifier's noise.
DRAFT_SEED_SALT = 0x5EC0DE


def draft_seed(seed: int) -> int:
    """The seed a sampling drafter draws its proposals with, for a request seeded `seed`."""
    return seed ^ DRAFT_SEED_SALT


@dataclass(frozen=True)
class Verified:
    """What one verify forward emits per row: accepted drafts, then the target's own token."""

    num_accepted: torch.Tensor  # [N] int64: leading drafts kept
    # [N, K + 1] int64: the accepted drafts, the target's token at column num_accepted (a replacement for
    # the first rejected draft, or the bonus after all k), -1 after it. The replacement never equals the
    # draft it replaces, so "accept while sampled == draft" over these rows gives back num_accepted.
    token_ids: torch.Tensor


def accept_or_resample(target_probs: torch.Tensor, draft_ids: torch.Tensor, draft_probs: torch.Tensor | None,
                       num_drafts: torch.Tensor, accept_u: torch.Tensor, noise: torch.Tensor) -> Verified:
    """Speculative sampling (Leviathan et al. 2023, Chen et al. 2023), batched over rows.

    target_probs [N, K+1, V]: the target's processed distribution at each verify slot (slot j follows draft
    j-1); draft_ids [N, K] drafted x_j ~ q_j; draft_probs [N, K, V] the drafter's q_j after the same
    processing, or None for deterministic drafts (q one-hot at x_j); num_drafts [N] real drafts per row (the
    rest is padding); accept_u [N, K] U(0, 1); noise [N, K+1, V] Exp(1) race noise. Draft j is kept with
    probability min(1, p_j(x_j) / q_j(x_j)); at the first rejection the token comes from
    norm(max(0, p_j - q_j)), after all accepted from p_{k+1}.
    """
    n, slots, vocab = target_probs.shape
    k = slots - 1
    rows = torch.arange(n, device=target_probs.device)
    if k == 0:
        num_accepted = torch.zeros(n, dtype=torch.int64, device=target_probs.device)
        return Verified(num_accepted, (target_probs[:, 0] / noise[:, 0]).argmax(dim=-1, keepdim=True))
    safe_ids = draft_ids.clamp_min(0)  # padding ids may be negative; they are never accepted
    p_x = target_probs[:, :k].gather(2, safe_ids.unsqueeze(2)).squeeze(2)
    q_x = (torch.ones_like(p_x) if draft_probs is None
           else draft_probs.gather(2, safe_ids.unsqueeze(2)).squeeze(2))
    real = torch.arange(k, device=draft_ids.device).unsqueeze(0) < num_drafts.unsqueeze(1)
    keep = (accept_u * q_x < p_x) & real  # u < p/q without dividing by q
    num_accepted = keep.long().cumprod(dim=1).sum(dim=1)

    p_a = target_probs[rows, num_accepted]  # [N, V]: the distribution the emitted token comes from
    last = num_accepted.clamp_max(k - 1)
    x_a = safe_ids[rows, last].unsqueeze(1)
    q_a = (torch.zeros_like(p_a).scatter_(1, x_a, 1.0) if draft_probs is None
           else draft_probs[rows, last])
    # The rejected draft gets weight 0 explicitly: mathematically already (p(x) < u q(x) <= q(x)), and the
    # scheduler's "accept while equal" then can never run past the rejection on a rounding tie.
    residual = (p_a - q_a).clamp_min_(0).scatter_(1, x_a, 0.0)
    fallback = p_a.scatter(1, x_a, 0.0)  # p == q up to rounding: the residual is empty
    residual = torch.where(residual.sum(dim=1, keepdim=True) > 0, residual, fallback)
    rejected = (num_accepted < num_drafts).unsqueeze(1)
    weights = torch.where(rejected, residual, p_a)
    # The race needs no normalisation: argmax w / E picks i with probability w_i / sum(w).
    token = (weights / noise[rows, num_accepted]).argmax(dim=-1)
    return Verified(num_accepted, _emitted(draft_ids, num_accepted, token))


def _emitted(draft_ids: torch.Tensor, num_accepted: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """[N, K+1]: drafts before num_accepted, `token` at it, -1 after."""
    n, k = draft_ids.shape
    cols = torch.arange(k + 1, device=draft_ids.device).unsqueeze(0)
    padded = torch.cat([draft_ids, draft_ids.new_full((n, 1), -1)], dim=1)
    at = num_accepted.unsqueeze(1)
    return torch.where(cols < at, padded, torch.where(cols == at, token.unsqueeze(1), -1))


def verify_draws(params: Sequence[SamplingParams], first_positions: Sequence[int], slots: int, vocab: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(accept_u [N, slots-1], race noise [N, slots, V]) of a verify, slot j of row i at position
    first_positions[i] + j (the index its emitted token takes in the sequence).

    A seeded row draws slot j from its (seed, position) generator: first the V race uniforms — exactly the
    plain sampler's, so a token that is not a replacement is the one a non-speculative step would sample —
    then the acceptance uniform. Unseeded rows share one fresh generator.
    """
    n = len(params)
    uniform = torch.empty(n, slots, vocab, dtype=torch.float32, device=device)
    accept_u = torch.empty(n, slots, dtype=torch.float32, device=device)
    if any(not p.greedy and p.seed is None for p in params):
        fresh = fresh_generator(device)
        uniform.uniform_(generator=fresh)
        accept_u.uniform_(generator=fresh)
    for i, p in enumerate(params):
        if p.greedy or p.seed is None:
            continue
        for j in range(slots):
            gen = seeded_generator(p.seed, first_positions[i] + j, device)
            uniform[i, j].uniform_(generator=gen)
            accept_u[i, j:j + 1].uniform_(generator=gen)
    return accept_u[:, :-1], uniform.log_().neg_().clamp_min_(1e-20)


def rejection_verify(target_logits: torch.Tensor, params: Sequence[SamplingParams],
                     first_positions: Sequence[int], draft_ids: torch.Tensor,
                     draft_probs: torch.Tensor | None, num_drafts: torch.Tensor) -> Verified:
    """Verify a batch of chains: target_logits [N, K+1, V] (raw), drafts as in `accept_or_resample` (their
    probabilities already processed by `processed_probs` with the same params). Greedy rows keep drafts
    while they equal the target's argmax and emit the argmax, as plain greedy decoding would."""
    n, slots, vocab = target_logits.shape
    k = slots - 1
    greedy_ids = target_logits.argmax(dim=-1)  # [N, K+1]
    cols = torch.arange(k, device=target_logits.device).unsqueeze(0)
    match = (draft_ids == greedy_ids[:, :k]) & (cols < num_drafts.unsqueeze(1))
    greedy_accepted = match.long().cumprod(dim=1).sum(dim=1)
    rows = torch.arange(n, device=target_logits.device)
    greedy = Verified(greedy_accepted,
                      _emitted(draft_ids, greedy_accepted, greedy_ids[rows, greedy_accepted]))
    if all(p.greedy for p in params):
        return greedy
    per_slot = [p for p in params for _ in range(slots)]
    target_probs = processed_probs(target_logits.reshape(n * slots, vocab), per_slot).view(n, slots, vocab)
    accept_u, noise = verify_draws(params, first_positions, slots, vocab, target_logits.device)
    sampled = accept_or_resample(target_probs, draft_ids, draft_probs, num_drafts, accept_u, noise)
    is_greedy = torch.tensor([p.greedy for p in params], device=target_logits.device)
    return Verified(torch.where(is_greedy, greedy.num_accepted, sampled.num_accepted),
                    torch.where(is_greedy.unsqueeze(1), greedy.token_ids, sampled.token_ids))
