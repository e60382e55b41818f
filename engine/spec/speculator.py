"""Speculation between engine steps: drafters learn each step's accepted tokens, then draft the next."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from engine.config import ModelConfig
from engine.executor import Executor, RunOutput
from engine.model import LayerHook, LlamaModel
from engine.scheduler import SchedulerOutput
from engine.sequence import Sequence, SequenceStatus
from engine.spec.adaptive import AdaptiveK
from engine.spec.config import SpecConfig, tree_nodes
from engine.spec.cost_model import StepCosts
from engine.spec.draft_head import DEFAULT_HEAD_PATH, DraftHead
from engine.spec.drafter import Drafter
from engine.spec.head_drafter import HeadDrafter
from engine.spec.head_graphs import HeadDraftGraphs
from engine.spec.head_slots import SlotHeadDrafter
from engine.spec.head_tree import head_tree_drafts
from engine.spec.ngram import NgramDrafter
from engine.spec.target_forward import LayerCapture

logger = logging.getLogger(__name__)


def _each_layer(_layer: int) -> None:
    """The layer hook of a capturing step on an executor that neither feeds the capture itself (CPU flat)
    nor outputs the features from its graphs (CUDA verify graphs): it hands such a step to its eager path,
    where the capture's forward hooks run."""


# Prompt positions whose fused features a prefill worker ships with the KV. The head is trained attending to
# the last 64 prompt tokens (train_head --prompt-context); started from the last position alone it drafts
# worse (offline on the 20 built-in prompts, docs/speculative.md "Across the split"). 64 rows of [H] are
# 147 kB in fp32 for the embedded model, about a tenth of a 64-token prompt's KV.
SHIPPED_PROMPT_ROWS = 64


@dataclass
class _Draft:
    drafter: Drafter
    length: AdaptiveK


