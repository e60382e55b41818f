"""Our Llama equals HF transformers: tiny random checkpoints (HF dir, llama3 rope) and the embedded GGUF."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from unittest import mock

import pytest
import torch

from contracts.kv_cache_spec import KVCacheSpec
from contracts.sampling import SamplingParams
from engine.config import EngineConfig
from engine.cpu_linear import use_cpu_linears
from engine.kv_cache import KVCache, dtype_name
from engine.model import LlamaModel
from engine.model_files import embedded_model_path, load_model
from kernels.attention.metadata import AttentionMetadata, SeqSpan

pytestmark = pytest.mark.timeout(240)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # offline machines: never try a hub lookup

# Plain token ids (SmolLM2 vocabulary): a chat-formatted question (38 tokens, crosses two 16-token blocks),
# the start of a Python function, and the start of a story.
PROMPTS = [
    [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712,
     8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 31469, 6740, 335, 2591, 47, 2, 198, 1, 520, 9531, 198],
    [1604, 3987, 46477, 24, 94, 727, 472, 1620, 14362, 260, 304, 29, 373, 24681, 46477, 1230, 7996, 198],
    [6403, 1980, 253, 655, 28, 281, 253, 1165, 6560, 418, 260, 5595, 282, 253, 1109, 3150, 28, 665, 4161,
     354],
]
NEW_TOKENS = 32
BLOCK = 16


def softmax_invariant(logits: torch.Tensor) -> torch.Tensor:
    return logits - logits.max(dim=-1, keepdim=True).values


def chunked_logits(model: LlamaModel, tokens: list[int], chunk: int) -> torch.Tensor:
    """Every position's logits, computed `chunk` tokens at a time over non-consecutive cache blocks."""
    c = model.config
    num_blocks = -(-len(tokens) // BLOCK)
    spec = KVCacheSpec(BLOCK, c.num_kv_heads, c.head_dim, dtype_name(model.embed_tokens.weight.dtype))
    kv = KVCache(spec, c.num_layers, 2 * num_blocks + 1)
    blocks = tuple(2 * i + 1 for i in range(num_blocks))  # odd ids: forces the gather path
    rows = []
    with torch.inference_mode():
        for start in range(0, len(tokens), chunk):
            end = min(start + chunk, len(tokens))
            slots = [blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, end)]
            span = SeqSpan(0, end - start, end, blocks[:-(-end // BLOCK)], None)
            meta = AttentionMetadata.from_spans([span], slots, BLOCK)
            hidden = model(torch.tensor(tokens[start:end]), torch.arange(start, end), meta, kv)
            rows.append(model.compute_logits(hidden))
    return torch.cat(rows)


# ---- tiny random checkpoints written by HF (fast) --------------------------------------------------------

@pytest.mark.parametrize("rope_scaling,tied", [(None, True), ("llama3", False)])
def test_tiny_hf_safetensors_checkpoint_matches_hf_logits(tmp_path: Path, rope_scaling: str | None,
                                                          tied: bool) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    scaling = None if rope_scaling is None else {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16, "rope_theta": 500000.0}
    hf_config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                            rope_theta=500000.0, rope_scaling=scaling, tie_word_embeddings=tied,
                            eos_token_id=3)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(hf_config).eval()
    hf.save_pretrained(tmp_path)  # safetensors + config.json, as a real checkpoint directory
    config, ours = load_model(str(tmp_path))
    assert config.tie_word_embeddings is tied
    assert (config.rope_scaling is not None) == (rope_scaling is not None)
    tokens = torch.randint(0, 128, (70,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        expected = hf(torch.tensor([tokens])).logits[0]
    expected = softmax_invariant(expected)
    torch.testing.assert_close(softmax_invariant(chunked_logits(ours, tokens, chunk=9)), expected,
                               atol=1e-4, rtol=1e-4)
    # The CPU decode layout transform (what LLMEngine applies on CPU) keeps the numerics.
    assert use_cpu_linears(ours) == 2 * 4 + 1  # 4 projections per layer + the LM head
    torch.testing.assert_close(softmax_invariant(chunked_logits(ours, tokens, chunk=1)), expected,
                               atol=1e-4, rtol=1e-4)


# ---- the embedded GGUF vs HF's own GGUF loader (slow) ----------------------------------------------------

@pytest.fixture(scope="module")
def hf_model():
    import gguf
    from transformers import AutoModelForCausalLM, modeling_utils
    from transformers.utils import is_accelerate_available

    from engine.weights_gguf import open_reader

    path = embedded_model_path()
    # transformers refuses gguf_file= without `accelerate` installed, yet its CPU GGUF path (no device_map)
    # never calls into accelerate: lift that guard rather than add a dependency just for this reference.
    guard = (contextlib.nullcontext() if is_accelerate_available()
             else mock.patch.object(modeling_utils, "is_accelerate_available", lambda: True))
    # Same reader over the same bytes, minus np.memmap's per-slice overhead (HF parses the file ~3 times).
    faster_parse = mock.patch.object(gguf, "GGUFReader", lambda p, *a, **k: open_reader(p))
    with guard, faster_parse:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def engine():
    from engine.llm_engine import LLMEngine

    # A small token budget splits the long prompt into chunks and mixes prefill chunks with decodes.
    return LLMEngine(EngineConfig(num_kv_blocks=64, max_batch_tokens=24, max_num_seqs=4))


@pytest.mark.slow
def test_embedded_gguf_logits_match_hf_transformers(hf_model, engine) -> None:
    for prompt in PROMPTS:
        with torch.no_grad():
            expected = hf_model(torch.tensor([prompt])).logits[0]
        got = chunked_logits(engine.model, prompt, chunk=11)
        diff = (softmax_invariant(got) - softmax_invariant(expected)).abs().max().item()
        assert diff <= 1e-3, f"max |Δlogit| {diff:.2e} on a {len(prompt)}-token prompt"


@pytest.mark.slow
def test_greedy_generation_is_token_identical_to_hf_generate(hf_model, engine) -> None:
    expected = []
    for prompt in PROMPTS:
        with torch.no_grad():
            ids = torch.tensor([prompt])
            out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                    do_sample=False)
        expected.append(out[0, len(prompt):].tolist())
    got = engine.generate(PROMPTS, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    assert got == expected
    assert engine.stats().num_free_blocks == 64  # every block came back
