"""KernelRegistry: one backend per registry, chosen per device and config; each Triton op has a reference."""
from __future__ import annotations

import logging
import sys

import pytest
import torch

from kernels.registry import KernelBackendUnavailable, KernelRegistry

pytestmark = pytest.mark.timeout(60)


def test_every_op_has_a_triton_kernel_and_a_torch_reference_of_the_same_name() -> None:
    reference, triton = KernelRegistry.reference(), KernelRegistry.triton()
    assert (reference.backend, triton.backend) == ("torch", "triton")
    for op in reference.op_names():
        ref_fn, triton_fn = getattr(reference, op), getattr(triton, op)
        assert ref_fn.__name__ == f"{op}_ref" and triton_fn.__name__ == f"{op}_triton"


def test_cpu_gets_the_references_and_only_triton_kernels_are_graph_safe() -> None:
    cpu = KernelRegistry.for_device("cpu")
    assert cpu == KernelRegistry.reference()
    assert cpu.paged_attention.__name__ == "paged_attention_ref"
    assert not cpu.graph_safe and KernelRegistry.triton().graph_safe


def test_torch_backend_forces_the_references_on_cuda() -> None:
    assert KernelRegistry.for_device(torch.device("cuda"), "torch") == KernelRegistry.reference()


def test_explicit_triton_off_cuda_and_unknown_backends_fail_loudly() -> None:
    with pytest.raises(KernelBackendUnavailable):
        KernelRegistry.for_device("cpu", "triton")
    with pytest.raises(ValueError, match="kernel backend"):
        KernelRegistry.for_device("cpu", "cuda")


def test_missing_triton_on_cuda_falls_back_with_a_warning_unless_triton_was_asked_for(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    with caplog.at_level(logging.WARNING, logger="kernels.registry"):
        assert KernelRegistry.for_device("cuda").backend == "torch"
    assert any("triton is not importable" in r.getMessage() for r in caplog.records)
    with pytest.raises(KernelBackendUnavailable):
        KernelRegistry.for_device("cuda", "triton")


def test_engine_config_names_its_backend_and_rejects_others() -> None:
    from engine.config import KERNEL_BACKENDS, EngineConfig

    assert EngineConfig().kernels == "auto" and KERNEL_BACKENDS == ("auto", "torch", "triton")
    with pytest.raises(ValueError, match="kernels must be one of"):
        EngineConfig(kernels="cuda")


def test_bound_model_serves_every_op_from_the_registry_it_was_given() -> None:
    from engine.config import ModelConfig
    from engine.model import LlamaModel

    config = ModelConfig(name="t", vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1,
                         num_heads=2, num_kv_heads=1, head_dim=4, max_position_embeddings=8)
    model = LlamaModel(config)
    assert model.layers[0].self_attn.qkv_proj.kernels == KernelRegistry.reference()
    triton = KernelRegistry.triton()
    model.bind_kernels(triton)
    users = [m for m in model.modules() if hasattr(type(m), "kernels")]
    assert len(users) >= 9 and all(m.kernels is triton for m in users)
