"""SmolLM2-135M decode tok/s on the GPU at bs1, graphed and eager (a part of bench/engine/decode_gpu.py)."""
from __future__ import annotations

import time

import torch

from bench.engine.decode_cpu import PROMPT as SMOL_PROMPT
from contracts.sampling import SamplingParams
from engine.config import EngineConfig
from engine.executors.eager import EagerExecutor
from engine.llm_engine import LLMEngine
from engine.model_files import ModelPathError, embedded_model_path
from engine.random_models import PRESETS, build_random_model


def smollm2_tok_s(new_tokens: int = 128) -> dict:
    """Decode tok/s of SmolLM2-135M at bs1, graphed and eager. The embedded GGUF (98 MB) does not fit the
    GPU machine's 64 MB upload; without it the same shape with random bf16 weights runs, and says so."""
    config = EngineConfig(device="cuda", dtype="bfloat16", num_kv_blocks=64, max_num_seqs=1)
    try:
        embedded_model_path()
        engine, weights = LLMEngine(config), "embedded GGUF"
    except ModelPathError:
        preset = PRESETS["smollm2-135m"]
        model = build_random_model(preset, torch.bfloat16, "cuda", seed=0, std=0.02)
        engine = LLMEngine(config, model=(preset, model))
        weights = "random bf16 weights (embedded GGUF not installed here)"
    result: dict = {"weights": weights}
    eager = EagerExecutor(engine.model, engine.kv_cache, torch.device(config.device))
    for label, executor in (("graphed", engine.executor), ("eager", eager)):
        seq = engine.add_request(f"smol-{label}", SMOL_PROMPT,
                                 SamplingParams(max_tokens=new_tokens, ignore_eos=True))

        def step(executor=executor) -> None:
            batch = engine.schedule()
            engine.postprocess(batch, executor.execute(batch))

        step()  # prefill + first token
        t0 = time.perf_counter()
        while engine.has_work():
            step()
        result[f"{label}_tok_s"] = (seq.num_output_tokens - 1) / (time.perf_counter() - t0)
        result[f"{label}_tokens"] = seq.output_token_ids
    result["graphed_equals_eager_tokens"] = result.pop("graphed_tokens") == result.pop("eager_tokens")
    return result
