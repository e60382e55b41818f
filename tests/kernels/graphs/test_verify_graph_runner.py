"""The verify-graph runner's forward (run eagerly over its static buffers on CPU, Triton kernels in the
interpreter) against the eager executor: the same tokens, hidden states, draft features and KV."""
from __future__ import annotations

import pytest
import torch

from contracts.kv_cache_spec import KVCacheSpec
from contracts.sampling import SamplingParams
from engine.config import ModelConfig
from engine.cuda_graphs import DecodeGraphRunner
from engine.executors.eager import EagerExecutor
from engine.executors.graphed import GraphedExecutor
from engine.kv_cache import KVCache
from engine.random_models import build_random_model
from engine.scheduler import ScheduledChunk, SchedulerOutput
from engine.sequence import Sequence
from engine.spec.target_forward import LayerCapture
from engine.verify_graphs import VerifyGraphRunner
from kernels.registry import KernelRegistry

BLOCK = 4
CONFIG = ModelConfig(name="t", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3,
                     num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64)
FEATURES = (0, 2)
CPU = torch.device("cpu")


def build() -> tuple[torch.nn.Module, KVCache, KVCache]:
    model = build_random_model(CONFIG, torch.float32, "cpu", seed=3, std=0.3)
    model.bind_kernels(KernelRegistry.triton())
    spec = KVCacheSpec(BLOCK, CONFIG.num_kv_heads, CONFIG.head_dim)
    return model, KVCache(spec, CONFIG.num_layers, 16), KVCache(spec, CONFIG.num_layers, 16)


def prefill(executors: list[EagerExecutor], seqs: list[Sequence]) -> None:
    """Each prompt's KV into every executor's cache, and its first token (greedy) appended."""
    batch = SchedulerOutput(tuple(ScheduledChunk(s, 0, s.num_tokens, 1) for s in seqs), ())
    outs = [e.execute(batch) for e in executors]
    assert outs[0].sampled == outs[1].sampled
    for s in seqs:
        s.token_ids.append(outs[0].sampled[s.request_id][0])
        s.num_computed_tokens = s.num_tokens - 1


@pytest.mark.parametrize("drafts", [[(5, 6), (7,), ()], [(1, 2, 3), (4, 5, 6)], [(), ()]])
def test_graphed_verify_step_equals_the_eager_step(drafts: list[tuple[int, ...]]) -> None:
    model, kv_eager, kv_graph = build()
    gen = torch.Generator().manual_seed(len(drafts))
    lengths = (5, 9, 3)[:len(drafts)]
    seqs = [Sequence(f"s{i}", torch.randint(1, 64, (n,), generator=gen).tolist(), SamplingParams(),
                     block_table=[4 * i + b for b in range(4)]) for i, n in enumerate(lengths)]
    eager = EagerExecutor(model, kv_eager, CPU)
    eager_twin = EagerExecutor(model, kv_graph, CPU)
    prefill([eager, eager_twin], seqs)
    verify = VerifyGraphRunner(model, kv_graph, 4, 16, CPU, k=3, feature_layers=FEATURES)
    graphed = GraphedExecutor(DecodeGraphRunner(model, kv_graph, 4, 16, CPU), eager_twin, verify)
    capture = LayerCapture(model, FEATURES)
    assert graphed.keep_features(capture)
    batch = SchedulerOutput(tuple(ScheduledChunk(s, s.num_tokens - 1, 1 + len(d), 1 + len(d), d)
                                  for s, d in zip(seqs, drafts, strict=True)), ())
    assert graphed.verify_graphed(batch)

    expected = eager.launch(batch)
    expected_features = capture.take()  # the eager forward's hooks
    got = graphed.launch(batch)
    got_features = capture.take()  # put by the graphed step
    assert got.token_ids.tolist() == expected.token_ids.tolist()
    assert got.num_sampled == expected.num_sampled and got.seqs == expected.seqs
    torch.testing.assert_close(got.last_hidden, expected.last_hidden, rtol=1e-5, atol=1e-5)
    assert got_features.shape == expected_features.shape == (batch.num_batched_tokens, 2 * CONFIG.hidden_size)
    torch.testing.assert_close(got_features, expected_features, rtol=1e-5, atol=1e-5)
    for a, b in zip(kv_eager.k + kv_eager.v, kv_graph.k + kv_graph.v, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    capture.close()
