"""Rejection-sampled verification emits the target's distribution (chi-square, fixed seeds), seeded."""
from __future__ import annotations

import math

import pytest
import torch

from contracts.sampling import SamplingParams
from engine.sampler import processed_probs, sample
from engine.spec.rejection import accept_or_resample, draft_seed, rejection_verify, verify_draws

pytestmark = pytest.mark.timeout(120)

VOCAB = 6
K = 2
# A toy Markov "language": the next token's logits depend on the previous token only. The drafter's table
# is a perturbed copy, so drafts are often but not always accepted.
_GEN = torch.Generator().manual_seed(1234)
TARGET = torch.randn(VOCAB, VOCAB, generator=_GEN) * 1.2
DRAFTER = TARGET + torch.randn(VOCAB, VOCAB, generator=_GEN) * 0.9


def chi2_critical(df: int, z: float = 4.26) -> float:
    """Wilson–Hilferty upper quantile of chi-square(df) at standard-normal z (4.26: p ≈ 1e-5)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """(statistic, degrees of freedom) over the cells of positive probability; none outside them may occur."""
    support = probs > 0
    assert counts[~support].sum() == 0, "a token of probability 0 was emitted"
    expected = probs[support] * counts.sum()
    return float(((counts[support] - expected) ** 2 / expected).sum()), int(support.sum()) - 1


def speculate(params: SamplingParams, n: int, sampled_drafts: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """n independent rows from context token 0: K drafts (sampled from the drafter's processed table, or its
    argmax), one rejection-sampled verify, and the next target step where the verify emitted one token.
    Returns the first two emitted tokens [n, 2] and the accepted counts."""
    first = [4 * i for i in range(n)]  # distinct positions: every row's draws are independent
    rows = [params] * n
    drafter_params = [SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                                     seed=draft_seed(params.seed))] * n
    context = torch.zeros(n, dtype=torch.long)
    drafts, draft_probs = [], []
    for j in range(K):
        logits = DRAFTER[context]
        draft_probs.append(processed_probs(logits, rows))
        context = (sample(logits, drafter_params, [p + j for p in first]) if sampled_drafts
                   else logits.argmax(dim=-1))
        drafts.append(context)
    draft_ids = torch.stack(drafts, dim=1)
    inputs = torch.cat([torch.zeros(n, 1, dtype=torch.long), draft_ids], dim=1)  # slot j reads token j-1
    verified = rejection_verify(TARGET[inputs], rows, first, draft_ids,
                                torch.stack(draft_probs, dim=1) if sampled_drafts else None,
                                torch.full((n,), K))
    tokens = verified.token_ids
    # Rows that emitted one token go on with a plain target step at the next position.
    nxt = sample(TARGET[tokens[:, 0]], rows, [p + 1 for p in first])
    second = torch.where(verified.num_accepted >= 1, tokens[:, 1], nxt)
    return torch.stack([tokens[:, 0], second], dim=1), verified.num_accepted


def expected(params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's own distributions: first token from context 0, and the pair."""
    table = processed_probs(TARGET, [params] * VOCAB)  # row c: next-token distribution after c
    return table[0], table[0].unsqueeze(1) * table


CASES = [SamplingParams(temperature=1.0, seed=7),
         SamplingParams(temperature=0.8, top_k=4, top_p=0.9, seed=8)]


@pytest.mark.parametrize("params", CASES, ids=["t1", "top-k-top-p"])
@pytest.mark.parametrize("sampled_drafts", [True, False], ids=["sampled-drafts", "argmax-drafts"])
def test_first_token_and_pair_follow_the_target_distribution(params: SamplingParams,
                                                             sampled_drafts: bool) -> None:
    n = 20000
    tokens, accepted = speculate(params, n, sampled_drafts)
    first, pair = expected(params)
    stat, df = chi_square(torch.bincount(tokens[:, 0], minlength=VOCAB).float(), first)
    assert stat < chi2_critical(df)
    pairs = torch.bincount(tokens[:, 0] * VOCAB + tokens[:, 1], minlength=VOCAB * VOCAB).float()
    stat, df = chi_square(pairs, pair.flatten())
    assert stat < chi2_critical(df)
    assert 0 < accepted.float().mean() < K  # the test exercises both acceptance and rejection


