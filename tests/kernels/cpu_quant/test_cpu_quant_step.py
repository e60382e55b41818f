"""cpu_quant.c's one-call bs1 decode step (kernels/cpu_quant/step.py) against FlatDecoder's torch ops path."""
from __future__ import annotations

import pytest
import torch

from contracts.kv_cache_spec import KVCacheSpec
from engine.config import ModelConfig
from engine.cpu_decode import FlatDecoder
from engine.kv_cache import KVCache
from engine.model import LlamaModel
from engine.quantize import use_int4, use_w8
from kernels.cpu_quant.library import BASE_FLAGS, library
from kernels.cpu_quant.step import DecodeStep
from tests.tiny_model import normal_model

pytestmark = pytest.mark.timeout(120)

PROMPT, DECODED = [3, 17, 5, 40, 22, 9], [11, 30, 7, 1]  # 6 + 4 positions: crosses a block of 4


def tiny_model(weights: str) -> LlamaModel:
    """Q4_1 ("w4a16") or Q8_0 ("w8") projections; hidden 64 and intermediate 96: K % 64 == 32 somewhere."""
    config = ModelConfig(name="t", vocab_size=48, hidden_size=64, intermediate_size=96, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512,
                         tie_word_embeddings=True)
    model = normal_model(config)
    if weights == "w4a16":
        use_int4(model, None)
    else:
        use_w8(model, on_cpu=True)
    return model


def decode(model: LlamaModel, blocks: list[int], fused: bool, lib=None,
           kv: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
    """Hidden states [4, H] of DECODED after PROMPT (prompt through the torch path), and the cache (`kv`,
    default an fp32 one of 8 blocks of 4)."""
    c = model.config
    kv = kv or KVCache(KVCacheSpec(4, c.num_kv_heads, c.head_dim), c.num_layers, 8)
    decoder = FlatDecoder(model, kv)
    step = decoder.step
    assert step is not None  # every projection is Q4_1 / Q8_0, the cache one the step stores into
    if lib is not None:
        step = DecodeStep(step.layers, c.num_heads, c.num_kv_heads, c.head_dim, c.rms_norm_eps,
                          c.head_dim ** -0.5, lib)
    decoder.step = None
    with torch.inference_mode():
        for position, token in enumerate(PROMPT):
            decoder(token, position, blocks)
        decoder.step = step if fused else None
        out = [decoder(token, position, blocks) for position, token in enumerate(DECODED, len(PROMPT))]
    return torch.cat(out), kv


@pytest.mark.parametrize("weights", ["w4a16", "w8"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("blocks", [[2, 3, 4], [5, 0, 3]])
def test_fused_step_equals_the_torch_ops_path(weights: str, threads: int, blocks: list[int]) -> None:
    """Tolerance, not equality: RMSNorm's sum of squares, RoPE's products and the softmax round in another
    order than torch's (the projections are the same kernels on bit-identical inputs only up to that).
    Scattered blocks (a prefix cache hit, a wrapped free list) are read in place as consecutive ones."""
    torch.set_num_threads(threads)
    model = tiny_model(weights)
    fused, fused_kv = decode(model, blocks, fused=True)
    plain, plain_kv = decode(model, blocks, fused=False)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    for a, b in zip(fused_kv.k + fused_kv.v, plain_kv.k + plain_kv.v, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_fused_step_is_bit_identical_across_thread_counts() -> None:
    """Only the projections use threads, and their rows do not depend on the thread count."""
    model = tiny_model("w4a16")
    outs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        outs.append(decode(model, [5, 0, 3], fused=True))
    assert torch.equal(outs[0][0], outs[1][0])
    (_, kv1), (_, kv2) = outs
    assert all(torch.equal(a, b) for a, b in zip(kv1.k + kv1.v, kv2.k + kv2.v, strict=True))


def test_scalar_build_fused_step_equals_the_torch_ops_path() -> None:
    torch.set_num_threads(1)
    model = tiny_model("w4a16")
    scalar, _ = decode(model, [5, 0, 3], fused=True, lib=library(BASE_FLAGS))
    plain, _ = decode(model, [5, 0, 3], fused=False)
    torch.testing.assert_close(scalar, plain, atol=1e-5, rtol=1e-5)


def test_a_short_block_table_is_refused() -> None:
    step = FlatDecoder(tiny_model("w4a16"), KVCache(KVCacheSpec(4, 2, 16), 2, 8)).step
    with pytest.raises(ValueError, match="blocks"):
        step(torch.zeros(1, 64), torch.zeros(8), torch.zeros(8), torch.tensor([0, 1]), 4, 9, 1)
