"""The engine with the head's batched accept and drafting (the CUDA-graph path, run eagerly over its static
buffers on CPU) proposes and emits what per-sequence head drafting does. The batched path against each
sequence's own HeadDrafter, step by step: tests/unit/test_head_slots_batched.py."""
from __future__ import annotations

import pytest
import torch

from contracts.sampling import SamplingParams
from engine.spec.draft_head import DraftHead, DraftHeadConfig


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_engine_drafting_in_graphs_proposes_and_emits_what_eager_drafting_does(tmp_path,
                                                                                temperature: float) -> None:
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.random_models import PRESETS, build_random_model
    from engine.spec.config import SpecConfig

    tiny = PRESETS["tiny"]
    model = (tiny, build_random_model(tiny, torch.float32, "cpu", seed=0))
    torch.manual_seed(1)
    path = tmp_path / "head.safetensors"
    DraftHead(DraftHeadConfig.for_target(tiny, (0, 1, 1), 128)).save(path, dtype=torch.float32)
    prompts = [[5, 17, 300, 42, 9, 5, 17, 300], [7, 7, 7, 7], [100, 200, 300, 400, 500, 11, 12]]
    # T > 0: sampled drafts from the slots' views, seeded like the per-sequence drafter's.
    params = SamplingParams(max_tokens=12, ignore_eos=True, temperature=temperature, seed=7)

    batched_calls, accept_calls = [], []

    def run(in_graphs: bool) -> tuple[list[list[int]], list[tuple[int, int]]]:
        engine = LLMEngine(EngineConfig(device="cpu", dtype="float32", num_kv_blocks=64, max_num_seqs=4,
                                        spec=SpecConfig("head", k=3, head_path=str(path))), model=model)
        if in_graphs:  # on CPU the graph path runs eagerly over its static buffers
            engine.speculator.draft_in_graphs(4, 128)
            graphs = engine.speculator.draft_graphs
            propose, accept = graphs.propose, graphs.accept

            def counted_propose(drafters, steps):
                batched_calls.append(len(drafters))
                return propose(drafters, steps)

            def counted_accept(items, features):
                accept_calls.append(len(items))
                return accept(items, features)
            graphs.propose, graphs.accept = counted_propose, counted_accept
        seqs = [engine.add_request(f"r{i}", p, params) for i, p in enumerate(prompts)]
        while engine.has_work():
            engine.step()
        engine.speculator.close()
        return [s.output_token_ids for s in seqs], [(s.num_draft_tokens, s.num_accepted_tokens) for s in seqs]

    eager_out, eager_counts = run(False)
    graph_out, graph_counts = run(True)
    assert graph_out == eager_out and graph_counts == eager_counts
    assert sum(drafted for drafted, _ in graph_counts) > 0
    if not temperature:  # the batch's greedy drafts came from one batched call per step
        assert max(batched_calls) == len(prompts)
    assert max(accept_calls) == len(prompts)  # and so did the head's accepts after the prompts
