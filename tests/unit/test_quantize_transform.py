"""Weight schemes as transforms: exactly the layers' projections are replaced, the engine serves the result
(bs1 decode through FlatDecoder), and bad scheme names are refused naming the value (config) or the flag."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from contracts.sampling import SamplingParams
from deploy.cli import build_parser
from engine.config import EngineConfig
from engine.executors.cpu_flat import CpuFlatExecutor
from engine.llm_engine import LLMEngine
from engine.quantize import use_int4, use_int4_kernels, use_w8, use_w8a8
from engine.quantize.cpu_linears import Q41Linear, Q80Linear
from engine.quantize.kernel_linears import W4A16KernelLinear, W8A8KernelLinear, W8KernelLinear
from engine.quantize.w8a8 import W8A8Linear
from engine.random_models import PRESETS, build_random_model
from engine.sequence_forward import forward_sequence

pytestmark = pytest.mark.timeout(120)


@torch.inference_mode()
def logits_of(model: nn.Module, tokens: list[int]) -> torch.Tensor:
    return model.compute_logits(forward_sequence(model, tokens))


def tiny_model() -> nn.Module:
    return build_random_model(PRESETS["tiny"], torch.float32, "cpu")


@pytest.mark.parametrize(("transform", "cls"), [
    (use_int4, Q41Linear), (use_w8a8, W8A8Linear),
    (lambda model, source: use_w8(model, on_cpu=True), Q80Linear),
    # the kernel-registry modules CUDA gets (and w8 everywhere), here on the torch references
    (use_int4_kernels, W4A16KernelLinear), (lambda model, source: use_w8(model), W8KernelLinear),
    (lambda model, source: use_w8a8(model, source, kernel_modules=True), W8A8KernelLinear),
])
def test_transform_replaces_exactly_the_four_projections_of_every_layer(transform, cls) -> None:
    torch.set_num_threads(1)
    model = tiny_model()
    untouched = {name: p.clone() for name, p in model.named_parameters()
                 if not name.endswith(("qkv_proj.weight", "o_proj.weight", "gate_up_proj.weight",
                                       "down_proj.weight"))}
    tokens = list(range(1, 40))
    before = logits_of(model, tokens)
    transform(model, None)
    replaced = [name for name, m in model.named_modules() if isinstance(m, cls)]
    expected = [f"layers.{i}.{part}" for i in range(model.config.num_layers)
                for part in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")]
    assert replaced == expected
    assert not any(isinstance(m, nn.Linear) for m in model.layers.modules())
    assert all(m.silu_mul_input == name.endswith("down_proj") for name, m in model.named_modules()
               if isinstance(m, cls))
    after = dict(model.named_parameters())
    assert after.keys() == untouched.keys()  # embedding, norms (and head, if untied) stay float parameters
    assert all(torch.equal(after[name], p) for name, p in untouched.items())
    logits = logits_of(model, tokens)
    # Same function up to quantization noise (int4 groups of 32 on Gaussian weights: ~9% here; w8a8 ~1%).
    assert ((logits - before).norm() / before.norm()).item() < 0.15


@pytest.mark.parametrize("weights", ["w4a16", "w8a8"])
def test_quantized_engine_decodes_bs1_flat_with_the_plain_forwards_tokens(weights: str) -> None:
    torch.set_num_threads(1)
    engine = LLMEngine(EngineConfig(model_path="random:tiny", weights=weights, num_kv_blocks=16,
                                    max_num_seqs=2))
    assert isinstance(engine.executor, CpuFlatExecutor)  # FlatDecoder calls the quantized modules
    sampling = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    flat = engine.generate([[5, 6, 7]], sampling)
    engine.executor = engine.executor.eager
    assert engine.generate([[5, 6, 7]], sampling) == flat and len(flat[0]) == 8


def test_w8_engine_serves_int8_weights_through_the_cpu_kernels_flat() -> None:
    torch.set_num_threads(1)
    config = EngineConfig(model_path="random:tiny", num_kv_blocks=16, max_num_seqs=2)
    plain = LLMEngine(config)
    w8 = LLMEngine(dataclasses.replace(config, weights="w8"))
    down = w8.model.layers[0].mlp.down_proj
    assert type(down) is Q80Linear and down.silu_mul_input and down.q.dtype == torch.int8
    assert isinstance(w8.executor, CpuFlatExecutor)  # FlatDecoder calls the Q8_0 modules
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    # per-channel int8 moves a tiny random model's logits by well under 1%: greedy tokens stay the same
    assert w8.generate([[5, 6, 7]], params) == plain.generate([[5, 6, 7]], params)


def test_engine_config_names_a_bad_weights_value() -> None:
    with pytest.raises(ValueError, match="weights 'int3' is not supported; expected one of auto, bf16"):
        EngineConfig(weights="int3")
    with pytest.raises(ValueError, match="weights 'bf16' needs dtype 'bfloat16'"):
        EngineConfig(weights="bf16", dtype="float32")


def test_cli_rejects_a_bad_weights_value_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["up", "--weights", "int3"])
    assert "--weights: invalid choice: 'int3'" in capsys.readouterr().err
    assert build_parser().parse_args(["up", "--weights", "w4a16"]).weights == "w4a16"
    assert build_parser().parse_args(["up", "--weights", "w8"]).weights == "w8"
    assert EngineConfig(weights="w8").weights == "w8"
