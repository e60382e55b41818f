"""What each part of a graphed decode step costs in place: graph GPU ms with kernels varied or patched out.

Run on a CUDA machine from the repo root, e.g.
    python -m bench.decode_gpu_ablate --points 16x512,16x4096 --variants base,noattn,nonorm,nomip
Llama-3-8B shape, random bf16 weights (as bench/decode_gpu.py). For each point (batch x context) the same
sequences decode while each variant is applied, the decode graphs recaptured, and the step replayed back to
back (median of --repeats, CUDA events); --rounds repeats the whole variant list (the summary keeps each
variant's best round, beside all rounds). Under PDL kernels overlap, so a kernel's profiled duration is not
its cost; the step without it is. Variants (join with '+'):
  base          the code as it is
  noattn        decode attention returns q unchanged             (timing only: wrong tokens)
  nonorm        the 2-16 row RMSNorm kernels return their input  (timing only)
  noreduce      the separate split-merge kernel is not launched  (timing only; with nomip)
  nomip         PDSERVE_MERGE_IN_PLACE=0: merge splits in a second kernel
  nopreload     PDSERVE_KV_PRELOAD=0: decode attention reads no KV before its PDL wait
  splitsN       decode attention with N KV splits
  attnBNxWxS    decode attention tiles: BLOCK_N x warps x stages
  T<N>_<K>_<BN>x<BK>x<W>x<S>  the 2-16 row GEMM config for weight [N, K]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator

import torch

import kernels.triton_attention as attention
import kernels.triton_linear as linear
import kernels.triton_rmsnorm as rmsnorm
from bench._cuda import cuda_missing
from bench.decode_gpu import BF16, LLAMA3_8B, median_event_ms, start_decoding
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.random_models import build_random_model
from kernels import dispatch


class _NoLaunch:
    """Stands in for a Triton kernel: `kernel[grid](...)` launches nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    undo: list = []  # (mapping, key, old value or None); module attributes via vars(), os.environ too

    def put(mapping: dict, key, value) -> None:
        undo.append((mapping, key, mapping.get(key)))
        mapping[key] = value

    try:
        for part in name.split("+"):
            if part == "base":
                continue
            if part == "noattn":
                put(dispatch._REGISTRY["paged_attention"], dispatch.TRITON, lambda q, *args: q)
            elif part == "nonorm":
                put(vars(rmsnorm), "rms_norm_and_residual_triton",
                    lambda x, w, eps, res=None: (x, x if res is None else res))
            elif part == "noreduce":
                put(vars(attention), "_decode_reduce_kernel", _NoLaunch())
            elif part == "nomip":
                put(os.environ, "PDSERVE_MERGE_IN_PLACE", "0")
            elif part == "nopreload":
                put(os.environ, "PDSERVE_KV_PRELOAD", "0")
            elif part.startswith("splits"):
                put(vars(attention), "choose_num_splits", lambda *args, n=int(part[6:]): n)
            elif part.startswith("attn"):
                tiles = tuple(int(v) for v in part[4:].split("x"))
                put(vars(attention), "decode_config", lambda *args, t=tiles: t)
            elif part.startswith("T"):
                n, k, config = part[1:].split("_")
                put(linear._TUNED, (False, int(n), int(k)),
                    linear.SkinnyConfig(*map(int, config.split("x"))))
            else:
                raise SystemExit(f"unknown variant part {part!r} (see --help)")
        yield
    finally:
        for mapping, key, value in reversed(undo):
            if value is None:
                mapping.pop(key, None)
            else:
                mapping[key] = value


def replay_ms(engine: LLMEngine, repeats: int) -> float:
    """Recapture the decode graphs under the current variant; GPU ms of the step replayed back to back."""
    graphs = engine.executor.graphs
    torch.cuda.synchronize()
    graphs._captured.clear()
    graphs._pool = None  # a fresh pool: the old graphs are gone
    for _ in range(3):
        engine.step()
    out = engine.schedule()
    ms = median_event_ms(lambda: graphs.run(out.chunks), repeats=repeats)
    engine.postprocess(out, engine.execute(out))
    return ms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", default="16x512", help="batch x context, comma-separated")
    parser.add_argument("--variants", default="base,noattn,nonorm")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--max-model-len", type=int, default=4240, help="the graphs' window (decode_gpu's)")
    parser.add_argument("--out", default="", help="JSON of every round's ms")
    args = parser.parse_args(argv)
    if cuda_missing(__file__):
        return 2
    try:
        points = [tuple(int(v) for v in p.split("x")) for p in args.points.split(",")]
    except ValueError:
        print(f"--points: expected BATCHxCONTEXT[,...], got {args.points!r}", file=sys.stderr)
        return 2
    names = args.variants.split(",")
    for name in names:
        with variant(name):  # unknown parts fail here, before minutes of model building
            pass
    model = build_random_model(LLAMA3_8B, BF16, "cuda", seed=0, std=0.02)
    max_batch = max(b for b, _ in points)
    blocks = max_batch * (-(-(max(c for _, c in points) + 400) // 16)) + 64
    engine = LLMEngine(EngineConfig(device="cuda", dtype="bfloat16", num_kv_blocks=blocks,
                                    max_model_len=args.max_model_len, max_num_seqs=max_batch,
                                    decode_lookahead=False),  # replays only: nothing launched ahead
                       model=(model.config, model))
    for cache in engine.kv_cache.k + engine.kv_cache.v:
        cache.normal_()
    results: dict[str, list[float]] = {}
    for batch, context in points:
        ids = start_decoding(engine, batch, context, f"b{batch}c{context}")
        for _ in range(args.rounds):
            for name in names:
                with variant(name):
                    ms = replay_ms(engine, args.repeats)
                results.setdefault(f"bs{batch} ctx{context} {name}", []).append(ms)
                print(f"bs{batch} ctx{context} {name:32s} {ms:.4f} ms", flush=True)
        for rid in ids:
            engine.abort(rid)
        engine.step()
    print(f"# graph GPU ms, best of {args.rounds} rounds (then every round)")
    for key, values in results.items():
        print(f"{key:48s} {min(values):.4f}   {' '.join(f'{v:.4f}' for v in values)}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "graph_gpu_ms": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
