"""Picks the engine's executor once, from the device, the model's layout and the engine config."""
from __future__ import annotations

import logging

import torch

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

logger = logging.getLogger(__name__)


def build_executor(model: LlamaModel, kv_cache: KVCache, config: EngineConfig,
                   max_model_len: int) -> Executor:
    """CPU: the flat bs1 decoder when the model's layout allows it (fp32 column blocks), else eager.
    CUDA: graphed decode (every bucket captured now, so no step stalls on a compile or a capture later),
    wrapped in the decode lookahead, as `config.cuda_graphs` and `config.decode_lookahead` allow."""
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
    graphed = GraphedExecutor(graphs, eager)
    return DecodeLookahead(graphed) if config.decode_lookahead else graphed
