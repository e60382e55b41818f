"""The two processes of the KV-transfer benchmark: the prefill side and the decode side.

The prefill side serves prefill calls; the decode side drives the run, hosts the channel, measures, then runs
the colocated reference.
"""
from __future__ import annotations

import asyncio
import datetime
import gc
import logging
import time
import traceback
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

from bench.transfer._kv_services import (
    TimedDecodeService,
    TimedPrefillService,
    bare_send_recv_seconds,
    close_pair_group,
    pair_group,
    weights_fingerprint,
)
from contracts.kv_cache_spec import scales_for
from contracts.sampling import SamplingParams
from contracts.transfer import TransferTarget
from decode_worker.api import ReserveRequest
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from kv_transfer.frame import segment_offsets
from kv_transfer.layout import KVLayout
from prefill_worker.api import PrefillRequest

LAYERWISE, AFTER_PREFILL = "layerwise", "after_prefill"
MODES = (LAYERWISE, AFTER_PREFILL)
_CONNECT_TIMEOUT = 900.0  # the peer may still be building an 8B model (two of them, on the prefill side)


@dataclass(frozen=True)
class BenchPlan:
    # "cpu" (gloo, both processes on the CPU) | "cuda" (prefill on cuda:0, decode on cuda:1, NCCL)
    device: str
    model: str
    dtype: str
    prompts: tuple[int, ...]
    new_tokens: int
    max_batch_tokens: int
    repeats: int
    warmup: int
    bandwidth_repeats: int
    threads: int  # torch intra-op threads per process on CPU; 0 = torch's default
    seed: int = 1234
    kv_cache_dtype: str = "auto"  # EngineConfig.kv_cache_dtype of both sides

    def device_of(self, role: str) -> str:
        if self.device == "cpu":
            return "cpu"
        return "cuda:0" if role == "prefill" else "cuda:1"

    def engine_config(self, role: str) -> EngineConfig:
        block_size = 16
        # One request at a time: room for the longest prompt plus its output, and a spare block. No prefix
        # cache: each round sends the same prompts again, and a cache hit would leave nothing to transfer.
        blocks = -(-(max(self.prompts) + self.new_tokens) // block_size) + 1
        return EngineConfig(model_path=self.model, device=self.device_of(role), dtype=self.dtype,
                            kv_cache_dtype=self.kv_cache_dtype, block_size=block_size, num_kv_blocks=blocks,
                            max_batch_tokens=self.max_batch_tokens,
                            max_model_len=max(self.prompts) + self.new_tokens, prefix_caching=False)

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(max_tokens=self.new_tokens, ignore_eos=True)  # greedy, fixed length


def layer_message_bytes(layout: KVLayout, num_tokens: int) -> list[int]:
    """Payload of each layer's KV frame for a prompt (k then v, 16-byte aligned), as the sender ships it."""
    kv = layout.num_blocks_for(num_tokens) * layout.block_bytes()
    return [segment_offsets([kv, kv])[1]] * layout.num_layers


def _setup(plan: BenchPlan, role: str) -> torch.device:
    logging.basicConfig(level=logging.WARNING, format=f"[{role}] %(levelname)s %(name)s: %(message)s")
    device = torch.device(plan.device_of(role))
    if device.type == "cuda":
        torch.cuda.set_device(device)  # Triton launches on the current device
    elif plan.threads:
        torch.set_num_threads(plan.threads)
    return device


def _report_errors(role: str, results: Any, body: Any, *args: Any) -> None:
    try:
        body(*args)
    except BaseException:  # the parent must hear of any failure, or it waits for nothing
        results.put(("error", role, traceback.format_exc()))
        raise


# ---- prefill side ----

def prefill_main(plan: BenchPlan, conn: Any, results: Any) -> None:
    _report_errors("prefill", results, _prefill, plan, conn)


def _prefill(plan: BenchPlan, conn: Any) -> None:
    device = _setup(plan, "prefill")
    config = plan.engine_config("prefill")
    services = {mode: TimedPrefillService(f"prefill-{mode}", config, stream_layers=mode == LAYERWISE)
                for mode in MODES}
    address, bandwidth_port = conn.recv()
    for service in services.values():
        service.connect_channel(address, timeout=_CONNECT_TIMEOUT)
    store = dist.TCPStore(address.host, bandwidth_port, None, False,
                          datetime.timedelta(seconds=_CONNECT_TIMEOUT))
    group = pair_group(store, 1, device)
    layout = services[LAYERWISE].layout
    for n in plan.prompts:
        bare_send_recv_seconds(group, 1, device, layer_message_bytes(layout, n), plan.bandwidth_repeats)
    conn.send({mode: weights_fingerprint(s.engine.model) for mode, s in services.items()})
    loop = asyncio.new_event_loop()
    try:
        while (message := conn.recv()) is not None:
            mode, request = message
            service = services[mode]
            result = loop.run_until_complete(service.prefill(request))
            conn.send((result, service.stamps.pop(request.request_id)))
    finally:
        loop.close()
        for service in services.values():
            service.shutdown()
        close_pair_group(group, device)  # idle since the bandwidth rounds; the peer is done with it too


# ---- decode side: drives the run ----

def decode_main(plan: BenchPlan, conn: Any, results: Any) -> None:
    _report_errors("decode", results, _decode, plan, conn, results)


def _decode(plan: BenchPlan, conn: Any, results: Any) -> None:
    device = _setup(plan, "decode")
    config = plan.engine_config("decode")
    service = TimedDecodeService("decode-0", config)
    store = dist.TCPStore("127.0.0.1", 0, None, True, datetime.timedelta(seconds=_CONNECT_TIMEOUT),
                          wait_for_workers=False)
    conn.send((service.channel_address(), store.port))
    for mode in MODES:
        service.accept_channel(f"prefill-{mode}", timeout=_CONNECT_TIMEOUT)
    group = pair_group(store, 0, device)
    layout = service.layout
    bandwidth = {}
    for n in plan.prompts:
        sizes = layer_message_bytes(layout, n)
        seconds = bare_send_recv_seconds(group, 0, device, sizes, plan.bandwidth_repeats)
        bandwidth[n] = {"bytes": sum(sizes), "messages": len(sizes), "seconds": seconds}
    prefill_prints = conn.recv()
    decode_print = weights_fingerprint(service.engine.model)
    vocab = service.engine.model_config.vocab_size
    gen = torch.Generator().manual_seed(plan.seed)
    prompts = {n: torch.randint(0, vocab, (n,), generator=gen).tolist() for n in plan.prompts}

    runs = asyncio.run(_drive(plan, service, conn, prompts))
    conn.send(None)  # the prefill side shuts down
    service.shutdown()
    close_pair_group(group, device)
    del service
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    colocated = _colocated(plan, prompts)
    for run in runs:
        run["ids_match"] = run.pop("ids") == colocated[run["prompt_tokens"]]
    results.put(("done", "decode", {
        "runs": runs,
        "bandwidth_alone": bandwidth,
        "weights_identical": all(p == decode_print for p in prefill_prints.values()),
        "kv_dtype": layout.dtype,
        "kv_bytes_per_token": layout.num_layers * layout.bytes_per_token(),
        "wire_bytes_per_token_layer": _wire_bytes(layout),
        "num_layers": layout.num_layers,
        "devices": _device_names(plan),
    }))


def _wire_bytes(layout: KVLayout) -> dict[str, dict[str, float]]:
    """Bytes per token per layer on the wire (k, v, scales) of each cache dtype for this model's heads, and
    their ratio to bf16: computed from the layout each dtype's spec gives."""
    out = {}
    for dtype in ("bfloat16", "int8", "int4"):
        spec = replace(layout.spec, dtype=dtype, scales=scales_for(dtype, layout.spec.head_dim))
        other = KVLayout(spec, layout.num_layers)
        out[dtype] = {"bytes": other.bytes_per_token(), "vs_bf16": other.wire_ratio_vs_bf16()}
    return out


async def _drive(plan: BenchPlan, service: TimedDecodeService, conn: Any,
                 prompts: dict[int, list[int]]) -> list[dict[str, Any]]:
    """Warm-up rounds, then `repeats` rounds; in each, every prompt size goes through both modes in turn."""
    runs: list[dict[str, Any]] = []
    for round_index in range(plan.warmup + plan.repeats):
        for n, prompt in prompts.items():
            for mode in MODES:
                rid = f"{mode}-{n}-{round_index}"
                run = await _one_request(plan, service, conn, mode, rid, prompt)
                if round_index >= plan.warmup:
                    runs.append({"mode": mode, "prompt_tokens": n, "round": round_index - plan.warmup, **run})
    return runs


async def _one_request(plan: BenchPlan, service: TimedDecodeService, conn: Any, mode: str, rid: str,
                       prompt: list[int]) -> dict[str, Any]:
    """The router's flow for one request: reserve on decode → prefill (KV streams in) → decode stream."""
    loop = asyncio.get_running_loop()
    submitted = time.monotonic()
    reservation = await service.reserve(ReserveRequest(rid, tuple(prompt), plan.sampling))
    target = TransferTarget(rid, reservation.decode_id, reservation.block_ids, len(prompt))
    request = PrefillRequest(rid, tuple(prompt), plan.sampling, target)

    def call_prefill() -> Any:  # requests run one at a time, so the pipe carries one call at a time
        conn.send((mode, request))
        return conn.recv()

    ids: list[int] = []
    first_token_at: float | None = None

    async def consume() -> None:
        nonlocal first_token_at
        async for chunk in service.stream(rid):
            if chunk.error:
                raise RuntimeError(f"{rid}: decode side failed: {chunk.error}")
            if chunk.token_ids and first_token_at is None:
                first_token_at = time.monotonic()
            ids.extend(chunk.token_ids)

    (result, prefill), _ = await asyncio.gather(loop.run_in_executor(None, call_prefill), consume())
    decode = service.stamps(rid)
    if first_token_at is None or result.first_token_id != ids[0]:
        raise RuntimeError(f"{rid}: first token {result.first_token_id} from prefill, stream began {ids[:1]}")
    return {
        "ids": ids,
        "kv_bytes": decode.bytes_received,
        "queue_s": prefill.started - prefill.arrived,
        "prefill_s": prefill.computed - prefill.started,
        # prefill's last layer done → decode side holds all KV (FINAL applied, scatters landed)
        "exposed_s": decode.holding_all_kv - prefill.computed,
        "exposed_service_s": result.transfer_exposed_seconds,  # the service's own, poll-quantized figure
        "transfer_s": decode.holding_all_kv - prefill.first_frame,
        "ttft_s": first_token_at - submitted,
        # reserve on decode + the hop to the prefill process
        "submit_to_prefill_s": prefill.arrived - submitted,
    }


def _colocated(plan: BenchPlan, prompts: dict[int, list[int]]) -> dict[int, list[int]]:
    """One LLMEngine on the decode device, same config as prefill's (same chunking), one prompt at a time."""
    config = replace(plan.engine_config("prefill"), device=plan.device_of("decode"))
    engine = LLMEngine(config)
    return {n: engine.generate([prompt], plan.sampling)[0] for n, prompt in prompts.items()}


def _device_names(plan: BenchPlan) -> dict[str, str]:
    names = {}
    for role in ("prefill", "decode"):
        device = torch.device(plan.device_of(role))
        names[role] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return names
