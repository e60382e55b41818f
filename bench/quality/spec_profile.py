"""Where a speculative engine step's time goes at batch 1: verify forward, drafting, capture, bookkeeping.

    python -m bench.quality.spec_profile [--prompts N] [--max-tokens N] [--k K] [--drafters ngram head]
                                         [--head PATH] [--fixed-k] [--threads 1] [--json OUT]

The first N built-in chat prompts run one at a time (batch 1, T = 0), each with speculation off and then
with each drafter (round-robin: a fresh engine per prompt and setting, all over one loaded model). Each
engine phase is timed by wrapping the object that runs it: the executor's forward (split by rows per step:
a 1-row decode step or a (k + 1)-row verify step), the speculator's feature capture (`LayerCapture.take`),
the drafter's `accept` and `propose` (the head's forwards), the rest of the speculator's `after_step` (its
Python), and the scheduler's schedule and postprocess (which rolls rejected drafts back). Times are ms per
step of one sequence, means over the run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

from contracts.sampling import SamplingParams
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.model_files import load_model, resolve_model_path
from engine.spec.config import SpecConfig
from engine.spec.eval_prompts import PROMPTS
from engine.spec.head_drafter import HeadDrafter
from engine.spec.ngram import NgramDrafter
from engine.tokenizer import Tokenizer
from kernels.attention.metadata import AttentionMetadata, SeqSpan


class Timers:
    """name → (calls, seconds), filled by wrapped callables."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = defaultdict(int)
        self.seconds: dict[str, float] = defaultdict(float)

    def add(self, name: str, seconds: float) -> None:
        self.calls[name] += 1
        self.seconds[name] += seconds

    def wrap(self, name: str | Callable[..., str], fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(name(*args, **kwargs) if callable(name) else name, time.perf_counter() - start)
        return timed


def _rows(batch, *_args) -> str:
    n = sum(c.num_new_tokens for c in batch.chunks)
    prefill = any(c.start < c.seq.num_prompt_tokens for c in batch.chunks)
    return "prefill" if prefill else ("forward, 1 row" if n == 1 else "forward, verify")


def profile(engine: LLMEngine, prompt: list[int], max_tokens: int, t: Timers) -> tuple[int, float, list[int]]:
    """One prompt through `engine`, its phases timed into `t` → (decode/verify steps, seconds, output)."""
    ex = engine.executor
    ex.execute = t.wrap(_rows, ex.execute)
    sched = engine.scheduler
    sched.schedule = t.wrap("schedule", sched.schedule)
    sched.postprocess = t.wrap("postprocess (incl. rollback)", sched.postprocess)
    spec = engine.speculator
    patched: list[tuple[type, str, Callable]] = []
    if spec is not None:
        spec.after_step = t.wrap("after_step (total)", spec.after_step)
        if spec.capture is not None:
            spec.capture.take = t.wrap("feature capture (take)", spec.capture.take)
        for cls in (HeadDrafter, NgramDrafter):
            for name in ("accept", "propose"):
                original = getattr(cls, name)
                patched.append((cls, name, original))
                setattr(cls, name, t.wrap(f"drafter {name}", original))
    steps = 0
    start = time.perf_counter()
    try:
        seq = engine.add_request("p", prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0))
        while engine.has_work():
            batch = engine.schedule()
            engine.postprocess(batch, engine.execute(batch))
            steps += sum(1 for c in batch.chunks if c.num_sampled and c.start >= c.seq.num_prompt_tokens)
    finally:
        for cls, name, original in patched:
            setattr(cls, name, original)
    return steps, time.perf_counter() - start, seq.output_token_ids


def report(label: str, t: Timers, steps: int, seconds: float, tokens: int) -> dict:
    rows = {name: {"calls": t.calls[name], "ms_per_call": 1e3 * t.seconds[name] / t.calls[name],
                   "ms_per_step": 1e3 * t.seconds[name] / max(steps, 1)} for name in sorted(t.calls)}
    if "after_step (total)" in rows:  # the speculator's own Python: after_step less the drafter's calls
        inner = sum(t.seconds[n] for n in ("drafter accept", "drafter propose"))
        rows["after_step (speculator Python)"] = {
            "calls": t.calls["after_step (total)"], "ms_per_call": float("nan"),
            "ms_per_step": 1e3 * (t.seconds["after_step (total)"] - inner) / max(steps, 1)}
    print(f"\n{label}: {steps} decode/verify steps, {tokens} tokens, {seconds:.2f} s, "
          f"{tokens / seconds:.1f} tok/s, τ {tokens / max(steps, 1):.3f}")
    for name, r in rows.items():
        print(f"  {name:<32} {r['calls']:>6} calls {r['ms_per_call']:>8.2f} ms/call "
              f"{r['ms_per_step']:>8.2f} ms/step")
    return {"label": label, "steps": steps, "tokens": tokens, "seconds": seconds, "phases": rows}


