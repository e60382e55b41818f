"""Feature capture equals the model's own hidden states; offline chain replay keeps greedy outputs."""
from __future__ import annotations

import pytest
import torch

from engine.kv_cache import KVCache
from engine.model_files import load_model
from engine.spec.chain_replay import chain_replay
from engine.spec.ngram import NgramDrafter
from engine.spec.target_forward import TargetForward, default_feature_layers
from kernels.attention.metadata import AttentionMetadata, SeqSpan

pytestmark = pytest.mark.timeout(60)

PROMPTS = [[5, 6, 7, 8, 5, 6, 7], [1, 2, 3, 4, 1, 2, 3, 4, 1, 2], [9] * 5]


@pytest.fixture(scope="module")
def tiny():
    return load_model("random:tiny")


def test_default_layers_are_low_middle_high() -> None:
    assert default_feature_layers(30) == (2, 15, 27)
    assert default_feature_layers(2) == (1, 1, 0)


def test_captured_features_are_the_layers_residual_streams(tiny) -> None:
    config, model = tiny
    ids = list(range(3, 23))
    runner = TargetForward(model, 1, 32, block_size=4, feature_layers=(0, 1))
    hidden, features = runner.forward([(0, 0, ids)])
    runner.close()
    assert features.shape == (20, 2 * config.hidden_size)
    # Layer by layer with the model's own parts, in a cache of its own.
    kv = KVCache(runner.kv.spec, config.num_layers, runner.kv.num_blocks)
    meta = AttentionMetadata.from_spans([SeqSpan(0, 20, 20, tuple(range(5)), 0)], list(range(20)), 4)
    with torch.no_grad():
        h, cos, sin = model.embed(torch.tensor(ids), torch.arange(20))
        h0, r0 = model.forward_layers(h, None, cos, sin, meta, kv, range(0, 1))
        h1, r1 = model.forward_layers(h0, r0, cos, sin, meta, kv, range(1, 2))
        torch.testing.assert_close(features[:, :config.hidden_size], h0 + r0)
        torch.testing.assert_close(features[:, config.hidden_size:], h1 + r1)
        # The last layer's stream, final-normed, is what the model's forward returns.
        torch.testing.assert_close(model.final_norm(h1, r1), hidden)


def test_capture_hooks_are_removed_on_close(tiny) -> None:
    _, model = tiny
    runner = TargetForward(model, 1, 16)
    runner.close()
    assert all(not layer._forward_hooks for layer in model.layers)


def test_replay_features_cover_every_position_but_the_last(tiny) -> None:
    _, model = tiny
    result = chain_replay(model, PROMPTS, 6, batch=2, keep_features=True)
    for prompt, out, feats in zip(PROMPTS, result.outputs, result.features, strict=True):
        assert feats.shape[0] == len(prompt) + len(out) - 1
    assert result.steps == [5, 5, 5] and result.tau == 1.0


def test_ngram_speculation_keeps_greedy_outputs(tiny) -> None:
    _, model = tiny
    plain = chain_replay(model, PROMPTS, 20, batch=2)
    spec = chain_replay(model, PROMPTS, 20, batch=2, make_drafter=NgramDrafter, k=4)
    assert spec.outputs == plain.outputs
    assert sum(spec.accepted) > 0 and sum(spec.steps) < sum(plain.steps)
    assert all(len(o) == 20 for o in spec.outputs)
