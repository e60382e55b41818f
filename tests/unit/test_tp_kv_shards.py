"""KV between workers of different TP sizes moves as whole heads: rank 0 gathers the ranks' kv-head shards
to send, and scatters received whole heads to the ranks that hold them; greedy output stays TP=1's."""
import dataclasses

import pytest
import torch

from contracts.sampling import SamplingParams
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.random_models import preset_config
from engine.tp.kv_shards import KVHeadMap
from engine.tp.worker_ranks import LocalTPRanks

CONFIG = EngineConfig(model_path="random:tiny", num_kv_blocks=32, max_batch_tokens=8, num_threads=1)
PROMPT = list(range(40, 61))  # 21 tokens: three prefill chunks, two blocks
GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)


@pytest.mark.parametrize("size", [2, 3, 4])
def test_head_map_shards_and_rejoins_whole_heads(size):
    # SmolLM2's shape: 9 heads, 3 kv heads; TP=4 replicates a kv head on two ranks.
    config = dataclasses.replace(preset_config("random:tiny"), num_heads=9, num_kv_heads=3)
    heads = KVHeadMap(config, size)
    whole = [torch.randn(5, 16, 3, 8), torch.randn(5, 16, 3)]  # k and a per-token-head scale
    shards = [heads.shard(whole, rank) for rank in range(size)]
    assert [s[0].shape[2] for s in shards] == [len(h) for h in heads.rank_heads]
    assert all(torch.equal(a, b) for a, b in zip(heads.whole(shards), whole, strict=True))


def _prefill_export(engine: LLMEngine, prompt: list[int]) -> tuple[int, list[tuple[torch.Tensor, ...]]]:
    """Prefill `prompt` as a prefill worker does: the final chunk's layer hook exports its blocks' KV."""
    seq = engine.add_request("p", prompt, dataclasses.replace(GREEDY, max_tokens=1))
    layers: dict[int, tuple[torch.Tensor, ...]] = {}
    while engine.has_work():
        batch = engine.schedule()
        if any(c.num_sampled for c in batch.chunks):
            blocks = tuple(seq.block_table[:engine.kv_cache.spec.num_blocks_for(len(prompt))])
            ids = torch.tensor(blocks)
            out = engine.execute(batch, lambda layer, ids=ids: layers.__setitem__(
                layer, engine.export_layer(layer, ids)), export_blocks=blocks)
        else:
            out = engine.execute(batch)
        engine.postprocess(batch, out)
    return seq.output_token_ids[0], [layers[i] for i in range(len(layers))]


def _decode_loaded(engine: LLMEngine, prompt: list[int], first: int,
                   layers: list[tuple[torch.Tensor, ...]]) -> list[int]:
    blocks = engine.reserve("d", prompt, GREEDY)
    engine.load_kv(blocks[:layers[0][0].shape[0]], layers)
    seq = engine.activate("d", first)
    while engine.has_work():
        engine.step()
    return seq.output_token_ids


@pytest.mark.timeout(300)
def test_prefill_and_decode_of_different_tp_sizes_match_tp1():
    tp1 = LLMEngine(CONFIG)
    expected = tp1.generate([PROMPT], GREEDY)[0]
    first, whole = _prefill_export(tp1, PROMPT)
    assert first == expected[0]
    assert whole[0][0].shape[2] == 2  # all of tiny's kv heads
    tp2 = LocalTPRanks(dataclasses.replace(CONFIG, tp_size=2))
    try:
        first2, whole2 = _prefill_export(tp2.engine, PROMPT)  # prefill TP=2 -> decode TP=1
        assert first2 == first
        for a, b in zip(whole2, whole, strict=True):
            assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(a, b, strict=True))
        assert _decode_loaded(LLMEngine(CONFIG), PROMPT, first2, whole2) == expected
        assert _decode_loaded(tp2.engine, PROMPT, first, whole) == expected  # prefill TP=1 -> decode TP=2
    finally:
        tp2.close()
    assert all(p.exitcode == 0 for p in tp2.followers)