def step_costs(engine: LLMEngine, prompt: list[int], max_rows: int, reps: int) -> list[dict]:
    """ms per forward of one sequence at 1..max_rows rows (the last token + drafts), each path timed
    round-robin over `reps` rounds (medians), so a shared box's load swings hit every path alike:
    the flat bs1 step (+ 1 LM-head row), the eager forward (+ every row's LM head: the old verify path),
    FlatRows (+ 1 LM-head row, the lazy head's cost when the first draft is rejected; + every row's LM head
    in one pass)."""
    ex = engine.executor
    model, kv = ex.eager.model, ex.eager.kv_cache
    position, drafts = len(prompt), [int(t) for t in prompt[:max_rows - 1]]
    first_block = 0
    blocks = list(range(first_block, first_block + position // kv.block_size + 1))

    def flat() -> None:
        model.compute_logits(ex.flat(prompt[-1], position, blocks))

    def eager(rows: int) -> None:
        end = position + rows
        span = SeqSpan(0, rows, end, tuple(range(-(-end // kv.block_size))), 0)
        meta = AttentionMetadata.from_spans([span], list(range(position, end)), kv.block_size)
        tokens = torch.tensor([prompt[-1], *drafts[:rows - 1]])
        model.compute_logits(model(tokens, torch.arange(position, end), meta, kv))

    def rows_path(rows: int, head_rows: int) -> None:
        ex.flat.logits(ex.rows([prompt[-1], *drafts[:rows - 1]], position, first_block)[:head_rows])

    paths: dict[str, Callable[[], None]] = {"flat bs1 step": flat}
    for rows in range(1, max_rows + 1):
        paths[f"eager, {rows} rows, all LM-head rows"] = lambda r=rows: eager(r)
        paths[f"FlatRows, {rows} rows, 1 LM-head row"] = lambda r=rows: rows_path(r, 1)
        paths[f"FlatRows, {rows} rows, all LM-head rows"] = lambda r=rows: rows_path(r, r)
    times: dict[str, list[float]] = defaultdict(list)
    with torch.inference_mode():
        for _ in range(reps + 1):  # the first round warms up (and packs FlatRows' weights)
            for name, fn in paths.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    out = []
    for name, ts in times.items():
        ms = 1e3 * sorted(ts[1:])[len(ts[1:]) // 2]
        out.append({"path": name, "ms": round(ms, 2)})
        print(f"  {name:<40} {ms:8.2f} ms")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--drafters", nargs="+", choices=("ngram", "head"), default=["ngram", "head"])
    p.add_argument("--head", type=Path, default=None)
    p.add_argument("--fixed-k", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path)
    p.add_argument("--step-costs", type=int, default=0, metavar="REPS",
                   help="also time one forward per path and row count, REPS rounds (medians)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(None, dtype="float32", device="cpu")
    tokenizer = Tokenizer.from_model(resolve_model_path(None))
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}])
               for text in PROMPTS[:args.prompts]]
    specs = [SpecConfig()] + [SpecConfig(d, k=args.k, head_path=str(args.head) if d == "head" and args.head
                                         else None, adaptive=not args.fixed_k) for d in args.drafters]
    blocks = -(-(max(map(len, prompts)) + args.max_tokens + args.k + 1) // 16) + 16
    timers = [Timers() for _ in specs]
    steps, seconds = [0] * len(specs), [0.0] * len(specs)
    outputs: list[list[list[int]]] = [[] for _ in specs]
    # Round-robin: each prompt through every setting in turn, so a shared box's load swings hit all alike.
    for prompt in prompts:
        for i, spec in enumerate(specs):
            config = EngineConfig(device="cpu", dtype="float32", num_kv_blocks=blocks, max_num_seqs=1,
                                  spec=spec)
            engine = LLMEngine(config, model=model)
            n, s, out = profile(engine, prompt, args.max_tokens, timers[i])
            if engine.speculator is not None:
                engine.speculator.close()
            steps[i], seconds[i] = steps[i] + n, seconds[i] + s
            outputs[i].append(out)
    results = []
    for i, spec in enumerate(specs):
        tokens = sum(len(o) - 1 for o in outputs[i])  # the first token comes from the prefill step
        same = outputs[i] == outputs[0]
        row = report(spec.describe(), timers[i], steps[i], seconds[i], tokens)
        results.append(row | {"greedy_identical": same})
        print(f"  greedy identical to off: {same}")
    costs = []
    if args.step_costs:
        engine = LLMEngine(EngineConfig(device="cpu", dtype="float32", num_kv_blocks=blocks, max_num_seqs=1),
                           model=model)
        print(f"\nstep costs at position {len(prompts[0])}, medians of {args.step_costs} rounds:")
        costs = step_costs(engine, prompts[0], args.k + 1, args.step_costs)
    if args.json is not None:
        args.json.write_text(json.dumps({"runs": results, "step_costs": costs, "prompts": args.prompts,
                                         "max_tokens": args.max_tokens, "threads": args.threads}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
