"""Steady-state ms per engine step on CUDA: speculation off (lookahead on / off) vs n-gram verify steps.

`python -m bench.engine.step_rate [--model random:smollm2-135m] [--batches 1,8,32] [--tokens 128]`: random
weights of a preset shape, bf16, `batch` prompts of 40 random tokens decoding `--tokens` each with ignore_eos,
through the engine's own schedule → execute → postprocess loop. The first run of a batch size is printed
separately: it pays Triton's compiles (seconds), which is what a benchmark without a warm-up would time.
"""
from __future__ import annotations

import argparse
import time

import torch

from contracts.sampling import SamplingParams
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.random_models import build_random_model, preset_config
from engine.spec.config import SpecConfig


def run(model, config, batch: int, tokens: int, lookahead: bool, spec: SpecConfig) -> tuple[int, float]:
    """(steps, seconds) of decoding `batch` sequences to `tokens` each."""
    engine = LLMEngine(EngineConfig(device="cuda", dtype="bfloat16", num_kv_blocks=batch * 16 + 16,
                                    max_num_seqs=batch, decode_lookahead=lookahead, spec=spec),
                       model=(config, model))
    gen = torch.Generator().manual_seed(0)
    for i in range(batch):
        engine.add_request(f"r{i}", torch.randint(3, config.vocab_size - 1, (40,), generator=gen).tolist(),
                           SamplingParams(max_tokens=tokens, ignore_eos=True))
    steps, start = 0, time.perf_counter()
    while engine.has_work():
        step = engine.schedule()
        engine.postprocess(step, engine.execute(step))
        steps += 1
    torch.cuda.synchronize()
    if engine.speculator is not None:
        engine.speculator.close()
    return steps, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:smollm2-135m")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--tokens", type=int, default=128)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("step_rate measures CUDA steps: no CUDA device here")
    config = preset_config(args.model)
    model = build_random_model(config, torch.bfloat16, "cuda")
    print(f"# {torch.cuda.get_device_name()} | {config.name} | bf16 | {args.tokens} tokens")
    settings = (("off, first run (compiles)", True, SpecConfig()), ("off, lookahead", True, SpecConfig()),
                ("off, no lookahead", False, SpecConfig()), ("ngram k=5", False, SpecConfig("ngram", k=5)))
    for batch in (int(b) for b in args.batches.split(",")):
        for name, lookahead, spec in settings:
            steps, seconds = run(model, config, batch, args.tokens, lookahead, spec)
            print(f"batch {batch:>3} {name:<26} {steps:>4} steps {1e3 * seconds / steps:7.3f} ms/step "
                  f"{batch * args.tokens / seconds:9.0f} tok/s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
