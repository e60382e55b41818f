"""One worker's engine: model, KV cache, scheduler, executor; a step is schedule → execute → postprocess."""
from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Sequence as Seq

import torch

from contracts.kv_cache_spec import KVCacheSpec
from contracts.sampling import SamplingParams
from contracts.stats import EngineStats
from engine.block_manager import BlockManager
from engine.config import EngineConfig, ModelConfig
from engine.cpu_linear import use_cpu_linears
from engine.executor import RunOutput
from engine.executors.factory import build_executor
from engine.executors.lookahead import DecodeLookahead
from engine.kv_cache import KVCache, key_offset_digest, with_key_offsets
from engine.model import LayerHook, LlamaModel
from engine.model_files import load_model, parse_dtype
from engine.quantize import apply_weights_scheme
from engine.quantize.kv_balance import balance_keys
from engine.quantize.kv_offsets import calibration_ids
from engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from engine.sequence import Sequence
from engine.spec.speculator import Speculator
from engine.step_cost import with_placement_costs
from engine.tp.comm import TPComm
from engine.tp.follower import TPLeaderExecutor, follow
from engine.tp.group import TPGroup
from engine.tp.kv_shards import KVHeadMap, LayerTensors, gather_layer, layer_tensors, scatter_blocks
from engine.tp.overlap import tune_chunks
from engine.tp.shard import ShardPlan, shard_model
from kernels.registry import KernelRegistry

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(
        self, config: EngineConfig, progress: bool = False,
        model: tuple[ModelConfig, LlamaModel] | None = None, tp: TPGroup | None = None,
    ) -> None:
        """`model`: a built (config, model) on config.device in config.dtype, served instead of loading
        config.model_path (random-weight benchmarks, engines sharing one model in tests).
        `tp`: this rank's group when config.tp_size > 1; the model is sharded onto it after loading."""
        self.config = config
        dtype = parse_dtype(config.dtype)
        device = torch.device(config.device)
        self.kernels = KernelRegistry.for_device(device, config.kernels)
        if model is None:
            self.model_config, self.model = load_model(config.model_path, dtype, device, progress)
        else:
            self.model_config, self.model = model
        apply_weights_scheme(self.model, config)  # config.weights: quantized projections, if it asks for them
        key_offsets = None
        if config.resolved_kv_cache_dtype == "int4":
            # Before sharding, from fixed text: every worker of this model and weights folds the same key
            # balance and subtracts the same offsets, the balanced keys' mean (the KV handshake compares
            # their digest).
            ids = calibration_ids(config.model_path, self.model_config.vocab_size)
            _, key_offsets = balance_keys(self.model, ids)
        # The wire spec names all heads' offsets, whatever share of them this rank's cache holds.
        self._key_offset_digest = "" if key_offsets is None else key_offset_digest(key_offsets)
        self.tp_comm: TPComm | None = None
        self.tp_plan: ShardPlan | None = None
        if config.tp_size > 1:
            if tp is None or tp.size != config.tp_size:
                raise ValueError(f"tp_size {config.tp_size} needs a TP group of that size, got {tp}")
            self.tp_comm = TPComm(tp, config.tp_comm)
            self.tp_plan = shard_model(self.model, self.tp_comm, max(config.tp_overlap_chunks, 1),
                                       config.tp_overlap_min_tokens)
        self.model.bind_kernels(self.kernels)  # before the runner: it captures graphs of these kernels
        if device.type == "cpu":
            # CPU decode is weight-bandwidth-bound: one kernel streams each fp32 weight once for all rows.
            swapped = use_cpu_linears(self.model)
            logger.info("CPU decode layout: %d fp32 linears packed for kernels/cpu_quant", swapped)
        if self.tp_comm is not None and config.tp_overlap_chunks == 0:
            # Measured with the kernels and layout that will serve.
            tune_chunks(self.model, self.tp_comm, config.max_batch_tokens)
        max_model_len = config.max_model_len or self.model_config.max_position_embeddings
        if max_model_len > self.model_config.max_position_embeddings:
            raise ValueError(f"max_model_len {max_model_len} exceeds the model's context length "
                             f"{self.model_config.max_position_embeddings}")
        if self.tp_plan is None:
            self.kv_cache = KVCache.for_model(self.model_config, config, key_offsets)
        else:  # the rank's kv heads only
            if key_offsets is not None:
                key_offsets = key_offsets[:, list(self.tp_plan.heads.kv_heads)].contiguous()
            self.kv_cache = KVCache(
                with_key_offsets(self.tp_plan.kv_cache_spec(self.model_config, config), key_offsets),
                self.model_config.num_layers, config.num_kv_blocks, device, key_offsets)
        self.executor = build_executor(self.model, self.kv_cache, config, max_model_len)
        if self.tp_comm is not None and self.tp_comm.group.rank == 0:
            # Rank 0 schedules and samples; each step goes to the follower ranks (`follow`) before it runs.
            self.executor = TPLeaderExecutor(self.executor, self.tp_comm.group)
        # The scheduler asks the lookahead which step it launched ahead (schedule below).
        self.lookahead = self.executor if isinstance(self.executor, DecodeLookahead) else None
        self.block_manager = BlockManager(config.num_kv_blocks, config.block_size)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_batch_tokens=config.max_batch_tokens,
                max_num_seqs=config.max_num_seqs,
                block_size=config.block_size,
                max_model_len=max_model_len,
                eos_token_ids=self.model_config.eos_token_ids,
                lookahead_tokens=1 if self.lookahead is not None else 0,
                prefix_caching=config.prefix_caching,
                long_prefill_token_threshold=config.long_prefill_token_threshold,
                max_long_partial_prefills=config.max_long_partial_prefills,
                fused_step_max_slowdown=config.fused_step_max_slowdown,
            ),
            self.block_manager,
        )
        # After the executor: its CUDA graphs are captured before the draft head's feature hooks exist.
        self.speculator = (Speculator(config.spec, self.model, self.model_config)
                           if config.spec.enabled else None)
        if self.speculator is not None:
            self.speculator.attach(self.executor, config.max_num_seqs, max_model_len)
        self._ids = itertools.count()
        self._kv_heads: KVHeadMap | None = None  # built on first use (TP KV exports and loads)
        logger.info("engine ready: %s, %s, %s", self.model_config.name, self.kv_cache,
                    type(self.executor).__name__)

    # ---- the step, in three calls ----

    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams) -> Sequence:
        seq = Sequence(request_id=request_id, token_ids=list(prompt_token_ids), sampling=sampling)
        self.scheduler.add(seq)
        return seq

    def schedule(self) -> SchedulerOutput:
        # A step launched ahead (decode lookahead) is the step: sequences that became runnable since wait one.
        lookahead = self.lookahead
        pending = lookahead.pending_seqs() if lookahead is not None else None
        if pending is not None:
            out = self.scheduler.schedule(decode_only=pending)
            if out.chunks:
                return out
            lookahead.drop()  # all of its sequences are gone (finished, aborted): it serves no step
        return self.scheduler.schedule()

    def execute(self, batch: SchedulerOutput, layer_hook: LayerHook | None = None,
                export_blocks: Seq[int] = ()) -> RunOutput:
        """`export_blocks`: blocks whose KV `layer_hook` reads with `export_layer` (TP: every rank then
        offers its shard of them at each layer)."""
        if isinstance(self.executor, TPLeaderExecutor):  # speculation is refused at tp_size > 1
            return self.executor.execute(batch, layer_hook, export_blocks)
        if self.speculator is not None:  # the draft head reads the target's features of this forward
            return self.speculator.execute(self.executor, batch, layer_hook)
        return self.executor.execute(batch, layer_hook)

    def postprocess(self, batch: SchedulerOutput, out: RunOutput) -> list[Sequence]:
        """Returns the sequences that finished this step; with speculation on, the others' next drafts are
        in their draft_token_ids (verified by the next step)."""
        finished = self.scheduler.postprocess(batch, out.sampled)
        if self.speculator is not None:
            self.speculator.after_step(batch)
        return finished

    def step(self) -> list[Sequence]:
        batch = self.schedule()
        return self.postprocess(batch, self.execute(batch))

    # ---- queries and control ----

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def abort(self, request_id: str) -> bool:
        if self.speculator is not None:
            self.speculator.drop(request_id)
        return self.scheduler.abort(request_id) is not None

    def draft_features(self, request_id: str) -> torch.Tensor | None:
        """Prefill side: the draft head's fused features [r, H] of the last r positions `request_id` computed
        in the step just executed (r ≤ speculator.SHIPPED_PROMPT_ROWS), to ship with its KV; None when this
        engine runs no draft head."""
        return self.speculator.fused_features(request_id) if self.speculator is not None else None

    def stats(self) -> EngineStats:
        scheduler = self.scheduler
        stats = with_placement_costs(scheduler.stats(), scheduler.step_cost, scheduler.num_awaiting_kv)
        if self.tp_comm is None:
            return stats
        return dataclasses.replace(stats, tp_comm_bytes=self.tp_comm.stats.bytes_sent)

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[list[int]]:
        """Offline loop: run every prompt to completion; returns the output token ids, in prompt order."""
        seqs = [self.add_request(f"generate-{next(self._ids)}", p, sampling) for p in prompts]
        while self.has_work():
            batch = self.schedule()
            if batch.is_empty:
                # Nothing fits and nothing runs: looping would spin forever.
                raise RuntimeError(
                    "scheduler has work but scheduled nothing (KV cache too small for a prompt?)")
            self.postprocess(batch, self.execute(batch))
        return [seq.output_token_ids for seq in seqs]

    # ---- tensor parallelism: ranks other than 0 follow rank 0's steps ----

    def follow(self) -> int:
        """A follower rank (tp rank > 0): run rank 0's steps until it calls stop_followers; steps run."""
        if self.tp_comm is None or self.tp_comm.group.rank == 0:
            raise RuntimeError("follow() is for tensor-parallel ranks other than 0")
        return follow(self.executor, self.tp_comm.group, self.kv_cache)

    def stop_followers(self) -> None:
        """Rank 0: end the followers' loops (the worker is shutting down)."""
        if not isinstance(self.executor, TPLeaderExecutor):
            raise RuntimeError("stop_followers() is for tensor-parallel rank 0")
        self.executor.stop_followers()

    # ---- KV as whole heads: what travels between workers, whatever their TP sizes ----

    @property
    def wire_kv_spec(self) -> KVCacheSpec:
        """The cache spec with all of the model's kv heads: KV leaves and enters this worker as whole heads
        (a TP rank's cache holds a shard of them; rank 0 gathers or scatters the others')."""
        return dataclasses.replace(self.kv_cache.spec, num_kv_heads=self.model_config.num_kv_heads,
                                   key_offset_digest=self._key_offset_digest)

    def export_layer(self, layer: int, block_ids: torch.Tensor) -> LayerTensors:
        """Whole-head (k, v, *scales)[block_ids] of `layer`: call it from the layer hook of a step run with
        `execute(..., export_blocks=block_ids)` (TP: the followers' shards are gathered then)."""
        tensors = layer_tensors(self.kv_cache, layer)
        if self.tp_comm is None:
            return tuple(t.index_select(0, block_ids) for t in tensors)
        return tuple(gather_layer(self.tp_comm.group, self._head_map(), tensors, block_ids, layer))

    def load_kv(self, block_ids: Seq[int], layers: Seq[LayerTensors]) -> None:
        """Write whole-head `layers[i]` = (k, v, *scales) `[len(block_ids), block_size, kv_heads, ...]` into
        these blocks (TP: each rank gets its kv heads)."""
        ids = torch.tensor(list(block_ids), dtype=torch.long, device=self.kv_cache.device)
        if self.tp_comm is None:
            for i, values in enumerate(layers):
                for cache, src in zip(layer_tensors(self.kv_cache, i), values, strict=True):
                    cache.index_copy_(0, ids, src.to(cache.device))
            return
        self.executor.announce_load(tuple(block_ids))
        scatter_blocks(self.tp_comm.group, self._head_map(), self.kv_cache, ids, layers)

    def _head_map(self) -> KVHeadMap:
        if self._kv_heads is None:
            self._kv_heads = KVHeadMap(self.model_config, self.config.tp_size)
        return self._kv_heads

    # ---- decode side: KV arriving from a prefill worker ----

    def reserve(self, request_id: str, prompt_token_ids: list[int],
                sampling: SamplingParams) -> tuple[int, ...] | None:
        """Hold KV blocks for a prompt a prefill worker will compute; the block ids its KV goes to, in order.

        None (nothing held) if the blocks or a sequence slot are not free now. The sequence is never scheduled
        until `activate`; `abort` frees its blocks in any state.
        """
        seq = Sequence(request_id=request_id, token_ids=list(prompt_token_ids), sampling=sampling)
        if not self.scheduler.reserve(seq):
            return None
        return tuple(seq.block_table)

    def reserved_prefix_tokens(self, request_id: str) -> int:
        """Leading tokens of a reservation whose KV is here already (prefix cache): no transfer for them."""
        seq = self.scheduler.get(request_id)
        return seq.num_computed_tokens if seq is not None else 0

    def activate(self, request_id: str, first_token_id: int,
                 draft_features: torch.Tensor | None = None) -> Sequence:
        """The prompt's KV has landed in the reserved blocks: the sequence joins the running batch with the
        first token the prefill worker sampled (raises SchedulerError if `request_id` awaits no KV).
        `draft_features`: the prefill worker's fused draft-head features of the last prompt positions, from
        which the head drafts before the first decode step (without them, that step runs plain)."""
        seq = self.scheduler.activate(request_id, first_token_id)
        if self.speculator is not None and not seq.is_finished:
            self.speculator.start_decode(seq, draft_features)
        return seq
