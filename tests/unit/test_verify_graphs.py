"""Verify-graph shapes and static-input staging (packed rows, padding), and executor routing, on CPU."""
from __future__ import annotations

import pytest
import torch

from contracts.kv_cache_spec import KVCacheSpec
from contracts.sampling import SamplingParams
from engine.config import ModelConfig
from engine.cuda_graphs import DecodeBatchError, DecodeGraphRunner
from engine.executors.eager import EagerExecutor
from engine.executors.graphed import GraphedExecutor
from engine.kv_cache import KVCache
from engine.model import LlamaModel
from engine.scheduler import ScheduledChunk, SchedulerOutput
from engine.sequence import Sequence
from engine.spec.target_forward import LayerCapture
from engine.verify_graphs import VerifyGraphRunner, VerifyStager, verify_widths
from kernels.attention.metadata import BlockTableError

BLOCK = 4
CONFIG = ModelConfig(name="t", vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=3,
                     num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=64)


def verify_chunk(rid: str, num_tokens: int, table: list[int], drafts: tuple[int, ...] = ()) -> ScheduledChunk:
    """The verify chunk of a sequence holding `num_tokens` tokens (ids 100 + position; the last one new)
    and `drafts` after it: 1 + len(drafts) rows, each sampled."""
    seq = Sequence(rid, [100 + i for i in range(num_tokens)], SamplingParams(), block_table=table)
    seq.num_computed_tokens = num_tokens - 1
    n = 1 + len(drafts)
    return ScheduledChunk(seq, num_tokens - 1, n, n, drafts)


def test_widths_double_from_two_and_end_at_k_plus_one() -> None:
    assert verify_widths(1) == (2,)
    assert verify_widths(3) == (2, 4)
    assert verify_widths(4) == (2, 4, 5)
    assert verify_widths(5) == (2, 4, 6)
    assert verify_widths(7) == (2, 4, 8)
    with pytest.raises(ValueError):
        verify_widths(0)


def test_fill_packs_each_chunks_rows_after_the_last_and_pads_the_rest() -> None:
    stager = VerifyStager(bucket=4, width=4, table_width=4, block_size=BLOCK)
    chunks = [verify_chunk("a", 6, [7, 3], (50, 51)), verify_chunk("b", 1, [5]),
              verify_chunk("c", 9, [1, 2, 8], (60, 61, 62))]
    assert stager.fill(chunks) == 3 + 1 + 4
    x = stager.inputs
    assert x.input_ids.tolist() == [105, 50, 51, 100, 108, 60, 61, 62] + [0] * 8
    assert x.positions.tolist() == [5, 6, 7, 0, 8, 9, 10, 11] + [0] * 8
    # a: positions 5..7 in block 3 (table[1]); b: block 5; c: positions 8..11 in block 8 (table[2])
    assert x.slot_mapping.tolist() == ([3 * BLOCK + 1, 3 * BLOCK + 2, 3 * BLOCK + 3, 5 * BLOCK]
                                       + [8 * BLOCK + i for i in range(4)] + [-1] * 8)
    assert x.seq_lens.tolist() == [8, 1, 12, 0]
    assert x.query_start_loc.tolist() == [0, 3, 4, 8, 8]  # the padded sequence has no rows
    assert x.block_tables[0, :2].tolist() == [7, 3] and x.block_tables[2, :3].tolist() == [1, 2, 8]


def test_a_smaller_step_turns_stale_rows_and_sequences_back_into_padding() -> None:
    stager = VerifyStager(bucket=2, width=2, table_width=4, block_size=BLOCK)
    stager.fill([verify_chunk(r, 5, [i, 9], (1,)) for i, r in enumerate("ab")])
    assert stager.fill([verify_chunk("a", 6, [0, 9])]) == 1
    assert stager.inputs.slot_mapping.tolist() == [9 * BLOCK + 1, -1, -1, -1]
    assert stager.inputs.seq_lens.tolist() == [6, 0]
    assert stager.inputs.query_start_loc.tolist() == [0, 1, 1]


