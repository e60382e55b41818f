"""Speculation on CUDA: verify steps replay verify graphs that equal the eager verify (tokens, draft
features, KV), and greedy output with speculation (n-gram, head) equals it without, in fp32."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from contracts.kv_cache_spec import KVCacheSpec
from contracts.sampling import SamplingParams
from engine.config import EngineConfig, ModelConfig
from engine.cuda_graphs import DecodeGraphRunner, decode_buckets
from engine.executors.eager import EagerExecutor
from engine.executors.graphed import GraphedExecutor
from engine.kv_cache import KVCache
from engine.llm_engine import LLMEngine
from engine.random_models import build_random_model
from engine.scheduler import ScheduledChunk, SchedulerOutput
from engine.sequence import Sequence
from engine.spec.config import SpecConfig
from engine.spec.draft_head import DraftHead, DraftHeadConfig
from engine.spec.target_forward import LayerCapture, default_feature_layers
from engine.verify_graphs import VerifyGraphRunner, verify_widths
from kernels.registry import KernelRegistry

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]

TINY = ModelConfig(name="tiny-spec-cuda", vocab_size=1024, hidden_size=256, intermediate_size=512,
                   num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=1024)
FEATURES = default_feature_layers(TINY.num_layers)
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def compiled_kernels_only() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter mode is on in this process: run tests/gpu in its own pytest process")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    # std 0.1 keeps greedy choices far from ties (fp32: graphed and eager differ in the last bits at most).
    model = build_random_model(TINY, torch.float32, "cuda", seed=0, std=0.1)
    model.bind_kernels(KernelRegistry.for_device(CUDA))
    return model


@pytest.fixture(scope="module")
def head_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    head = DraftHead(DraftHeadConfig.for_target(TINY, FEATURES, draft_vocab_size=512))
    path = tmp_path_factory.mktemp("head") / "tiny-head.safetensors"
    head.save(path, dtype=torch.float32)
    return path


def repeating_prompts() -> list[list[int]]:
    """Prompts that repeat themselves, so n-gram drafts match and some are accepted."""
    gen = torch.Generator().manual_seed(5)
    motifs = [torch.randint(1, TINY.vocab_size, (n,), generator=gen).tolist() for n in (3, 5, 7, 4, 6)]
    return [m * reps for m, reps in zip(motifs, (6, 3, 2, 5, 4), strict=True)]


MAX_TOKENS = (24, 9, 17, 5, 12)  # the batch shrinks mid-run: buckets and widths change


def engine(model: torch.nn.Module, spec: SpecConfig, **config) -> LLMEngine:
    return LLMEngine(EngineConfig(device="cuda", dtype="float32", num_kv_blocks=96, max_num_seqs=8,
                                  max_batch_tokens=256, spec=spec, **config), model=(TINY, model))


def generate(engine: LLMEngine) -> tuple[list[list[int]], int]:
    """Greedy outputs, and how many steps replayed a verify graph."""
    verify = getattr(engine.executor, "verify", None)
    replays = 0
    if verify is not None:
        run = verify.run

        def counted(chunks):
            nonlocal replays
            replays += 1
            return run(chunks)
        verify.run = counted
    seqs = [engine.add_request(f"g{i}", p, SamplingParams(max_tokens=m, ignore_eos=True))
            for i, (p, m) in enumerate(zip(repeating_prompts(), MAX_TOKENS, strict=True))]
    while engine.has_work():
        engine.step()
    if engine.speculator is not None:
        engine.speculator.close()  # its feature hooks stay off the next engine's forwards and captures
    return [s.output_token_ids for s in seqs], replays


def test_speculating_engine_captures_every_bucket_and_width_and_no_lookahead(model, head_path) -> None:
    eng = engine(model, SpecConfig("head", k=5, head_path=str(head_path)))
    verify = eng.executor.verify
    assert isinstance(eng.executor, GraphedExecutor) and eng.lookahead is None
    assert verify.captured == tuple((b, w) for b in decode_buckets(8) for w in verify_widths(5))
    assert verify.feature_layers == FEATURES and eng.speculator.features_in_graphs
    assert eng.speculator.draft_graphs is not None  # greedy head drafts in graphs too
    assert engine(model, SpecConfig("ngram", k=5)).executor.verify.feature_layers == ()
    eng.speculator.close()


@pytest.mark.parametrize("method", ["ngram", "head"])
def test_greedy_output_with_graphed_speculation_equals_plain_decoding(model, head_path, method: str) -> None:
    plain, _ = generate(engine(model, SpecConfig()))
    spec = SpecConfig(method, k=3, head_path=str(head_path) if method == "head" else None)
    graphed, replays = generate(engine(model, spec))
    eager, _ = generate(engine(model, spec, cuda_graphs=False))
    assert graphed == plain == eager
    assert [len(o) for o in graphed] == list(MAX_TOKENS)
    # n-gram: verify steps replayed graphs; the head: every decode step did (only they output features).
    assert replays >= (max(MAX_TOKENS) // 2 if method == "head" else 1)


@pytest.mark.parametrize("drafts", [[(5, 6), (7,), ()], [(1, 2, 3), (4, 5, 6)], [(), (), ()]])
def test_graphed_verify_step_equals_the_eager_step_with_its_features(model, drafts) -> None:
    spec = KVCacheSpec(16, TINY.num_kv_heads, TINY.head_dim)
    kv_eager, kv_graph = KVCache(spec, TINY.num_layers, 32, CUDA), KVCache(spec, TINY.num_layers, 32, CUDA)
    eager, eager_twin = EagerExecutor(model, kv_eager, CUDA), EagerExecutor(model, kv_graph, CUDA)
    decode = DecodeGraphRunner(model, kv_graph, 4, 128, CUDA)
    decode.capture_all()
    verify = VerifyGraphRunner(model, kv_graph, 4, 128, CUDA, k=3, feature_layers=FEATURES, pool=decode.pool)
    verify.capture_all()
    graphed = GraphedExecutor(decode, eager_twin, verify)
    capture = LayerCapture(model, FEATURES)
    assert graphed.keep_features(capture)
    gen = torch.Generator().manual_seed(len(drafts))
    lengths = (20, 33, 7)[:len(drafts)]
    seqs = [Sequence(f"s{i}", torch.randint(1, TINY.vocab_size, (n,), generator=gen).tolist(),
                     SamplingParams(), block_table=[8 * i + b for b in range(8)])
            for i, n in enumerate(lengths)]
    prompt = SchedulerOutput(tuple(ScheduledChunk(s, 0, s.num_tokens, 1) for s in seqs), ())
    with torch.inference_mode():
        first = eager.execute(prompt)
        assert eager_twin.execute(prompt).sampled == first.sampled
        capture.take()
        for s in seqs:
            s.token_ids.append(first.sampled[s.request_id][0])
        batch = SchedulerOutput(tuple(ScheduledChunk(s, s.num_tokens - 1, 1 + len(d), 1 + len(d), d)
                                      for s, d in zip(seqs, drafts, strict=True)), ())
        assert graphed.verify_graphed(batch)
        expected = eager.launch(batch)
        expected_features = capture.take().clone()
        got = graphed.launch(batch)
        got_features = capture.take()
    assert got.token_ids.tolist() == expected.token_ids.tolist()
    torch.testing.assert_close(got.last_hidden, expected.last_hidden, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_features, expected_features, rtol=1e-4, atol=1e-4)
    for a, b in zip(kv_eager.k + kv_eager.v, kv_graph.k + kv_graph.v, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    capture.close()


def test_graphed_head_accept_and_drafts_equal_each_drafters_own() -> None:
    """The batched accept and drafting graphs over slot-resident head KV, replayed through steps of
    different acceptance, aborts and arrivals: each sequence's head KV, last output and greedy drafts equal
    its own eager HeadDrafter's (fp32); sampled drafts over a slot its seeded ones; the accept never syncs."""
    from tests.unit.test_head_slots_batched import run_scenario

    assert run_scenario(CUDA, capture=True, steps=12) == 12
