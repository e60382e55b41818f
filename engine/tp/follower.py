"""Rank 0 schedules and samples; follower ranks run the same steps: the leader executor broadcasts each batch
before running it, the follower loop runs what it receives (collectives inside pair up step by step)."""
from __future__ import annotations

from engine.executor import Executor, SampledStep
from engine.model import LayerHook
from engine.scheduler import SchedulerOutput
from engine.tp.group import TPGroup
from engine.tp.step_message import receive_step, send_step


class TPLeaderExecutor(Executor):
    """Rank 0's executor: every launched step is first sent to the followers."""

    def __init__(self, inner: Executor, group: TPGroup) -> None:
        self.inner = inner
        self.group = group

    def launch(self, batch: SchedulerOutput, layer_hook: LayerHook | None = None) -> SampledStep | None:
        if not batch.chunks:
            return None  # nothing runs: the followers are not asked either
        send_step(self.group, batch)
        return self.inner.launch(batch, layer_hook)

    def stop_followers(self) -> None:
        send_step(self.group, None)


def follow(executor: Executor, group: TPGroup) -> int:
    """A follower rank's loop: run rank 0's steps until it stops; returns the number of steps run."""
    steps = 0
    while (batch := receive_step(group)) is not None:
        executor.execute(batch)
        steps += 1
    return steps
