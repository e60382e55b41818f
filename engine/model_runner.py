"""Runs one scheduled step: flat inputs + attention metadata → forward → logits of sampling rows → tokens."""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch

from engine.config import ModelConfig
from engine.cpu_decode import FlatDecoder
from engine.cuda_graphs import DecodeGraphRunner
from engine.kv_cache import KVCache
from engine.lookahead import DecodeLookahead, SampledStep
from engine.model import LayerHook, LlamaModel
from engine.sampler import sample
from engine.scheduler import SchedulerOutput
from kernels.attention.metadata import AttentionMetadata

logger = logging.getLogger(__name__)

# PDSERVE_CUDA_GRAPHS=0 runs every CUDA step eagerly (debugging, A/B timing).
_GRAPHS_ENV = "PDSERVE_CUDA_GRAPHS"


class RowsByRequest(Mapping[str, torch.Tensor]):
    """request_id → one row of an [N, H] tensor, sliced only when asked for.

    Decode steps never ask (only the prefill side ships draft features), so a batch of 128 costs no
    per-row tensor views.
    """

    def __init__(self, request_ids: tuple[str, ...], rows: torch.Tensor) -> None:
        self._index = {rid: i for i, rid in enumerate(request_ids)}
        self._rows = rows

    def __getitem__(self, request_id: str) -> torch.Tensor:
        return self._rows[self._index[request_id]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


@dataclass(frozen=True)
class RunOutput:
    sampled: dict[str, int] = field(default_factory=dict)  # request_id → next token (chunks with sample=True)
    # request_id → final hidden state [H] of the chunk's last token (draft-head features), sampling chunks.
    last_hidden: Mapping[str, torch.Tensor] = field(default_factory=dict)


def graph_safe_kernels(model: LlamaModel, device: torch.device) -> bool:
    """Whether the model's kernels are ones a CUDA graph can replay (KernelRegistry.graph_safe)."""
    return device.type == "cuda" and model.kernels.graph_safe


class ModelRunner:
    """Owns no scheduling state: every call is a pure function of the SchedulerOutput plus the KV cache.

    On CUDA, decode-only steps that fit a bucket replay a captured graph (`self.graphs`); prefill, mixed and
    hooked steps run eagerly. `use_graphs` switches replay off at run time (eager kernels, A/B timing).
    On CPU, a one-sequence decode step runs `self.flat_decoder` (the model's math in fewer torch calls) when
    it can.
    """

    def __init__(self, model: LlamaModel, kv_cache: KVCache, model_config: ModelConfig,
                 device: torch.device | str = "cpu", max_num_seqs: int = 32, max_model_len: int | None = None,
                 cuda_graphs: bool | None = None) -> None:
        """`cuda_graphs`: None = on where possible (CUDA, Triton kernels, PDSERVE_CUDA_GRAPHS != 0)."""
        self.model = model
        self.kv_cache = kv_cache
        self.model_config = model_config
        self.device = torch.device(device)
        possible = graph_safe_kernels(model, self.device)
        if cuda_graphs is None:
            cuda_graphs = possible and os.environ.get(_GRAPHS_ENV, "1") != "0"
        elif cuda_graphs and not possible:
            raise ValueError(f"CUDA graphs need a CUDA device and the Triton kernels (device {self.device})")
        self.graphs: DecodeGraphRunner | None = None
        if cuda_graphs:
            max_len = max_model_len or model_config.max_position_embeddings
            self.graphs = DecodeGraphRunner(model, kv_cache, max_num_seqs, max_len, self.device)
        self.use_graphs = self.graphs is not None
        # Decode engines set this (LLMEngine): graphed decode steps launch the step after them early.
        self.lookahead: DecodeLookahead | None = None
        # CPU: bs1 decode steps run the model's math flat (FlatDecoder) when its layout allows it.
        self.flat_decoder: FlatDecoder | None = None
        if self.device.type == "cpu" and FlatDecoder.supports(model, kv_cache):
            self.flat_decoder = FlatDecoder(model, kv_cache)

    def prepare(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """(input_ids [T], positions [T], metadata), rows in chunk order."""
        token_ids: list[int] = []
        positions: list[int] = []
        for chunk in out.chunks:
            end = chunk.start + chunk.num_new_tokens
            token_ids.extend(chunk.seq.token_ids[chunk.start:end])
            positions.extend(range(chunk.start, end))
        meta = AttentionMetadata.from_chunks(out.chunks, self.kv_cache.block_size, self.device)
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        return ids, pos, meta

    def flat_decode(self, out: SchedulerOutput, layer_hook: LayerHook | None = None) -> torch.Tensor | None:
        """Hidden state [1, H] of a bs1 decode step run by the flat CPU decoder; None (nothing computed) if
        the step does not fit it: several chunks, a prefill chunk, a layer hook, non-consecutive KV blocks."""
        if self.flat_decoder is None or layer_hook is not None or len(out.chunks) != 1:
            return None
        chunk = out.chunks[0]
        if chunk.num_new_tokens != 1:
            return None
        seq, position, block_size = chunk.seq, chunk.start, self.kv_cache.block_size
        num_blocks = position // block_size + 1
        blocks = seq.block_table[:num_blocks]
        first = blocks[0] if blocks else 0
        if len(blocks) < num_blocks or blocks != list(range(first, first + num_blocks)):
            return None  # the plain path gathers scattered blocks (and reports a short table)
        return self.flat_decoder(seq.token_ids[position], position, first * block_size)

    def graphed(self, out: SchedulerOutput, layer_hook: LayerHook | None = None) -> bool:
        """Whether this step replays a decode graph (decode-only, fits a bucket, no per-layer host hook)."""
        return (self.use_graphs and self.graphs is not None and layer_hook is None
                and self.graphs.fits(out.chunks))

    @torch.inference_mode()
    def run(self, out: SchedulerOutput, layer_hook: LayerHook | None = None,
            look_ahead: bool = True) -> RunOutput:
        """look_ahead False: launch nothing ahead of this step (others are waiting to join the batch)."""
        lookahead = self.lookahead if self.graphed(out, layer_hook) else None
        step = None
        if lookahead is not None:
            step = lookahead.claim(out)  # the step launched ahead of this one, if it is this one
        elif self.lookahead is not None:
            self.lookahead.drop()  # an eager step: whatever was launched ahead is stale
        if step is None:
            step = self._forward_and_sample(out, layer_hook)
        if step is None:
            return RunOutput()
        if lookahead is None:
            ids_host = step.token_ids.tolist()  # the step's only device → host sync
        else:
            # Queue this step's ids for the host before launching the next step behind them, then wait.
            pinned = torch.empty(step.token_ids.shape, dtype=step.token_ids.dtype, pin_memory=True)
            pinned.copy_(step.token_ids, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
            if look_ahead:
                lookahead.launch(out.chunks, step)
            copied.synchronize()
            ids_host = pinned.tolist()
        request_ids = tuple(s.request_id for s in step.seqs)
        return RunOutput(sampled=dict(zip(request_ids, ids_host, strict=True)),
                         last_hidden=RowsByRequest(request_ids, step.last_hidden))

    @torch.inference_mode()
    def forward_and_sample(self, out: SchedulerOutput,
                           layer_hook: LayerHook | None = None) -> SampledStep | None:
        """The step up to the sampled ids, left on the device; None if no chunk samples.

        A graphed step syncs nowhere (inputs go up by one non-blocking copy from pinned memory); the eager
        path's metadata upload does.
        """
        return self._forward_and_sample(out, layer_hook)

    def _forward_and_sample(self, out: SchedulerOutput, layer_hook: LayerHook | None) -> SampledStep | None:
        # Callers hold inference mode (entering it costs tens of µs on slow hosts, and decode is host-bound).
        if not out.chunks:
            return None
        rows = [i for i, c in enumerate(out.chunks) if c.sample]
        graphs = self.graphs if self.graphed(out, layer_hook) else None
        if graphs is not None:
            hidden, logits = graphs.run(out.chunks)
            if not rows:
                return None
            if len(rows) == len(out.chunks):
                last = hidden.clone()  # graph outputs are overwritten by the next replay
            else:  # 1-token chunks mid-prompt ride along but do not sample
                index = torch.tensor(rows).to(self.device, non_blocking=True)
                last, logits = hidden[index], logits[index]
        elif (flat := self.flat_decode(out, layer_hook)) is not None:
            if not rows:
                return None
            last, logits = flat, self.model.compute_logits(flat)
        else:
            ids, pos, meta = self.prepare(out)
            hidden = self.model(ids, pos, meta, self.kv_cache, layer_hook)
            if not rows:
                return None
            ends = [span.query_start + span.query_len - 1 for span in (meta.spans[i] for i in rows)]
            # One sampling row (bs1 decode) is a view; several are one gather.
            if len(ends) == 1:
                last = hidden[ends[0]:ends[0] + 1]
            else:
                last = hidden[torch.tensor(ends).to(hidden.device, non_blocking=True)]
            logits = self.model.compute_logits(last)
        seqs = tuple(out.chunks[i].seq for i in rows)
        token_ids = sample(logits, [s.sampling for s in seqs], [s.num_tokens for s in seqs])
        return SampledStep(token_ids, seqs, last)
