"""Speculation across the P/D split: head features travel bit-exactly, decode drafts from its first step."""
from __future__ import annotations

import asyncio

import pytest
import torch

from contracts.sampling import SamplingParams
from contracts.transfer import TransferTarget
from decode_worker.api import ReserveRequest
from decode_worker.service import DecodeService
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.spec.config import SpecConfig
from engine.spec.speculator import SHIPPED_PROMPT_ROWS
from prefill_worker.api import PrefillRequest
from prefill_worker.service import PrefillService
from tests.service_pair import connect_services

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PLAIN = EngineConfig(device="cpu", num_kv_blocks=64, max_batch_tokens=64)
# Fixed k: these tests check the features' transport and drafting from the first step; adaptive k may
# (rightly) choose plain steps once its cost model has measured that drafts do not pay on this CPU.
HEAD = EngineConfig(device="cpu", num_kv_blocks=64, max_batch_tokens=64,
                    spec=SpecConfig("head", k=4, adaptive=False))
# Tree drafts on the decode side: the head drafts its first tree from the shipped features.
HEAD_TREE = EngineConfig(device="cpu", num_kv_blocks=64, max_batch_tokens=64,
                         spec=SpecConfig("head", adaptive=False, tree_branching=(2, 2, 1)))
PROMPTS = [[1, 504, 3458, 282, 4649, 314], [1, 17, 28, 339, 1142, 42, 2071, 30, 9641] * 3]
SAMPLING = SamplingParams(max_tokens=16, ignore_eos=True)


def _pair(prefill_config: EngineConfig, decode_config: EngineConfig, name: str):
    decode = DecodeService(f"decode-{name}", decode_config)
    prefill = PrefillService(f"prefill-{name}", prefill_config)
    connect_services(prefill, decode)
    return prefill, decode


def _record(obj, name: str, log: list):
    """Wrap obj.name so each call's arguments and result (a sequence: its drafts then) go to `log`."""
    inner = getattr(obj, name)

    def wrapped(*args):
        result = inner(*args)
        log.append((args, list(getattr(result, "draft_token_ids", ())) or result))
        return result
    setattr(obj, name, wrapped)


async def _generate(prefill, decode, rid: str, prompt: list[int]) -> tuple[list[int], int, int]:
    reservation = await decode.reserve(ReserveRequest(rid, tuple(prompt), SAMPLING))
    target = TransferTarget(rid, reservation.decode_id, reservation.block_ids, len(prompt),
                            start_token=reservation.start_token)
    ids, drafted, accepted = [], 0, 0

    async def consume() -> None:
        nonlocal drafted, accepted
        async for chunk in decode.stream(rid):
            ids.extend(chunk.token_ids)
            drafted += chunk.num_draft_tokens
            accepted += chunk.num_accepted_tokens

    consumer = asyncio.create_task(consume())
    await prefill.prefill(PrefillRequest(rid, tuple(prompt), SAMPLING, target))
    await consumer
    return ids, drafted, accepted


@pytest.mark.parametrize(("prefill_runs_the_head", "decode_config"),
                         [(True, HEAD), (False, HEAD), (True, HEAD_TREE)],
                         ids=["features-shipped", "no-features", "tree-features-shipped"])
def test_head_speculation_across_the_split_gives_plain_greedy_tokens(prefill_runs_the_head,
                                                                     decode_config) -> None:
    expected = LLMEngine(PLAIN).generate(PROMPTS, SAMPLING)
    name = f"{prefill_runs_the_head}-{bool(decode_config.spec.tree_branching)}"
    prefill, decode = _pair(HEAD if prefill_runs_the_head else PLAIN, decode_config, name)
    shipped, activated = [], []
    _record(prefill.engine, "draft_features", shipped)
    _record(decode.engine, "activate", activated)
    try:
        for i, prompt in enumerate(PROMPTS):
            ids, drafted, accepted = asyncio.run(_generate(prefill, decode, f"s{i}", prompt))
            assert ids == expected[i]
            assert 0 <= accepted <= drafted and drafted > 0
        for prompt, (_, sent), ((_, _, received), drafts) in zip(PROMPTS, shipped, activated, strict=True):
            if prefill_runs_the_head:  # the fused features [r, H] arrived bit for bit; drafts before step one
                hidden = decode.engine.model_config.hidden_size
                assert sent is not None and sent.shape == (min(len(prompt), SHIPPED_PROMPT_ROWS), hidden)
                assert received.dtype == sent.dtype and torch.equal(received, sent)
                assert drafts and isinstance(drafts, list)
            else:  # nothing shipped: the first decode step runs plain, the head starts from its features
                assert sent is None and received is None
        assert decode.engine.speculator.num_drafting == 0
        assert decode.engine.stats().num_free_blocks == decode.engine.stats().num_total_blocks
    finally:
        prefill.shutdown()
        decode.shutdown()
