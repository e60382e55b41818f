"""CPU bs1 verify steps run flat: FlatRows equals the plain forward (KV and captured layers too), the lazy
LM head samples what sampling every row would, and the executor keeps verify and capturing steps flat."""
from __future__ import annotations

import pytest
import torch

from contracts.sampling import SamplingParams
from engine.config import EngineConfig
from engine.cpu_decode import FlatDecoder
from engine.executors.cpu_flat import CpuFlatExecutor
from engine.executors.cpu_verify import FlatRows, sample_chain
from engine.executors.factory import build_executor
from engine.kv_cache import KVCache
from engine.sampler import sample
from engine.scheduler import ScheduledChunk, SchedulerOutput
from engine.sequence import Sequence
from engine.spec.target_forward import LayerCapture
from engine.spec.tree import DraftTree
from engine.spec.tree_verify import TreeChunk, tree_verify_metadata
from tests.quantized_rows import assert_same_kv, cache_like
from tests.unit.test_cpu_decode_path import forward_step, tiny_blocked_model

pytestmark = pytest.mark.timeout(60)

PROMPT = [3, 17, 5, 40, 22, 9, 11, 30, 2]


def kv_for(model, dtype: str = "float32") -> KVCache:
    return cache_like(model.config, 8, dtype)


@pytest.mark.parametrize(("rows", "kv_dtype"), [(1, "float32"), (3, "float32"), (6, "float32"), (3, "int4"),
                                                (6, "int8")])
def test_flat_rows_equal_the_plain_forward_kv_and_layer_outputs(rows: int, kv_dtype: str) -> None:
    model = tiny_blocked_model()
    plain_kv, flat_kv = kv_for(model, kv_dtype), kv_for(model, kv_dtype)
    tolerance = 1e-5 if kv_dtype == "float32" else 1e-4
    capture = LayerCapture(model, (0, 1))
    verify = [7, 8, 21, 4, 33, 12][:rows]
    with torch.inference_mode():
        for kv in (plain_kv, flat_kv):  # the same context in both caches, from block 2 on
            forward_step(model, kv, PROMPT, 0, blocks=[2, 3, 4, 5, 6, 7])
        capture.take()
        expected = forward_step(model, plain_kv, verify, len(PROMPT), blocks=[2, 3, 4, 5, 6, 7])
        expected_layers = capture.take()
        got = FlatRows(FlatDecoder(model, flat_kv))(verify, len(PROMPT), 2 * 4, keep=capture.keep)
        got_layers = capture.take()
    capture.close()
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(got_layers, expected_layers, atol=tolerance, rtol=tolerance)
    assert_same_kv(flat_kv, plain_kv, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_chain_sampling_keeps_every_row_up_to_the_first_rejection(temperature: float) -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 50, generator=gen)
    params = SamplingParams(temperature=temperature, seed=7)
    seq = Sequence("r", list(range(10)), params)
    positions = list(range(10, 15))  # the chunk starts at position 9: row j's token takes index 10 + j
    full = sample(logits, [params] * 5, positions).tolist()
    one_by_one = [int(sample(logits[j:j + 1], [params], [positions[j]])[0]) for j in range(5)]
    assert full == one_by_one  # each row sampled as a one-row decode step would
    for accepted in range(5):  # drafts equal to the full sampling up to `accepted`, then one that differs
        drafts = tuple(full[:accepted]) + tuple((t + 1) % 50 for t in full[accepted:4])
        got = sample_chain(logits, ScheduledChunk(seq, 9, 5, 5, drafts))
        assert got[:accepted + 1] == full[:accepted + 1]
        assert got[accepted + 1:] == [-1] * (4 - accepted)


def test_executor_runs_verify_and_capturing_steps_flat_with_the_eager_tokens() -> None:
    model = tiny_blocked_model()
    c = model.config
    flat_kv, eager_kv = kv_for(model), kv_for(model)
    executor = build_executor(model, flat_kv, EngineConfig(), max_model_len=64)
    reference = build_executor(model, eager_kv, EngineConfig(), max_model_len=64).eager
    assert isinstance(executor, CpuFlatExecutor)
    capture = LayerCapture(model, (1,))
    executor.feed(capture.keep)
    with torch.inference_mode():
        for kv in (flat_kv, eager_kv):
            forward_step(model, kv, PROMPT[:-1], 0, blocks=[2, 3, 4, 5, 6, 7])
        capture.take()
        seq = Sequence("r", list(PROMPT), SamplingParams(), block_table=[2, 3, 4])
        seq.num_computed_tokens = len(PROMPT) - 1
        hidden = forward_step(model, kv_for(model), PROMPT, 0, [2, 3, 4, 5, 6, 7])
        greedy = model.compute_logits(hidden[-1:]).argmax(-1)
        drafts = (int(greedy), 5, 6)  # the first draft is the target's token: accepted
        batch = SchedulerOutput((ScheduledChunk(seq, len(PROMPT) - 1, 4, 4, drafts),), ())
        calls = []
        executor.eager.launch = lambda *a: calls.append(a)  # must not be reached
        got = executor.execute(batch).sampled["r"]
        want = reference.execute(batch).sampled["r"]
        assert not calls and capture.take().shape == (4, c.hidden_size)
    capture.close()
    assert got[:2] == want[:2] and got[0] == drafts[0]
    assert got[2:] == tuple(w if g != -1 else -1 for g, w in zip(got[2:], want[2:], strict=True))



