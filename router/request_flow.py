"""RequestFlow: one request end to end: queue until a worker has room, prefill (or local), relay, clean up."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc

from contracts.sampling import FinishReason, SamplingParams
from contracts.stats import WorkerInfo
from contracts.transfer import TransferTarget
from decode_worker.api import NoCapacity, Reservation, ReserveRequest, TokenChunk
from prefill_worker.api import PrefillFailed, PrefillRequest, PrefillResult
from proto.api import pb
from router.admission import Admission, QueueFull, Ticket
from router.clients import DecodeClient, WorkerClient, WorkerUnavailable
from router.config import RouterConfig
from router.dispatch import DispatchPolicy, PromptBlocks
from router.flow_errors import DecodeLost, FlowError, FlowFailure
from router.metrics import RouterMetrics
from router.migration import Streamed, decode_comes_back, wait_for_ready_decode
from router.placement import NO_PREFILL_WORKER, PlacementPolicy
from router.token_relay import TokenRelay
from router.validation import ValidatedRequest
from router.workers import DECODE, PREFILL, WorkerPool

log = logging.getLogger(__name__)

LOCAL_PREFILL = "local"  # Timings.prefill_worker when the decode worker prefilled the prompt itself
_FINISH_TO_PB = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}


class RequestFlow:
    """Runs in its own task so that Abort, client cancel and the deadline all end it the same way: cancel the
    task, abort every worker it touched exactly once, free the admission slot, then emit the terminal event.
    The gRPC handler only relays `events()`, whose reading task also reads the decode stream (TokenRelay)."""

    def __init__(
        self,
        request: ValidatedRequest,
        *,
        pool: WorkerPool,
        policy: DispatchPolicy,
        placement: PlacementPolicy,
        admission: Admission,
        metrics: RouterMetrics,
        config: RouterConfig,
        budget_s: float,
        api: str,
    ) -> None:
        self.request = request
        self.api = api  # the door it came through ("grpc" | "http"): a metrics label, nothing else
        self._pool, self._policy, self._placement, self._admission = pool, policy, placement, admission
        self._metrics, self._config = metrics, config
        self._budget_s = budget_s
        self._events: asyncio.Queue[pb.GenerateResponse | FlowError | TokenRelay] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._stop_reason: str | None = None  # "abort" (Abort RPC) | "cancelled" (client gone, shutdown)
        self._closing = False
        # Workers that may hold state for this request; aborted once each unless the request ends normally.
        self._touched: dict[str, WorkerClient] = {}
        loop = asyncio.get_running_loop()
        self._received_at = loop.time()
        self._deadline = self._received_at + budget_s
        self._dispatched_at: float | None = None  # a decode worker reserved room: it left the queue
        self._ticket: Ticket | None = None  # its place in the admission queue
        self._holds_slot = False  # an admission in-flight slot, given back exactly once
        self._refusal = ""  # why the last reservation round found no room (named when the deadline hits)
        self._first_token_at: float | None = None
        self._num_output = 0
        self._num_drafted = self._num_accepted = 0  # speculative decoding, summed over the stream's chunks
        self._streamed = Streamed()  # what the client has: where a migrated request continues
        self._finish: FinishReason | None = None
        self._decode_id = ""
        self._prefill_id = ""
        self._prefill_result: PrefillResult | None = None
        self._prompt_blocks: PromptBlocks | None = None  # the attempt's prompt, as dispatch policies see it

    # -- control -------------------------------------------------------------------------------------------
    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self._run(), name=f"request-{self.request.request_id}")
        return self._task

    def stop(self, reason: str) -> None:
        """Abort RPC ("abort") or client gone ("cancelled"); a no-op once the flow is finishing."""
        if self._task is None or self._task.done() or self._closing:
            return
        if reason == "cancelled" and asyncio.get_running_loop().time() >= self._deadline:
            reason = "deadline"  # gRPC cancels at the client's deadline, on a busy loop before our own timer
        self._stop_reason = self._stop_reason or reason
        self._task.cancel()

    async def wait_closed(self, timeout_s: float) -> None:
        if self._task is not None:
            await asyncio.wait({self._task}, timeout=timeout_s)  # never cancels the flow itself

    async def events(self) -> AsyncIterator[pb.GenerateResponse | FlowError]:
        """Deltas, then exactly one terminal event: a final message or a FlowError. The caller's task reads
        the decode stream itself (TokenRelay): a token reaches the caller's write with no task switch. Leaving
        early stops the flow, as a client that goes away does."""
        try:
            while True:
                event = await self._events.get()
                if isinstance(event, TokenRelay):
                    async with aclosing(event.deltas(self._relay_chunk, self._metrics)) as deltas:
                        async for delta in deltas:
                            yield delta
                    continue
                yield event
                if isinstance(event, FlowError) or event.WhichOneof("payload") == "final":
                    return
        finally:
            self.stop("cancelled")  # a no-op once the flow is finishing

    # -- the request -----------------------------------------------------------------------------------------
    async def _run(self) -> None:
        outcome, terminal = "error", None
        try:
            async with asyncio.timeout_at(self._deadline):
                self._finish = await self._serve()
            outcome = self._finish.value
        except QueueFull as e:
            self._metrics.count_rejected("queue_full")
            terminal = FlowError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e), retry_after_s=e.retry_after_s)
            outcome = "rejected"
        except TimeoutError:
            outcome = "deadline"
            message = f"request {self.request.request_id} exceeded its deadline of {self._budget_s:.3g}s"
            if self._dispatched_at is None:
                self._metrics.count_rejected("deadline")
                message += " waiting for a decode worker with room"
                message += f" ({self._refusal or self._admission.describe()})"
            terminal = FlowError(grpc.StatusCode.DEADLINE_EXCEEDED, message)
        except FlowFailure as e:
            outcome, terminal = e.outcome, FlowError(e.code, e.message)
        except asyncio.CancelledError:
            if self._stop_reason is None:
                raise  # not ours to swallow
            asyncio.current_task().uncancel()  # type: ignore[union-attr]  # we asked for it; finish cleanly
            outcome = self._stop_reason
            self._finish = FinishReason.ABORT
        except Exception as e:
            log.exception("request %s failed", self.request.request_id)
            outcome, terminal = (
                "error",
                FlowError(grpc.StatusCode.INTERNAL, f"internal error ({type(e).__name__})"),
            )
        finally:
            self._closing = True
            if outcome not in ("stop", "length"):
                await self._abort_workers()
            if self._holds_slot:
                self._holds_slot = False
                self._admission.release(self._ticket)
            self._record(outcome)
            self._events.put_nowait(terminal if terminal is not None else self._final_message())

    async def _serve(self) -> FinishReason:
        while True:
            try:
                return await self._attempt()
            except DecodeLost as e:
                self._touched.pop(e.worker_id, None)  # gone, or failed everything it held: no abort call
                limit, streamed = self._config.migration_limit, self._streamed
                if streamed.migrations >= limit:
                    message = f"{e.message} (migration limit {limit} reached)"
                    raise FlowFailure(grpc.StatusCode.UNAVAILABLE, message, "unavailable") from None
                streamed.migrate(e.worker_id)
                self._metrics.request_migrated()
                await self._abort_workers()  # e.g. the prefill worker still sending to the dead one
                log.warning("request %s migrates after %d tokens (%d/%d): %s", self.request.request_id,
                            len(streamed.output_ids), streamed.migrations, limit, e.message)

    async def _attempt(self) -> FinishReason:
        """One decode worker's go at the request: from the prompt plus any tokens already streamed."""
        req = self.request
        n = len(req.prompt_token_ids) + len(self._streamed.output_ids)
        if not self._streamed.lost and not self._pool.ready(DECODE):  # (a migrating one: _decode_candidates)
            wait_s = self._config.decode_ready_wait_s
            if not await decode_comes_back(self._pool, wait_s):
                raise FlowFailure(grpc.StatusCode.UNAVAILABLE,
                                  f"no decode worker is ready (waited {wait_s:g} s for one)", "unavailable")
        placement = self._placement.place(n, self._pool.ready(PREFILL), self._pool.ready(DECODE))
        if placement.reason == NO_PREFILL_WORKER and self._config.kv_failure_policy != "recompute":
            raise FlowFailure(grpc.StatusCode.UNAVAILABLE, "no prefill worker is ready", "unavailable")
        self._metrics.prefill_placed(placement.where, placement.reason)
        local = placement.local
        reserve = self._streamed.reserve_request(req.request_id, req.prompt_token_ids, req.sampling, local)
        self._prompt_blocks = PromptBlocks(reserve.prompt_token_ids)  # hashed only if the policy asks
        decode, reservation = await self._admit(reserve)
        if self._dispatched_at is None:  # first placement: it left the admission queue
            self._dispatched_at = asyncio.get_running_loop().time()
            self._metrics.observe_queue_wait(self._dispatched_at - self._received_at)
        tasks = [asyncio.create_task(self._relay(decode))]
        if not local:
            tasks.append(asyncio.create_task(
                self._prefill(decode, reservation, reserve.prompt_token_ids, reserve.sampling)))
        else:
            self._prefill_id = LOCAL_PREFILL
        try:
            pending: set[asyncio.Task[None]] = set(tasks)
            while pending:  # first failure wins; prefill finishing first is the normal order
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    t.result()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._finish is None:  # _relay returns only after a finish chunk; guard the invariant anyway
            raise RuntimeError("decode stream ended without a finish reason")
        return self._finish

    async def _admit(self, reserve: ReserveRequest) -> tuple[DecodeClient, Reservation]:
        """Wait in the admission queue for a slot, then for a decode worker that takes the reservation; a
        round where every worker refuses puts the request back at its place in the queue, not to the client.
        A migrating request keeps the slot it holds and only waits for room."""
        if not self._holds_slot:
            self._ticket = await self._admission.acquire()
            self._holds_slot = True
        while (placed := await self._reserve(reserve)) is None:
            self._holds_slot = False
            await self._admission.requeue(self._ticket)
            self._holds_slot = True
        self._admission.placed(self._ticket)
        return placed

    async def _decode_candidates(self) -> list[WorkerInfo]:
        """Ready decode workers in policy order; after a death, the others first, else the first that answers
        ready again (router/migration.py)."""
        order = self._policy.order_decode(self._pool.ready(DECODE), prompt=self._prompt_blocks)
        if not self._streamed.lost:
            return order
        others = [i for i in order if i.worker_id not in self._streamed.lost]
        return others or [await wait_for_ready_decode(self._pool, self._config.worker_call_timeout_s)]

    async def _reserve(self, reserve: ReserveRequest) -> tuple[DecodeClient, Reservation] | None:
        """Try the ready decode workers in policy order; None if every one said NoCapacity."""
        order = await self._decode_candidates()
        if not order:
            raise FlowFailure(grpc.StatusCode.UNAVAILABLE, "no decode worker is ready", "unavailable")
        local = reserve.prefill_locally
        refusals: list[str] = []
        unreachable: list[str] = []
        for info in order:
            client = self._pool.decode(info.worker_id)
            # Marked before the call: if we are cancelled mid-call the worker may already hold blocks.
            self._touched[client.worker_id] = client
            try:
                reservation = await client.reserve(reserve)
            except NoCapacity as e:
                del self._touched[client.worker_id]
                refusals.append(str(e))
                continue
            except WorkerUnavailable as e:
                del self._touched[client.worker_id]
                unreachable.append(str(e))
                continue
            self._decode_id = client.worker_id
            self._pool.note_reserved(client.worker_id, len(reservation.block_ids), local,
                                     len(reserve.prompt_token_ids))
            return client, reservation
        if not refusals:
            raise FlowFailure(
                grpc.StatusCode.UNAVAILABLE,
                f"no decode worker could be reached: {'; '.join(unreachable)}",
                "unavailable",
            )
        self._refusal = "; ".join(refusals)
        log.debug("no room for %s yet: %s", reserve.request_id, self._refusal)
        return None

    async def _prefill(
        self,
        decode: DecodeClient,
        reservation: Reservation,
        prompt: tuple[int, ...],
        sampling: SamplingParams,
    ) -> None:
        rid = self.request.request_id
        n = len(prompt)
        order = self._policy.order_prefill(self._pool.ready(PREFILL), n, prompt=self._prompt_blocks)
        if not order:
            return await self._prefill_failed(decode, "no prefill worker is ready", "unavailable")
        client = self._pool.prefill(order[0].worker_id)
        self._prefill_id = client.worker_id
        target = TransferTarget(rid, self._decode_id, reservation.block_ids, num_tokens=n,
                                start_token=reservation.start_token)
        self._touched[client.worker_id] = client
        self._pool.note_prefill(client.worker_id, n, finished=False)
        try:
            called = time.perf_counter()
            self._prefill_result = await client.prefill(PrefillRequest(rid, prompt, sampling, target))
            self._placement.observe(n, self._prefill_result, time.perf_counter() - called)
        except PrefillFailed as e:
            del self._touched[client.worker_id]  # the prefill side cleaned up after itself
            await self._prefill_failed(decode, f"prefill failed on {client.worker_id}: {e}", "prefill_failed")
        except WorkerUnavailable as e:
            self._touched.pop(client.worker_id, None)
            await self._prefill_failed(decode, str(e), "unavailable")
        finally:
            self._pool.note_prefill(client.worker_id, n, finished=True)

    async def _prefill_failed(self, decode: DecodeClient, message: str, outcome: str) -> None:
        """--kv-failure-policy: "recompute" has the decode worker prefill the prompt itself (the stream
        goes on); "fail" ends the request with the reason."""
        if self._config.kv_failure_policy != "recompute":
            raise FlowFailure(grpc.StatusCode.UNAVAILABLE, message, outcome)
        log.warning("request %s: %s; prefilling on %s", self.request.request_id, message, decode.worker_id)
        self._prefill_id = LOCAL_PREFILL
        try:
            # False: the KV arrived after all, or the decode worker already recomputed on its own.
            await asyncio.wait_for(decode.recompute(self.request.request_id),
                                   self._config.worker_call_timeout_s)
        except (WorkerUnavailable, TimeoutError) as e:
            raise DecodeLost(decode.worker_id, f"decode worker {decode.worker_id} is gone: {e}") from None

    async def _relay(self, decode: DecodeClient) -> None:
        """Hand the attempt's token stream to the reader of `events()` and wait for its verdict."""
        relay = TokenRelay(decode.worker_id, decode.stream(self.request.request_id))
        self._events.put_nowait(relay)
        try:
            self._finish = await relay.done
        finally:
            relay.interrupt()

    def _relay_chunk(self, chunk: TokenChunk) -> pb.GenerateResponse | None:
        """One chunk of the decode stream: its delta for the client, if it carries any."""
        text = self._streamed.relay(chunk.token_ids, chunk.text)
        if not chunk.token_ids and not text:
            return None
        if self._first_token_at is None:
            self._first_token_at = asyncio.get_running_loop().time()
        self._num_output += len(chunk.token_ids)
        self._num_drafted += chunk.num_draft_tokens
        self._num_accepted += chunk.num_accepted_tokens
        return pb.GenerateResponse(request_id=self.request.request_id,
                                   delta=pb.TokenDelta(token_ids=chunk.token_ids, text=text))

    # -- finishing -------------------------------------------------------------------------------------------
    async def _abort_workers(self) -> None:
        touched, self._touched = list(self._touched.values()), {}  # emptied first: exactly once
        if not touched:
            return
        rid = self.request.request_id

        async def abort(client: WorkerClient) -> bool:
            return await asyncio.wait_for(client.abort(rid), self._config.worker_call_timeout_s)

        results = await asyncio.gather(*(abort(c) for c in touched), return_exceptions=True)
        for client, result in zip(touched, results, strict=True):
            if isinstance(result, BaseException):
                log.warning(
                    "abort(%s) on %s failed: %s: %s", rid, client.worker_id, type(result).__name__, result
                )

    def _elapsed(self, since: float | None, until: float | None = None) -> float:
        if since is None:
            return 0.0
        end = until if until is not None else asyncio.get_running_loop().time()
        return max(0.0, end - since)

    def _record(self, outcome: str) -> None:
        ttft = self._elapsed(self._received_at, self._first_token_at) if self._first_token_at else None
        self._metrics.observe_request(
            outcome,
            api=self.api,
            prompt_tokens=len(self.request.prompt_token_ids) if self._dispatched_at is not None else 0,
            completion_tokens=self._num_output,
            ttft_s=ttft,
            e2e_s=self._elapsed(self._received_at) if outcome in ("stop", "length") else None,
        )

    def _final_message(self) -> pb.GenerateResponse:
        finish, received, first = self._finish or FinishReason.ABORT, self._received_at, self._first_token_at
        timings = pb.Timings(
            queue_seconds=self._elapsed(received, self._dispatched_at) if self._dispatched_at else 0.0,
            ttft_seconds=self._elapsed(received, first) if first is not None else 0.0,
            prefill_seconds=self._prefill_result.prefill_seconds if self._prefill_result else 0.0,
            e2e_seconds=self._elapsed(self._received_at),
            prefill_worker=self._prefill_id,
            decode_worker=self._decode_id,
        )
        usage = pb.Usage(prompt_tokens=len(self.request.prompt_token_ids), completion_tokens=self._num_output,
                         draft_tokens=self._num_drafted, accepted_draft_tokens=self._num_accepted)
        return pb.GenerateResponse(
            request_id=self.request.request_id,
            final=pb.FinalResult(finish_reason=_FINISH_TO_PB[finish], usage=usage, timings=timings),
        )
