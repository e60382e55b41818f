"""A step's cost fitted online (fixed + per decode + per prefill token); it caps prefill beside decodes."""
from __future__ import annotations

import time

MIN_STEPS = 4  # steps with prefill tokens, and steps without, before the fit is trusted
REFIT_EVERY = 32  # steps between fits: costs drift over many steps, and a fit costs tens of us of Python


def _solve(a: list[list[float]], b: list[float]) -> list[float] | None:
    """a x = b by Gaussian elimination with partial pivoting (n <= 3); None if a is (nearly) singular."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    scale = max(abs(v) for row in a for v in row) or 1.0
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-12 * scale:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            for c in range(col, n + 1):
                m[r][c] -= f * m[col][c]
    x = [0.0] * n
    for r in reversed(range(n)):
        x[r] = (m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))) / m[r][r]
    return x


class StepCostModel:
    """Least squares, exponentially forgetting (about the last `window` steps), of step seconds = fixed +
    per_decode * decode tokens + per_prefill * prefill tokens, kept as running sums (O(1) a step). A fused
    step then costs at most `max_slowdown` x the pure decode step of its batch when its prefill tokens stay
    within prefill_cap(decode tokens) = (max_slowdown - 1) * (fixed + per_decode * decodes) / per_prefill."""

    def __init__(self, max_slowdown: float, window: int = 256) -> None:
        if max_slowdown <= 1.0:
            raise ValueError(f"max_slowdown must be > 1, got {max_slowdown}")
        if window < 2:
            raise ValueError(f"window must be >= 2, got {window}")
        self.max_slowdown = max_slowdown
        self._keep = 1.0 - 1.0 / window
        self._timed: tuple[object, float, int] | None = None  # the step `finish` will time
        # Weighted sums over x = (1, decode tokens d, prefill tokens p): of x x^T (n, d, p, dd, dp, pp) and of
        # x * seconds (t, dt, pt): the normal equations of the fit.
        self._sums = [0.0] * 9
        self._steps_with_prefill = self._steps_without = 0
        self._coef: tuple[float, float, float] | None = None
        self._unfitted = 0  # steps observed since the last fit

    def start(self, step: object, decode_tokens: int) -> None:
        """The scheduler made `step` (an opaque token) now; `finish(step)` times it and observes its cost."""
        self._timed = (step, time.perf_counter(), decode_tokens)

    def finish(self, step: object, batched_tokens: int) -> None:
        timed = self._timed
        if timed is not None and timed[0] is step:
            self._timed = None
            self.observe(timed[2], batched_tokens - timed[2], time.perf_counter() - timed[1])

    def observe(self, decode_tokens: int, prefill_tokens: int, seconds: float) -> None:
        if seconds <= 0 or decode_tokens + prefill_tokens <= 0:
            return
        d, p, k = float(decode_tokens), float(prefill_tokens), self._keep
        n, sd, sp, dd, dp, pp, t, dt, pt = self._sums
        self._sums = [n * k + 1.0, sd * k + d, sp * k + p, dd * k + d * d, dp * k + d * p, pp * k + p * p,
                      t * k + seconds, dt * k + d * seconds, pt * k + p * seconds]
        if prefill_tokens:
            self._steps_with_prefill += 1
        else:
            self._steps_without += 1
        self._unfitted += 1

    @property
    def coefficients(self) -> tuple[float, float, float] | None:
        """(fixed s, s per decode token, s per prefill token), or None while the steps seen cannot tell a
        prefill token's cost (too few, or not both steps with and without prefill). Refitted every
        REFIT_EVERY steps, and as soon as the first fit is possible."""
        if self._unfitted >= REFIT_EVERY or (self._coef is None and self._unfitted):
            self._unfitted = 0
            self._coef = self._fit()
        return self._coef

    def _fit(self) -> tuple[float, float, float] | None:
        if min(self._steps_with_prefill, self._steps_without) < MIN_STEPS:
            return None
        n, sd, sp, dd, dp, pp, t, dt, pt = self._sums
        xx, xt = [[n, sd, sp], [sd, dd, dp], [sp, dp, pp]], [t, dt, pt]
        coef = _solve(xx, xt)
        if coef is None:  # one batch size throughout: fixed and per-decode cost merge into one intercept
            two = _solve([[xx[0][0], xx[0][2]], [xx[2][0], xx[2][2]]], [xt[0], xt[2]])
            if two is None:
                return None
            coef = [two[0], 0.0, two[1]]
        fixed, per_decode, per_prefill = coef
        if per_prefill <= 0:  # noise swamped it: prefill looks free, so nothing to cap
            return None
        return max(fixed, 0.0), max(per_decode, 0.0), per_prefill

    def prefill_cap(self, decode_tokens: int) -> int | None:
        """Most prefill tokens a step with `decode_tokens` decode tokens may add (>= 1, so prompts always
        progress); None while no cost is known."""
        coef = self.coefficients
        if coef is None:
            return None
        fixed, per_decode, per_prefill = coef
        pure = fixed + per_decode * decode_tokens
        return max(1, int((self.max_slowdown - 1.0) * pure / per_prefill))