@pytest.mark.parametrize("scheme", ["w4a16", "w8a8"])
def test_flat_rows_call_quantized_projections_as_the_plain_forward_does(scheme: str) -> None:
    """FlatRows over Q41Linear / W8A8Linear projections (down's silu_mul applied by the module itself)."""
    model = tiny_blocked_model(weights=scheme)
    plain_kv, flat_kv = kv_for(model), kv_for(model)
    blocks = [2, 3, 4, 5, 6, 7]
    with torch.inference_mode():
        for kv in (plain_kv, flat_kv):
            forward_step(model, kv, PROMPT, 0, blocks=blocks)
        expected = forward_step(model, plain_kv, [7, 8, 21, 4], len(PROMPT), blocks=blocks)
        got = FlatRows(FlatDecoder(model, flat_kv))([7, 8, 21, 4], len(PROMPT), 2 * 4)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_flat_rows_over_a_tree_equal_the_plain_tree_forward_and_walk_like_eager() -> None:
    """A tree verify stays flat at bs1: depth positions, the ancestor mask, the walk and the path's KV move
    give the eager executor's tokens and cache."""
    model = tiny_blocked_model()
    flat_kv, eager_kv = kv_for(model), kv_for(model)
    executor = build_executor(model, flat_kv, EngineConfig(), max_model_len=64)
    reference = build_executor(model, eager_kv, EngineConfig(), max_model_len=64).eager
    assert isinstance(executor, CpuFlatExecutor)
    start = len(PROMPT) - 1
    with torch.inference_mode():
        for kv in (flat_kv, eager_kv):
            forward_step(model, kv, PROMPT[:-1], 0, blocks=[2, 3, 4, 5, 6, 7])
        hidden = forward_step(model, kv_for(model), PROMPT, 0, [2, 3, 4, 5, 6, 7])
        greedy = int(model.compute_logits(hidden[-1:]).argmax(-1))
        # root → {5, greedy}; greedy → {6, 7}; 5 → {8}: the walk leaves the first branch at once.
        tree = DraftTree((PROMPT[-1], 5, greedy, 6, 7, 8), (-1, 0, 0, 2, 2, 1))
        inputs = tree_verify_metadata([TreeChunk((2, 3, 4, 5), start, tree)], 4, torch.device("cpu"))
        expected = model(*inputs, kv_for_copy(model, flat_kv))
        got_hidden = executor.rows(list(tree.tokens), start, 2 * 4, tree=tree)
        torch.testing.assert_close(got_hidden, expected, atol=1e-5, rtol=1e-5)
        for kv in (flat_kv, eager_kv):  # the same cache again: the executors store the rows themselves
            forward_step(model, kv, PROMPT[:-1], 0, blocks=[2, 3, 4, 5, 6, 7])
        results, calls = [], []
        executor.eager.launch = lambda *a: calls.append(a)  # must not be reached: the tree runs flat
        for run in (executor, reference):
            seq = Sequence("r", list(PROMPT), SamplingParams(), block_table=[2, 3, 4, 5])
            seq.num_computed_tokens = start
            batch = SchedulerOutput((ScheduledChunk(seq, start, 6, 6, tree.tokens[1:], tree=tree),), ())
            results.append(run.execute(batch).sampled["r"])
    got, want = results
    accepted = sum(t >= 0 for t in got) - 1
    assert not calls and got == want and got[0] == greedy and accepted >= 1
    for layer in range(model.config.num_layers):  # the path's KV at consecutive slots, as eager left it
        path_slots = slice(2 * 4 + start, 2 * 4 + start + accepted + 1)
        torch.testing.assert_close(flat_kv.k[layer].view(-1, *flat_kv.k[layer].shape[2:])[path_slots],
                                   eager_kv.k[layer].view(-1, *eager_kv.k[layer].shape[2:])[path_slots],
                                   atol=1e-5, rtol=1e-5)


def kv_for_copy(model, kv: KVCache) -> KVCache:
    """A fresh cache holding `kv`'s contents."""
    copy = kv_for(model)
    for mine, theirs in zip(copy.k + copy.v, kv.k + kv.v, strict=True):
        mine.copy_(theirs)
    return copy
