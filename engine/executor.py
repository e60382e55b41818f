"""The execution contract: an Executor runs one scheduled batch and hands back what each sequence sampled."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch

from engine.model import LayerHook
from engine.scheduler import SchedulerOutput


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
    # request_id → one sampled id per sampled position of its chunk, in position order (sampling chunks).
    sampled: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # request_id → final hidden state [H] of the chunk's last token (draft-head features), sampling chunks.
    last_hidden: Mapping[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class SampledStep:
    """A step's results still on the device: `Executor.execute` turns them into host ints with one sync."""

    token_ids: torch.Tensor  # [R] int64: one per sampled position, sequences in order, positions in order
    seqs: tuple  # the sampling sequences (engine.sequence.Sequence), in row order
    last_hidden: torch.Tensor  # [len(seqs), H], owned by the caller (not a view of graph outputs)
    # Sampled positions per sequence; None: one each (every decode and prefill step; R == len(seqs)).
    num_sampled: tuple[int, ...] | None = None

    def to_output(self, ids_host: list[int]) -> RunOutput:
        """The RunOutput of this step, given token_ids copied to the host."""
        request_ids = tuple(s.request_id for s in self.seqs)
        if self.num_sampled is None:
            sampled = {rid: (token,) for rid, token in zip(request_ids, ids_host, strict=True)}
        else:
            sampled, row = {}, 0
            for rid, n in zip(request_ids, self.num_sampled, strict=True):
                sampled[rid] = tuple(ids_host[row:row + n])
                row += n
        return RunOutput(sampled=sampled, last_hidden=RowsByRequest(request_ids, self.last_hidden))


class FeatureSink(Protocol):
    """Where the draft head's target features go (engine.spec.target_forward.LayerCapture)."""

    @property
    def layers(self) -> tuple[int, ...]: ...

    def put(self, features: torch.Tensor) -> None: ...


class Executor(ABC):
    """Runs one scheduled batch on the model and the KV cache; chosen once when the engine is built.

    Contract of `execute(batch, layer_hook)`:
    - every chunk's tokens (`chunk.token_ids`, at positions chunk.start …) are run through the model and
      their K/V stored in the chunk's blocks, whatever path computes them;
    - for a chunk with `num_sampled = m > 0`, each of its last m positions p samples one token, seeded
      by (seed, p + 1) — the index that token takes in its sequence — so paths and processes agree;
      `RunOutput.sampled[request_id]` holds those m ids in position order and `last_hidden[request_id]`
      the final hidden state of the chunk's last token; chunks with m == 0 appear in neither; a verify
      chunk with `draft_probs` is rejection-sampled instead (engine/spec/rejection.py): its m ids are the
      accepted drafts, the target's token after them, then -1;
    - `layer_hook(i)`, when given, runs right after layer i stored its K/V (paths that cannot call it
      hand the batch to an eager executor);
    - an executor holds no scheduling state; the host waits for the device once per step, to read the
      sampled ids (the eager path's metadata upload aside).
    `launch(batch, layer_hook)` is the step up to the sampled ids, left on the device (no host sync on the
    graphed path); `execute` is `launch` plus that one sync. Callers of `launch` hold inference mode.
    """

    @abstractmethod
    def launch(self, batch: SchedulerOutput, layer_hook: LayerHook | None = None) -> SampledStep | None:
        """The step's sampled ids on the device; None if no chunk samples."""

    @torch.inference_mode()
    def execute(self, batch: SchedulerOutput, layer_hook: LayerHook | None = None) -> RunOutput:
        return read_to_host(self.launch(batch, layer_hook))

    def keep_features(self, capture: FeatureSink) -> bool:
        """Whether this executor's graphed steps hand `capture` the rows of its layers' outputs themselves
        (`capture.put`), so a step needs no layer hook to keep the draft head's features; then they do from
        now on. Default: no graph computes them (steps that want features run eagerly, where the capture's
        forward hooks see the layers)."""
        return False


def read_to_host(step: SampledStep | None) -> RunOutput:
    """The step's RunOutput, its sampled ids read with the step's one device → host sync."""
    return RunOutput() if step is None else step.to_output(step.token_ids.tolist())
