"""The soak's client side: one streaming request with an optional cancel point, and an RSS sampler."""
from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from proto.api import pb, pb_grpc

# Prompt token ids are drawn from a range every tokenizer of the embedded model's size has.
_TOKEN_RANGE = (100, 10_000)
GREEDY_TOKENS = 16  # output length of the fixed greedy prompts


@dataclass(frozen=True)
class Plan:
    """One request of the run, fixed by the seed before anything is sent."""
    index: int
    prompt: tuple[int, ...]
    max_tokens: int
    cancel_after: int | None  # tokens received before the client cancels (0: before the first); None: never
    greedy_ref: int | None = None  # which fixed greedy prompt it is (its undisturbed output must match)


@dataclass
class Outcome:
    plan: Plan
    code: grpc.StatusCode = grpc.StatusCode.OK
    details: str = ""
    token_ids: list[int] = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0
    decode_worker: str = ""  # the decode worker that finished it (FinalResult timings)


def mixed_plans(n: int, seed: int, greedy_prompts: list[tuple[int, ...]], cancel_share: float,
                greedy_every: int) -> list[Plan]:
    """Mixed prompt lengths (4..160 tokens) and outputs (1..16 tokens); a share cancelled at random points;
    every greedy_every-th request is one of the fixed greedy prompts (never cancelled)."""
    rng = random.Random(seed)
    plans = []
    for i in range(n):
        if i % greedy_every == greedy_every // 2:
            ref = (i // greedy_every) % len(greedy_prompts)
            plans.append(Plan(i, greedy_prompts[ref], GREEDY_TOKENS, None, ref))
            continue
        length = rng.choice((rng.randint(4, 24), rng.randint(24, 80), rng.randint(80, 160)))
        prompt = tuple(rng.randint(*_TOKEN_RANGE) for _ in range(length))
        max_tokens = rng.randint(1, 16)
        cancel = rng.randint(0, max_tokens - 1) if rng.random() < cancel_share else None
        plans.append(Plan(i, prompt, max_tokens, cancel))
    return plans


def run_one(stub: pb_grpc.PDServeStub, plan: Plan, timeout_s: float,
            on_tokens: Callable[[int], None] | None = None) -> Outcome:
    """Streams one request; on_tokens(count so far) runs after each delta (a fault trigger)."""
    out = Outcome(plan, started=time.monotonic())
    sampling = pb.SamplingOptions(max_tokens=plan.max_tokens, ignore_eos=True)
    call = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=plan.prompt), sampling=sampling),
                         timeout=timeout_s)
    try:
        if plan.cancel_after == 0:
            call.cancel()
        for response in call:
            if response.HasField("delta"):
                out.token_ids += response.delta.token_ids
                if on_tokens is not None:
                    on_tokens(len(out.token_ids))
                if plan.cancel_after is not None and len(out.token_ids) >= plan.cancel_after:
                    call.cancel()
            else:
                out.decode_worker = response.final.timings.decode_worker
    except grpc.RpcError as e:
        out.code, out.details = e.code(), e.details() or ""
    out.ended = time.monotonic()
    return out


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class RssSampler:
    """Samples a process's resident set every period_s on a thread (start, peak and end are reported)."""

    def __init__(self, pid: int, period_s: float = 0.5) -> None:
        self.pid, self.period_s = pid, period_s
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self.samples.append(rss_bytes(self.pid))
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(rss_bytes(self.pid))

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.samples.append(rss_bytes(self.pid))
