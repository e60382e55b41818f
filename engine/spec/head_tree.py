"""Tree drafts from a HeadDrafter: the head's top-k after each node, one head forward per depth."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.spec.head_drafter import HeadDrafter
from engine.spec.tree import DraftTree, build_topk_tree


class _DepthForwards:
    """build_topk_tree's `propose` over one HeadDrafter: a node's head input is [its token ‖ the output
    that predicted it] at position num_committed + depth - 1, as in a chain (HeadDrafter.propose); the
    nodes of one depth run together, each attending to the accepted positions' KV, its ancestors' and its
    own (a tree mask over the head's KV). The drafter's own KV is never changed."""

    def __init__(self, drafter: HeadDrafter) -> None:
        self.drafter = drafter
        self.outputs: dict[int, torch.Tensor] = {0: drafter.last[0, -1]}  # row → head output [H]
        self.k: list[torch.Tensor] = []  # per depth run: the head's k, v [1, Hk, nodes, D]
        self.v: list[torch.Tensor] = []
        self.kv_rows: list[int] = []  # the tree rows of those k, v entries, in order

    def __call__(self, tree: DraftTree, rows: Sequence[int]) -> torch.Tensor:
        drafter, head = self.drafter, self.drafter.head
        if list(rows) != [0]:
            self._forward(tree, rows)
        logits = head.logits(torch.stack([self.outputs[r] for r in rows]))
        d2t = head.d2t
        if drafter.limit is not None:
            logits, d2t = logits[:, :drafter.limit], d2t[:drafter.limit]
        probs = torch.softmax(logits, dim=-1)  # the head's own ranking (T = 1) scores the paths
        return probs.new_zeros(len(rows), head.config.target_vocab_size).index_copy_(1, d2t, probs)

    def _forward(self, tree: DraftTree, rows: Sequence[int]) -> None:
        drafter, head = self.drafter, self.drafter.head
        g = torch.stack([self.outputs[tree.parents[r]] for r in rows]).unsqueeze(0)  # [1, F, H]
        device = g.device
        emb = drafter.embed(torch.tensor([[tree.tokens[r] for r in rows]], device=device)).to(g.dtype)
        position = drafter.num_committed + tree.depths[rows[0]] - 1  # one depth: one position
        q, k, v = head.qkv(emb, g, torch.full((len(rows),), position, device=device))
        keys = torch.cat([drafter.k, *self.k, k], dim=2)
        values = torch.cat([drafter.v, *self.v, v], dim=2)
        ancestors = tree.ancestor_masks()
        seen = [[bool(ancestors[r] >> j & 1) for j in (*self.kv_rows, *rows)] for r in rows]
        mask = torch.cat([torch.ones(len(rows), drafter.k.shape[2], dtype=torch.bool, device=device),
                          torch.tensor(seen, dtype=torch.bool, device=device)], dim=1)
        out = head.finish(g, q, keys, values, mask)[0]
        self.outputs.update(zip(rows, out, strict=True))
        self.k.append(k)
        self.v.append(v)
        self.kv_rows.extend(rows)


@torch.no_grad()
def head_tree_drafts(drafter: HeadDrafter, root: int, branching: Sequence[int],
                     max_nodes: int | None = None) -> DraftTree | None:
    """The top-k tree after the drafter's accepted positions (`root`: the last accepted token), or None
    before it has any. Its drafts are deterministic (the head's top-k, whatever the request's sampling):
    the verify walk then keeps the target's distribution (engine/spec/tree.py, sample_tree_path)."""
    if drafter.last is None or not branching:
        return None
    return build_topk_tree(root, _DepthForwards(drafter), branching, max_nodes)
