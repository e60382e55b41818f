"""One command trains a draft head: distil data, build the vocab map, TTT-train, export safetensors.

    python -m engine.spec.train_head [--steps N] [--device cuda] [--time-budget S] [--fresh]
    python -m engine.spec.train_head --export-prompts runs/spec-prompts.jsonl --num-prompts 20000  # ship it
    python -m engine.spec.train_head --prompts-file runs/spec-prompts.jsonl --device cuda ...     # on the GPU

Re-running continues from `<work-dir>/data.pt` and `<work-dir>/<name>.ckpt.pt`: a CPU run here and a GPU
run on the device extend the same training. The recipe (data, steps, time, hardware) goes into the exported
file's metadata and the `.recipe.json` beside it. The recipes themselves: docs/speculative.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from engine.model_files import load_model, resolve_model_path
from engine.spec.draft_head import DraftHead, DraftHeadConfig, build_vocab_map, target_to_draft
from engine.spec.eval_prompts import PROMPTS as EVAL_PROMPTS
from engine.spec.head_eval import held_out
from engine.spec.self_prompts import sample_user_messages
from engine.spec.target_forward import default_feature_layers
from engine.spec.train_data import (
    DOC_ROOT,
    Example,
    build_examples,
    make_batch,
    mixed_prompts,
    read_prompts,
    write_prompts,
)
from engine.spec.ttt import ttt_loss
from engine.tokenizer import Tokenizer
from kernels.registry import BACKENDS, KernelRegistry

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="target (GGUF / HF dir); default the embedded SmolLM2")
    p.add_argument("--work-dir", type=Path, default=Path("runs/spec-head"), help="data and checkpoints")
    p.add_argument("--name", default="fused", help="checkpoint name inside --work-dir")
    p.add_argument("--out", type=Path, default=None, help="exported head (default: the work dir)")
    p.add_argument("--features", choices=("fused", "last"), default="fused",
                   help="fused: low/mid/high layer outputs; last: the last layer's only")
    p.add_argument("--draft-vocab", type=int, default=4096,
                   help="frequency-ranked target ids the head drafts")
    p.add_argument("--num-prompts", type=int, default=128, help="prompts drawn (or the first read)")
    p.add_argument("--question-share", type=float, default=0.8,
                   help="share of drawn prompts that are chat-shaped word-list questions (the rest doc "
                        "paragraphs); the evaluation prompts are chat requests")
    p.add_argument("--prompts-file", type=Path, default=None,
                   help="read the prompts from this --export-prompts file instead of drawing them here")
    p.add_argument("--export-prompts", type=Path, default=None,
                   help="draw the prompts, write them to this file (JSON lines) and exit: the device has "
                        "other docs, so draw here and ship the file")
    p.add_argument("--self-prompts", type=int, default=0,
                   help="also this many user messages the target writes itself (sampled at T = 1, top-p "
                        "0.95, seeded), shuffled in with the others: general chat requests from its own "
                        "idea of a user; the evaluation prompts are filtered out. Written to "
                        "<work-dir>/self-prompts.jsonl (and beside --out)")
    p.add_argument("--distil-batch", type=int, default=32, help="sequences per target forward")
    p.add_argument("--distil-budget", type=float, default=0.0,
                   help="seconds of distillation: no new batch of prompts starts after it; 0 = none")
    p.add_argument("--save-data", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the distilled data in <work-dir>/data.pt for later runs (GBs at GPU scale)")
    p.add_argument("--max-tokens", type=int, default=128, help="reply length the target generates per prompt")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps in all (a resumed run goes on)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ttt-steps", type=int, default=5,
                   help="unrolled draft steps per training position (as many as the drafts served: k = 5)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--prompt-context", type=int, default=64,
                   help="prompt tokens (the last ones) a training row may attend to")
    p.add_argument("--val", type=int, default=12, help="held-out examples (last of the data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--kernels", choices=BACKENDS, default="auto",
                   help="the target's kernels: auto = Triton on CUDA (batched paged attention), torch on CPU")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 on a shared box: oversubscribed pools thrash)")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds of training, then checkpoint; the lr schedule ends at whichever of "
                        "--steps and this budget comes first; 0 = none")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    return p.parse_args(argv)


def draw_prompts(args: argparse.Namespace) -> tuple[list[str], str]:
    """(user messages, where they came from)."""
    if args.prompts_file is not None:
        texts = read_prompts(args.prompts_file)[:args.num_prompts]
        return texts, f"{len(texts)} prompts of {args.prompts_file.name}"
    texts = mixed_prompts(args.num_prompts, args.seed, args.question_share)
    return texts, (f"{len(texts)} prompts (seed {args.seed}): {args.question_share:.0%} questions over words "
                   f"of {DOC_ROOT}, the rest its paragraphs under chat instructions")


def recipe_key(args: argparse.Namespace) -> list:
    """What the distilled data depends on: a data.pt built with other values is not reused."""
    source = args.prompts_file.name if args.prompts_file is not None else args.question_share
    return [args.num_prompts, args.max_tokens, args.seed, source, args.self_prompts]


def add_self_prompts(args: argparse.Namespace, model, model_config, tokenizer: Tokenizer,
                     texts: list[str], source: str) -> tuple[list[str], str]:
    """`texts` with --self-prompts messages sampled from the target shuffled in (seeded), and the source."""
    start = time.time()
    own = sample_user_messages(model, tokenizer, args.self_prompts, args.seed,
                               end_ids=model_config.eos_token_ids, batch=args.distil_batch,
                               exclude=EVAL_PROMPTS)
    for path in {args.work_dir, args.out.parent if args.out is not None else args.work_dir}:
        write_prompts(path / "self-prompts.jsonl", own)
    logger.info("the target wrote %d prompts in %.0f s", len(own), time.time() - start)
    mixed = texts + own
    random.Random(args.seed).shuffle(mixed)  # a --distil-budget cut keeps both kinds in proportion
    return mixed, (f"{source} and {len(own)} user messages the target sampled itself (seed {args.seed}, "
                   f"T 1, top-p 0.95, {time.time() - start:.0f} s), shuffled together")


def distil(args: argparse.Namespace, model, model_config, layers: tuple[int, ...]) -> dict:
    tokenizer = Tokenizer.from_model(resolve_model_path(args.model))
    texts, source = draw_prompts(args) if args.num_prompts else ([], "no drawn prompts")
    if args.self_prompts:
        texts, source = add_self_prompts(args, model, model_config, tokenizer, texts, source)
    start = time.time()
    examples: list[Example] = []
    # One forward batch at a time (templated as it goes), so that --distil-budget can stop between them.
    for first in range(0, len(texts), args.distil_batch):
        if args.distil_budget and time.time() - start > args.distil_budget:
            logger.info("distil budget spent: %d of %d prompts", len(examples), len(texts))
            break
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": t}])
                   for t in texts[first:first + args.distil_batch]]
        examples += build_examples(model, prompts, args.max_tokens, layers, model_config.eos_token_ids,
                                   batch=args.distil_batch)
        logger.info("distilled %d/%d prompts in %.0f s", len(examples), len(texts), time.time() - start)
    if len(examples) < len(texts):
        source += f" (the first {len(examples)} distilled within {args.distil_budget:.0f} s)"
    return {"layers": layers, "examples": examples, "seconds": time.time() - start,
            "recipe_args": recipe_key(args), "source": source}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.export_prompts is not None:
        texts, source = draw_prompts(args)
        write_prompts(args.export_prompts, texts)
        logger.info("wrote %s: %s", args.export_prompts, source)
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model_config, model = load_model(args.model, "float32", device)
    # Triton on CUDA: the torch reference attention loops over sequences, hundreds per forward here.
    model.bind_kernels(KernelRegistry.for_device(device, args.kernels))
    layers = tuple(sorted({*default_feature_layers(model_config.num_layers), model_config.num_layers - 1}))
    args.work_dir.mkdir(parents=True, exist_ok=True)
    data_path = args.work_dir / "data.pt"
    if data_path.exists():
        data = torch.load(data_path, map_location=device, weights_only=False)
        if data["recipe_args"] != recipe_key(args):
            raise SystemExit(f"{data_path} was built with (num_prompts, max_tokens, seed, source) = "
                             f"{data['recipe_args']}: delete it or pass those")
    else:
        data = distil(args, model, model_config, layers)
        if args.save_data:
            torch.save(data, data_path)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the head's training only: the data is distilled
        torch.backends.cudnn.allow_tf32 = True
    examples: list[Example] = data["examples"]
    train, val = examples[:-args.val], examples[-args.val:]
    head_layers = (default_feature_layers(model_config.num_layers) if args.features == "fused"
                   else (model_config.num_layers - 1,))
    hidden = model_config.hidden_size
    columns = torch.cat([torch.arange(hidden) + data["layers"].index(i) * hidden for i in head_layers])
    columns = columns.to(device)  # indexes the features where make_batch moved them

    counts = torch.zeros(model_config.vocab_size, dtype=torch.int64)
    for e in train:
        counts += torch.bincount(e.token_ids[e.num_prompt_tokens:], minlength=model_config.vocab_size)
    d2t = build_vocab_map(counts, args.draft_vocab)
    t2d = target_to_draft(d2t, model_config.vocab_size)
    head = DraftHead(DraftHeadConfig.for_target(model_config, head_layers, args.draft_vocab)).to(device)
    with torch.no_grad():
        # The target's own (tied) output rows and final norm: a head that starts in the right output space.
        head.d2t.copy_(d2t.to(device))
        head.lm_head.weight.copy_(model.lm_head_weight[d2t.to(device)].float())
        head.norm.weight.copy_(model.norm.weight.float())
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.95))
    ckpt_path = args.work_dir / f"{args.name}.ckpt.pt"
    step, seconds, rng = 0, 0.0, random.Random(args.seed)
    if ckpt_path.exists() and not args.fresh:
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        head.load_state_dict(ckpt["head"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, seconds = ckpt["step"], ckpt["seconds"]
        rng.setstate(ckpt["rng"])
        logger.info("resumed %s at step %d", ckpt_path, step)

    def lr_at(i: int, elapsed: float) -> float:
        # Linear warm-up, cosine decay to 10% by --steps or by the end of --time-budget, whichever is
        # first: a time-boxed GPU run still anneals (its step count depends on the machine, not its seed).
        warm = max(min(args.steps // 20, 200), 1)
        if i < warm:
            return args.lr * (i + 1) / warm
        done = min(1.0, (i - warm) / max(args.steps - warm, 1))
        if args.time_budget:
            done = max(done, min(1.0, elapsed / args.time_budget))
        return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * done)))

    def save_checkpoint() -> None:
        torch.save({"head": head.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                    "seconds": seconds, "rng": rng.getstate()}, ckpt_path)

    bar = tqdm(total=args.steps, initial=step, desc="train", unit="step")
    started = saved = time.time()
    while step < args.steps and not (args.time_budget and time.time() - started > args.time_budget):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, time.time() - started)
        batch = make_batch(rng.sample(train, min(args.batch_size, len(train))), columns, model.embed_tokens,
                           t2d, device, args.prompt_context)
        loss, stats = ttt_loss(head, batch, args.ttt_steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        optimizer.step()
        step += 1
        bar.update(1)
        if step % 10 == 0:  # each postfix syncs the GPU
            bar.set_postfix(loss=f"{loss.item():.3f}", acc0=f"{stats[0][0] / max(stats[0][1], 1):.3f}",
                            refresh=False)
        if time.time() - saved > 60:  # by time, not steps: a GPU step is ~100x shorter than a CPU one
            save_checkpoint()
            saved = time.time()
    seconds += time.time() - started
    bar.close()
    save_checkpoint()

    # The whole prompt as context, as the engine drafts (training rows see only --prompt-context of it).
    val_eval = held_out(head, val, columns, model.embed_tokens, t2d, device, prompt_context=1 << 30,
                        steps=args.ttt_steps, batch_size=args.batch_size)
    hardware = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"{platform.processor() or platform.machine()} CPU, {args.threads} torch threads")
    recipe = {
        "target": model_config.name, "data": data["source"],
        "examples": {"train": len(train), "val": len(val)},
        "tokens": {"train": sum(len(e.token_ids) for e in train),
                   "train_reply": sum(len(e.token_ids) - e.num_prompt_tokens for e in train)},
        "distil_seconds": round(data["seconds"], 1), "distil_batch": args.distil_batch,
        "distil_budget": args.distil_budget,
        "reply_max_tokens": args.max_tokens, "time_budget": args.time_budget,
        "features": args.features, "feature_layers": list(head_layers), "draft_vocab": args.draft_vocab,
        "steps": step, "batch_size": args.batch_size, "prompt_context": args.prompt_context,
        "ttt_steps": args.ttt_steps, "lr": args.lr,
        "seed": args.seed, "train_seconds": round(seconds, 1), "hardware": hardware,
        "val_accuracy_per_step": val_eval.accuracy, "val": val_eval.as_dict(),
    }
    out = args.out or args.work_dir / f"{args.name}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    head.save(out, metadata={"recipe": json.dumps(recipe, sort_keys=True)})
    out.with_suffix(".recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    logger.info("wrote %s (%.1f MB): %s", out, out.stat().st_size / 1e6, json.dumps(recipe))


if __name__ == "__main__":
    main()
