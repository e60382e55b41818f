"""Batched token sampling: greedy, temperature, top-k, top-p; seeded draws fixed by (seed, position)."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from contracts.sampling import SamplingParams

_MASK64 = (1 << 64) - 1


def position_seed(seed: int, position: int) -> int:
    """Seed for one request's draw at one position (splitmix64 mix), identical in every process."""
    z = (seed * 0x9E3779B97F4A7C15 + position + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)  # torch seeds must fit a signed 64-bit int


def argmax_rows(x: torch.Tensor, chunks: int = 64) -> torch.Tensor:
    """x.argmax(dim=-1) for [N, V], the first index on ties, in two passes over a long row when V allows.

    A one-row argmax over a 128k vocabulary runs as one thread block (~28 µs on an H100, most of a bs1
    step's sampling); chunk maxima first spread it over the GPU. The first chunk holding the row's maximum,
    and the first index of it within that chunk, give the same first index as one pass.
    """
    if x.shape[1] < 16 * 1024 or x.shape[1] % chunks or not x.is_cuda:
        return x.argmax(dim=-1)
    return argmax_two_pass(x, chunks)


def argmax_two_pass(x: torch.Tensor, chunks: int) -> torch.Tensor:
    """argmax_rows' two passes (any device; V a multiple of chunks)."""
    n, vocab = x.shape
    values, inner = x.view(n, chunks, vocab // chunks).max(dim=-1)  # [N, chunks] each
    chunk = values.argmax(dim=-1, keepdim=True)
    return (chunk * (vocab // chunks) + inner.gather(1, chunk)).squeeze(1)


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], positions: Sequence[int]) -> torch.Tensor:
    """Pick one token per row of `logits` [N, vocab]; returns int64 [N] on logits' device.

    `positions[i]` is the index the sampled token takes in its sequence. A seeded request draws its noise from
    (seed, position) alone, so the prefill worker (first token) and the decode worker (the rest) reproduce a
    colocated run, whatever else is in the batch. Unseeded requests share one freshly seeded generator.
    Sampling uses the exponential race (argmax p_i / E_i, E_i ~ Exp(1)), which equals multinomial sampling
    but needs no host sync. top-k keeps exactly k tokens (ties at the k-th value broken arbitrarily).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, vocab], got shape {tuple(logits.shape)}")
    n = logits.shape[0]
    if len(params) != n or len(positions) != n:
        raise ValueError(f"{n} logit rows but {len(params)} params and {len(positions)} positions")
    logits = logits.float()
    greedy_ids = argmax_rows(logits)
    if all(p.greedy for p in params):
        return greedy_ids

    probs = processed_probs(logits, params)
    noise = race_noise(params, positions, probs.shape, probs.device)
    sampled_ids = argmax_rows(probs / noise)

    greedy_mask = _to_device([p.greedy for p in params], torch.bool, logits.device)
    return torch.where(greedy_mask, greedy_ids, sampled_ids)


def processed_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Each row's sampling distribution [N, vocab] (float32): temperature, then top-k, then top-p, softmax.

    Greedy rows get temperature 1 and no filter (their callers take the argmax). Speculative verification
    applies this same function to the drafter's logits and the target's, so both sides are processed alike.
    """
    logits = logits.float()
    vocab = logits.shape[1]
    temps = _to_device([1.0 if p.greedy else p.temperature for p in params], torch.float32, logits.device)
    scaled = logits / temps.unsqueeze(1)
    if any(not p.greedy and (0 < p.top_k < vocab or p.top_p < 1.0) for p in params):
        scaled = _apply_top_k_top_p(scaled, params, vocab)
    return torch.softmax(scaled, dim=-1)


def seeded_generator(seed: int, position: int, device: torch.device) -> torch.Generator:
    """The generator of a seeded request's draws at one position (the sampler's race noise comes first)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(position_seed(seed, position))
    return gen


def fresh_generator(device: torch.device) -> torch.Generator:
    """A non-deterministically seeded generator, independent of the global torch RNG (unseeded requests)."""
    gen = torch.Generator(device=device)
    gen.seed()
    return gen


def race_noise(params: Sequence[SamplingParams], positions: Sequence[int], shape: torch.Size,
               device: torch.device) -> torch.Tensor:
    """Exp(1) noise [N, vocab] of the exponential race, row i seeded by (seed, positions[i]) when seeded."""
    # Exponential noise as -log(U): several times faster on CPU than Tensor.exponential_.
    uniform = torch.empty(shape, dtype=torch.float32, device=device)
    if any(not p.greedy and p.seed is None for p in params):
        uniform.uniform_(generator=fresh_generator(device))
    for i, p in enumerate(params):
        if not p.greedy and p.seed is not None:
            uniform[i].uniform_(generator=seeded_generator(p.seed, positions[i], device))
    return uniform.log_().neg_().clamp_min_(1e-20)  # U = 0 gives inf (that token loses); never divide by 0


def _apply_top_k_top_p(scaled: torch.Tensor, params: Sequence[SamplingParams], vocab: int) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k and then outside its top-p nucleus (of the top-k)."""
    device = scaled.device
    filtered = [not p.greedy and (0 < p.top_k < vocab or p.top_p < 1.0) for p in params]
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    # A full vocab sort is the slow part on CPU; when every filtered row has a top-k, the largest k suffices.
    width = max(k for k, f in zip(ks, filtered, strict=True) if f)
    if width < vocab:
        cand, order = scaled.topk(width, dim=-1)  # sorted, descending
    else:
        cand, order = scaled.sort(dim=-1, descending=True, stable=True)  # ties: lowest id first, as argmax
    ranks = torch.arange(width, device=device).unsqueeze(0)
    cand = cand.masked_fill(ranks >= _to_device(ks, torch.int64, device).unsqueeze(1), float("-inf"))
    cand_probs = torch.softmax(cand, dim=-1)
    mass_before = cand_probs.cumsum(dim=-1) - cand_probs
    # Keep a token while the mass of strictly better tokens is below top_p: the first token always stays.
    top_p = _to_device([p.top_p for p in params], torch.float32, device).unsqueeze(1)
    cand = cand.masked_fill(mass_before >= top_p, float("-inf"))
    masked = torch.full_like(scaled, float("-inf")).scatter_(-1, order, cand)
    return torch.where(_to_device(filtered, torch.bool, device).unsqueeze(1), masked, scaled)


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Per-request parameters as a tensor on `device` without a blocking host→device copy (no host sync)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)
