"""The embedded model with speculation on (n-gram, shipped head) gives plain greedy decoding's tokens."""
from __future__ import annotations

import pytest

from contracts.sampling import SamplingParams
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.model_files import resolve_model_path
from engine.spec.config import SpecConfig
from engine.tokenizer import Tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

QUESTIONS = ("Why is the sky blue?", "List five healthy breakfast ideas.",
             "Write a Python function that checks whether a string is a palindrome.")


def test_embedded_model_greedy_tokens_are_the_same_with_and_without_speculation() -> None:
    tokenizer = Tokenizer.from_model(resolve_model_path(None))
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    sampling = SamplingParams(max_tokens=16, temperature=0.0)
    config = EngineConfig(num_kv_blocks=64, max_num_seqs=4)
    plain = LLMEngine(config)
    reference = plain.generate(prompts, sampling)
    bs1 = plain.generate(prompts[:1], sampling)  # bs1 decode runs the flat CPU path; verify steps do not
    for spec in (SpecConfig("ngram", k=5), SpecConfig("head", k=5)):
        engine = LLMEngine(EngineConfig(num_kv_blocks=64, max_num_seqs=4, spec=spec), model=(
            plain.model_config, plain.model))
        assert engine.generate(prompts, sampling) == reference, spec
        assert engine.generate(prompts[:1], sampling) == bs1, spec
        assert engine.block_manager.num_free == engine.block_manager.num_total
        engine.speculator.close()  # the next engine shares the model: no hooks left on it
