"""Picks the engine's executor once, from the device, the model's layout and the engine config."""
from __future__ import annotations

import logging

import torch
from safetensors import safe_open

from engine.config import EngineConfig
from engine.cpu_decode import FlatDecoder
from engine.cuda_graphs import DecodeGraphRunner
from engine.executor import Executor
from engine.executors.cpu_flat import CpuFlatExecutor
from engine.executors.eager import EagerExecutor
from engine.executors.graphed import GraphedExecutor, graph_safe_kernels
from engine.executors.lookahead import DecodeLookahead
from engine.kv_cache import KVCache
from engine.model import LlamaModel
from engine.spec.config import SpecConfig
from engine.spec.draft_head import DEFAULT_HEAD_PATH, DraftHeadConfig
from engine.verify_graphs import VerifyGraphRunner

logger = logging.getLogger(__name__)


def build_executor(model: LlamaModel, kv_cache: KVCache, config: EngineConfig,
                   max_model_len: int) -> Executor:
    """CPU: the flat bs1 decoder when the model's layout allows it (fp32 column blocks), else eager.
    CUDA: graphed decode (every bucket captured now, so no step stalls on a compile or a capture later),
    wrapped in the decode lookahead, as `config.cuda_graphs` and `config.decode_lookahead` allow; with
    speculation on, graphed verify steps too (every bucket × query width captured now) and no lookahead."""
    device = torch.device(config.device)
    eager = EagerExecutor(model, kv_cache, device)
    if device.type == "cpu":
        if FlatDecoder.supports(model, kv_cache):
            return CpuFlatExecutor(FlatDecoder(model, kv_cache), eager)
        return eager
    if not config.cuda_graphs or config.tp_size > 1:
        # TP steps run eager: capturing NCCL collectives in the decode graphs is not yet verified (issue 17).
        return eager
    if not graph_safe_kernels(model, device):
        logger.info("no CUDA graphs: the model's kernels on %s cannot be replayed from a graph", device)
        return eager
    graphs = DecodeGraphRunner(model, kv_cache, config.max_num_seqs, max_model_len, device)
    graphs.capture_all()
    verify = None
    if config.spec.enabled:
        verify = VerifyGraphRunner(model, kv_cache, config.max_num_seqs, max_model_len, device, config.spec.k,
                                   spec_feature_layers(config.spec), pool=graphs.pool)
        before = torch.cuda.memory_reserved(device)
        verify.capture_all()
        logger.info("verify graphs: %.1f MiB more reserved GPU memory",
                    (torch.cuda.memory_reserved(device) - before) / 2**20)
    graphed = GraphedExecutor(graphs, eager, verify)
    # With speculation on, the step after a decode step is mostly a verify step (the drafter proposes after
    # every step), never the one-token step a lookahead would launch: its GPU time would be thrown away.
    lookahead = config.decode_lookahead and not config.spec.enabled
    return DecodeLookahead(graphed) if lookahead else graphed


def spec_feature_layers(spec: SpecConfig) -> tuple[int, ...]:
    """The target layers whose outputs the draft head fuses (read from the head file's config), () unless
    it drafts with a head: the verify graphs then output them (the speculator checks they are its own)."""
    if spec.method != "head":
        return ()
    path = spec.head_path or DEFAULT_HEAD_PATH
    with safe_open(str(path), framework="pt") as f:
        return DraftHeadConfig.from_json(f.metadata()["config"]).feature_layers
