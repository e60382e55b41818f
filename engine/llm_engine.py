"""One worker's engine: model + KV cache + scheduler + runner; a step is schedule → run → postprocess."""
from __future__ import annotations

import itertools
import logging
import os

import torch

from contracts.sampling import SamplingParams
from contracts.stats import EngineStats
from engine.block_manager import BlockManager
from engine.config import EngineConfig, ModelConfig
from engine.cpu_decode import use_column_blocks
from engine.kv_cache import KVCache
from engine.lookahead import DecodeLookahead
from engine.model import LayerHook, LlamaModel
from engine.model_files import load_model, parse_dtype
from engine.model_runner import ModelRunner, RunOutput
from engine.quantize import apply_weights_scheme
from engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from engine.sequence import Sequence

logger = logging.getLogger(__name__)

# PDSERVE_LOOKAHEAD=0: decode engines launch each step only after the host read the last (A/B timing).
_LOOKAHEAD_ENV = "PDSERVE_LOOKAHEAD"


class LLMEngine:
    def __init__(
        self, config: EngineConfig, progress: bool = False, hold_finished_blocks: bool = False,
        model: tuple[ModelConfig, LlamaModel] | None = None,
    ) -> None:
        """`hold_finished_blocks`: the prefill side keeps a finished sequence's blocks until
        scheduler.release(seq) (its KV is still being sent). `model`: a built (config, model) on config.device
        in config.dtype, served instead of loading config.model_path (random-weight benchmarks)."""
        self.config = config
        dtype = parse_dtype(config.dtype)
        device = torch.device(config.device)
        if device.type == "cuda":
            from kernels.triton_registry import register_triton_kernels

            register_triton_kernels()  # dispatch then picks the Triton kernels on CUDA
        if model is None:
            self.model_config, self.model = load_model(config.model_path, dtype, device, progress)
        else:
            self.model_config, self.model = model
        apply_weights_scheme(self.model, config)  # config.weights: quantized projections, if it asks for them
        if device.type == "cpu":
            # bs1 decode on CPU is GEMV-bound: blocked weights let every core stream its share (same math).
            parts = torch.get_num_threads()
            swapped = use_column_blocks(self.model, parts)
            logger.info("CPU decode layout: %d linears split into %d column blocks", swapped, parts)
        max_model_len = config.max_model_len or self.model_config.max_position_embeddings
        if max_model_len > self.model_config.max_position_embeddings:
            raise ValueError(f"max_model_len {max_model_len} exceeds the model's context length "
                             f"{self.model_config.max_position_embeddings}")
        self.kv_cache = KVCache.for_model(self.model_config, config)
        self.runner = ModelRunner(self.model, self.kv_cache, self.model_config, config.device,
                                  max_num_seqs=config.max_num_seqs, max_model_len=max_model_len)
        decode_side = self.runner.graphs is not None and not hold_finished_blocks
        if decode_side and os.environ.get(_LOOKAHEAD_ENV, "1") != "0":
            # Graphed decode steps launch the step after them before the host reads their tokens.
            self.runner.lookahead = DecodeLookahead(self.runner.graphs)
        self.block_manager = BlockManager(config.num_kv_blocks, config.block_size)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_batch_tokens=config.max_batch_tokens,
                max_num_seqs=config.max_num_seqs,
                block_size=config.block_size,
                max_model_len=max_model_len,
                eos_token_ids=self.model_config.eos_token_ids,
                hold_finished_blocks=hold_finished_blocks,
                lookahead_tokens=1 if self.runner.lookahead is not None else 0,
            ),
            self.block_manager,
        )
        if decode_side:
            # Decode side: capture every bucket now, so no step stalls on a Triton compile or a capture later.
            # (The prefill side almost never runs a decode-only step; it captures lazily if it does.)
            self.runner.graphs.capture_all()
        self._ids = itertools.count()
        logger.info("engine ready: %s, %s", self.model_config.name, self.kv_cache)

    # ---- the step, in three calls ----

    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams) -> Sequence:
        seq = Sequence(request_id=request_id, token_ids=list(prompt_token_ids), sampling=sampling)
        self.scheduler.add(seq)
        return seq

    def schedule(self) -> SchedulerOutput:
        # A step launched ahead (decode lookahead) is the step: sequences that became runnable since wait one.
        lookahead = self.runner.lookahead
        pending = lookahead.pending_seqs() if lookahead is not None else None
        if pending is not None:
            out = self.scheduler.schedule(decode_only=pending)
            if out.chunks:
                return out
            lookahead.drop()  # all of its sequences are gone (finished, aborted): it serves no step
        return self.scheduler.schedule()

    def run(self, out: SchedulerOutput, layer_hook: LayerHook | None = None) -> RunOutput:
        # Launch the next step ahead only if it will be this batch again: nobody else waits to run.
        alone = self.scheduler.num_waiting == 0 and self.scheduler.num_running == len(out.chunks)
        return self.runner.run(out, layer_hook, look_ahead=alone)

    def postprocess(self, out: SchedulerOutput, run_output: RunOutput) -> list[Sequence]:
        """Returns the sequences that finished this step."""
        return self.scheduler.postprocess(out, run_output.sampled)

    def step(self) -> list[Sequence]:
        out = self.schedule()
        return self.postprocess(out, self.run(out))

    # ---- queries and control ----

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def abort(self, request_id: str) -> bool:
        return self.scheduler.abort(request_id) is not None

    def stats(self) -> EngineStats:
        return self.scheduler.stats()

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[list[int]]:
        """Offline loop: run every prompt to completion; returns the output token ids, in prompt order."""
        seqs = [self.add_request(f"generate-{next(self._ids)}", p, sampling) for p in prompts]
        while self.has_work():
            out = self.schedule()
            if out.is_empty:
                # Nothing fits and nothing runs: looping would spin forever.
                raise RuntimeError(
                    "scheduler has work but scheduled nothing (KV cache too small for a prompt?)")
            self.postprocess(out, self.run(out))
        return [seq.output_token_ids for seq in seqs]
