"""ms per step of the draft head alone (accept + k greedy drafts): batched over slots vs per-sequence eager.

`python -m bench.engine.head_step --device cuda` loads the shipped head (bf16 on CUDA, fp32 on CPU) with a
random embedding of the target's shape, starts B sequences from a 100-token prompt, then times steps that
accept 3 positions per sequence (random features) and draft k: once through HeadDraftGraphs (slots, two
graph replays a step on CUDA) and once through one HeadDrafter per sequence (the eager path it replaces).
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

from engine.spec.draft_head import DEFAULT_HEAD_PATH, DraftHead
from engine.spec.head_drafter import HeadDrafter
from engine.spec.head_graphs import HeadDraftGraphs

PROMPT, ACCEPTED = 100, 3


def ms_per_call(fn: Callable[[], None], calls: int, device: torch.device) -> float:
    for _ in range(3):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    began = time.perf_counter()
    for _ in range(calls):
        fn()  # each ends in the drafts' read-back: no extra sync needed
    return (time.perf_counter() - began) / calls * 1e3


@torch.no_grad()
def measure(head: DraftHead, embed: nn.Embedding, batch: int, k: int, max_len: int,
            steps: int) -> tuple[float, float]:
    """(batched, per-sequence) ms per step at this batch."""
    device, dtype = head.fc.weight.device, head.fc.weight.dtype
    width = len(head.config.feature_layers) * head.config.hidden_size
    graphs = HeadDraftGraphs(head, embed, batch, max_len, k)
    graphs.capture_all()
    slotted, own = [], []
    for _ in range(batch):
        features = torch.randn(PROMPT - 1, width, device=device, dtype=dtype)
        for drafters, drafter in ((slotted, graphs.new_drafter(0, None)), (own, HeadDrafter(head, embed))):
            drafter.accept(list(range(PROMPT)), features)
            drafters.append((drafter, list(range(PROMPT))))

    def batched() -> None:
        features = torch.randn(batch * ACCEPTED, width, device=device, dtype=dtype)
        items = []
        for i, (drafter, ids) in enumerate(slotted):
            ids += [7] * ACCEPTED
            items.append((drafter, ids, list(range(i * ACCEPTED, (i + 1) * ACCEPTED))))
        graphs.accept(items, features)
        graphs.propose([drafter for drafter, _ in slotted])

    def per_sequence() -> None:
        features = torch.randn(ACCEPTED, width, device=device, dtype=dtype)
        for drafter, ids in own:
            ids += [7] * ACCEPTED
            drafter.accept(ids, features)
            drafter.propose(k)

    return ms_per_call(batched, steps, device), ms_per_call(per_sequence, steps, device)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--max-len", type=int, default=8192, help="the engine's max_model_len (slot capacity)")
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    head = DraftHead.load(DEFAULT_HEAD_PATH, device, dtype)
    embed = nn.Embedding(head.config.target_vocab_size, head.config.hidden_size).to(device, dtype)
    print(f"| batch | batched slots ms/step | per-sequence eager ms/step |  (k={args.k}, {ACCEPTED} rows "
          f"accepted per sequence, {PROMPT}-token prompts, {device}, head {head.fc.weight.dtype})")
    for batch in map(int, args.batches.split(",")):
        fast, slow = measure(head, embed, batch, args.k, args.max_len, args.steps)
        print(f"| {batch} | {fast:.3f} | {slow:.3f} |", flush=True)


if __name__ == "__main__":
    main()
