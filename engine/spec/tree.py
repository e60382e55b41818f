"""Tree drafts: a top-k draft tree, flattened to verify rows with ancestor masks, and its accepted path."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from contracts.sampling import SamplingParams
from engine.sampler import fresh_generator, processed_probs, seeded_generator
from kernels.attention.metadata import MAX_TREE_ROWS


@dataclass(frozen=True)
class DraftTree:
    """A verify chunk's rows: row 0 is the last committed token (the root), rows 1.. the drafted nodes in a
    topological order (every parent before its children)."""

    tokens: tuple[int, ...]  # per row: its input token (row 0: the root's)
    parents: tuple[int, ...]  # per row: its parent's row (-1 for the root)

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents) or not self.tokens or self.parents[0] != -1:
            raise ValueError("a draft tree needs one parent per row and the root (parent -1) at row 0")
        if any(not 0 <= p < i for i, p in enumerate(self.parents) if i):
            raise ValueError(f"parents must precede their children: {self.parents}")
        if len(self.tokens) > MAX_TREE_ROWS:
            raise ValueError(f"{len(self.tokens)} rows: the tree attention mask holds {MAX_TREE_ROWS}")

    @property
    def num_rows(self) -> int:
        return len(self.tokens)

    @property
    def depths(self) -> tuple[int, ...]:
        depths: list[int] = []
        for p in self.parents:
            depths.append(depths[p] + 1 if p >= 0 else 0)
        return tuple(depths)

    def positions(self, start: int) -> list[int]:
        """Each row's position in the sequence (RoPE): the root at `start`, a node one past its parent."""
        return [start + d for d in self.depths]

    def ancestor_masks(self) -> tuple[int, ...]:
        """Per row, bit j set when row j is the row itself or one of its ancestors (SeqSpan.tree)."""
        masks: list[int] = []
        for i, p in enumerate(self.parents):
            masks.append((masks[p] if p >= 0 else 0) | 1 << i)
        return tuple(masks)

    def children(self, row: int) -> list[int]:
        return [i for i, p in enumerate(self.parents) if p == row]

    @property
    def is_chain(self) -> bool:
        return self.parents == tuple(range(-1, self.num_rows - 1))

    def prefix(self, num_rows: int) -> DraftTree:
        """The first num_rows rows: a tree too (every parent precedes its children)."""
        return DraftTree(self.tokens[:num_rows], self.parents[:num_rows])

    def path(self, token_ids: Sequence[int]) -> tuple[int, ...]:
        """The rows (root first) of the path whose drafted tokens are `token_ids`: at each node its first
        child with the next token, as both walks take it (siblings of a top-k tree are distinct)."""
        rows = [0]
        for token in token_ids:
            rows.append(next(c for c in self.children(rows[-1]) if self.tokens[c] == token))
        return tuple(rows)

    @classmethod
    def chain(cls, root: int, drafts: Sequence[int]) -> DraftTree:
        """The chain root → drafts[0] → drafts[1] …, as a tree."""
        return cls((root, *drafts), tuple(range(-1, len(drafts))))


# propose(tree, rows): the drafter's distributions [len(rows), V] of the token after each of `rows` (rows
# of the tree grown so far, all of its deepest level; row 0 alone at first, the root).
ProposeDepth = Callable[["DraftTree", Sequence[int]], torch.Tensor]


def build_topk_tree(root: int, propose: ProposeDepth, branching: Sequence[int],
                    max_nodes: int | None = None) -> DraftTree:
    """Expand each node of depth d into the drafter's branching[d] most probable next tokens, one
    `propose` call per depth for all of its nodes (a drafter batches their forwards).

    With max_nodes, only the max_nodes nodes of highest path probability (product of the drafter's
    probabilities along the path) stay; a parent scores at least its children and comes first on ties, so
    the kept set is still a tree. A node already outside the best max_nodes is not expanded: none of its
    descendants could be kept.
    """
    tokens, parents, scores = [root], [-1], [1.0]
    frontier = [0]
    for width in branching:
        if not frontier:
            break
        probs, ids = propose(DraftTree(tuple(tokens), tuple(parents)), frontier).float().topk(width, dim=-1)
        grown = []
        for row, row_probs, row_ids in zip(frontier, probs.tolist(), ids.tolist(), strict=True):
            for prob, token in zip(row_probs, row_ids, strict=True):
                tokens.append(token)
                parents.append(row)
                scores.append(scores[row] * prob)
                grown.append(len(tokens) - 1)
        frontier = grown if max_nodes is None else sorted(set(grown) & set(_best(scores, max_nodes)))
    if max_nodes is not None and len(tokens) - 1 > max_nodes:
        keep = [0, *sorted(_best(scores, max_nodes))]
        row_of = {old: new for new, old in enumerate(keep)}
        tokens = [tokens[i] for i in keep]
        parents = [row_of[parents[i]] if parents[i] >= 0 else -1 for i in keep]
    return DraftTree(tuple(tokens), tuple(parents))


