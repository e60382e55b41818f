"""Offline draft acceptance: τ per drafter and k without the engine, for comparing heads and vocab subsets.

    python -m bench.quality.spec_offline [--prompts-file PATH] [--max-tokens N] [--batch B] [--json OUT]
                                         [--k 5] [--head PATH] [--compare-head LABEL=PATH] [--vocab-limit S]
                                         [--held-out]

Each drafter's chain drafts are verified against the embedded target's greedy tokens, `--batch` sequences
per target forward (engine/spec/chain_replay.py), and the outputs compared with plain greedy decoding of the
same prompts in the same run. τ = tokens emitted per verify forward (accepted drafts + the target's own
token). No timing: tokens/s with and without speculation come from the engine
(`python -m bench.quality.spec`). `--held-out` adds each head's figures computed the way training computes
its held-out accuracy (engine/spec/head_eval.py) over the same replies and features: per-step accuracy, and
the τ and first-draft acceptance a chain walk over them implies, which equal the replay's when drafting
matches training. A prompts file holds one message per line, or one JSON string per line (train_head
--export-prompts files, whose messages hold newlines).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from engine.model_files import load_model, resolve_model_path
from engine.spec.chain_replay import ReplayResult, chain_replay
from engine.spec.draft_head import DEFAULT_HEAD_PATH, DraftHead, target_to_draft
from engine.spec.eval_prompts import PROMPTS
from engine.spec.head_drafter import HeadDrafter
from engine.spec.head_eval import HeldOut, held_out
from engine.spec.ngram import NgramDrafter
from engine.spec.train_data import Example
from engine.tokenizer import Tokenizer

NOT_MEASURED = "see bench.quality.spec"

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts-file", type=Path, help="one user message per line (default: 20 built in)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="only 0 today: sampled verification needs the engine integration")
    p.add_argument("--batch", type=int, default=8, help="sequences verified together in one target forward")
    p.add_argument("--json", type=Path, help="write {'runs': [...]} here")
    p.add_argument("--k", type=int, nargs="+", default=[5], help="draft lengths to run")
    p.add_argument("--head", type=Path, default=DEFAULT_HEAD_PATH, help="the learned head ('none' to skip)")
    p.add_argument("--compare-head", action="append", default=[], metavar="LABEL=PATH",
                   help="another head in the same table (e.g. last-layer features)")
    p.add_argument("--vocab-limit", type=int, action="append", default=[], metavar="S",
                   help="also run each head drafting over only its S most frequent ids")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--prompt-rows", type=int, action="append", default=[], metavar="N",
                   help="also run each head given only the last N prompt positions' features, as a decode "
                        "worker gets them across the P/D split (the prefill worker ships 1)")
    p.add_argument("--held-out", action="store_true",
                   help="also each head's training-way figures (engine/spec/head_eval.py), same forwards")
    args = p.parse_args(argv)
    if args.temperature != 0.0:
        p.error("--temperature > 0 needs rejection sampling in the engine's verify step: not measured yet")
    return args


def load_prompts(path: Path | None) -> list[str]:
    """One message per line; a line that is a JSON string (train_head --export-prompts files) is decoded."""
    if path is None:
        return list(PROMPTS)
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [json.loads(line) if line.startswith('"') else line for line in lines]


class PromptTailDrafter(HeadDrafter):
    """A HeadDrafter whose prompt brings only its last `rows` feature rows, as a transfer does."""

    def __init__(self, head: DraftHead, embed: torch.nn.Embedding, rows: int) -> None:
        super().__init__(head, embed)
        self.rows = rows
        self.fresh = True

    def accept(self, token_ids, features) -> None:
        if self.fresh:  # the prompt's rows: keep the last ones, as if the earlier were never sent
            self.fresh = False
            n = min(self.rows, features.shape[0])
            self.num_committed, features = features.shape[0] - n, features[features.shape[0] - n:]
        super().accept(token_ids, features)


def first_accept(result: ReplayResult) -> float:
    """Share of verify forwards whose first draft was accepted."""
    return sum(result.first_kept) / max(sum(result.steps), 1)


def training_way(head: DraftHead, model, prompts: list[list[int]], result: ReplayResult, k: int) -> HeldOut:
    """The head's held-out figures as training computes them, over these prompts' greedy replies and the
    features the replay's forwards captured: set against the replay's τ, the gap left is train/serve."""
    examples = [Example(torch.tensor(p + out), len(p), feats)
                for p, out, feats in zip(prompts, result.outputs, result.features, strict=True)]
    columns = torch.arange(result.features[0].shape[1])
    t2d = target_to_draft(head.d2t, head.config.target_vocab_size)
    return held_out(head, examples, columns, model.embed_tokens, t2d, torch.device("cpu"),
                    prompt_context=1 << 30, steps=k)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model_config, model = load_model(None)
    tokenizer = Tokenizer.from_model(resolve_model_path(None))
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": t}])
               for t in load_prompts(args.prompts_file)]
    eos = model_config.eos_token_ids

    def replay(make_drafter=None, k: int = 0, layers=None, label: str = "greedy", keep: bool = False
               ) -> ReplayResult:
        start = time.time()
        result = chain_replay(model, prompts, args.max_tokens, make_drafter=make_drafter, k=k,
                              batch=args.batch, eos_token_ids=eos, feature_layers=layers, progress=label,
                              keep_features=keep)
        print(f"{label}: {time.time() - start:.0f} s", file=sys.stderr)
        return result

    plain = replay()
    heads = [] if str(args.head) == "none" else [("head", args.head)]
    heads += [tuple(spec.split("=", 1)) for spec in args.compare_head]
    runs = []
    for k in args.k:
        variants = [("ngram", NgramDrafter, None, None)]
        for label, path in heads:
            head = DraftHead.load(path)
            for limit in [None, *args.vocab_limit]:
                name = label if limit is None else f"{label}@{limit}"

                def make(head=head, limit=limit) -> HeadDrafter:
                    return HeadDrafter(head, model.embed_tokens, draft_vocab_limit=limit)
                variants.append((name, make, head.config.feature_layers, head if limit is None else None))
            for rows in args.prompt_rows:
                def make_tail(head=head, rows=rows) -> HeadDrafter:
                    return PromptTailDrafter(head, model.embed_tokens, rows)
                variants.append((f"{label}, last {rows} prompt rows", make_tail, head.config.feature_layers,
                                 None))
        for name, make_drafter, layers, head in variants:
            keep = args.held_out and head is not None
            result = replay(make_drafter, k, layers, label=f"{name} k={k}", keep=keep)
            runs.append({
                "drafter": name, "k": k, "tau": round(result.tau, 3),
                "acceptance": round(sum(result.accepted) / max(sum(result.drafted), 1), 3),
                "first_accept": round(first_accept(result), 3),
                "speedup": None, "greedy_identical": result.outputs == plain.outputs,
            })
            if keep:
                runs[-1]["held_out"] = training_way(head, model, prompts, result, k).as_dict()
    print(f"{len(prompts)} prompts, ≤ {args.max_tokens} tokens, T = 0, batch {args.batch}")
    print(f"{'drafter':<18} {'k':>2} {'tau':>6} {'accepted/drafted':>17} {'greedy identical':>17}  speedup")
    for r in runs:
        print(f"{r['drafter']:<18} {r['k']:>2} {r['tau']:>6.3f} {r['acceptance']:>17.3f} "
              f"{str(r['greedy_identical']):>17}  {NOT_MEASURED}  first draft kept {r['first_accept']:.3f}")
        if "held_out" in r:
            print(f"{'':<18} training way: {json.dumps(r['held_out'])}")
    if args.json is not None:
        args.json.write_text(json.dumps({"runs": runs, "prompts": len(prompts), "max_tokens": args.max_tokens,
                                         "batch": args.batch, "speedup": NOT_MEASURED}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
