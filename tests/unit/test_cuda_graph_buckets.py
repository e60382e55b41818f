"""Decode-graph bucketing and static-input staging (padding, incremental block tables), on CPU."""
from __future__ import annotations

import pytest
import torch

from contracts.kv_cache_spec import KVCacheSpec
from contracts.sampling import SamplingParams
from engine.config import EngineConfig, ModelConfig
from engine.cuda_graphs import DecodeBatchError, DecodeStager, decode_buckets, pick_bucket
from engine.executor import RowsByRequest
from engine.executors.eager import EagerExecutor
from engine.executors.factory import build_executor
from engine.graph_step import DecodeInputs, graph_pieces, input_layout
from engine.kv_cache import KVCache
from engine.model import LlamaModel
from engine.scheduler import ScheduledChunk
from engine.sequence import Sequence
from kernels.attention.metadata import BlockTableError

BLOCK = 4


def decode_chunk(rid: str, num_tokens: int, table: list[int]) -> ScheduledChunk:
    """The decode chunk of a sequence holding `num_tokens` tokens (the last one new), ids = 100 + position."""
    seq = Sequence(rid, [100 + i for i in range(num_tokens)], SamplingParams(), block_table=table)
    seq.num_computed_tokens = num_tokens - 1
    return ScheduledChunk(seq, num_tokens - 1, 1, 1)


def test_buckets_are_powers_of_two_capped_by_max_num_seqs() -> None:
    assert decode_buckets(1) == (1,)
    assert decode_buckets(32) == (1, 2, 4, 8, 16, 32)
    assert decode_buckets(48) == (1, 2, 4, 8, 16, 32, 48)  # the largest batch always has a bucket
    with pytest.raises(ValueError):
        decode_buckets(0)


def test_batch_picks_the_smallest_bucket_that_holds_it() -> None:
    buckets = decode_buckets(48)
    assert [pick_bucket(n, buckets) for n in (1, 2, 3, 5, 16, 17, 33, 48)] == [1, 2, 4, 8, 16, 32, 48, 48]
    assert pick_bucket(49, buckets) is None  # larger than every bucket: the step runs eagerly
    assert pick_bucket(0, buckets) is None


def test_input_segments_are_16_byte_aligned_views_of_one_buffer() -> None:
    layout, size = input_layout(bucket=3, table_width=5)
    assert all(offset % 4 == 0 for offset, _ in layout.values())
    assert layout["block_tables"][1] == 15 and size >= sum(n for _, n in layout.values())
    buffer = torch.zeros(size, dtype=torch.int32)
    inputs = DecodeInputs.views(buffer, 3, 5)
    inputs.block_tables[2, 4] = 7
    inputs.seq_lens[1] = 9
    assert buffer[layout["block_tables"][0] + 14] == 7 and buffer[layout["seq_lens"][0] + 1] == 9
    with pytest.raises(ValueError):
        DecodeInputs.views(torch.zeros(size, dtype=torch.int64), 3, 5)


def test_fill_writes_real_rows_and_pads_the_rest_with_no_slot_and_no_context() -> None:
    stager = DecodeStager(bucket=4, table_width=6, block_size=BLOCK)
    chunks = [decode_chunk("a", 6, [7, 3]), decode_chunk("b", 1, [5]), decode_chunk("c", 9, [1, 2, 8])]
    assert stager.fill(chunks) == 3
    x = stager.inputs
    assert x.input_ids.tolist() == [105, 100, 108, 0]
    assert x.positions.tolist() == [5, 0, 8, 0]
    # position 5 → block 3 (table[1]) offset 1; position 0 → block 5; position 8 → block 8 (table[2]) offset 0
    assert x.slot_mapping.tolist() == [3 * BLOCK + 1, 5 * BLOCK, 8 * BLOCK, -1]
    assert x.seq_lens.tolist() == [6, 1, 9, 0]
    assert x.query_start_loc.tolist() == [0, 1, 2, 3, 4]
    assert x.block_tables[0, :2].tolist() == [7, 3] and x.block_tables[2, :3].tolist() == [1, 2, 8]


def test_a_smaller_batch_turns_stale_rows_back_into_padding() -> None:
    stager = DecodeStager(bucket=4, table_width=6, block_size=BLOCK)
    stager.fill([decode_chunk(r, 5, [i, 9]) for i, r in enumerate("abcd")])
    stager.fill([decode_chunk("a", 6, [0, 9])])
    assert stager.inputs.slot_mapping.tolist() == [9 * BLOCK + 1, -1, -1, -1]
    assert stager.inputs.seq_lens.tolist() == [6, 0, 0, 0]