def test_fill_rejects_what_a_verify_graph_cannot_serve() -> None:
    stager = VerifyStager(bucket=2, width=3, table_width=2, block_size=BLOCK)
    with pytest.raises(DecodeBatchError):
        stager.fill([verify_chunk(r, 2, [1]) for r in "abc"])  # 3 sequences > bucket 2
    with pytest.raises(DecodeBatchError):
        stager.fill([verify_chunk("wide", 2, [1, 2], (1, 2, 3))])  # 4 rows > width 3
    with pytest.raises(BlockTableError):
        stager.fill([verify_chunk("short", 3, [1], (1, 2))])  # position 4 needs a second block
    with pytest.raises(DecodeBatchError):
        stager.fill([verify_chunk("long", 8, [1, 2, 3], (1,))])  # 3 blocks > captured width 2


def tiny_runner(max_num_seqs: int = 4, k: int = 3, feature_layers: tuple[int, ...] = ()) -> VerifyGraphRunner:
    kv = KVCache(KVCacheSpec(BLOCK, 1, 8), CONFIG.num_layers, 8)
    return VerifyGraphRunner(LlamaModel(CONFIG), kv, max_num_seqs, 64, "cpu", k, feature_layers)


def test_a_step_takes_the_smallest_bucket_and_the_narrowest_width_that_hold_it() -> None:
    runner = tiny_runner()  # buckets 1, 2, 4; widths 2, 4
    assert runner.shape_for([verify_chunk("a", 3, [0])]) == (1, 2)  # a decode row: width 2
    assert runner.shape_for([verify_chunk("a", 3, [0], (1,)), verify_chunk("b", 3, [1], (1, 2))]) == (2, 4)
    assert runner.shape_for([verify_chunk(r, 3, [i], (1, 2, 3)) for i, r in enumerate("abc")]) == (4, 4)
    assert runner.shape_for([verify_chunk(r, 3, [0]) for r in "abcde"]) is None  # more than max_num_seqs
    prompt = verify_chunk("p", 6, [0, 1])
    assert runner.shape_for([ScheduledChunk(prompt.seq, 0, 6, 1)]) is None  # a prompt chunk of 6 rows
    assert runner.shape_for([verify_chunk("long", 35, list(range(9)), (1,))]) is None  # 9 blocks > 8
    assert runner.captured == ()  # asking captures nothing


def test_feature_layers_must_be_the_models() -> None:
    with pytest.raises(ValueError, match="feature layers"):
        tiny_runner(feature_layers=(0, 3))


def test_a_capture_returns_rows_put_by_a_graph_before_what_its_hooks_kept() -> None:
    model = LlamaModel(CONFIG)
    capture = LayerCapture(model, (0, 2))
    given = torch.ones(3, 2 * CONFIG.hidden_size)
    capture.put(given)
    assert capture.take() is given
    with pytest.raises(RuntimeError, match="no forward"):
        capture.take()  # taken once only, and no hook kept anything
    capture.close()


def test_executor_keeps_features_only_when_its_verify_graphs_compute_those_layers() -> None:
    runner = tiny_runner(feature_layers=(0, 2))
    decode = DecodeGraphRunner(runner.model, runner.kv_cache, 4, 64, "cpu")
    eager = EagerExecutor(runner.model, runner.kv_cache, torch.device("cpu"))
    batch = SchedulerOutput((verify_chunk("a", 3, [0]),), ())
    plain = GraphedExecutor(decode, eager)
    assert not plain.keep_features(LayerCapture(runner.model, (0, 2)))  # no verify graphs
    executor = GraphedExecutor(decode, eager, runner)
    assert executor.graphed(batch) and not executor.verify_graphed(batch)
    assert not executor.keep_features(LayerCapture(runner.model, (0, 1)))
    assert executor.keep_features(LayerCapture(runner.model, (0, 2)))
    # Decode graphs do not output features: with them kept, a decode step replays a verify graph.
    assert not executor.graphed(batch) and executor.verify_graphed(batch)
    assert not executor.verify_graphed(batch, layer_hook=lambda _i: None)  # a hook runs eagerly
