"""The draft head for a batch of sequences: its accept and its k greedy draft steps as CUDA graphs."""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from contracts.sampling import SamplingParams
from engine.cuda_graphs import decode_buckets, pick_bucket
from engine.spec.draft_head import DraftHead
from engine.spec.head_drafter import HeadDrafter
from engine.spec.head_rows import accept_rows, propose_rows
from engine.spec.head_slots import HeadKVSlots, SlotHeadDrafter

logger = logging.getLogger(__name__)


@dataclass
class _Graphed:
    """One captured call: replayed on CUDA; on CPU (`graph` None) `run` runs eagerly."""

    run: Callable[[], torch.Tensor | None]
    graph: torch.cuda.CUDAGraph | None = None
    out: torch.Tensor | None = None

    def __call__(self) -> torch.Tensor | None:
        if self.graph is None:
            return self.run()
        self.graph.replay()
        return self.out


class HeadDraftGraphs:
    """Head drafting for every sequence of a step at once, over head KV resident in `slots`
    (HeadKVSlots: a sequence's slot is its row in every call here):

    - `accept`: the positions each sequence accepted in the step just verified (1 .. k + 1 rows each), one
      head forward for all of them, padded to k + 1 rows, appending their k, v in place in the slots;
    - `propose`: 1 .. k greedy drafts (as many as the batch's longest ask) for every slot, one head forward
      a draft step, reading the same slots.

    Each is one CUDA graph per batch bucket (the highest live slot + 1, rounded up to a decode bucket),
    context span (the head KV rows its attention reads: the longest live slot's plus k + 1 spare, rounded
    up to `spans`, so short sequences do not pay for attention over the whole `max_len`) and, for
    `propose`, number of drafts (adaptive k often asks for 1 or 2: no forwards for drafts nobody reads);
    their inputs are small static tensors the host fills with one copy per call (lengths, positions,
    accepted counts, next tokens, feature row numbers; the step's feature rows are gathered into a static
    buffer), and nothing is read back but the drafts, once per step. Greedy drafters are proposed here;
    sampled ones (T > 0: per-request seeded draws) draft through their own `propose` over their slot.
    On CPU the same code runs eagerly over the same buffers.
    """

    def __init__(self, head: DraftHead, embed: nn.Embedding, max_num_seqs: int, max_len: int, k: int,
                 draft_vocab_limit: int | None = None, first_span: int = 256) -> None:
        c = head.config
        self.head, self.embed, self.k, self.limit = head, embed, k, draft_vocab_limit
        self.width = k + 1  # rows a verified step can accept: the last token and up to k kept drafts
        self.slots = HeadKVSlots(head, embed, max_num_seqs, max_len, spare=self.width,
                                 draft_vocab_limit=draft_vocab_limit)
        self.buckets = decode_buckets(max_num_seqs)
        self.spans = context_spans(self.slots.capacity, first_span)
        device, w = self.slots.device, self.width
        # Per slot: length, position, accepted rows, the rows' next tokens [w], their feature rows [w].
        self.accept_inputs = torch.zeros(max_num_seqs, 3 + 2 * w, dtype=torch.int64, device=device)
        self.propose_inputs = torch.zeros(max_num_seqs, 2, dtype=torch.int64, device=device)
        self.features = torch.zeros(max_num_seqs, w, len(c.feature_layers) * c.hidden_size,
                                    dtype=head.fc.weight.dtype, device=device)
        self._accepts: dict[tuple[int, int], _Graphed] = {}  # (bucket, span) →
        self._proposes: dict[tuple[int, int, int], _Graphed] = {}  # (bucket, span, drafts) →
        self._pool = None

    # ---- drafters ----

    def new_drafter(self, first_position: int, sampling: SamplingParams | None) -> SlotHeadDrafter | None:
        """A drafter with its KV in a free slot; None when all are taken (the caller drafts unbatched)."""
        return self.slots.new_drafter(first_position, sampling)

    def batches(self, drafter: HeadDrafter, start: int, rows: int) -> bool:
        """Whether `accept` takes this drafter's next `rows` positions from `start`."""
        return (isinstance(drafter, SlotHeadDrafter) and drafter.slots is self.slots
                and drafter.num_committed == start and 0 < rows <= self.width)

    def serves(self, drafter: HeadDrafter) -> bool:
        """Whether `propose` drafts for it: a greedy slot drafter of these slots with a last output."""
        return (isinstance(drafter, SlotHeadDrafter) and drafter.slots is self.slots
                and drafter.sampling is None and drafter.has_last)

    # ---- the step ----

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Capture every graph now, largest first (smaller graphs then reuse the pool's memory)."""
        for bucket in sorted(self.buckets, reverse=True):
            for span in sorted(self.spans, reverse=True):
                self._accept_graph(bucket, span)
                for steps in range(self.k, 0, -1):
                    self._propose_graph(bucket, span, steps)
        logger.info("captured head accept and drafting CUDA graphs (k=%d) for batch sizes %s, spans %s",
                    self.k, self.buckets, self.spans)

    @torch.inference_mode()
    def accept(self, items: Sequence[tuple[SlotHeadDrafter, Sequence[int], Sequence[int]]],
               features: torch.Tensor) -> None:
        """Each item: (drafter, its sequence's token ids, the rows of `features` [T, F·H] — the step's
        captured target features — of its newly accepted positions, in order; `batches` holds for each).
        The same as each drafter's `accept(token_ids, features[rows])`, in one head forward."""
        if not items:
            return
        (bucket, span, state), w = self._pick(), self.width
        inputs = [[length, position, 0] + [0] * (2 * w) for length, position in state]
        for drafter, token_ids, rows in items:
            start, n = drafter.num_committed, len(rows)
            if not 0 < n <= w:
                raise ValueError(f"{n} rows: the batched accept takes 1 .. {w} a sequence")
            if start + n != len(token_ids) - 1:
                raise ValueError(
                    f"{n} feature rows after {start} accepted positions, but {len(token_ids)} tokens")
            row = inputs[drafter.slot]
            row[2] = n
            row[3:3 + n] = token_ids[start + 1:]
            row[3 + w:3 + w + n] = rows  # padded rows read feature row 0: computed, never kept
        graphed = self._accept_graph(bucket, span)
        self._upload(self.accept_inputs[:bucket], inputs)
        feature_rows = self.accept_inputs[:bucket, 3 + w:].reshape(-1)
        self.features[:bucket].view(bucket * w, -1).copy_(features.index_select(0, feature_rows))
        graphed()
        for drafter, _, rows in items:
            drafter.advance(len(rows))

    @torch.inference_mode()
    def propose(self, drafters: Sequence[SlotHeadDrafter], steps: int | None = None) -> list[list[int]]:
        """`steps` (1 .. k, default k) greedy drafts for each drafter (each `serves`), in order; one host
        sync for all of them."""
        steps = self.k if steps is None else steps
        if not 1 <= steps <= self.k:
            raise ValueError(f"{steps} drafts: the graphs draft 1 .. {self.k}")
        bucket, span, state = self._pick()
        graphed = self._propose_graph(bucket, span, steps)
        self._upload(self.propose_inputs[:bucket], state)
        rows = graphed()[:bucket].tolist()
        return [rows[d.slot] for d in drafters]

    # ---- internals ----

    def _pick(self) -> tuple[int, int, list[list[int]]]:
        """The bucket and span a call runs, and the bucket's slots' [length, position]."""
        bucket = pick_bucket(self.slots.in_use, self.buckets)
        if bucket is None:
            raise ValueError("no live slot to run the head for")
        state = self.slots.host_state(bucket)
        # Padded rows and drafts write up to width - 1 rows past a slot's length: all within the span.
        need = max(length for length, _ in state) + self.width
        return bucket, next(s for s in self.spans if s >= need), state

    def _upload(self, dest: torch.Tensor, rows: list[list[int]]) -> None:
        host = torch.tensor(rows, dtype=torch.int64)
        if dest.device.type == "cuda":
            host = host.pin_memory()  # an asynchronous copy: no sync between verify and propose
        dest.copy_(host, non_blocking=True)

    def _accept_graph(self, bucket: int, span: int) -> _Graphed:
        graphed = self._accepts.get((bucket, span))
        if graphed is None:
            head, embed, slots, w = self.head, self.embed, self.slots, self.width
            keys, values, last = slots.k[:bucket, :, :span], slots.v[:bucket, :, :span], slots.last[:bucket]
            inputs, features = self.accept_inputs[:bucket], self.features[:bucket]

            def accept() -> None:
                accept_rows(head, embed, keys, values, last, head.fuse(features), inputs[:, 3:3 + w],
                            inputs[:, 0], inputs[:, 1], inputs[:, 2])
            graphed = self._accepts[bucket, span] = self._graph(accept)
        return graphed

    def _propose_graph(self, bucket: int, span: int, steps: int) -> _Graphed:
        graphed = self._proposes.get((bucket, span, steps))
        if graphed is None:
            head, embed, slots, limit = self.head, self.embed, self.slots, self.limit
            keys, values, last = slots.k[:bucket, :, :span], slots.v[:bucket, :, :span], slots.last[:bucket]
            inputs = self.propose_inputs[:bucket]

            def propose() -> torch.Tensor:
                return propose_rows(head, embed, keys, values, last, inputs[:, 0], inputs[:, 1], steps, limit)
            graphed = self._proposes[bucket, span, steps] = self._graph(propose)
        return graphed

    def _graph(self, run: Callable[[], torch.Tensor | None]) -> _Graphed:
        """`run` captured in a CUDA graph (in the graphs' shared pool); on CPU it stays eager."""
        slots = self.slots
        if slots.device.type != "cuda":
            return _Graphed(run)
        if slots.in_use:  # warm-up and capture run for real and write into the slots they cover
            raise RuntimeError("capture the head graphs (capture_all) before any drafter takes a slot")
        self.accept_inputs.zero_()  # every slot free: nothing accepted, rows written at 0 .. width - 1
        self.propose_inputs.zero_()
        device = slots.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up: lets cuBLAS and SDPA pick their kernels
            for _ in range(2):
                run()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            out = run()
        self._pool = self._pool or graph.pool()
        return _Graphed(run, graph, out)


def context_spans(capacity: int, first: int) -> tuple[int, ...]:
    """The head KV lengths graphs attend over: first, 4·first, … below `capacity`, then `capacity`."""
    spans = []
    span = first
    while span < capacity:
        spans.append(span)
        span *= 4
    return (*spans, capacity)