def _best(scores: Sequence[float], count: int) -> list[int]:
    """The `count` drafted rows (row 0, the root, excluded) of highest path probability, earlier on ties."""
    return sorted(range(1, len(scores)), key=lambda i: (-scores[i], i))[:count]


@dataclass(frozen=True)
class TreeAccept:
    """The walk's result: the rows of the accepted path (root first) and the tokens it emits."""

    rows: tuple[int, ...]  # root, then each accepted node's row
    token_ids: tuple[int, ...]  # the accepted nodes' tokens, then the target's own token after them

    @property
    def num_accepted(self) -> int:
        return len(self.rows) - 1


def accept_tree_path(tree: DraftTree, target_logits: torch.Tensor, params: SamplingParams,
                     first_position: int) -> TreeAccept:
    """Walk down from the root: target_logits [rows, V] row r scores the token after row r's path.

    Greedy: move to the child whose token is the target's argmax, else stop and emit the argmax. Sampled:
    `sample_tree_path` over the target's processed distributions (the same processing as plain sampling).
    """
    if not params.greedy:
        probs = processed_probs(target_logits, [params] * tree.num_rows)
        return sample_tree_path(tree, probs, params, first_position)
    return greedy_tree_path(tree, lambda row: target_logits[row])


def greedy_tree_path(tree: DraftTree, row_logits: Callable[[int], torch.Tensor]) -> TreeAccept:
    """The greedy walk, asking row_logits(r) [V] only for the rows it reaches (a lazy LM head computes
    the path's rows alone)."""
    rows, row = [0], 0
    while True:
        token = int(row_logits(row).argmax())
        nxt = next((c for c in tree.children(row) if tree.tokens[c] == token), None)
        if nxt is None:
            return TreeAccept(tuple(rows), tuple(tree.tokens[r] for r in rows[1:]) + (token,))
        rows.append(nxt)
        row = nxt


def sample_tree_path(tree: DraftTree, target_probs: torch.Tensor, params: SamplingParams,
                     first_position: int) -> TreeAccept:
    """The sampled walk over target_probs [rows, V] (processed): multi-candidate speculative sampling with
    deterministic drafts (SpecInfer's scheme). At a node its children are tried in row order, each accepted
    with probability w(x) / sum(w) of the current weights w (the target's distribution minus the children
    already rejected); with none accepted the token comes from w. The emitted tokens follow the target's
    distribution. Draws at depth d come from the (seed, first_position + d) generator: first the race
    noise, then one acceptance uniform per child tried, so a chain-shaped tree draws what
    `rejection_verify` draws for the same chain (and emits the same tokens).
    """
    fresh = fresh_generator(target_probs.device) if params.seed is None else None
    rows, emitted, row, depth = [0], [], 0, 0
    while True:
        children = tree.children(row)
        gen = fresh or seeded_generator(params.seed, first_position + depth, target_probs.device)
        token, nxt = _sample_node(target_probs[row], [tree.tokens[c] for c in children], children, gen)
        emitted.append(token)
        if nxt is None:
            return TreeAccept(tuple(rows), tuple(emitted))
        rows.append(nxt)
        row, depth = nxt, depth + 1


def _sample_node(p: torch.Tensor, child_tokens: list[int], children: list[int],
                 gen: torch.Generator) -> tuple[int, int | None]:
    """(emitted token, accepted child row or None) at one node of target distribution p [V]."""
    uniform = torch.empty_like(p).uniform_(generator=gen)  # the race noise first, as the plain sampler
    accept_u = torch.empty(len(children), dtype=torch.float32, device=p.device).uniform_(generator=gen)
    weights = p.clone()
    mass = 1.0  # what is left of p's mass (nominal: p sums to 1 up to rounding, as rejection_verify takes it)
    for i, (token, child) in enumerate(zip(child_tokens, children, strict=True)):
        if float(accept_u[i]) * mass < float(weights[token]):
            return token, child
        mass -= float(weights[token])  # rejected: the rest of the distribution, renormalised by `mass`
        weights[token] = 0.0
    if weights.sum() <= 0:  # every token of positive probability was a rejected child (rounding)
        weights = p.clone()
        weights[child_tokens] = 0.0
    noise = uniform.log_().neg_().clamp_min_(1e-20)
    return int((weights / noise).argmax()), None
