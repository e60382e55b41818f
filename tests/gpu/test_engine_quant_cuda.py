"""Quantized weights on the CUDA engine: the registry's Triton quantized ops replay from CUDA graphs, and a
tiny random model's greedy tokens per scheme equal the same scheme served by the torch reference modules."""
from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from contracts.sampling import SamplingParams
from engine.config import EngineConfig, ModelConfig
from engine.cuda_graphs import decode_buckets
from engine.executors.lookahead import DecodeLookahead
from engine.llm_engine import LLMEngine
from engine.quantize.int4 import quantize_int4
from engine.quantize.kernel_linears import W4A16KernelLinear, W8A8KernelLinear, W8KernelLinear
from engine.quantize.w8a8 import quantize_per_channel, rotated_weight
from engine.random_models import build_random_model
from kernels.quant_linear.layout import W8Weight, pack_w4
from kernels.registry import KernelRegistry

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(600)]

TINY = ModelConfig(name="tiny-cuda-quant", vocab_size=1024, hidden_size=256, intermediate_size=512,
                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=1024)
PROMPT_LENGTHS = (3, 15, 16, 17, 40)  # 5 sequences: buckets 8, 4, 2, 1 as they finish
MAX_TOKENS = (24, 9, 17, 5, 12)
MODULES = {"w4a16": W4A16KernelLinear, "w8": W8KernelLinear, "w8a8": W8A8KernelLinear}


@pytest.fixture(autouse=True)
def compiled_kernels_only() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter mode is on in this process: run tests/gpu in its own pytest process")


def quantized_engine(weights: str, dtype: str = "float32", **config) -> LLMEngine:
    """A fresh tiny model (same seed every call: the same float weights, so the same quantized ones) served
    with `weights`; std 0.1 keeps greedy choices far from ties."""
    model = build_random_model(TINY, getattr(torch, dtype), "cuda", seed=0, std=0.1)
    engine_config = EngineConfig(model_path="random:tiny", device="cuda", dtype=dtype, weights=weights,
                                 num_kv_blocks=64, max_num_seqs=8, max_batch_tokens=128, **config)
    return LLMEngine(engine_config, model=(TINY, model))


def generate(engine: LLMEngine) -> tuple[list[list[int]], int]:
    """Greedy outputs per prompt, and how many steps replayed a decode graph."""
    gen = torch.Generator().manual_seed(1)
    seqs = [engine.add_request(f"q-{i}", torch.randint(1, TINY.vocab_size, (n,), generator=gen).tolist(),
                               SamplingParams(max_tokens=m, ignore_eos=True))
            for i, (n, m) in enumerate(zip(PROMPT_LENGTHS, MAX_TOKENS, strict=True))]
    graphed = 0
    while engine.has_work():
        batch = engine.schedule()
        graphed += isinstance(engine.executor, DecodeLookahead) and engine.executor.graphed(batch)
        engine.postprocess(batch, engine.execute(batch))
    return [s.output_token_ids for s in seqs], graphed


@pytest.mark.parametrize(("weights", "kv_cache_dtype"),
                         [("w8", "auto"), ("w4a16", "auto"), ("w8a8", "auto"), ("w4a16", "int4")])
def test_graphed_quantized_engine_matches_the_reference_modules_token_for_token(
        weights: str, kv_cache_dtype: str) -> None:
    triton = quantized_engine(weights, kv_cache_dtype=kv_cache_dtype)
    assert triton.kernels.backend == "triton"
    assert type(triton.model.layers[0].mlp.down_proj) is MODULES[weights]
    assert isinstance(triton.executor, DecodeLookahead)
    assert triton.executor.graphs.captured_buckets == decode_buckets(8)  # every bucket captured at start
    reference = quantized_engine(weights, kernels="torch", kv_cache_dtype=kv_cache_dtype)
    assert reference.model.layers[0].mlp.down_proj.kernels.backend == "torch"
    got, graphed = generate(triton)
    expected, _ = generate(reference)
    assert graphed >= max(MAX_TOKENS) - 2  # decode steps replayed the captured graphs
    assert got == expected


@pytest.mark.parametrize(("weights", "kv_cache_dtype"), [("w8", "auto"), ("w4a16", "auto"), ("w8", "int8")])
def test_bf16_graphed_quantized_decode_matches_its_eager_steps(weights: str, kv_cache_dtype: str) -> None:
    # bf16 queries: an int8 cache is read by the int16-pairs kernel (kernels/attention/int8_decode.py)
    graphed = quantized_engine(weights, dtype="bfloat16", kv_cache_dtype=kv_cache_dtype)
    eager = LLMEngine(replace(graphed.config, weights="auto", cuda_graphs=False),  # the model is quantized
                      model=(TINY, graphed.model))
    got, replays = generate(graphed)
    expected, _ = generate(eager)
    assert replays >= max(MAX_TOKENS) - 2 and got == expected


def llama_shaped_module(kind: str, n: int, k: int) -> torch.nn.Module:
    weight = torch.randn(n, k, device="cuda", generator=torch.Generator("cuda").manual_seed(n)) * 0.02
    if kind == "w4a16":
        return W4A16KernelLinear(pack_w4(*quantize_int4(weight, 128)))
    if kind == "w8":
        return W8KernelLinear(W8Weight(*quantize_per_channel(weight)))
    smooth = torch.rand(k, device="cuda") + 0.5
    rotated, block = rotated_weight(weight, smooth)
    return W8A8KernelLinear(W8Weight(*quantize_per_channel(rotated)), 1.0 / smooth, block)


@pytest.mark.parametrize("rows", [1, 5, 16, 48])
@pytest.mark.parametrize("kind", ["w4a16", "w8", "w8a8"])
def test_registry_op_replays_from_a_cuda_graph_and_matches_the_reference(kind: str, rows: int) -> None:
    module = llama_shaped_module(kind, 1000, 4096)  # N = 1000: ragged last row blocks
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
    module.kernels = KernelRegistry.triton()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile outside the capture
        module(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = module(x)
    x.copy_(torch.randn_like(x))  # new values in the captured input
    graph.replay()
    torch.cuda.synchronize()
    module.kernels = KernelRegistry.reference()
    expected = module(x).float()
    scale = expected.abs().max().item()
    torch.testing.assert_close(out.float(), expected, atol=2e-2 * scale, rtol=2e-2)