def test_block_table_rows_follow_growth_row_shifts_and_swapped_tables() -> None:
    stager = DecodeStager(bucket=2, table_width=4, block_size=BLOCK)
    a, b = decode_chunk("a", 4, [10]), decode_chunk("b", 4, [20])
    stager.fill([a, b])
    a.seq.token_ids.append(104)
    a.seq.block_table.append(11)  # the scheduler grew a's table in place: only the new entry is written
    a5 = ScheduledChunk(a.seq, 4, 1, 1)
    stager.fill([a5, b])
    assert stager.inputs.block_tables[0, :2].tolist() == [10, 11]
    stager.fill([b])  # a finished: b moves up to row 0
    assert stager.inputs.block_tables[0, 0].item() == 20
    b.seq.block_table = [30]  # freed and re-allocated (preemption): a new list, rewritten from scratch
    stager.fill([b])
    assert stager.inputs.block_tables[0, 0].item() == 30
    b.seq.block_table[0] = 31  # even an in-place rewrite of the last written entry is caught
    stager.fill([b])
    assert stager.inputs.block_tables[0, 0].item() == 31
    assert stager.inputs.slot_mapping[0].item() == 31 * BLOCK + 3


def test_fill_rejects_what_a_decode_graph_cannot_serve() -> None:
    stager = DecodeStager(bucket=2, table_width=2, block_size=BLOCK)
    with pytest.raises(DecodeBatchError):
        stager.fill([decode_chunk(r, 2, [1]) for r in "abc"])  # 3 rows > bucket 2
    prefill = decode_chunk("p", 4, [1])
    with pytest.raises(DecodeBatchError):
        stager.fill([ScheduledChunk(prefill.seq, 0, 4, 1)])
    with pytest.raises(BlockTableError):
        stager.fill([decode_chunk("short", 6, [1])])  # position 5 needs a second block
    with pytest.raises(DecodeBatchError):
        stager.fill([decode_chunk("long", 12, [1, 2, 3])])  # 3 blocks > captured width 2


def test_executor_on_cpu_never_uses_graphs() -> None:
    config = ModelConfig(name="t", vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1,
                         num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=64)
    kv = KVCache(KVCacheSpec(BLOCK, 1, 8), 1, 4)
    executor = build_executor(LlamaModel(config), kv, EngineConfig(cuda_graphs=True), max_model_len=64)
    assert type(executor) is EagerExecutor  # plain nn.Linear layout: not even the flat CPU decoder


def test_run_output_hidden_rows_are_looked_up_by_request_id() -> None:
    rows = torch.arange(6.0).view(3, 2)
    hidden = RowsByRequest(("a", "b", "c"), rows)
    assert len(hidden) == 3 and list(hidden) == ["a", "b", "c"]
    assert torch.equal(hidden["b"], rows[1]) and hidden.get("zzz") is None
    assert torch.equal(dict(hidden)["c"], rows[2])


@pytest.mark.parametrize("num_layers", [0, 1, 2, 5, 32])
def test_graph_pieces_cover_every_layer_once_in_order_starting_with_one(num_layers: int) -> None:
    pieces = graph_pieces(num_layers)
    assert [i for piece in pieces for i in piece] == list(range(num_layers))
    if num_layers:
        assert len(pieces[0]) == 1 and all(len(p) > 0 for p in pieces)
    assert [len(p) for p in graph_pieces(32)] == [1, 2, 4, 8, 16, 1]


def test_model_run_in_layer_pieces_equals_forward() -> None:
    from kernels.attention.metadata import AttentionMetadata, SeqSpan

    config = ModelConfig(name="t", vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=5,
                         num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaModel(config)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    model.init_buffers("cpu")
    ids, positions = torch.tensor([3, 7, 1]), torch.arange(3)
    meta = AttentionMetadata.from_spans([SeqSpan(0, 3, 3, (0,), 0)], [0, 1, 2], BLOCK)
    whole_kv, piece_kv = KVCache(KVCacheSpec(BLOCK, 1, 8), 5, 2), KVCache(KVCacheSpec(BLOCK, 1, 8), 5, 2)
    expected = model(ids, positions, meta, whole_kv)
    h, cos, sin = model.embed(ids, positions)
    residual = None
    for piece in graph_pieces(config.num_layers):
        h, residual = model.forward_layers(h, residual, cos, sin, meta, piece_kv, piece)
    assert torch.equal(model.final_norm(h, residual), expected)
    pairs = zip(whole_kv.k + whole_kv.v, piece_kv.k + piece_kv.v, strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
