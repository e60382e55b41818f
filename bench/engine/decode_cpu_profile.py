"""Where a CPU bs1 decode step's time goes: per-projection GEMVs, LM head, attention, other ops, Python.

    .venv/bin/python -m bench.engine.decode_cpu_profile --threads 1 [--weights fp32 w8 w4a16-native]

Each contestant (bench/engine/decode_cpu.py's) decodes greedily under torch.profiler; every step is one
labelled region, and so are the FlatDecoder GEMVs (by projection) or its one-call fused step (whole), the
logits and the sampling (wrappers added here, their own few µs counted in the label). Everything else
inside a step is a torch op (attention: its matmuls, softmax and KV store; other: norms, rope, activation,
residual) or, the rest of the step's time, Python and dispatch. The profiler inflates every op by its
record cost, so the table also gives the step time measured without it. GB/s: the bytes a category's
weights hold (as stored) over its time.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from bench.engine.decode_cpu import CONTESTANTS, PROMPT, TORCH_OPS, copy_bandwidth
from contracts.sampling import SamplingParams
from engine import cpu_decode
from engine.config import EngineConfig
from engine.executors import cpu_flat
from engine.executors.cpu_flat import CpuFlatExecutor
from engine.llm_engine import LLMEngine
from engine.model_files import embedded_model_path

PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
ATTENTION_OPS = ("aten::bmm", "aten::baddbmm", "aten::softmax", "aten::_softmax", "aten::index_copy_",
                 "aten::index_put_", "aten::as_strided")


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's weights as stored (parameters and buffers)."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def decode_steps(engine: LLMEngine, new_tokens: int, label: bool) -> float:
    """Greedy decode; returns ms per decode step (after the first token), each step labelled if asked."""
    sampling = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    engine.add_request(f"profile-{time.monotonic_ns()}", PROMPT, sampling)
    engine.step()
    steps, start = 0, time.perf_counter()
    while engine.has_work():
        if label:
            with record_function("step"):
                engine.step()
        else:
            engine.step()
        steps += 1
    return (time.perf_counter() - start) / steps * 1e3


_GEMV, _SAMPLE = cpu_decode.FlatDecoder._gemv, cpu_flat.sample  # unwrapped, whatever label_regions did
FUSED = "fused step (every layer in one C call)"


def label_regions(engine: LLMEngine) -> None:
    """Wrap the FlatDecoder GEMVs (named by projection), the logits and the sampler in profiler labels."""
    names = {id(getattr(parent, name)): name for layer in engine.model.layers
             for parent in (layer.self_attn, layer.mlp) for name in PROJECTIONS if hasattr(parent, name)}
    logits = engine.model.compute_logits

    def labelled_gemv(linear: torch.nn.Module, x: torch.Tensor,
                      residual: torch.Tensor | None = None) -> torch.Tensor:
        with record_function(f"gemv.{names.get(id(linear), 'other')}"):
            return _GEMV(linear, x, residual)

    def labelled_logits(hidden: torch.Tensor) -> torch.Tensor:
        with record_function("lm_head"):
            return logits(hidden)

    def labelled_sample(*args: object) -> torch.Tensor:
        with record_function("sampling"):
            return _SAMPLE(*args)

    step = engine.executor.flat.step
    if step is not None:  # kernels/cpu_quant/step.py: the GEMVs and everything between them, not split
        fused = step.fn

        def labelled_step(*args: object) -> None:
            with record_function(FUSED):
                fused(*args)

        step.fn = labelled_step
    cpu_decode.FlatDecoder._gemv = staticmethod(labelled_gemv)
    cpu_flat.sample = labelled_sample
    engine.model.compute_logits = labelled_logits


def breakdown(prof: profile) -> tuple[dict[str, float], int]:
    """Category → µs summed over the labelled steps, and the number of steps."""
    totals: dict[str, float] = defaultdict(float)
    steps = [e for e in prof.events() if e.name == "step"]
    for step in steps:
        inside = 0.0
        for child in step.cpu_children:
            if child.name.startswith("gemv.") or child.name in ("lm_head", "sampling", FUSED):
                key = child.name
            elif child.name in ATTENTION_OPS:
                key = "attention (matmuls, softmax, KV store)"
            else:
                key = "other torch ops (norms, rope, silu, residual)"
            totals[key] += child.cpu_time_total
            inside += child.cpu_time_total
        totals["Python + dispatch (rest of the step)"] += step.cpu_time_total - inside
    return totals, len(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", nargs="+", choices=list(CONTESTANTS), default=list(CONTESTANTS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=48, help="new tokens per profiled run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = embedded_model_path()
    print(f"torch {torch.__version__}, {args.threads} threads, copy bandwidth "
          f"{copy_bandwidth() / 1e9:.1f} GB/s (read + write)")
    for name in args.weights:
        engine = LLMEngine(EngineConfig(model_path=str(path), weights=CONTESTANTS[name], num_kv_blocks=64,
                                        max_num_seqs=1))
        if not isinstance(engine.executor, CpuFlatExecutor):
            print(f"{name}: not on FlatDecoder, skipped")
            continue
        if name in TORCH_OPS:
            engine.executor.flat.step = None
        bare = min(decode_steps(engine, args.tokens, label=False) for _ in range(3))
        label_regions(engine)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            profiled = decode_steps(engine, args.tokens, label=True)
        totals, steps = breakdown(prof)
        layers = engine.model.layers
        sizes = {f"gemv.{p}": sum(module_bytes(getattr(layer.self_attn if p in PROJECTIONS[:2] else layer.mlp,
                                                       p)) for layer in layers) for p in PROJECTIONS}
        sizes["lm_head"] = module_bytes(engine.model.lm_head)
        sizes[FUSED] = sum(sizes[f"gemv.{p}"] for p in PROJECTIONS)
        print(f"\n{name}: {bare:.2f} ms/step unprofiled (best of 3 runs), {profiled:.2f} profiled, "
              f"{steps} steps")
        print(f"  {'category':46s} {'ms/step':>8s} {'share':>6s} {'MB':>7s} {'GB/s':>6s}")
        step_total = sum(totals.values())
        for key, micros in sorted(totals.items(), key=lambda kv: -kv[1]):
            ms = micros / steps / 1e3
            size = sizes.get(key)
            mb = "" if size is None else f"{size / 1e6:.1f}"
            rate = "" if size is None else f"{size / ms / 1e6:.1f}"
            print(f"  {key:46s} {ms:8.2f} {micros / step_total:6.0%} {mb:>7s} {rate:>6s}")
        del engine


if __name__ == "__main__":
    main()
