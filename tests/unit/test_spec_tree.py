"""Tree drafts: top-k construction, flattening (positions, ancestor masks), and the accepted-path walk, greedy
and sampled (chi-square against the target, and equal to chain rejection sampling on a chain)."""
from __future__ import annotations

import pytest
import torch

from contracts.sampling import SamplingParams
from engine.sampler import processed_probs, sample
from engine.spec.rejection import rejection_verify
from engine.spec.tree import DraftTree, accept_tree_path, build_topk_tree, sample_tree_path
from tests.unit.test_spec_rejection import DRAFTER, TARGET, VOCAB, chi2_critical, chi_square

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def one_thread():
    """Thousands of walks over 6-token rows: torch's intra-op threads only add overhead to ops this small."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def markov_propose(tree: DraftTree, rows) -> torch.Tensor:
    """The toy drafter of test_spec_rejection: next-token probabilities after each row's token."""
    return torch.softmax(DRAFTER[[tree.tokens[r] for r in rows]], -1)


def test_a_chain_flattens_to_consecutive_positions_and_causal_masks() -> None:
    tree = DraftTree.chain(7, [3, 4, 5])
    assert tree.depths == (0, 1, 2, 3)
    assert tree.positions(10) == [10, 11, 12, 13]
    assert tree.ancestor_masks() == (0b1, 0b11, 0b111, 0b1111)


def test_topk_tree_branches_per_depth_with_depth_positions_and_ancestor_masks() -> None:
    tree = build_topk_tree(0, markov_propose, branching=(2, 2))
    first = torch.softmax(DRAFTER[0], -1).topk(2).indices.tolist()
    assert tree.parents == (-1, 0, 0, 1, 1, 2, 2)
    assert list(tree.tokens[1:3]) == first
    assert list(tree.tokens[3:5]) == torch.softmax(DRAFTER[first[0]], -1).topk(2).indices.tolist()
    assert tree.positions(20) == [20, 21, 21, 22, 22, 22, 22]
    masks = tree.ancestor_masks()
    assert masks[5] == 1 << 0 | 1 << 2 | 1 << 5  # root, its second child, itself


def test_pruning_keeps_the_most_probable_paths_as_a_tree() -> None:
    full = build_topk_tree(1, markov_propose, branching=(3, 3))
    pruned = build_topk_tree(1, markov_propose, branching=(3, 3), max_nodes=5)
    assert pruned.num_rows == 6
    assert all(0 <= p < i for i, p in enumerate(pruned.parents) if i)  # DraftTree checks it, too
    paths = {tuple(full.tokens[r] for r in _path(full, i)) for i in range(1, full.num_rows)}
    assert {tuple(pruned.tokens[r] for r in _path(pruned, i)) for i in range(1, 6)} <= paths


def test_pruning_while_growing_keeps_the_best_nodes_of_the_full_tree() -> None:
    """Nodes outside the best max_nodes are not expanded, yet the kept set is the full tree's best."""
    full = build_topk_tree(2, markov_propose, branching=(3, 3, 2))
    scores = [1.0]
    for row in range(1, full.num_rows):
        parent = full.parents[row]
        prob = torch.softmax(DRAFTER[full.tokens[parent]], -1)[full.tokens[row]]
        scores.append(scores[parent] * float(prob))
    best = sorted(range(1, full.num_rows), key=lambda i: -scores[i])[:6]
    pruned = build_topk_tree(2, markov_propose, branching=(3, 3, 2), max_nodes=6)
    paths = {tuple(full.tokens[r] for r in _path(full, i)) for i in best}
    assert {tuple(pruned.tokens[r] for r in _path(pruned, i)) for i in range(1, 7)} == paths


def test_a_path_is_found_from_its_tokens_and_prefixes_are_trees() -> None:
    tree = DraftTree((9, 1, 2, 3, 4), (-1, 0, 0, 2, 2))
    assert tree.path([2, 4]) == (0, 2, 4) and tree.path([]) == (0,)
    assert tree.prefix(3) == DraftTree((9, 1, 2), (-1, 0, 0)) and not tree.is_chain
    assert tree.prefix(2).is_chain and DraftTree.chain(9, [1, 2]).is_chain


def _path(tree: DraftTree, row: int) -> list[int]:
    rows = []
    while row > 0:
        rows.append(row)
        row = tree.parents[row]
    return rows[::-1]


def test_greedy_walk_follows_the_argmax_through_the_tree() -> None:
    tree = DraftTree((9, 1, 2, 3, 4), (-1, 0, 0, 2, 2))  # root → {1, 2}; 2 → {3, 4}
    logits = torch.zeros(5, 10)
    logits[0, 2] = logits[2, 4] = logits[4, 6] = 1.0  # argmax after root: 2, after node 2: 4, after 4: 6
    out = accept_tree_path(tree, logits, SamplingParams(), 0)
    assert out.rows == (0, 2, 4) and out.token_ids == (2, 4, 6)
    logits[0] = 0
    logits[0, 5] = 1.0  # no child is the argmax: only the target's token
    assert accept_tree_path(tree, logits, SamplingParams(), 0).token_ids == (5,)


def test_a_chain_shaped_tree_walks_like_chain_rejection_sampling(one_thread: None) -> None:
    gen = torch.Generator().manual_seed(2)
    for seed in range(100):
        logits = torch.randn(4, 12, generator=gen) * 2
        drafts = logits[:3].argmax(-1)
        drafts[seed % 3] = seed % 12  # some chains break early
        params = SamplingParams(temperature=1.0, top_k=8, seed=seed)
        chain = rejection_verify(logits.unsqueeze(0), [params], [30], drafts.unsqueeze(0), None,
                                 torch.tensor([3]))
        walk = accept_tree_path(DraftTree.chain(0, drafts.tolist()), logits, params, 30)
        a = int(chain.num_accepted[0])
        assert walk.num_accepted == a
        assert list(walk.token_ids) == chain.token_ids[0, :a + 1].tolist()


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0, seed=21),
                                    SamplingParams(temperature=0.8, top_k=4, top_p=0.9, seed=22)],
                         ids=["t1", "top-k-top-p"])
def test_tree_walk_emits_the_target_distribution(params: SamplingParams, one_thread: None) -> None:
    n = 10000
    tree = build_topk_tree(0, markov_propose, branching=(3, 2))
    logits = TARGET[torch.tensor(tree.tokens)]  # row r scores the token after row r's token
    probs = processed_probs(logits, [params] * tree.num_rows)  # what accept_tree_path walks, computed once
    firsts, seconds, accepted = [], [], 0
    for i in range(n):
        out = sample_tree_path(tree, probs, params, 4 * i)
        firsts.append(out.token_ids[0])
        seconds.append(out.token_ids[1] if out.num_accepted else -1)
        accepted += out.num_accepted
    first = torch.tensor(firsts)
    nxt = sample(TARGET[first], [params] * n, [4 * i + 1 for i in range(n)])
    second = torch.where(torch.tensor(seconds) >= 0, torch.tensor(seconds), nxt)
    table = processed_probs(TARGET, [params] * VOCAB)
    stat, df = chi_square(torch.bincount(first, minlength=VOCAB).float(), table[0])
    assert stat < chi2_critical(df)
    pairs = torch.bincount(first * VOCAB + second, minlength=VOCAB * VOCAB).float()
    stat, df = chi_square(pairs, (table[0].unsqueeze(1) * table).flatten())
    assert stat < chi2_critical(df)
    assert 0 < accepted / n < 2
