"""Token-budget scheduler (vLLM-v1 style, no phases): decode tokens first, then prefill chunks; preemption."""
from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping

from contracts.sampling import FinishReason
from contracts.stats import EngineStats
from engine.block_manager import BlockManager
from engine.prefix_cache import PrefixCache
from engine.scheduler_types import ScheduledChunk, SchedulerConfig, SchedulerOutput
from engine.sequence import Sequence, SequenceStatus
from engine.spec.verify import decode_chunk, num_accepted
from engine.step_cost import StepCostModel


class SchedulerError(RuntimeError):
    """A caller broke the scheduler's protocol (unknown request, wrong state, missing sampled token)."""


class SequenceRejected(ValueError):
    """A sequence can never be scheduled here (too long for max_model_len or for the whole KV cache)."""


class Scheduler:
    """Owns sequence state transitions and their blocks; `schedule → run → postprocess` is one engine step.

    `running` is kept oldest-admitted first: the oldest decode first, the newest is preempted first.
    """

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        if config.block_size != block_manager.block_size:
            raise ValueError(f"SchedulerConfig.block_size {config.block_size} != "
                             f"BlockManager.block_size {block_manager.block_size}")
        self.config = config
        self.blocks = block_manager
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._awaiting: dict[str, Sequence] = {}
        self._seqs: dict[str, Sequence] = {}  # every sequence the scheduler still tracks
        # The context window is also bounded by the cache: a sequence longer than all blocks could never run.
        self.max_len = min(config.max_model_len, block_manager.num_total * block_manager.block_size)
        self.prefix = PrefixCache(block_manager) if config.prefix_caching else None
        slowdown = config.fused_step_max_slowdown
        self.step_cost = StepCostModel(slowdown) if slowdown else None

    # ---- admission ----

    def add(self, seq: Sequence) -> None:
        """Queue a sequence to compute from seq.num_computed_tokens (its block_table, if any, is now ours)."""
        self._validate_new(seq)
        seq.status = SequenceStatus.WAITING
        self._waiting.append(seq)
        self._seqs[seq.request_id] = seq

    def reserve(self, seq: Sequence) -> bool:
        """Decode side: hold blocks for seq.num_tokens tokens whose KV a prefill worker will send.

        Returns False (allocating nothing) if the blocks or a sequence slot are not available now.
        """
        self._validate_new(seq)
        cached = self._prefix_match(seq)
        if cached is None:
            need = self._blocks_missing(seq, seq.num_tokens)
        else:
            need = self.prefix.free_blocks_needed(seq, cached, seq.num_tokens)
        if self._num_slots_used() >= self.config.max_num_seqs or not self.blocks.can_allocate(need):
            return False
        if cached is not None:  # its KV is here already: num_computed_tokens is where the transfer starts
            self.prefix.attach(seq, cached)
        seq.block_table.extend(self.blocks.allocate(self._blocks_missing(seq, seq.num_tokens)))
        seq.status = SequenceStatus.AWAITING_KV
        self._awaiting[seq.request_id] = seq
        self._seqs[seq.request_id] = seq
        return True

    def activate(self, request_id: str, first_token_id: int) -> Sequence:
        """KV for the prompt arrived: the sequence joins the running batch with its first sampled token."""
        seq = self._awaiting.pop(request_id, None)
        if seq is None:
            raise SchedulerError(f"activate({request_id!r}): no sequence awaiting KV under that id")
        seq.num_computed_tokens = seq.num_prompt_tokens
        if self.prefix is not None:
            self.prefix.register(seq)
        seq.status = SequenceStatus.RUNNING
        self._running.append(seq)
        self._append_token(seq, first_token_id)
        return seq

    # ---- one step ----

    def schedule(self, decode_only: Iterable[Sequence] | None = None) -> SchedulerOutput:
        """The next step's chunks. decode_only: the decode tokens of these sequences (those still running)
        and nothing else — the step a decode lookahead already launched (engine/executors/lookahead.py);
        everyone else waits a step (then nothing is launched ahead, so the step after includes them)."""
        only = None if decode_only is None else {id(s) for s in decode_only}
        # Fair prefill: with anyone else running or waiting, a long prompt's chunk is capped so that it
        # shares the budget (engine/scheduler_types.py: long_prefill_token_threshold).
        contended = len(self._running) + len(self._waiting) > 1
        long_prefills = 0  # long prompts partly prefilled (running) or started this step
        budget = self.config.max_batch_tokens
        chunks: list[ScheduledChunk] = []
        scheduled: set[str] = set()
        preempted: list[Sequence] = []

        # 1) Decoding sequences, oldest first: the last token plus any draft tokens as verify positions (as
        #    many as budget and context allow); preempt the newest to find blocks.
        for seq in list(self._running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING or seq.num_uncomputed != 1:
                continue
            if only is not None and id(seq) not in only:
                continue
            drafts = ()
            if seq.draft_token_ids:
                drafts = tuple(seq.draft_token_ids[:max(0, min(budget - 1, self.max_len - seq.num_tokens))])
            if not self._grow_or_preempt(seq, seq.num_tokens + len(drafts), scheduled, preempted):
                continue
            if self.config.lookahead_tokens and not drafts:  # verify steps are never launched ahead
                ahead = min(seq.num_tokens + self.config.lookahead_tokens, self.config.max_model_len)
                if self.blocks.can_allocate(self._blocks_missing(seq, ahead)):
                    seq.block_table.extend(self.blocks.allocate(self._blocks_missing(seq, ahead)))
            n = 1 + len(drafts)
            chunks.append(decode_chunk(seq, drafts))
            scheduled.add(seq.request_id)
            budget -= n

        decode_tokens = self.config.max_batch_tokens - budget
        if only is not None:
            return self._output(chunks, preempted, decode_tokens)
        if decode_tokens and self.step_cost and (self._waiting or len(chunks) < len(self._running)):
            # Split-fused: what the decode batch's time credit buys (engine/step_cost.py).
            pending = sum(q.num_uncomputed for q in self._waiting) + sum(
                q.num_uncomputed for q in self._running if q.status is SequenceStatus.RUNNING
                and q.request_id not in scheduled)
            budget = min(budget, self.step_cost.prefill_cap(decode_tokens, pending))
        # 2) Running sequences still mid-prefill: as much of the next chunk as budget and blocks allow.
        for seq in list(self._running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING or seq.request_id in scheduled:
                continue
            # No preemption for prefill: whoever holds the blocks is older (and progresses) or decodes newer
            # (and preempts itself when it next needs a block), so a stalled chunk resumes.
            long_prefills += self._is_long(seq, seq.num_computed_tokens)  # a partial one, chunk or not
            n = self._fit_chunk(seq, self._prefill_chunk(seq, seq.num_computed_tokens, budget, contended))
            if n == 0:
                continue
            chunks.append(self._schedule_chunk(seq, n))
            scheduled.add(seq.request_id)
            budget -= n

        # 3) Waiting sequences, FIFO. Not in a step that preempted: their blocks were freed for running ones.
        #    A long prompt waits while max_long_partial_prefills long ones run; shorter ones behind it start.
        i = 0
        while (i < len(self._waiting) and budget > 0 and not preempted
               and self._num_slots_used() < self.config.max_num_seqs):
            seq = self._waiting[i]
            cached = self._prefix_match(seq)
            start = seq.num_computed_tokens if cached is None else len(cached) * self.blocks.block_size
            if self._is_long(seq, start) and long_prefills >= self.config.max_long_partial_prefills:
                i += 1
                continue
            n = self._prefill_chunk(seq, start, budget, contended)
            if cached is None:
                need = self._blocks_missing(seq, start + n)
            else:
                need = self.prefix.free_blocks_needed(seq, cached, start + n)
            if not self.blocks.can_allocate(need):
                break  # FIFO on blocks: a later, smaller prompt does not take the blocks this one waits for
            del self._waiting[i]
            long_prefills += self._is_long(seq, start)
            if cached is not None:
                self.prefix.attach(seq, cached)
            seq.status = SequenceStatus.RUNNING
            self._running.append(seq)
            chunks.append(self._schedule_chunk(seq, n))
            scheduled.add(seq.request_id)
            budget -= n

        return self._output(chunks, preempted, decode_tokens)

    def postprocess(self, out: SchedulerOutput, sampled: Mapping[str, tuple[int, ...]]) -> list[Sequence]:
        """Advance computed counts, append accepted tokens, apply stop rules; return the finished ones.

        `sampled[request_id]`: one id per sampled position of the chunk, in position order. A verify chunk
        keeps its draft tokens up to the first one the model did not sample at that position
        (`engine/spec/verify.py`), then appends the model's token there (or after the last draft): with
        sampling seeded by (seed, position), those are exactly the tokens single steps would give. Rejected
        positions are rolled back (`rollback`); seq.num_draft_tokens / num_accepted_tokens count them.
        """
        if self.step_cost is not None:  # schedule -> postprocess: the step's cost
            self.step_cost.finish(out, out.num_batched_tokens)
        finished: list[Sequence] = []
        for chunk in out.chunks:
            seq = chunk.seq
            if seq.status is not SequenceStatus.RUNNING:  # aborted between schedule and postprocess
                continue
            seq.num_computed_tokens = chunk.start + chunk.num_new_tokens
            if self.prefix is not None:  # before the stop rules free a finished sequence's blocks
                self.prefix.register(seq)
            if not chunk.num_sampled:
                continue
            ids = sampled.get(seq.request_id)
            if ids is None or len(ids) != chunk.num_sampled:
                raise SchedulerError(f"{seq.request_id!r}: its chunk samples {chunk.num_sampled} token(s), "
                                     f"got {ids!r}")
            drafts = chunk.draft_token_ids
            accepted = num_accepted(chunk, ids)
            if drafts:
                seq.draft_token_ids, seq.draft_probs, seq.draft_tree = [], None, None
                seq.num_draft_tokens += len(drafts)
            done = False
            for i, token_id in enumerate(ids[:accepted + 1]):
                seq.num_accepted_tokens += i < accepted
                if self._append_token(seq, token_id):
                    finished.append(seq)
                    done = True
                    break
            if not done and accepted < len(drafts):
                self.rollback(seq, chunk.output_start + accepted)
        return finished

    def rollback(self, seq_or_id: Sequence | str, num_computed_tokens: int) -> Sequence:
        """Forget the KV of positions >= num_computed_tokens of a running sequence (rejected verify
        positions): they are computed again when scheduled, and blocks past what seq.token_ids needs are
        freed (never one its tokens still need)."""
        rid = seq_or_id if isinstance(seq_or_id, str) else seq_or_id.request_id
        seq = self._seqs.get(rid)
        if seq is None or seq.status is not SequenceStatus.RUNNING:
            raise SchedulerError(f"rollback({rid!r}): no running sequence under that id")
        if not 0 <= num_computed_tokens <= seq.num_computed_tokens:
            raise SchedulerError(f"rollback({rid!r}) to {num_computed_tokens}: it has "
                                 f"{seq.num_computed_tokens} computed tokens")
        seq.num_computed_tokens = num_computed_tokens
        keep = self.blocks.blocks_needed(seq.num_tokens)
        if len(seq.block_table) > keep:
            # A new list, not a shrink in place: the decode graphs' stager trusts a list it saw to only grow.
            table, seq.block_table = seq.block_table, seq.block_table[:keep]
            self.blocks.free(table[keep:])
        return seq

    # ---- teardown ----

    def abort(self, request_id: str) -> Sequence | None:
        """Drop an unfinished sequence in any state, freeing its blocks once; None if unknown or finished."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return None
        if seq.status is SequenceStatus.WAITING:
            self._waiting.remove(seq)
        elif seq.status is SequenceStatus.RUNNING:
            self._running.remove(seq)
        else:
            del self._awaiting[request_id]
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = FinishReason.ABORT
        self._free_blocks(seq)
        return seq

    # ---- queries ----

    def get(self, request_id: str) -> Sequence | None:
        return self._seqs.get(request_id)

    def has_work(self) -> bool:
        """True if schedule() may hand out tokens (awaiting-KV sequences need activate() first)."""
        return bool(self._waiting or self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_awaiting_kv(self) -> int:
        return len(self._awaiting)

    def stats(self) -> EngineStats:
        queued = sum(s.num_uncomputed for s in self._waiting)
        queued += sum(s.num_uncomputed for s in self._running if s.num_uncomputed > 1)
        hits, queries = (self.prefix.hit_tokens, self.prefix.query_tokens) if self.prefix else (0, 0)
        return EngineStats(num_free_blocks=self.blocks.num_free, num_total_blocks=self.blocks.num_total,
                           num_running=len(self._running) + len(self._awaiting),
                           num_waiting=len(self._waiting), queued_prefill_tokens=queued,
                           max_num_seqs=self.config.max_num_seqs,
                           prefix_hit_tokens=hits, prefix_query_tokens=queries)

    # ---- internals ----

    def _validate_new(self, seq: Sequence) -> None:
        if seq.request_id in self._seqs:
            raise SchedulerError(f"request_id {seq.request_id!r} is already scheduled here")
        if seq.num_tokens == 0:
            raise SequenceRejected(f"{seq.request_id}: empty prompt")
        if seq.num_tokens > self.max_len:
            raise SequenceRejected(f"{seq.request_id}: {seq.num_tokens} tokens exceed the context window of "
                                   f"{self.max_len} (max_model_len {self.config.max_model_len}, "
                                   f"KV cache {self.blocks.num_total} x {self.blocks.block_size} tokens)")

    def _output(self, chunks: list[ScheduledChunk], preempted: list[Sequence],
                decode_tokens: int) -> SchedulerOutput:
        others = bool(self._waiting) or len(self._running) != len(chunks)
        out = SchedulerOutput(tuple(chunks), tuple(preempted), others_waiting=others)
        if self.step_cost is not None and chunks:
            self.step_cost.start(out, decode_tokens)
        return out

    def _num_slots_used(self) -> int:
        # Awaiting-KV sequences count: activate() moves them into the running batch unconditionally.
        return len(self._running) + len(self._awaiting)

    def _prefix_match(self, seq: Sequence) -> list[int] | None:
        """seq's cached leading blocks if it may start from the cache (caching on, nothing held or computed
        yet), else None."""
        if self.prefix is None or seq.block_table or seq.num_computed_tokens:
            return None
        return self.prefix.match(seq)

    def _is_long(self, seq: Sequence, start: int) -> bool:
        threshold = self.config.long_prefill_token_threshold
        return 0 < threshold < seq.num_tokens - start

    def _prefill_chunk(self, seq: Sequence, start: int, budget: int, contended: bool) -> int:
        """Prefill tokens seq may compute from `start` this step, before block limits."""
        n = min(seq.num_tokens - start, budget)
        if contended and self._is_long(seq, start):
            n = min(n, self.config.long_prefill_token_threshold)
        return n

    def _blocks_missing(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, self.blocks.blocks_needed(num_tokens) - len(seq.block_table))

    def _fit_chunk(self, seq: Sequence, n: int) -> int:
        """Largest chunk <= n whose tokens fit in seq's blocks plus the free ones."""
        capacity = (len(seq.block_table) + self.blocks.num_free) * self.blocks.block_size
        return max(0, min(n, capacity - seq.num_computed_tokens))

    def _schedule_chunk(self, seq: Sequence, n: int) -> ScheduledChunk:
        start = seq.num_computed_tokens
        seq.block_table.extend(self.blocks.allocate(self._blocks_missing(seq, start + n)))
        return ScheduledChunk(seq, start, n, 1 if start + n == seq.num_tokens else 0)

    def _grow_or_preempt(self, seq: Sequence, num_tokens: int, scheduled: set[str],
                         preempted: list[Sequence]) -> bool:
        """Make seq's block table cover num_tokens, preempting the newest unscheduled sequences as needed.

        Returns False if seq itself was the one preempted.
        """
        while not self.blocks.can_allocate(self._blocks_missing(seq, num_tokens)):
            # Never empty: seq itself is running and unscheduled. max_len <= cache size bounds every table,
            # so a sequence that preempts itself can always be recomputed later.
            victim = next(s for s in reversed(self._running) if s.request_id not in scheduled)
            self._preempt(victim, preempted)
            if victim is seq:
                return False
        seq.block_table.extend(self.blocks.allocate(self._blocks_missing(seq, num_tokens)))
        return True

    def _preempt(self, seq: Sequence, preempted: list[Sequence]) -> None:
        # Recompute-style preemption: drop the KV, keep the tokens, come back first in line.
        self._running.remove(seq)
        self._free_blocks(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self._waiting.appendleft(seq)
        preempted.append(seq)

    def _append_token(self, seq: Sequence, token_id: int) -> bool:
        """Append a sampled token and apply the stop rules; True if the sequence finished."""
        seq.token_ids.append(token_id)
        reason = seq.stop_reason(self.config.eos_token_ids, self.max_len)
        if reason is None:
            return False
        self._finish(seq, reason)
        return True

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self._running.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self._seqs.pop(seq.request_id, None)
        self._free_blocks(seq)

    def _free_blocks(self, seq: Sequence) -> None:
        # Clearing the table makes a second free impossible by construction. Freed last block first: the LRU
        # prefix cache then evicts a sequence's tail (the least shared part) before its head.
        table, seq.block_table = seq.block_table, []
        seq.num_cached_blocks = 0
        self.blocks.free(reversed(table))
