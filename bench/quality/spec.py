"""Speculative decoding through the real engine: τ, tokens/s with and without it, greedy identity.

    python -m bench.quality.spec [--prompts-file PATH] [--max-tokens N] [--temperature T] [--batch B ...]
                                 [--json OUT] [--k K ...] [--drafters ngram head] [--head PATH] [--threads 1]
                                 [--tree 2,2,1,1,1 ...] [--tree-max-nodes N]
                                 [--device cuda] [--model PATH] [--dtype D]

For each batch size, the prompts (20 built-in chat questions, or one per line of --prompts-file;
chat-templated, repeated to fill at least one batch) run through the engine's steps with speculation off,
then with each drafter and k (EngineConfig.spec), all engines sharing one loaded model, round-robin by
groups of B prompts (each setting sees the same load swings of a shared box). τ = tokens emitted per
decode or verify step of a sequence (accepted drafts + the target's own token); tokens/s = output tokens /
wall seconds of the whole run (prefill included, the same for every row); speedup = tokens/s over the
speculation-off run of the same batch size in the same process; greedy_identical = every output equals the
speculation-off output (at T > 0, seeded per request: the same draws for n-gram; the head samples its
drafts then, so its text differs by design, its distribution does not). `--time-budget` (default 540 s
of measuring, within the issue's 10 minutes with the model load) starts no group of prompts that would end
past it: on a loaded box fewer prompts are measured — every setting the same ones, the count in each row —
rather than the run overrunning. Offline acceptance for comparing heads without the engine:
`python -m bench.quality.spec_offline`. Where a step's time goes: `python -m bench.quality.spec_profile`.
`--tree B` adds a "head-tree" row per branching B (SpecConfig.tree_branching; its k is the tree's depth):
the head's top-k trees verified with a tree mask; drafted counts every tree node.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from contracts.sampling import SamplingParams
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.model_files import load_model, resolve_model_path
from engine.spec.config import SpecConfig, tree_nodes
from engine.spec.eval_prompts import PROMPTS
from engine.tokenizer import Tokenizer


@dataclass(frozen=True)
class Measured:
    outputs: list[list[int]]
    seconds: float
    steps: int  # decode + verify steps, summed over sequences
    emitted: int  # tokens those steps appended
    drafted: int
    accepted: int

    def plus(self, other: Measured) -> Measured:
        return Measured(self.outputs + other.outputs, self.seconds + other.seconds, self.steps + other.steps,
                        self.emitted + other.emitted, self.drafted + other.drafted,
                        self.accepted + other.accepted)

    @property
    def tokens_per_s(self) -> float:
        return sum(len(o) for o in self.outputs) / self.seconds

    @property
    def tau(self) -> float:
        return self.emitted / max(self.steps, 1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts-file", type=Path, help="one user message per line (default: 20 built in)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="> 0: seeded sampling per request (the drafts are verified by seeded draws)")
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="most sequences decoding together")
    p.add_argument("--json", type=Path, help="write {'runs': [...]} here")
    p.add_argument("--k", type=int, nargs="+", default=[5], help="draft lengths (SpecConfig.k)")
    p.add_argument("--drafters", nargs="+", choices=("ngram", "head"), default=["ngram", "head"])
    p.add_argument("--head", type=Path, default=None, help="draft head file (default: the shipped one)")
    p.add_argument("--fixed-k", action="store_true", help="always draft k (adaptive k off)")
    p.add_argument("--tree", type=branching, nargs="+", default=[],
                   help="also the head drafting trees of these branchings per depth (e.g. 2,2,1,1,1)")
    p.add_argument("--tree-max-nodes", type=int, default=None, help="prune each tree to this many nodes")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (bfloat16 model, decode in CUDA graphs)")
    p.add_argument("--model", default=None, help="target GGUF / HF dir (default: the embedded SmolLM2)")
    p.add_argument("--dtype", default=None, help="compute dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--time-budget", type=float, default=540.0,
                   help="seconds of measuring, all batch sizes (0: no limit); no group starts that would "
                        "end past it: a loaded box measures fewer prompts, every setting the same ones")
    args = p.parse_args(argv)
    if args.temperature < 0 or args.max_tokens < 1 or min(args.batch) < 1 or min(args.k) < 1:
        p.error("need --temperature >= 0, --max-tokens >= 1, --batch >= 1 and --k >= 1")
    return args


def branching(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tree wants e.g. 2,2,1,1,1, got {text!r}") from None


def drafter_name(spec: SpecConfig) -> str:
    return "head-tree" if spec.tree_branching else spec.method


def load_prompts(path: Path | None) -> list[str]:
    if path is None:
        return list(PROMPTS)
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def measure(engine: LLMEngine, prompts: list[list[int]], sampling: list[SamplingParams]) -> Measured:
    """Runs every prompt to completion through the engine's steps, counting decode/verify steps."""
    seqs = [engine.add_request(f"bench-{i}", prompt, params)
            for i, (prompt, params) in enumerate(zip(prompts, sampling, strict=True))]
    steps = emitted = 0
    start = time.perf_counter()
    while engine.has_work():
        batch = engine.schedule()
        engine.postprocess(batch, engine.execute(batch))
        for chunk in batch.chunks:
            if chunk.num_sampled and chunk.start >= chunk.seq.num_prompt_tokens:  # not a prompt's end
                steps += 1
                emitted += len(chunk.seq.token_ids) - chunk.output_start
    seconds = time.perf_counter() - start
    return Measured([s.output_token_ids for s in seqs], seconds, steps, emitted,
                    sum(s.num_draft_tokens for s in seqs), sum(s.num_accepted_tokens for s in seqs))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    model = load_model(args.model, dtype=dtype, device=args.device)
    tokenizer = Tokenizer.from_model(resolve_model_path(args.model))
    texts = load_prompts(args.prompts_file)
    specs = [SpecConfig()] + [
        SpecConfig(drafter, k=k, head_path=str(args.head) if drafter == "head" and args.head else None,
                   adaptive=not args.fixed_k)
        for drafter, k in itertools.product(args.drafters, args.k)] + [
        SpecConfig("head", head_path=str(args.head) if args.head else None, adaptive=not args.fixed_k,
                   tree_branching=tree, tree_max_nodes=args.tree_max_nodes) for tree in args.tree]
    runs: list[dict] = []
    started = time.perf_counter()
    total = sum(max(len(texts), b) for b in args.batch)
    bar = tqdm(total=total * len(specs), unit="prompt-run", desc="spec bench", file=sys.stderr)
    stopped = False
    for batch in args.batch:
        # At least one full batch: the gain at batch B is measured with B sequences decoding.
        chosen = list(itertools.islice(itertools.cycle(texts), max(len(texts), batch)))
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": t}]) for t in chosen]
        sampling = [SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=1000 + i)
                    for i in range(len(prompts))]
        rows_ahead = max([*args.k, *(tree_nodes(t) for t in args.tree)])  # verify rows past the context
        blocks = batch * (-(-(max(map(len, prompts)) + args.max_tokens + rows_ahead + 1) // 16)) + 16
        totals: list[Measured | None] = [None] * len(specs)
        rows: list[dict] = []
        group_seconds: list[float] = []
        # Round-robin over the settings, one group of `batch` prompts at a time: on a shared, noisy box each
        # setting then sees the same load swings (one setting after the other would compare two moments).
        if args.device.startswith("cuda"):
            # Untimed warm-up, the first group once per setting: Triton compiles each kernel variant at its
            # first launch (seconds), which would otherwise land in whichever setting runs first (spec off).
            for spec in specs:
                engine = LLMEngine(EngineConfig(device=args.device, dtype=dtype, num_kv_blocks=blocks,
                                                max_num_seqs=batch, spec=spec), model=model)
                measure(engine, prompts[:batch], sampling[:batch])
                if engine.speculator is not None:
                    engine.speculator.close()
        for first in range(0, len(prompts), batch):
            group = slice(first, first + batch)
            if over_budget(args.time_budget, started, group_seconds):
                stopped = True
                break
            group_start = time.perf_counter()
            for i, spec in enumerate(specs):
                engine = LLMEngine(EngineConfig(device=args.device, dtype=dtype, num_kv_blocks=blocks,
                                                max_num_seqs=batch, spec=spec), model=model)
                got = measure(engine, prompts[group], sampling[group])
                if engine.speculator is not None:
                    engine.speculator.close()  # its feature hooks stay off the next engine's forwards
                totals[i] = got if totals[i] is None else totals[i].plus(got)
                bar.update(len(prompts[group]))
            group_seconds.append(time.perf_counter() - group_start)
            done = min(first + batch, len(prompts))
            rows = [row(spec, batch, got, totals[0]) | {"prompts": done}
                    for spec, got in zip(specs[1:], totals[1:], strict=True)]
            if args.json is not None:  # after every group: a long sweep cut short keeps what it measured
                write_json(args, runs + rows, done)
        runs += rows
        if stopped:
            break
    bar.close()
    if stopped:
        print(f"time budget {args.time_budget:.0f} s reached: rows measured on the prompts shown per row "
              "(every setting on the same ones); batch sizes after the last row not run", file=sys.stderr)
    print(f"{len(texts)} prompts, ≤ {args.max_tokens} tokens, T = {args.temperature}, "
          f"{args.threads} thread(s), adaptive k {'off' if args.fixed_k else 'on'}")
    print(f"{'drafter':<9} {'k':>2} {'batch':>5} {'prompts':>7} {'tau':>6} {'accepted/drafted':>17} "
          f"{'tok/s':>8} {'off tok/s':>9} {'speedup':>8} {'identical':>9}")
    for r in runs:
        print(f"{r['drafter']:<9} {r['k']:>2} {r['batch']:>5} {r['prompts']:>7} {r['tau']:>6.3f} "
              f"{r['acceptance']:>17.3f} "
              f"{r['tokens_per_s']:>8.1f} {r['baseline_tokens_per_s']:>9.1f} {r['speedup']:>7.2f}x "
              f"{str(r['greedy_identical']):>9}")
    for spec in specs[1:]:
        slower = [r["batch"] for r in runs if (r["drafter"], r["k"]) == (drafter_name(spec), spec.draft_depth)
                  and r["speedup"] < 1]
        if slower:
            print(f"{drafter_name(spec)} k={spec.draft_depth}: below 1x from batch {min(slower)}")
    return 0


def over_budget(budget: float, started: float, group_seconds: list[float]) -> bool:
    """Whether one more group, at this batch size's mean group time so far, would end past `budget`
    seconds of run (the first group of a batch size starts while any budget is left)."""
    if budget <= 0:
        return False
    mean = sum(group_seconds) / len(group_seconds) if group_seconds else 0.0
    return time.perf_counter() - started + mean > budget


def row(spec: SpecConfig, batch: int, got: Measured, plain: Measured) -> dict:
    tree = {}
    if spec.tree_branching:
        tree = {"tree": list(spec.tree_branching), "tree_max_nodes": spec.tree_max_nodes}
    return {"drafter": drafter_name(spec), "k": spec.draft_depth, "batch": batch, "tau": round(got.tau, 3),
            "speedup": round(got.tokens_per_s / plain.tokens_per_s, 3),
            "greedy_identical": got.outputs == plain.outputs,
            "acceptance": round(got.accepted / max(got.drafted, 1), 3),
            "tokens_per_s": round(got.tokens_per_s, 2), "baseline_tokens_per_s": round(plain.tokens_per_s, 2),
            "drafted": got.drafted, "accepted": got.accepted} | tree


def write_json(args: argparse.Namespace, runs: list[dict], num_prompts: int) -> None:
    args.json.write_text(json.dumps({"runs": runs, "prompts": num_prompts, "max_tokens": args.max_tokens,
                                     "temperature": args.temperature, "threads": args.threads,
                                     "adaptive_k": not args.fixed_k}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
