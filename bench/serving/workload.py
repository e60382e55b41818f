"""Synthesizes requests offline: seeded prompt/output lengths, random token-id prompts, shared prefixes."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

# Ids below 1000 hold special and byte tokens in common vocabularies; 30000 fits every model we serve.
DEFAULT_TOKEN_RANGE = (1000, 30000)


@dataclass(frozen=True)
class BenchRequest:
    """One request as sent: a prompt given as token ids (exact length) or as raw text (a trace's choice)."""
    max_tokens: int
    prompt_ids: tuple[int, ...] = ()
    text: str | None = None

    @property
    def prompt_tokens(self) -> int:
        """Known length for token-id prompts; 0 for text, whose length the server reports."""
        return len(self.prompt_ids)


@dataclass(frozen=True)
class LengthDist:
    """fixed:N, uniform:LOW:HIGH, or chat:MEDIAN:MAX (log-normal, sigma 1: many short turns, a long tail)."""
    kind: str
    a: int
    b: int = 0

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return self.a
        if self.kind == "uniform":
            return rng.randint(self.a, self.b)
        return max(1, min(self.b, round(rng.lognormvariate(math.log(self.a), 1.0))))

    def __str__(self) -> str:
        return f"{self.kind}:{self.a}" + (f":{self.b}" if self.kind != "fixed" else "")


def parse_length(text: str) -> LengthDist:
    """Parses a --prompt-len/--output-len value; ValueError names the accepted forms."""
    forms = "fixed:N, uniform:LOW:HIGH or chat:MEDIAN:MAX (whole numbers >= 1)"
    kind, _, rest = text.partition(":")
    try:
        nums = [int(x) for x in rest.split(":")] if rest else []
    except ValueError:
        raise ValueError(f"{text!r}: expected {forms}") from None
    want = {"fixed": 1, "uniform": 2, "chat": 2}.get(kind)
    if want is None or len(nums) != want or min(nums) < 1 or (want == 2 and nums[0] > nums[1]):
        raise ValueError(f"{text!r}: expected {forms}")
    return LengthDist(kind, *nums)


@dataclass(frozen=True)
class SharedPrefix:
    """N system prompts of prefix_len tokens, each shared by M users: a request is system + user turn."""
    systems: int
    users: int
    prefix_len: int


@dataclass(frozen=True)
class WorkloadSpec:
    num_requests: int
    prompt_len: LengthDist
    output_len: LengthDist
    seed: int = 0
    shared_prefix: SharedPrefix | None = None
    token_range: tuple[int, int] = DEFAULT_TOKEN_RANGE


def synthesize(spec: WorkloadSpec) -> list[BenchRequest]:
    """The same spec gives the same requests everywhere (one seeded generator, a fixed draw order)."""
    rng = random.Random(spec.seed)
    low, high = spec.token_range

    def ids(n: int) -> tuple[int, ...]:
        return tuple(rng.randrange(low, high) for _ in range(n))

    sp = spec.shared_prefix
    systems = [ids(sp.prefix_len) for _ in range(sp.systems)] if sp else []
    users = [ids(spec.prompt_len.sample(rng)) for _ in range(sp.systems * sp.users)] if sp else []
    out = []
    for k in range(spec.num_requests):
        if sp:
            # Users take turns in order, so every system prompt is in use from the first round on.
            user = k % len(users)
            prompt = systems[user % sp.systems] + users[user]
        else:
            prompt = ids(spec.prompt_len.sample(rng))
        out.append(BenchRequest(max_tokens=spec.output_len.sample(rng), prompt_ids=prompt))
    return out
