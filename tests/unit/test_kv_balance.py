"""int4 key balance: factors shared by each RoPE pair, folded into the qkv rows of every weight format so that
the model computes the same function, and calibrated on every int4 engine before its key offsets."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.model_files import load_model
from engine.quantize import use_int4, use_int4_kernels, use_w8, use_w8a8
from engine.quantize.kv_balance import (
    KEY_BALANCE_STEPS,
    apply_key_balance,
    balance_keys,
    key_balance,
    key_statistics,
    scale_output_rows,
)
from engine.quantize.kv_offsets import calibration_ids
from engine.random_models import PRESETS, build_random_model
from engine.sequence_forward import forward_sequence, prefill_cache

pytestmark = pytest.mark.timeout(120)

IDS = calibration_ids("random:tiny", PRESETS["tiny"].vocab_size)[:600]  # a whole window, then a partial one


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return build_random_model(PRESETS["tiny"], torch.float32, "cpu")


@torch.inference_mode()
def logits_of(model: nn.Module, tokens: list[int]) -> torch.Tensor:
    return model.compute_logits(forward_sequence(model, tokens))


def test_factors_are_shared_by_rope_pairs_on_a_fixed_grid_with_geometric_mean_one() -> None:
    model = tiny_model()
    c = key_balance(key_statistics(model, IDS))
    cfg = model.config
    assert c.shape == (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim) and c.dtype == torch.float32
    half = cfg.head_dim // 2
    assert torch.equal(c[..., :half], c[..., half:])
    steps = c.log2() * KEY_BALANCE_STEPS
    assert torch.allclose(steps, steps.round(), atol=1e-3)
    assert c.log2().mean(-1).abs().max() < 1.0 / KEY_BALANCE_STEPS
    assert not torch.allclose(c, torch.ones_like(c))  # a random model's heads are not balanced already
    # deterministic: every worker folds the same factors
    assert torch.equal(c, key_balance(key_statistics(model, IDS)))


def test_balance_keeps_the_float_model_and_moves_key_energy_as_the_factors_say() -> None:
    model = tiny_model()
    tokens = list(range(1, 50))
    before = logits_of(model, tokens)
    _, kv_before = prefill_cache(model, tokens, "float32")
    c, _ = balance_keys(model, IDS)
    torch.testing.assert_close(logits_of(model, tokens), before, atol=1e-4, rtol=1e-4)
    _, kv_after = prefill_cache(model, tokens, "float32")
    for layer in range(model.config.num_layers):  # post-rotary keys divided by the pair's factor
        keys_before = kv_before.k[layer].flatten(0, 1)[:len(tokens)]
        keys_after = kv_after.k[layer].flatten(0, 1)[:len(tokens)]
        torch.testing.assert_close(keys_after, keys_before / c[layer], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(kv_after.v[layer], kv_before.v[layer])


@pytest.mark.parametrize("transform", [
    use_int4, use_w8a8, lambda model, source: use_w8(model, on_cpu=True), use_int4_kernels,
    lambda model, source: use_w8(model), lambda model, source: use_w8a8(model, source, kernel_modules=True),
], ids=["q4_1", "w8a8", "w8-q8_0", "w4a16-kernel", "w8-kernel", "w8a8-kernel"])
def test_every_weight_format_scales_its_qkv_rows(transform) -> None:
    torch.set_num_threads(1)
    model = tiny_model()
    transform(model, None)
    proj = model.layers[0].self_attn.qkv_proj
    x = torch.randn(5, model.config.hidden_size)
    before = proj(x)
    factors = torch.exp2(torch.randint(-3, 4, (proj.out_features,)).float() / 4)
    scale_output_rows(proj, factors)
    # float16 scales round the products (w8a8 also re-quantizes nothing: its weight scale is per row)
    torch.testing.assert_close(proj(x), before * factors, atol=2e-3, rtol=2e-3)


def test_a_projection_of_unknown_format_is_refused_naming_its_type() -> None:
    with pytest.raises(TypeError, match="Identity"):
        scale_output_rows(nn.Identity(), torch.ones(3))


def test_apply_key_balance_scales_query_and_key_rows_and_leaves_values() -> None:
    model = tiny_model()
    cfg = model.config
    weight = model.layers[1].self_attn.qkv_proj.weight.detach().clone()
    c = torch.exp2(torch.randint(-4, 5, (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim // 2)).float() / 8)
    c = torch.cat([c, c], -1)
    apply_key_balance(model, c)
    after = model.layers[1].self_attn.qkv_proj.weight.detach()
    q_rows, kv_rows = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    group = cfg.num_heads // cfg.num_kv_heads
    q_factor = c[1].repeat_interleave(group, 0).flatten().unsqueeze(1)
    torch.testing.assert_close(after[:q_rows], weight[:q_rows] * q_factor)
    torch.testing.assert_close(after[q_rows:q_rows + kv_rows], weight[q_rows:q_rows + kv_rows]
                               / c[1].flatten().unsqueeze(1))
    assert torch.equal(after[q_rows + kv_rows:], weight[q_rows + kv_rows:])


def test_an_int4_engine_subtracts_the_offsets_of_the_balanced_keys() -> None:
    engine = LLMEngine(EngineConfig(model_path="random:tiny", kv_cache_dtype="int4", num_kv_blocks=16,
                                    num_threads=1))
    _, model = load_model("random:tiny", "float32", "cpu")  # the engine's weights (seeded by the preset)
    ids = calibration_ids("random:tiny", model.config.vocab_size)
    plain = key_statistics(model, ids)
    _, offsets = balance_keys(model, ids)
    assert torch.equal(engine.kv_cache.key_offsets, offsets)
    assert torch.equal(offsets, offsets.half().float())  # float16 values: every worker rounds the same way
    # One pass served both: a second over the balanced model measures the same mean, up to the float16
    # rounding of the offsets and the balanced weights' own rounding.
    balanced_mean = (key_statistics(model, ids).k_sums / len(ids)).float()
    tolerance = 1e-3 * balanced_mean.abs().max().item()
    torch.testing.assert_close(offsets, balanced_mean, atol=tolerance, rtol=1e-3)
    assert ((plain.k_sums / len(ids)).float() - balanced_mean).abs().max() > 10 * tolerance
