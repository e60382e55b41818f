"""Runs one scheduled step: flat inputs + attention metadata → forward → logits of sampling rows → tokens."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.attention_metadata import AttentionMetadata
from engine.config import ModelConfig
from engine.kv_cache import KVCache
from engine.model import LayerHook, LlamaModel
from engine.sampler import sample
from engine.scheduler import SchedulerOutput


@dataclass(frozen=True)
class RunOutput:
    sampled: dict[str, int] = field(default_factory=dict)  # request_id → next token (chunks with sample=True)
    # request_id → final hidden state [H] of the chunk's last token (draft-head features), sampling chunks.
    last_hidden: dict[str, torch.Tensor] = field(default_factory=dict)


class ModelRunner:
    """Owns no scheduling state: every call is a pure function of the SchedulerOutput plus the KV cache."""

    def __init__(self, model: LlamaModel, kv_cache: KVCache, model_config: ModelConfig,
                 device: torch.device | str = "cpu") -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.model_config = model_config
        self.device = torch.device(device)

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

    @torch.inference_mode()
    def run(self, out: SchedulerOutput, layer_hook: LayerHook | None = None) -> RunOutput:
        if not out.chunks:
            return RunOutput()
        ids, pos, meta = self.prepare(out)
        hidden = self.model(ids, pos, meta, self.kv_cache, layer_hook)
        sampling = [(c, span) for c, span in zip(out.chunks, meta.spans, strict=True) if c.sample]
        if not sampling:
            return RunOutput()
        rows = [span.query_start + span.query_len - 1 for _, span in sampling]
        # One sampling row (bs1 decode) is a view; several are one gather.
        if len(rows) == 1:
            last = hidden[rows[0]:rows[0] + 1]
        else:
            last = hidden[torch.tensor(rows, device=hidden.device)]
        seqs = [c.seq for c, _ in sampling]
        logits = self.model.compute_logits(last)
        token_ids = sample(logits, [s.sampling for s in seqs], [s.num_tokens for s in seqs])
        ids_host = token_ids.tolist()  # the step's only device → host sync
        return RunOutput(
            sampled={s.request_id: t for s, t in zip(seqs, ids_host, strict=True)},
            last_hidden={s.request_id: last[i] for i, s in enumerate(seqs)},
        )
