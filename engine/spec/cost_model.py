"""Measured step costs decide how many drafts pay: each request's draft length from its acceptance rate."""
from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np


class StepCosts:
    """What this engine's steps cost, measured as it runs (never a constant: a CPU verify row at batch 1
    costs ~8% of a plain step here, a batch-8 step leaving the flat decoder far more, a GPU row ~nothing).

    A decode step's wall time is fitted by least squares over the last `window` decode steps as
    a + b·sequences + u·[any verifying] + v·verifying sequences + c·draft rows: u is what a step pays when
    any of its sequences verifies (at batch > 1 on CPU the whole step then leaves the flat decoder, which a
    per-sequence term spread over 8 verifying sequences hid), v what a sequence pays for verifying at all
    (on this CPU at batch 1 the first extra row costs ~10% of a plain step, each further one ~8%, since
    kernels/cpu_quant's f32_linear streams the weights once for all rows), c what each draft row adds.
    Drafting costs `d` seconds per drafted token and the drafter's bookkeeping (the head's forward over
    accepted positions) `e` per sequence step, both EWMAs. Without enough spread in the observations (every
    step with the same number of drafts) there is no estimate and callers fall back to acceptance alone.
    """

    def __init__(self, window: int = 64, decay: float = 0.9) -> None:
        # (sequences, verifying sequences, draft rows, seconds)
        self._steps: deque[tuple[float, float, float, float]] = deque(maxlen=window)
        self._fit: tuple[float, float, float, float] | None = None
        self._stale = True
        self.decay = decay
        self.draft_seconds: float | None = None  # per drafted token
        self.learn_seconds: float | None = None  # per sequence step
        self.steps = 0  # decode/verify steps observed: the clock requests that run plain probe by

    def observe_step(self, sequences: int, verifying: int, drafts: int, seconds: float) -> None:
        self._steps.append((float(sequences), float(verifying), float(drafts), seconds))
        self._stale = True
        self.steps += 1

    def observe_drafting(self, sequences: int, drafted: int, learn_seconds: float,
                         draft_seconds: float) -> None:
        if sequences:
            self.learn_seconds = self._ewma(self.learn_seconds, learn_seconds / sequences)
        if drafted:
            self.draft_seconds = self._ewma(self.draft_seconds, draft_seconds / drafted)

    def _ewma(self, old: float | None, new: float) -> float:
        return new if old is None else self.decay * old + (1.0 - self.decay) * new

    def _coefficients(self) -> tuple[float, float, float, float] | None:
        if self._stale:
            self._stale = False
            self._fit = None
            drafts = {d for _, _, d, _ in self._steps}
            if len(self._steps) >= 8 and len(drafts) >= 2:
                # gelsd: the minimum-norm fit where columns coincide (every sequence verifying at batch 1):
                # its predictions are right for the configurations seen, and probes add the others.
                # numpy's lstsq is gelsd too, at a third of torch's per-call cost (~50 vs ~150 µs here): this
                # runs on the host between every two steps of a speculating engine.
                steps = np.array(self._steps)
                x = np.column_stack((np.ones(len(steps)), steps[:, 0], steps[:, 1] > 0, steps[:, 1:3]))
                a, b, u, v, c = np.linalg.lstsq(x, steps[:, 3], rcond=None)[0].tolist()
                self._fit = (a, b, max(u, 0.0) + max(v, 0.0), max(c, 0.0))
        return self._fit

    def draft_length(self, acceptance: float, sequences: int, max_k: int,
                     rows: Sequence[int] | None = None) -> int | None:
        """Drafts that pay for a request whose drafts are accepted with probability `acceptance` each
        (0..max_k), None without an estimate yet. `rows[k - 1]`: the verify rows (and drafted tokens) that k
        drafts cost, for tree drafts (k levels of a tree); None: k (a chain).

        Draft j is emitted only if drafts 1..j all are: probability acceptance^j. Each emitted draft saves
        what a token costs without it — the step's share per sequence, plus the drafter's per-step
        bookkeeping; drafting k costs verifying at all plus k rows and their drafting. The length with the
        largest saving less cost, 0 if none saves more than it costs. Verifying at all costs u + v: a request
        is charged the whole step's switch to verifying, as if it alone verified (never an optimistic share).
        """
        fit = self._coefficients()
        if fit is None:
            return None
        a, b, verify, row = fit
        token = (a + b * sequences) / max(sequences, 1) + (self.learn_seconds or 0.0)
        row += self.draft_seconds or 0.0
        best, best_gain, emitted = 0, 0.0, 0.0
        for k in range(1, max_k + 1):
            emitted += acceptance ** k
            gain = emitted * token - verify - (k if rows is None else rows[k - 1]) * row
            if gain > best_gain:
                best, best_gain = k, gain
        return best
