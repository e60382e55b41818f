"""Adaptive draft length: each request drafts about as many tokens as its drafts have lately been accepted."""
from __future__ import annotations

import math


class AdaptiveK:
    """EWMA of accepted drafts per verify step, rounded, plus one → next draft length in 1..k (k when off).

    Drafting one more token than the target has lately accepted keeps a good request growing toward k while
    a poor one drops to 1 draft (one wasted verify row a step instead of k). Starts optimistic, at k.
    """

    def __init__(self, k: int, adaptive: bool = True, decay: float = 0.5) -> None:
        if k < 1 or not 0.0 < decay < 1.0:
            raise ValueError(f"need k >= 1 and 0 < decay < 1, got k={k}, decay={decay}")
        self.max_k = k
        self.adaptive = adaptive
        self.decay = decay
        self.accepted_ewma = float(k)

    def update(self, drafted: int, accepted: int) -> None:
        """One verify step's outcome; a step with no drafts teaches nothing."""
        if drafted:
            self.accepted_ewma = self.decay * self.accepted_ewma + (1.0 - self.decay) * accepted

    @property
    def k(self) -> int:
        if not self.adaptive:
            return self.max_k
        # Rounded, not floored: a request fully accepting 1 draft (EWMA approaching 1 from below) must grow.
        return max(1, min(self.max_k, math.floor(self.accepted_ewma + 0.5) + 1))
