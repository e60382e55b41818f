"""Split-fused steps under a time credit: decode steps earn it, prefill tokens beside decodes spend it."""
from __future__ import annotations

import dataclasses
import time

from contracts.stats import EngineStats

WINDOW_STEPS = 4  # steps of credit a fused step may spend at once (the window the slowdown is averaged over)
_PURE_ALPHA = 0.1  # EWMA weight of a new decode-only step's seconds
_DEBT_WINDOWS = 4  # the most credit owed, in full credits
_PREFILL_ALPHA = 0.2  # EWMA weight of a new prefill-only step's seconds per token


class StepCostModel:
    """Keeps the decode batch's mean step time within `max_slowdown` x what decode-only steps of the same
    batch cost (give or take one window's credit), while prompts prefill beside it.

    Why a credit and not a per-step cap: a step that carries any prefill token can cost far more than the
    decode step it replaces (on CPU a batch of one decodes on a flat path, 34 ms, and one prefill token
    beside it sends the step down the eager path, 61 ms: 1.8x; on CUDA decode steps replay graphs and fused
    ones run eager), so no per-step cap can hold 1.5x at small batches. A request's TPOT is its mean time
    per token, so the budget is what matters: each step with decodes earns `max_slowdown` x pure(d) minus
    what it cost (a pure step about (s - 1) x pure(d); a fused one pays its surplus back), capped at
    `window` x (s - 1) x pure(d) (or twice a fused step's fixed cost, if more). Prefill beside decodes waits
    until the credit is full, then spends it in one chunk, so the fixed cost of leaving the decode path is
    paid once per window rather than every step (a prompt that fits the credit whole starts at once). A
    request's mean over its own tokens can still include one chunk more than its share (up to window x
    (s - 1) / its token count above s): a short window keeps that and the single slow step small.

    pure(d): an EWMA of decode-only steps of d decode tokens (measured per batch size: the batch of one is
    the outlier). extra(p): what a fused step cost beyond pure(d), fitted as e0 + c x p by least squares
    forgetting over about `window_fit` fused steps (with chunks of about one size: c = extra / p, which is
    conservative, and the smaller chunks it buys spread the sizes again).
    """

    def __init__(self, max_slowdown: float, window: int = WINDOW_STEPS, window_fit: int = 16) -> None:
        if max_slowdown <= 1.0:
            raise ValueError(f"max_slowdown must be > 1, got {max_slowdown}")
        if window < 1 or window_fit < 2:
            raise ValueError(f"window must be >= 1 and window_fit >= 2, got {window}, {window_fit}")
        self.max_slowdown = max_slowdown
        self.window = window
        self._keep = 1.0 - 1.0 / window_fit
        self._timed: tuple[object, float, int] | None = None  # the step `finish` will time
        self.pure_seconds: dict[int, float] = {}  # decode tokens -> EWMA seconds of decode-only steps
        self.credit = 0.0  # seconds the decode batch may still be held back
        self._fused_steps = 0  # timed steps with decodes and prefill tokens
        # Forgetting sums over fused steps of x = (1, p) and y = seconds beyond pure(d): n, sp, pp, sy, spy.
        self._sums = [0.0] * 5
        self.prefill_only_s_per_token = 0.0  # EWMA over prefill-only steps; 0 = none timed yet
        # Decode tokens -> forgetting sums (seconds, prefill tokens) over steps with prompts waiting beside
        # them; _waited_beside: the batch prefill_cap was last asked about, until its step is observed.
        self._paced: dict[int, tuple[float, float]] = {}
        self._pace_keep = 1.0 - 1.0 / (4 * window_fit)
        self._waited_beside: int | None = None

    # ---- timing (the scheduler calls these) ----

    def start(self, step: object, decode_tokens: int) -> None:
        """The scheduler made `step` (an opaque token) now; `finish(step)` times it and observes its cost."""
        self._timed = (step, time.perf_counter(), decode_tokens)

    def finish(self, step: object, batched_tokens: int) -> None:
        timed = self._timed
        if timed is not None and timed[0] is step:
            self._timed = None
            self.observe(timed[2], batched_tokens - timed[2], time.perf_counter() - timed[1])

    def observe(self, decode_tokens: int, prefill_tokens: int, seconds: float) -> None:
        if seconds <= 0:
            return
        if decode_tokens <= 0:  # holds no stream back: nothing to earn or pay; placement reads its pace
            if prefill_tokens > 0:
                rate, old = seconds / prefill_tokens, self.prefill_only_s_per_token
                self.prefill_only_s_per_token = rate if old == 0 else old + _PREFILL_ALPHA * (rate - old)
            return
        if self._waited_beside == decode_tokens:
            sec, tok = self._paced.get(decode_tokens, (0.0, 0.0))
            k = self._pace_keep
            self._paced[decode_tokens] = (sec * k + seconds, tok * k + prefill_tokens)
        self._waited_beside = None
        if prefill_tokens == 0:
            old = self.pure_seconds.get(decode_tokens)
            self.pure_seconds[decode_tokens] = seconds if old is None else old + _PURE_ALPHA * (seconds - old)
        pure = self.pure(decode_tokens)
        if pure is None:
            return
        # A worker's first fused step can carry a one-off cost (cold caches, lazily built state: on CPU it
        # once packed a second copy of the weights, ~0.6 s) that no price per token explains; fitted, it
        # would stall prefill for a while after. So a first fused step beyond the debt bound is not fitted
        # (the credit still pays for it).
        one_off = self._fused_steps == 0 and seconds - pure > _DEBT_WINDOWS * self._full(pure)
        if prefill_tokens and not one_off:
            self._fused_steps += 1
            p, y, k = float(prefill_tokens), seconds - pure, self._keep
            n, sp, pp, sy, spy = self._sums
            self._sums = [n * k + 1.0, sp * k + p, pp * k + p * p, sy * k + y, spy * k + p * y]
        full = self._full(pure)
        # Debt is repaid (a misjudged chunk is paid for by later ones), up to a bound: a stall of the whole
        # box (swap, a stopped process) must not keep prompts out for long after.
        self.credit = min(full, max(-_DEBT_WINDOWS * full, self.credit + self.max_slowdown * pure - seconds))

    # ---- what the scheduler asks ----

    def pure(self, decode_tokens: int) -> float | None:
        """Seconds of a decode-only step of `decode_tokens`: measured, or the nearest smaller batch measured
        (a bigger batch costs no less), or the smallest measured; None before any decode-only step."""
        if not self.pure_seconds:
            return None
        if decode_tokens in self.pure_seconds:
            return self.pure_seconds[decode_tokens]
        below = [d for d in self.pure_seconds if d < decode_tokens]
        return self.pure_seconds[max(below) if below else min(self.pure_seconds)]

    def extra(self) -> tuple[float, float] | None:
        """(e0 s, c s per prefill token): a fused step's cost beyond pure(d) = e0 + c x p; None before any
        fused step was timed."""
        n, sp, pp, sy, spy = self._sums
        if n <= 0 or sp <= 0:
            return None
        det = n * pp - sp * sp
        if det > 0.01 * n * pp:  # chunk sizes spread (var / mean square > 1%): both terms can be told apart
            c = (n * spy - sp * sy) / det
            e0 = (sy - c * sp) / n
            if c > 0:
                return max(e0, 0.0), c
        return 0.0, max(sy, 0.0) / sp or 1e-6  # one chunk size seen (or noise): all of it per token

    def prefill_cap(self, decode_tokens: int, pending_tokens: int) -> int:
        """Prefill tokens a step with `decode_tokens` decode tokens may add, `pending_tokens` being what
        prompts still need: all of them if that fits the credit; once the credit is full, what it buys
        (>= 1, so a prompt always progresses); else 0 while it builds. 0 until a decode-only step of this
        batch was timed (nothing to compare with yet); what it buys is 1 token until a fused step was."""
        if pending_tokens > 0:
            self._waited_beside = decode_tokens  # the step it shapes paces the prompts: observe times it
        pure = self.pure(decode_tokens)
        if pure is None or pending_tokens <= 0:
            return 0
        fit = self.extra()
        full = self.credit >= self._full(pure) * (1.0 - 1e-9)
        if fit is None:
            return 1 if full else 0
        e0, c = fit
        affordable = int((self.credit - e0) / c) if self.credit > e0 else 0
        n, sp, _, sy, _ = self._sums
        if sy > 0:  # and no more than the mean cost per token seen buys: the line is not trusted far out
            affordable = min(affordable, int(self.credit * sp / sy))
        if affordable >= pending_tokens:
            return pending_tokens
        if not full:
            return 0
        # Every other chunk buys half: chunks of one size cannot tell e0 from c, and a wrong split would
        # stand (the credit kept and the chunk bought are both read off the fit).
        return max(1, affordable // 2 if self._fused_steps % 2 else affordable)

    def fused_prefill_s_per_token(self, decode_tokens: int) -> float | None:
        """Wall seconds per prompt token while prompts wait beside a batch of `decode_tokens` decodes (the
        steps that bank credit count, as do those that spend it), measured over about `window_fit` x 4
        such steps: the nearest smaller batch measured (a bigger one pays no slower), else the smallest;
        None until such steps prefilled a token."""
        paced = {d: sec / tok for d, (sec, tok) in self._paced.items() if tok > 0}
        if not paced:
            return None
        below = [d for d in paced if d <= decode_tokens]
        return paced[max(below) if below else min(paced)]

    def _full(self, pure: float) -> float:
        """The most credit kept: `window` steps' worth, or enough to pay a fused step's fixed cost twice and
        a token (where leaving the decode path costs more than the window earns, e.g. next to CUDA graphs)."""
        fit = self.extra()
        floor = 0.0 if fit is None else 2.0 * fit[0] + fit[1]
        return max(self.window * (self.max_slowdown - 1.0) * pure, floor)


def with_placement_costs(stats: EngineStats, step_cost: StepCostModel | None,
                         awaiting_kv: int) -> EngineStats:
    """`stats` plus, for conditional placement (router/placement.py), the reservations whose KV is in flight
    and the measured pace of a prompt prefilled here:
    alone (prefill-only steps) and beside the sequences running now (the split-fused credit's pace for that
    batch; a prompt placed now would decode beside them). 0.0 where nothing was measured yet."""
    alone = beside = 0.0
    if step_cost is not None:
        alone = step_cost.prefill_only_s_per_token
        beside = step_cost.fused_prefill_s_per_token(max(1, stats.num_running - awaiting_kv)) or 0.0
    return dataclasses.replace(stats, num_awaiting_kv=awaiting_kv, prefill_s_per_token=alone,
                               fused_prefill_s_per_token=beside)
