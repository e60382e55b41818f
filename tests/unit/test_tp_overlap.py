"""Chunked row-parallel all-reduce (overlap) equals the unchunked one; the chunk-count model; auto chunks."""
from dataclasses import replace

import torch

from contracts.sampling import SamplingParams
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.random_models import PRESETS, build_random_model
from engine.tp.comm import TPComm
from engine.tp.group import TPGroup
from engine.tp.layers import RowParallel
from engine.tp.local_ranks import run_local_ranks
from engine.tp.overlap import OverlapTiming
from kernels.linear.modules import Linear

GREEDY = SamplingParams(max_tokens=4, ignore_eos=True)


def _row_parallel(group: TPGroup) -> dict:
    gen = torch.Generator().manual_seed(group.rank)
    inner = Linear(32, 48)
    with torch.no_grad():
        inner.weight.copy_(torch.randn(48, 32, generator=gen))
    x = torch.randn(50, 32, generator=gen)
    comm = TPComm(group)
    plain = RowParallel(inner, comm, chunks=1)(x)
    chunked = RowParallel(inner, comm, chunks=3, min_chunk_tokens=4)(x)
    short = RowParallel(inner, comm, chunks=3, min_chunk_tokens=20)(x)  # 50 < 3 · 20 rows: one piece
    calls = comm.stats.all_reduces
    # An engine that measures its chunk count: every rank must agree on it, and serve correctly.
    config = EngineConfig(num_kv_blocks=16, max_batch_tokens=64, tp_size=group.size, tp_overlap_chunks=0,
                          tp_overlap_min_tokens=2)
    model = PRESETS["tiny"]
    built = build_random_model(model, torch.float32, "cpu", seed=2)
    engine = LLMEngine(config, model=(model, built), tp=group)
    chunks = engine.model.layers[0].mlp.down_proj.chunks
    if group.rank == 0:
        tokens = engine.generate([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]], GREEDY)
        engine.stop_followers()
    else:
        tokens = engine.follow()
    return {"plain": plain, "chunked": chunked, "short": short, "calls": calls, "chunks": chunks,
            "tokens": tokens, "comm_bytes": engine.stats().tp_comm_bytes}


def test_chunked_all_reduce_equals_unchunked():
    results = run_local_ranks(_row_parallel, 2)
    for r in results:
        torch.testing.assert_close(r["chunked"], r["plain"], atol=1e-5, rtol=0)
        torch.testing.assert_close(r["short"], r["plain"], atol=0, rtol=0)
        assert r["calls"] == 1 + 3 + 1
    torch.testing.assert_close(results[0]["plain"], results[1]["plain"], atol=0, rtol=0)
    assert results[0]["chunks"] == results[1]["chunks"] >= 1
    assert len(results[0]["tokens"][0]) == 4 and results[1]["tokens"] == 4  # rank 1 followed 4 steps
    assert results[0]["comm_bytes"] > 0  # the worker's metrics see the TP traffic


def test_chunk_model_hides_communication_only_when_it_pays():
    balanced = OverlapTiming(compute_s=1.0, comm_s=1.0, per_chunk_s=0.0)
    assert balanced.pipelined_s(1) == 2.0 and abs(balanced.pipelined_s(4) - 1.25) < 1e-12
    assert balanced.best_chunks(max_chunks=8) == 8  # free chunks: as many as allowed
    assert OverlapTiming(1.0, 1.0, per_chunk_s=0.2).best_chunks() == 2  # overhead caps it
    assert OverlapTiming(1.0, 0.001, per_chunk_s=0.01).best_chunks() == 1  # nothing to hide
    assert replace(balanced, comm_s=0.5).ratio == 0.5
