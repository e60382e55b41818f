"""Batched greedy head drafting (the CUDA-graph path, run eagerly over its static buffers on CPU) drafts
what each sequence's own HeadDrafter drafts."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from contracts.sampling import SamplingParams
from engine.config import ModelConfig
from engine.spec.draft_head import DraftHead, DraftHeadConfig
from engine.spec.head_drafter import HeadDrafter
from engine.spec.head_graphs import HeadDraftGraphs

TARGET = ModelConfig(name="t", vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=4,
                     num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=128)
LAYERS = (1, 2, 3)


def head_and_embed() -> tuple[DraftHead, nn.Embedding]:
    torch.manual_seed(0)
    head = DraftHead(DraftHeadConfig.for_target(TARGET, LAYERS, draft_vocab_size=64))
    for p in head.parameters():
        nn.init.normal_(p, std=0.3)
    head.d2t = torch.randperm(TARGET.vocab_size)[:64]
    embed = nn.Embedding(TARGET.vocab_size, TARGET.hidden_size)
    nn.init.normal_(embed.weight, std=1.0)
    return head.eval(), embed


def drafter_after(head: DraftHead, embed: nn.Embedding, tokens: int, first: int, seed: int,
                  sampling: SamplingParams | None = None) -> HeadDrafter:
    """A drafter that accepted positions first .. tokens - 2 (random features), in two steps."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TARGET.vocab_size, (tokens,), generator=gen).tolist()
    features = torch.randn(tokens - 1 - first, len(LAYERS) * TARGET.hidden_size, generator=gen)
    drafter = HeadDrafter(head, embed, first_position=first, sampling=sampling)
    half = (tokens - 1 - first) // 2
    drafter.accept(ids[:first + half + 1], features[:half])
    drafter.accept(ids, features[half:])
    return drafter


@pytest.mark.parametrize("k", [1, 3, 5])
def test_batched_drafts_equal_each_drafters_own(k: int) -> None:
    head, embed = head_and_embed()
    graphs = HeadDraftGraphs(head, embed, max_num_seqs=4, max_len=64, k=k)
    drafters = [drafter_after(head, embed, n, first, seed)
                for seed, (n, first) in enumerate([(9, 0), (30, 4), (2, 0)])]
    assert all(graphs.serves(d) for d in drafters)
    with torch.no_grad():
        got = graphs.propose(drafters)
        expected = [d.propose(k) for d in drafters]
    assert got == expected
    # A smaller batch later (rows shift, stale rows stay behind): still each drafter's own drafts.
    with torch.no_grad():
        assert graphs.propose(drafters[1:2]) == expected[1:2]


def test_serves_only_greedy_drafters_of_its_head_that_fit() -> None:
    head, embed = head_and_embed()
    graphs = HeadDraftGraphs(head, embed, max_num_seqs=2, max_len=16, k=2)
    assert graphs.serves(drafter_after(head, embed, 10, 0, 1))
    assert not graphs.serves(drafter_after(head, embed, 20, 0, 1))  # 19 head KV rows > max_len 16
    assert not graphs.serves(drafter_after(head, embed, 10, 0, 1, SamplingParams(temperature=0.7, seed=3)))
    assert not graphs.serves(HeadDrafter(head, embed))  # nothing accepted yet: no last output
    other, _ = head_and_embed()
    assert not graphs.serves(drafter_after(other, embed, 10, 0, 1))
    with pytest.raises(ValueError):
        graphs.propose([drafter_after(head, embed, 10, 0, i) for i in range(3)])  # 3 > max_num_seqs 2


def test_engine_drafting_in_graphs_proposes_and_emits_what_eager_drafting_does(tmp_path) -> None:
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
    greedy = SamplingParams(max_tokens=12, ignore_eos=True)

    batched_calls = []

    def run(in_graphs: bool) -> tuple[list[list[int]], list[tuple[int, int]]]:
        engine = LLMEngine(EngineConfig(device="cpu", dtype="float32", num_kv_blocks=64, max_num_seqs=4,
                                        spec=SpecConfig("head", k=3, head_path=str(path))), model=model)
        if in_graphs:  # on CPU the graph path runs eagerly over its static buffers
            engine.speculator.draft_in_graphs(4, 128)
            graphs = engine.speculator.draft_graphs
            propose = graphs.propose
            graphs.propose = lambda drafters: batched_calls.append(len(drafters)) or propose(drafters)
        seqs = [engine.add_request(f"r{i}", p, greedy) for i, p in enumerate(prompts)]
        while engine.has_work():
            engine.step()
        engine.speculator.close()
        return [s.output_token_ids for s in seqs], [(s.num_draft_tokens, s.num_accepted_tokens) for s in seqs]

    eager_out, eager_counts = run(False)
    graph_out, graph_counts = run(True)
    assert graph_out == eager_out and graph_counts == eager_counts
    assert sum(drafted for drafted, _ in graph_counts) > 0
    assert max(batched_calls) == len(prompts)  # the batch's drafts came from one batched call per step
