"""The simulator's step costs: prefill ms vs tokens, decode ms vs batch and context, KV transfer time."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from bench.serving.sim_spread import StepSpread

GOLDEN = (5 ** 0.5 - 1) / 2


@dataclass(frozen=True)
class PrefillCost:
    """One prefill step over chunks: a fixed part, a per-token part and causal attention's token-pair part.
    ms = fixed + per_token * sum(chunk) + per_pair * sum(chunk * (context_before + chunk / 2))."""
    fixed_ms: float
    per_token_ms: float
    per_pair_ms: float = 0.0

    def step_ms(self, chunks: list[tuple[int, int]]) -> float:
        """chunks: (tokens computed this step, tokens of the prompt already computed before it)."""
        return self.fixed_ms + self.marginal_ms(chunks)

    def marginal_ms(self, chunks: list[tuple[int, int]]) -> float:
        """What the chunks add to a step that already pays the fixed part (a split-fused decode step)."""
        tokens = sum(c for c, _ in chunks)
        pairs = sum(c * (before + c / 2) for c, before in chunks)
        return self.per_token_ms * tokens + self.per_pair_ms * pairs


@dataclass(frozen=True)
class DecodeCost:
    """One decode step: ms = fixed + per_seq * batch + per_ctx_token * (the batch's summed context)."""
    fixed_ms: float
    per_seq_ms: float
    per_ctx_token_ms: float = 0.0

    def step_ms(self, batch: int, total_context: int) -> float:
        return self.fixed_ms + self.per_seq_ms * batch + self.per_ctx_token_ms * total_context


@dataclass(frozen=True)
class TransferCost:
    """KV of a prompt streamed layer by layer while the prefill computes (the real sender's layer hook): the
    exposed part is the last layer's share, or what the link cannot hide behind the final step's compute."""
    kv_bytes_per_token: int  # all layers, k and v
    num_layers: int
    gb_per_s: float
    latency_ms: float = 0.0  # per transfer: handshake, FINAL frame, activation hop

    def total_ms(self, tokens: int) -> float:
        return tokens * self.kv_bytes_per_token / (self.gb_per_s * 1e9) * 1e3

    def exposed_ms(self, tokens: int, final_step_ms: float) -> float:
        total = self.total_ms(tokens)
        hidden = final_step_ms * (self.num_layers - 1) / self.num_layers
        return self.latency_ms + max(total / self.num_layers, total - hidden)


@dataclass(frozen=True)
class StepCosts:
    """Everything the event loop charges time for; `source` says where each number came from."""
    prefill: PrefillCost
    decode: DecodeCost
    transfer: TransferCost
    router_ms: float = 0.0  # per request, arrival -> dispatched
    contention: float = 0.0  # workers sharing one host: a step costs (1 + contention * other busy workers)x
    # A decode step's own factor, where prefill (compute-bound) and decode (weight-streaming) steps slow each
    # other unequally on a shared host; None: `contention` for both.
    decode_contention: float | None = None
    source: dict[str, str] | None = None
    # The measured spread of router_ms: lone requests' TTFT minus the prefill fit, sorted (ms). Empty: none.
    path_jitter_ms: tuple[float, ...] = ()
    # The engine's step-to-step spread (sim_spread.py), fitted from its timed steps: the simulator draws
    # each step's time factor from it, seeded. None: every step costs exactly the model's ms (the H100
    # costs, and tests that need exact times).
    prefill_spread: StepSpread | None = None
    decode_spread: StepSpread | None = None
    # Host sharing fitted per placement kind (sim_host.py: unpinned, pinned, pinned-shared) as (contention,
    # decode_contention): pinned workers slow each other far less than unpinned ones. A kind not here
    # replays with `contention` / `decode_contention`.
    placement_contention: dict[str, tuple[float, float | None]] = field(default_factory=dict)

    def for_placement(self, kind: str) -> StepCosts:
        """The costs a run of this placement kind replays with: its kind's fitted host sharing if any."""
        if kind not in self.placement_contention:
            return self
        c, dc = self.placement_contention[kind]
        return replace(self, contention=c, decode_contention=dc)

    def contention_of(self, role: str) -> float:
        """The slowdown per other busy worker of a step on a worker of this role."""
        return self.decode_contention if role == "decode" and self.decode_contention is not None \
            else self.contention

    @property
    def shares_host(self) -> bool:
        return bool(self.contention or self.decode_contention)

    def path_ms(self, index: int) -> float:
        """Request `index`'s arrival -> dispatch latency: router_ms plus one of the measured residuals, picked
        by a low-discrepancy walk (frac((index + 1) x golden ratio)) so any stretch of requests sees the
        measured spread evenly and a run stays deterministic."""
        if not self.path_jitter_ms:
            return self.router_ms
        pick = int(((index + 1) * GOLDEN) % 1 * len(self.path_jitter_ms))
        return max(self.router_ms + self.path_jitter_ms[pick], 0.0)

    def with_tp(self, tp: int, efficiency: float) -> StepCosts:
        """Tensor parallelism over `tp` GPUs: compute and per-GPU bytes split tp ways at `efficiency` per
        doubling (all-reduce and smaller GEMMs), so a step costs 1 / (tp * efficiency ** log2(tp))."""
        if tp < 1 or tp & (tp - 1):
            raise ValueError(f"tp must be a power of two >= 1, got {tp}")
        # each GPU of the group sends its shard of the heads over its own link
        return replace(self._steps_times(1.0 / (tp * efficiency ** math.log2(tp))),
                       transfer=replace(self.transfer, gb_per_s=self.transfer.gb_per_s * tp))

    def slowed(self, factor: float) -> StepCosts:
        """Every step cost and the path's latency x factor: the same cluster on a host with 1/factor of
        the CPU to spare (a shared box's load changes run to run)."""
        return replace(self._steps_times(factor), router_ms=self.router_ms * factor,
                       path_jitter_ms=tuple(j * factor for j in self.path_jitter_ms))

    def _steps_times(self, k: float) -> StepCosts:
        p, d = self.prefill, self.decode
        return replace(self, prefill=PrefillCost(p.fixed_ms * k, p.per_token_ms * k, p.per_pair_ms * k),
                       decode=DecodeCost(d.fixed_ms * k, d.per_seq_ms * k, d.per_ctx_token_ms * k))

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> StepCosts:
        return StepCosts(prefill=PrefillCost(**d["prefill"]), decode=DecodeCost(**d["decode"]),
                         transfer=TransferCost(**d["transfer"]), router_ms=d.get("router_ms", 0.0),
                         contention=d.get("contention", 0.0), decode_contention=d.get("decode_contention"),
                         source=d.get("source"),
                         path_jitter_ms=tuple(d.get("path_jitter_ms", ())),
                         prefill_spread=StepSpread.from_dict(d.get("prefill_spread")),
                         decode_spread=StepSpread.from_dict(d.get("decode_spread")),
                         placement_contention={k: (c, dc) for k, (c, dc) in
                                               d.get("placement_contention", {}).items()})


def load_costs(path: str | Path) -> StepCosts:
    return StepCosts.from_dict(json.loads(Path(path).read_text()))


def save_costs(costs: StepCosts, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(costs.to_dict(), indent=1) + "\n")
