"""How the engine speculates (EngineConfig.spec): which drafter, how many drafts, adaptive k."""
from __future__ import annotations

from dataclasses import dataclass

# off: plain decoding; ngram: prompt lookup (no model); head: the learned EAGLE-3-style draft head.
SPEC_METHODS = ("off", "ngram", "head")
# Drafted nodes a tree may have: the tree attention mask's 64 rows (kernels.attention.metadata.MAX_TREE_ROWS,
# not imported: this module stays torch-free for the CLI) less the root.
MAX_TREE_NODES = 63


@dataclass(frozen=True)
class SpecConfig:
    """`k`: most drafts per verify step. `adaptive`: each request drafts between 1 and k tokens, following
    an EWMA of how many of its drafts the target accepted (engine/spec/adaptive.py). `head_path`: the head's
    safetensors (method head); None = the head shipped for the embedded model.

    `tree_branching` (method head): draft trees instead of chains — the head's branching[d] most probable
    tokens after each node of depth d (engine/spec/tree.py), verified in one forward with a tree mask; its
    depth replaces k (adaptive: 1..depth levels). `tree_max_nodes`: keep only that many nodes, those of
    highest path probability. () = chains."""

    method: str = "off"
    k: int = 5
    head_path: str | None = None
    adaptive: bool = True
    tree_branching: tuple[int, ...] = ()
    tree_max_nodes: int | None = None

    def __post_init__(self) -> None:
        if self.method not in SPEC_METHODS:
            raise ValueError(f"spec method must be one of {SPEC_METHODS}, got {self.method!r}")
        if not 1 <= self.k <= 16:
            raise ValueError(f"spec k must be in 1..16, got {self.k}")
        if self.head_path is not None and self.method != "head":
            raise ValueError(f"a draft head path is for spec method 'head', not {self.method!r}")
        if self.tree_branching or self.tree_max_nodes is not None:
            check_tree_shape(self.method, self.tree_branching, self.tree_max_nodes)

    @property
    def enabled(self) -> bool:
        return self.method != "off"

    def describe(self) -> str:
        """One line for ModelInfo / logs, e.g. "head k=5 adaptive" or "off"."""
        if not self.enabled:
            return "off"
        if self.tree_branching:
            shape = "tree=" + ",".join(map(str, self.tree_branching))
            shape += f" max_nodes={self.tree_max_nodes}" if self.tree_max_nodes is not None else ""
        else:
            shape = f"k={self.k}"
        return f"{self.method} {shape}" + (" adaptive" if self.adaptive else "")

    @property
    def draft_depth(self) -> int:
        """Most drafted tokens a verify step can accept: k for chains, the tree's depth for trees."""
        return len(self.tree_branching) or self.k


def tree_nodes(branching: tuple[int, ...]) -> int:
    """Drafted nodes of a full tree of that branching (before any max_nodes)."""
    nodes, width = 0, 1
    for b in branching:
        width *= b
        nodes += width
    return nodes


def check_tree_shape(method: str, branching: tuple[int, ...], max_nodes: int | None) -> None:
    """A tree drafts with the head, 1..16 levels of branching >= 1, and its full tree (every node is
    proposed before max_nodes prunes it) fits the tree mask's rows with the root."""
    if method != "head":
        raise ValueError(f"tree drafts are for spec method 'head', not {method!r}")
    if not 1 <= len(branching) <= 16 or min(branching) < 1:
        raise ValueError(f"tree branching wants 1..16 levels, each >= 1, got {branching}")
    if tree_nodes(branching) > MAX_TREE_NODES:
        raise ValueError(f"tree branching {branching} has {tree_nodes(branching)} nodes; at most "
                         f"{MAX_TREE_NODES} fit the tree mask with the root")
    if max_nodes is not None and max_nodes < 1:
        raise ValueError(f"tree max nodes must be >= 1, got {max_nodes}")
