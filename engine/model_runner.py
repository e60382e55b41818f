"""Runs one scheduled step: flat inputs + attention metadata → forward → logits of sampling rows → tokens."""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch

from engine.attention_metadata import AttentionMetadata
from engine.config import ModelConfig
from engine.cuda_graphs import DecodeGraphRunner
from engine.kv_cache import KVCache
from engine.model import LayerHook, LlamaModel
from engine.sampler import sample
from engine.scheduler import SchedulerOutput
from engine.sequence import Sequence
from kernels import dispatch

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


@dataclass(frozen=True)
class SampledStep:
    """A step's results still on the device: what `run` turns into host ints with its one sync."""

    token_ids: torch.Tensor  # [N] int64, one per sampling sequence
    seqs: tuple[Sequence, ...]  # the sampling sequences, in row order
    last_hidden: torch.Tensor  # [N, H], owned by the caller (not a view of graph outputs)


def graph_safe_kernels(device: torch.device) -> bool:
    """Whether dispatch serves attention and KV stores with kernels a graph can replay.

    The torch references read host-side spans and cannot skip padded rows, so they never go into a graph.
    """
    from kernels.attention import paged_attention_ref, store_kv_ref

    return (device.type == "cuda"
            and dispatch.lookup("paged_attention", device) is not paged_attention_ref
            and dispatch.lookup("store_kv", device) is not store_kv_ref)


class ModelRunner:
    """Owns no scheduling state: every call is a pure function of the SchedulerOutput plus the KV cache.

    On CUDA, decode-only steps that fit a bucket replay a captured graph (`self.graphs`); prefill, mixed and
    hooked steps run eagerly. `use_graphs` switches replay off at run time (eager kernels, A/B timing).
    """

    def __init__(self, model: LlamaModel, kv_cache: KVCache, model_config: ModelConfig,
                 device: torch.device | str = "cpu", max_num_seqs: int = 32, max_model_len: int | None = None,
                 cuda_graphs: bool | None = None) -> None:
        """`cuda_graphs`: None = on where possible (CUDA, Triton kernels, PDSERVE_CUDA_GRAPHS != 0)."""
        self.model = model
        self.kv_cache = kv_cache
        self.model_config = model_config
        self.device = torch.device(device)
        possible = graph_safe_kernels(self.device)
        if cuda_graphs is None:
            cuda_graphs = possible and os.environ.get(_GRAPHS_ENV, "1") != "0"
        elif cuda_graphs and not possible:
            raise ValueError(f"CUDA graphs need a CUDA device and the Triton kernels (device {self.device})")
        self.graphs: DecodeGraphRunner | None = None
        if cuda_graphs:
            max_len = max_model_len or model_config.max_position_embeddings
            self.graphs = DecodeGraphRunner(model, kv_cache, max_num_seqs, max_len, self.device)
        self.use_graphs = self.graphs is not None

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

    def graphed(self, out: SchedulerOutput, layer_hook: LayerHook | None = None) -> bool:
        """Whether this step replays a decode graph (decode-only, fits a bucket, no per-layer host hook)."""
        return (self.use_graphs and self.graphs is not None and layer_hook is None
                and self.graphs.fits(out.chunks))

    @torch.inference_mode()
    def run(self, out: SchedulerOutput, layer_hook: LayerHook | None = None) -> RunOutput:
        step = self._forward_and_sample(out, layer_hook)
        if step is None:
            return RunOutput()
        ids_host = step.token_ids.tolist()  # the step's only device → host sync
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
