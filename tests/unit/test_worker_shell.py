"""The shared worker shell on the tiny random model: step loop via role hooks, info, failure, shutdown."""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future

import pytest
import torch

from contracts.sampling import SamplingParams
from engine.config import EngineConfig
from engine.executor import RunOutput
from engine.scheduler import SchedulerOutput
from engine.sequence import Sequence
from engine.worker_shell import WorkerActor, WorkerMetrics, WorkerService

CONFIG = EngineConfig(model_path="random:tiny", device="cpu", block_size=4, num_kv_blocks=16)


class GenerateService(WorkerService):
    """A toy role: generates whole requests and resolves a future per request when it finishes."""

    role = "toy"

    def __init__(self, fail_after_step: bool = False) -> None:
        super().__init__("toy-0", CONFIG)
        self.metrics = WorkerMetrics()
        self.fail_after_step = fail_after_step
        self.calls: list[str] = []
        self.polls = 0
        self.in_flight = False
        self._done: dict[str, Future] = {}
        self.start()

    async def generate(self, request_id: str, prompt: list[int]) -> list[int]:
        done: Future = Future()

        def add() -> None:
            self._done[request_id] = done
            self.engine.add_request(request_id, prompt, SamplingParams(max_tokens=4, ignore_eos=True))

        await self._on_engine_thread(add)
        return await asyncio.wrap_future(done)

    def _poll_transfers(self) -> bool:
        self.polls += 1
        return False

    def _transfers_in_flight(self) -> bool:
        return self.in_flight

    def _after_step(self, out: SchedulerOutput, run: RunOutput, finished: list[Sequence]) -> None:
        self.calls.append("after_step")
        if self.fail_after_step:
            raise RuntimeError("role bug")
        for seq in finished:
            self._done.pop(seq.request_id).set_result(seq.output_token_ids)

    def _abort(self, request_id: str, reason: str) -> bool:
        self.calls.append(f"abort:{reason}")
        return self.engine.abort(request_id)

    def _fail_waiters(self, error: str) -> None:
        for done in self._done.values():
            done.set_exception(RuntimeError(error))

    def _close(self) -> None:
        self.calls.append(f"close:thread_alive={self._thread.alive}")


def test_step_loop_runs_requests_through_the_role_hooks_and_info_reports_stats() -> None:
    service = GenerateService()
    try:
        async def scenario() -> None:
            ids = await service.generate("a", [1, 2, 3, 4, 5])
            assert len(ids) == 4
            info = await service.info()
            assert (info.worker_id, info.role, info.state) == ("toy-0", "toy", "ready")
            assert info.stats.num_free_blocks == info.stats.num_total_blocks == 16
            assert not await service.abort("a")  # finished: nothing left to free

        asyncio.run(scenario())
        assert "after_step" in service.calls and service.calls[-1] == "abort:abort"
        service.metrics.transfer_failed("lease expired")
        assert 'pdserve_kv_transfer_failures_total{reason="lease expired"} 1.0' in service.metrics_text()
    finally:
        service.shutdown()
    assert service.calls[-1] == "close:thread_alive=False"  # transports close after the thread stopped


def test_info_answers_at_once_from_the_published_snapshot_while_a_step_runs_for_seconds() -> None:
    service = GenerateService()
    entered, release = threading.Event(), threading.Event()
    run_step = service.engine.execute

    def slow_run(out: SchedulerOutput, *args: object, **kwargs: object) -> RunOutput:
        entered.set()
        release.wait(30)  # a long prefill (38 s for 4k tokens on a 2-core box), cut short by the test
        return run_step(out, *args, **kwargs)

    service.engine.execute = slow_run  # type: ignore[method-assign]
    try:
        async def scenario() -> None:
            generate = asyncio.create_task(service.generate("a", [1, 2, 3, 4, 5]))
            assert await asyncio.to_thread(entered.wait, 30)
            answers = []
            for _ in range(6):  # over a second of the step
                start = time.perf_counter()
                info = await service.info()
                answers.append((time.perf_counter() - start, info))
                await asyncio.sleep(0.2)
            release.set()
            assert len(await asyncio.wait_for(generate, 30)) == 4
            assert max(seconds for seconds, _ in answers) < 0.1
            for _, info in answers:  # not a failure; the snapshot from before the step counts the prompt
                assert info.state == "ready"
                assert (info.stats.num_waiting, info.stats.queued_prefill_tokens) == (1, 5)
            after = (await service.info()).stats
            assert (after.num_running, after.num_waiting, after.num_free_blocks) == (0, 0, 16)
            assert after.max_num_seqs == CONFIG.max_num_seqs

        asyncio.run(scenario())
    finally:
        release.set()
        service.shutdown()


def test_an_engine_thread_that_dies_makes_the_worker_report_failed() -> None:
    service = GenerateService(fail_after_step=True)
    try:
        async def scenario() -> None:
            with pytest.raises(RuntimeError, match="toy-0 engine thread died: RuntimeError: role bug"):
                await asyncio.wait_for(service.generate("a", [1, 2, 3]), timeout=30)

        asyncio.run(scenario())
        assert isinstance(service._thread.error, RuntimeError)
        assert asyncio.run(service.info()).state == "failed"
        with pytest.raises(RuntimeError, match="not running"):
            asyncio.run(service.abort("a"))
    finally:
        service.shutdown()


def test_actor_tail_sizes_torch_threads_before_building_the_service_and_forwards() -> None:
    before = torch.get_num_threads()
    seen: list[int] = []

    def make() -> GenerateService:
        seen.append(torch.get_num_threads())
        return GenerateService()

    try:
        actor = WorkerActor(EngineConfig(num_threads=1), make)
        assert seen == [1]
        assert "pdserve_kv_transfer_failures" in asyncio.run(actor.metrics_text())
        assert asyncio.run(actor.info()).state == "ready"
        asyncio.run(actor.shutdown())
        assert actor.service.calls[-1] == "close:thread_alive=False"
    finally:
        torch.set_num_threads(before)


def test_an_idle_worker_polls_often_only_while_a_transfer_is_in_flight() -> None:
    service = GenerateService()
    try:
        def polls_in(seconds: float) -> int:
            before = service.polls
            time.sleep(seconds)
            return service.polls - before

        assert polls_in(0.3) <= 4  # nothing in flight: it sleeps until a command (or 0.1 s) wakes it
        service.in_flight = True
        time.sleep(0.15)  # the current long wait ends
        assert polls_in(0.3) >= 10  # a lease to watch: every 5 ms (fewer on a busy box, not this few)
        service.in_flight = False
        assert len(asyncio.run(service.generate("r0", [1, 2, 3]))) == 4  # a command wakes the sleeper
    finally:
        service.shutdown()