class Speculator:
    """Owns one drafter per decoding sequence (request_id → drafter), created when the sequence's first
    token is sampled and dropped when it finishes, is aborted or preempted (a preempted one starts afresh
    from its recompute). After each step's postprocess, `after_step` hands every sampling sequence's drafter
    the accepted tokens (and, for the head, the target's low/mid/high layer outputs at those positions,
    captured from the step's forward) and stores its next drafts in `seq.draft_token_ids`, which the
    scheduler verifies in the next step.

    Only the head captures features; with method ngram steps run on whatever path they would without
    speculation (on CPU, bs1 verify steps run flat; on CUDA, verify steps replay verify graphs,
    engine/verify_graphs.py, which output the head's features too; elsewhere eager: engine/executors/).

    Tree drafts (SpecConfig.tree_branching): the head proposes a top-k tree (engine/spec/head_tree.py) into
    `seq.draft_tree`, its rows in `seq.draft_token_ids`; the executor verifies it with a tree mask (CPU bs1:
    flat rows; otherwise eager, never a CUDA graph) and walks it (engine/spec/tree_verify.py); the head then
    learns the features of the walked path's rows.
    """

    def __init__(self, config: SpecConfig, model: LlamaModel, model_config: ModelConfig) -> None:
        if not config.enabled:
            raise ValueError("a Speculator needs a spec method other than 'off'")
        self.config = config
        self.embed = model.embed_tokens
        self.head: DraftHead | None = None
        self.capture: LayerCapture | None = None
        if config.method == "head":
            weight = model.embed_tokens.weight
            path = config.head_path or DEFAULT_HEAD_PATH
            self.head = DraftHead.load(path, weight.device, weight.dtype)
            if weight.device.type == "cpu":  # its GEMVs in the target's fp32 kernel (when fp32)
                self.head.use_cpu_linears()
            check_head_fits(self.head, model_config, str(path))
            self.capture = LayerCapture(model, self.head.config.feature_layers)
            logger.info("draft head %s: features of layers %s, %d draft ids", path,
                        self.head.config.feature_layers, self.head.config.draft_vocab_size)
        self._drafts: dict[str, _Draft] = {}
        self._features: torch.Tensor | None = None  # the last step's captured rows [T, F·H]
        self._rows: dict[str, tuple[int, int]] = {}  # request_id → (first row, rows) of its chunk then
        self._fed: Executor | None = None  # the executor feeding the capture itself (attach)
        self.features_in_graphs = False  # the executor's graphs hand `capture` the features (attach)
        self.draft_graphs: HeadDraftGraphs | None = None  # greedy head drafts in CUDA graphs
        # Measured step and drafting costs: adaptive k drafts only what pays (engine/spec/adaptive.py).
        self.costs = StepCosts() if config.adaptive else None

    # ---- the step ----

    def attach(self, executor: Executor, max_num_seqs: int, max_len: int) -> None:
        """Executors that can hand the capture each layer's output themselves keep capturing steps on their
        fast path: the CPU flat executor's `feed`, CUDA graphs that output the features (`keep_features`;
        greedy chain drafts then come from graphs too). The others get a layer hook that sends such a step
        to their eager path, where the capture's forward hooks run."""
        if self.capture is None:
            return
        feed = getattr(executor, "feed", None)
        if feed is not None:
            feed(self.capture.keep)
            self._fed = executor
        elif executor.keep_features(self.capture):
            self.features_in_graphs = True
            if not self.config.tree_branching:  # the draft graphs draft chains; trees draft eagerly
                self.draft_in_graphs(max_num_seqs, max_len)

    def execute(self, executor: Executor, batch: SchedulerOutput,
                layer_hook: LayerHook | None = None) -> RunOutput:
        """Runs the step through `executor`, keeping the feature rows of each chunk when the head drafts."""
        began = time.perf_counter()
        if self.capture is None:
            out = executor.execute(batch, layer_hook)
        else:
            fed = self.features_in_graphs or executor is self._fed
            out = executor.execute(batch, layer_hook if fed else layer_hook or _each_layer)
        chunks = batch.chunks
        if self.costs is not None and chunks and all(c.start >= c.seq.num_prompt_tokens for c in chunks):
            seconds = time.perf_counter() - began  # a decode/verify-only step: what the cost model fits
            verifying = [len(c.draft_token_ids) for c in chunks if c.draft_token_ids]
            self.costs.observe_step(len(chunks), len(verifying), sum(verifying), seconds)
        if self.capture is None:
            return out
        self._rows.clear()
        row = 0
        for chunk in batch.chunks:
            self._rows[chunk.seq.request_id] = (row, chunk.num_new_tokens)
            row += chunk.num_new_tokens
        self._features = self.capture.take() if batch.chunks else None
        return out

    def after_step(self, batch: SchedulerOutput) -> None:
        """After the scheduler's postprocess: drafters learn what each sampling chunk accepted, then draft."""
        for seq in batch.preempted:
            self.drop(seq.request_id)
        sequences = len(batch.chunks)
        proposing: list[tuple[Sequence, _Draft]] = []
        batched: list[tuple[SlotHeadDrafter, list[int], list[int]]] = []  # the graphs' accept
        graphs = self.draft_graphs
        learn_s = 0.0
        for chunk in batch.chunks:
            seq = chunk.seq
            if seq.status is not SequenceStatus.RUNNING:  # finished or aborted: its drafter goes too
                self.drop(seq.request_id)
                continue
            if not chunk.num_sampled:
                continue
            state = self._drafts.get(seq.request_id)
            kept = seq.num_tokens - chunk.output_start - 1  # postprocess appended kept drafts + 1
            if chunk.draft_token_ids and state is not None:
                depth = len(chunk.draft_token_ids) if chunk.tree is None else max(chunk.tree.depths)
                state.length.update(depth, kept)
            if chunk.tree is None:  # the chunk's leading rows: the last token and the kept drafts
                rows = range(seq.num_tokens - 1 - chunk.start)
            else:  # the walked path's rows
                rows = chunk.tree.path(seq.token_ids[chunk.output_start:chunk.output_start + kept])
            if state is not None and graphs is not None and graphs.batches(state.drafter, chunk.start,
                                                                            len(rows)):
                first, _ = self._rows[seq.request_id]
                batched.append((state.drafter, seq.token_ids, [first + r for r in rows]))
                proposing.append((seq, state))
                continue
            features = self._chunk_features(seq.request_id, rows)
            t0 = time.perf_counter()
            if state is None or not self._learn(state.drafter, seq, chunk.start, features):
                state = self._start(seq, chunk.start, features)
                if state is None:
                    continue
            learn_s += time.perf_counter() - t0
            proposing.append((seq, state))
        if batched:
            t0 = time.perf_counter()
            graphs.accept(batched, self._features)
            learn_s += time.perf_counter() - t0
        self._features = None
        t1 = time.perf_counter()
        drafted = self._propose_all(proposing, sequences)
        if self.costs is not None:
            self.costs.observe_drafting(len(proposing), drafted, learn_s, time.perf_counter() - t1)

    # ---- sequences arriving and leaving ----

    def start_decode(self, seq: Sequence, fused_features: torch.Tensor | None) -> None:
        """A sequence whose prompt was computed elsewhere joins with its first token: the head starts from the
        prefill worker's fused features of the last prompt positions ([r, H], or [H] for the last one alone);
        without them (that worker runs no head) the first decode step runs plain and the head starts from its
        features."""
        if self.head is None:
            state = self._start(seq, seq.num_tokens - 1, None)
        elif fused_features is None:
            return
        else:
            rows = fused_features.reshape(-1, self.head.config.hidden_size)
            drafter = self._head_drafter(seq, seq.num_tokens - 1 - rows.shape[0])
            drafter.accept_fused(seq.token_ids, rows)
            state = _Draft(drafter, self._length())
            self._drafts[seq.request_id] = state
        if state is not None:
            self._propose(seq, state, min(_room(seq), state.length.next(max(self.num_drafting, 1))))

    def draft_in_graphs(self, max_num_seqs: int, max_len: int) -> None:
        """CUDA: the head's KV lives in one slot per sequence, its accepts come from one graph replay per
        step for the whole batch and so do greedy drafts (HeadDraftGraphs, captured now), instead of
        eager head forwards per sequence. Drafters started from now on take a slot."""
        if self.head is None:
            raise ValueError("only the draft head drafts in graphs")
        self.draft_graphs = HeadDraftGraphs(self.head, self.embed, max_num_seqs, max_len, self.config.k)
        self.draft_graphs.capture_all()

    def drop(self, request_id: str) -> None:
        state = self._drafts.pop(request_id, None)
        if state is not None and isinstance(state.drafter, SlotHeadDrafter):
            state.drafter.release()  # its slot in the draft graphs' buffers

    def fused_features(self, request_id: str, rows: int = SHIPPED_PROMPT_ROWS) -> torch.Tensor | None:
        """The head's fused input features [r, H] of the last r ≤ `rows` positions `request_id` computed in
        the step just executed (what a prefill worker ships with the KV); None without a head or a chunk in
        that step."""
        if self.head is None or self._features is None or request_id not in self._rows:
            return None
        first, n = self._rows[request_id]
        tail = self._features[first + n - min(rows, n):first + n]
        with torch.no_grad():
            return self.head.fuse(tail.to(self.head.fc.weight.dtype)).clone()

    @property
    def num_drafting(self) -> int:
        return len(self._drafts)

    def close(self) -> None:
        """Removes the feature hooks from the model (engines sharing one model, benchmarks)."""
        if self.capture is not None:
            self.capture.close()
        if self._fed is not None:
            self._fed.feed(None)
            self._fed = None

    # ---- internals ----

    def _chunk_features(self, request_id: str, rows: range | tuple[int, ...]) -> torch.Tensor | None:
        """Those feature rows of request_id's chunk in the step just executed (None without a head)."""
        if self._features is None:
            return None
        first, _ = self._rows[request_id]
        if isinstance(rows, range):
            return self._features[first + rows.start:first + rows.stop]
        return self._features[torch.tensor(rows, device=self._features.device) + first]

    def _learn(self, drafter: Drafter, seq: Sequence, start: int, features: torch.Tensor | None) -> bool:
        """Feed the accepted positions; False if the drafter is not where this chunk starts (start afresh)."""
        if isinstance(drafter, HeadDrafter) and drafter.num_committed != start:
            return False
        drafter.accept(seq.token_ids, features)
        return True

    def _start(self, seq: Sequence, start: int, features: torch.Tensor | None) -> _Draft | None:
        if self.head is None:
            drafter: Drafter = NgramDrafter()
            drafter.accept(seq.token_ids, None)
        elif features is None:
            return None
        else:
            drafter = self._head_drafter(seq, start)
            drafter.accept(seq.token_ids, features)
        state = _Draft(drafter, self._length())
        self._drafts[seq.request_id] = state
        return state

    def _head_drafter(self, seq: Sequence, first_position: int) -> HeadDrafter:
        """With the draft graphs, a drafter in a slot of theirs (while one is free)."""
        self.drop(seq.request_id)  # a restarted sequence gives its old slot back first
        if self.draft_graphs is not None:
            drafter = self.draft_graphs.new_drafter(first_position, seq.sampling)
            if drafter is not None:
                return drafter
        return HeadDrafter(self.head, self.embed, first_position=first_position, sampling=seq.sampling)

    def _length(self) -> AdaptiveK:
        config = self.config
        rows = None
        if config.tree_branching:  # verify rows of each depth's tree, as max_nodes prunes it
            rows = [tree_nodes(config.tree_branching[:d]) for d in range(1, len(config.tree_branching) + 1)]
            rows = [min(r, config.tree_max_nodes or r) for r in rows]
        return AdaptiveK(config.draft_depth, config.adaptive, costs=self.costs, rows=rows)

    def _propose_all(self, proposing: list[tuple[Sequence, _Draft]], sequences: int) -> int:
        """Next drafts for each (seq, state), as many as its adaptive length asks (0: a plain step); greedy
        head drafters all at once in the draft graphs, if any. Returns the drafts proposed."""
        wanted = [(seq, state, min(_room(seq), state.length.next(sequences))) for seq, state in proposing]
        graphs = self.draft_graphs
        batched = [] if graphs is None else [
            (seq, state, n) for seq, state, n in wanted
            if n > 0 and isinstance(state.drafter, HeadDrafter) and graphs.serves(state.drafter)]
        if batched:
            drafts = graphs.propose([state.drafter for _, state, _ in batched], max(n for _, _, n in batched))
            for (seq, _, n), ids in zip(batched, drafts, strict=True):
                # The first n of the graph's drafts are what the drafter's propose(n) gives.
                seq.draft_token_ids, seq.draft_probs = ids[:n], None
        done = {id(seq) for seq, _, _ in batched}
        for seq, state, n in wanted:
            if id(seq) not in done:
                self._propose(seq, state, n)
        return sum(len(seq.draft_token_ids) for seq, _, _ in wanted)

    def _propose(self, seq: Sequence, state: _Draft, n: int) -> None:
        seq.draft_tree = None
        if n <= 0:  # no room, or drafts would not pay for themselves now: a plain step
            seq.draft_token_ids, seq.draft_probs = [], None
            return
        drafter, branching = state.drafter, self.config.tree_branching
        if branching and isinstance(drafter, HeadDrafter):
            # n levels; the scheduler verifies the leading rows that fit (`_room` caps only the depth).
            tree = head_tree_drafts(drafter, seq.token_ids[-1], branching[:n], self.config.tree_max_nodes)
            seq.draft_token_ids, seq.draft_probs = ([] if tree is None else list(tree.tokens[1:])), None
            seq.draft_tree = None if tree is None or tree.is_chain else tree
            return
        seq.draft_token_ids = drafter.propose(n)
        seq.draft_probs = drafter.draft_probs  # sampled drafts (head, T > 0): rejection-sampled


def _room(seq: Sequence) -> int:
    """Drafts worth proposing: the target's own token after the drafts is free, so up to max_tokens - 1
    ahead wastes none."""
    return seq.sampling.max_tokens - seq.num_output_tokens - 1


def check_head_fits(head: DraftHead, target: ModelConfig, where: str) -> None:
    """A head trained for another target fails loudly at engine start, naming what differs."""
    c = head.config
    wrong = [f"{name} {mine} != target's {theirs}" for name, mine, theirs in (
        ("hidden_size", c.hidden_size, target.hidden_size),
        ("target_vocab_size", c.target_vocab_size, target.vocab_size),
    ) if mine != theirs]
    if max(c.feature_layers) >= target.num_layers:
        wrong.append(f"feature layers {c.feature_layers} past the target's {target.num_layers} layers")
    if wrong:
        raise ValueError(f"draft head {where} does not fit {target.name}: " + "; ".join(wrong))