def test_sampled_drafts_are_accepted_at_the_rate_sum_of_min_p_q() -> None:
    # The first draft's acceptance probability is sum_x min(p(x), q(x)).
    params = CASES[0]
    _, accepted = speculate(params, 20000, sampled_drafts=True)
    p = processed_probs(TARGET[:1], [params])[0]
    q = processed_probs(DRAFTER[:1], [params])[0]
    rate = float((accepted >= 1).float().mean())
    assert abs(rate - float(torch.minimum(p, q).sum())) < 0.015  # 4.5 sigma at n = 20000


def test_without_drafts_and_for_the_bonus_token_it_draws_what_the_plain_sampler_draws() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, K + 1, 50, generator=gen)
    params = [SamplingParams(temperature=0.9, top_k=20, seed=s) for s in range(5)]
    first = [10, 3, 7, 0, 22]
    drafts = torch.randint(0, 50, (5, K), generator=gen)
    none = rejection_verify(logits, params, first, drafts, None, torch.zeros(5, dtype=torch.long))
    assert none.num_accepted.tolist() == [0] * 5
    assert none.token_ids[:, 0].tolist() == sample(logits[:, 0], params, first).tolist()
    # Drafts of probability 1 under q and p: all accepted, the bonus is the plain sampler's at its position.
    slots = torch.cat([drafts, drafts[:, :1]], 1).unsqueeze(2)
    certain = torch.full_like(logits, -1e9).scatter_(2, slots, 0.0)
    certain[:, K] = logits[:, K]
    q = processed_probs(certain[:, :K].reshape(-1, 50), [p for p in params for _ in range(K)]).view(5, K, 50)
    full = rejection_verify(certain, params, first, drafts, q, torch.full((5,), K))
    assert full.num_accepted.tolist() == [K] * 5
    assert full.token_ids[:, :K].tolist() == drafts.tolist()
    assert full.token_ids[:, K].tolist() == sample(logits[:, K], params, [f + K for f in first]).tolist()


def test_greedy_rows_keep_the_argmax_prefix_and_emit_the_argmax() -> None:
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 4, 30, generator=gen)
    argmax = logits.argmax(-1)
    drafts = argmax[:, :3].clone()
    drafts[0, 1] = (drafts[0, 1] + 1) % 30  # row 0: second draft wrong; row 1: all right; row 2: one draft
    out = rejection_verify(logits, [SamplingParams()] * 3, [5, 5, 5], drafts, torch.rand(3, 3, 30),
                           torch.tensor([3, 3, 1]))
    assert out.num_accepted.tolist() == [1, 3, 1]
    assert out.token_ids.tolist() == [[drafts[0, 0], argmax[0, 1], -1, -1], argmax[1].tolist(),
                                      [drafts[2, 0], argmax[2, 1], -1, -1]]


def test_seeded_verify_repeats_whatever_else_is_in_the_batch() -> None:
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(4, K + 1, 40, generator=gen)
    drafts = torch.randint(0, 40, (4, K), generator=gen)
    q = torch.softmax(torch.randn(4, K, 40, generator=gen), -1)
    params = [SamplingParams(temperature=1.0, seed=s) for s in (1, 2, 3, 4)]
    first = [8, 9, 10, 11]
    nd = torch.full((4,), K)
    whole = rejection_verify(logits, params, first, drafts, q, nd)
    again = rejection_verify(logits, params, first, drafts, q, nd)
    alone = rejection_verify(logits[2:3], params[2:3], first[2:3], drafts[2:3], q[2:3], nd[2:3])
    assert torch.equal(whole.token_ids, again.token_ids)
    assert torch.equal(whole.token_ids[2:3], alone.token_ids)


def test_the_replacement_token_never_equals_the_rejected_draft() -> None:
    # p == q exactly except where rounding decides: the residual is empty and the fallback must skip x.
    n, vocab = 2000, 5
    p = torch.softmax(torch.randn(n, 2, vocab, generator=torch.Generator().manual_seed(6)), -1)
    drafts = torch.randint(0, vocab, (n, 1), generator=torch.Generator().manual_seed(7))
    params = [SamplingParams(temperature=1.0)] * n
    accept_u, noise = verify_draws(params, [0] * n, 2, vocab, torch.device("cpu"))
    out = accept_or_resample(p, drafts, p[:, :1] * 1.5, torch.ones(n, dtype=torch.long), accept_u, noise)
    rejected = out.num_accepted == 0
    assert rejected.any()
    assert (out.token_ids[rejected, 0] != drafts[rejected, 0]).all()
