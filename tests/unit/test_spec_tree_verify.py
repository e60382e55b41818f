"""Tree verify forwards on the tiny random model: the accepted paths reproduce greedy decoding, and a chain
tree computes what a causal verify chunk computes."""
from __future__ import annotations

import pytest
import torch

from contracts.kv_cache_spec import KVCacheSpec
from contracts.sampling import SamplingParams
from engine.config import EngineConfig
from engine.kv_cache import KVCache
from engine.llm_engine import LLMEngine
from engine.model import LlamaModel
from engine.random_models import PRESETS, build_random_model
from engine.spec.tree import DraftTree, accept_tree_path
from engine.spec.tree_verify import TreeChunk, commit_path, tree_verify_logits
from kernels.attention.metadata import AttentionMetadata, SeqSpan

pytestmark = pytest.mark.timeout(120)

PROMPT = [5, 17, 300, 42, 9, 77, 128]
BLOCKS = (7, 2, 9, 4, 11, 0, 13, 5)  # scattered, unordered: slots go through the block table
BLOCK_SIZE = 4
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model() -> LlamaModel:
    return build_random_model(PRESETS["tiny"], torch.float32, "cpu", seed=0)


@pytest.fixture(scope="module")
def reference(model: LlamaModel) -> list[int]:
    engine = LLMEngine(EngineConfig(device="cpu", dtype="float32", num_kv_blocks=32, max_num_seqs=2),
                       model=(PRESETS["tiny"], model))
    (tokens,) = engine.generate([PROMPT], SamplingParams(max_tokens=16, ignore_eos=True))
    return tokens


def new_cache(model: LlamaModel) -> KVCache:
    config = model.config
    return KVCache(KVCacheSpec(BLOCK_SIZE, config.num_kv_heads, config.head_dim), config.num_layers, 16)


@torch.inference_mode()
def forward_causal(model: LlamaModel, kv: KVCache, start: int, tokens: list[int]) -> torch.Tensor:
    """Logits [len(tokens), V] of a plain causal chunk at positions start…"""
    end = start + len(tokens)
    blocks = BLOCKS[:-(-end // BLOCK_SIZE)]
    slots = [blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(start, end)]
    meta = AttentionMetadata.from_spans([SeqSpan(0, len(tokens), end, blocks, None)], slots, BLOCK_SIZE)
    hidden = model(torch.tensor(tokens), torch.arange(start, end), meta, kv)
    return model.compute_logits(hidden)


def draft_tree(root: int, right: list[int], step: int, vocab: int) -> DraftTree:
    """A tree holding the right continuation right[0:3] among wrong branches: the right first token is the
    first or second child (so the path is sometimes not the leading rows); on odd steps the third is wrong."""
    def wrong(token: int, j: int) -> int:
        return (token + 1 + j) % vocab
    if step % 2:
        tokens = (root, right[0], wrong(right[0], 0), right[1], wrong(right[1], 1), wrong(right[2], 2))
        parents = (-1, 0, 0, 1, 1, 3)
    else:
        tokens = (root, wrong(right[0], 0), right[0], wrong(right[1], 5), right[1], wrong(right[1], 1),
                  right[2])
        parents = (-1, 0, 0, 1, 2, 2, 4)
    return DraftTree(tokens, parents)


def test_accepted_tree_paths_reproduce_greedy_decoding(model: LlamaModel, reference: list[int]) -> None:
    kv = new_cache(model)
    vocab = model.config.vocab_size
    out = [int(forward_causal(model, kv, 0, PROMPT)[-1].argmax())]
    accepted = []
    step = 0
    while len(out) < 12:
        start = len(PROMPT) + len(out) - 1  # the last token is the root, not yet in the cache
        tree = draft_tree(out[-1], reference[len(out):len(out) + 3], step, vocab)
        chunk = TreeChunk(BLOCKS, start, tree)
        (logits,) = tree_verify_logits(model, kv, [chunk], CPU)
        path = accept_tree_path(tree, logits, SamplingParams(), start + 1)
        commit_path(kv, chunk, path.rows)  # later steps read the path's KV from consecutive slots
        out.extend(path.token_ids)
        accepted.append(path.num_accepted)
        step += 1
    assert out[:12] == reference[:12]
    assert set(accepted) == {2, 3}  # odd steps stop at the wrong third draft, even steps take all three


def test_a_chain_tree_verify_computes_the_causal_chunk(model: LlamaModel, reference: list[int]) -> None:
    start = len(PROMPT)
    drafts = reference[1:5]
    chain_kv, causal_kv = new_cache(model), new_cache(model)
    for kv in (chain_kv, causal_kv):
        forward_causal(model, kv, 0, PROMPT)
    (chain,) = tree_verify_logits(model, chain_kv, [TreeChunk(BLOCKS, start, DraftTree.chain(reference[0],
                                                                                          drafts))], CPU)
    causal = forward_causal(model, causal_kv, start, [reference[0], *drafts])
    torch.testing.assert_close(chain, causal, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chain_kv.k[1], causal_kv.k[1], atol=1e-6, rtol=1e-6)
