"""Adaptive draft length: each request drafts what its acceptance earns, and no more than the costs pay."""
from __future__ import annotations

import math
from collections.abc import Sequence

from engine.spec.cost_model import StepCosts


class AdaptiveK:
    """EWMA of accepted drafts per verify step, rounded, plus one → next draft length in 1..k (k when off).

    Drafting one more token than the target has lately accepted keeps a good request growing toward k while
    a poor one drops to 1 draft (one wasted verify row a step instead of k). Starts optimistic, at k.

    With `costs` (the engine's measured step costs), the length is also capped by what pays
    (StepCosts.draft_length, from this request's per-draft acceptance rate): 0 switches speculation off for
    the request, except every `probe_every`-th step of the engine (the costs' step clock), which drafts one
    token so the rate stays measured. Every request that runs plain probes on the same steps: a batch's
    step leaves the flat path when any of its sequences verifies, so probes spread over different steps
    would make most steps of a large batch verify steps.

    Tree drafts: the length is the tree's depth (levels of the tree drafted), `rows` what each depth costs.
    """

    def __init__(self, k: int, adaptive: bool = True, decay: float = 0.5, costs: StepCosts | None = None,
                 probe_every: int = 8, rows: Sequence[int] | None = None) -> None:
        if k < 1 or not 0.0 < decay < 1.0:
            raise ValueError(f"need k >= 1 and 0 < decay < 1, got k={k}, decay={decay}")
        self.max_k = k
        self.adaptive = adaptive
        self.decay = decay
        self.accepted_ewma = float(k)
        self.costs = costs
        self.probe_every = probe_every
        self.rows = rows  # tree drafts: verify rows of 1..k levels (StepCosts.draft_length)
        # Per-draft acceptance: accepted drafts over accepted + rejected ones (a step stops at its first
        # rejection), decayed per step; one optimistic pseudo-step to start.
        self._accepted, self._rejected = 1.0, 0.5

    def update(self, drafted: int, accepted: int) -> None:
        """One verify step's outcome; a step with no drafts teaches nothing."""
        if drafted:
            self.accepted_ewma = self.decay * self.accepted_ewma + (1.0 - self.decay) * accepted
            keep = 1.0 - (1.0 - self.decay) / 4  # slower than the length's EWMA: a rate needs more steps
            self._accepted = keep * self._accepted + accepted
            self._rejected = keep * self._rejected + (accepted < drafted)

    @property
    def acceptance(self) -> float:
        return self._accepted / (self._accepted + self._rejected)

    @property
    def k(self) -> int:
        """The acceptance rule's length (1..k), before any cost cap."""
        if not self.adaptive:
            return self.max_k
        # Rounded, not floored: a request fully accepting 1 draft (EWMA approaching 1 from below) must grow.
        return max(1, min(self.max_k, math.floor(self.accepted_ewma + 0.5) + 1))

    def next(self, sequences: int) -> int:
        """Drafts for this request's next step when `sequences` decode together (0: a plain step)."""
        k = self.k
        if not self.adaptive or self.costs is None:
            return k
        paid = self.costs.draft_length(self.acceptance, sequences, self.max_k, self.rows)
        if paid is None or paid > 0:
            return k if paid is None else min(k, paid)
        return 1 if self.costs.steps % self.probe_every == 0 else 0
