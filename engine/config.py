"""Frozen configs: what the model is (ModelConfig) and how the engine runs it (EngineConfig)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from contracts.config_checks import require_at_least
from engine.spec.config import SpecConfig


@dataclass(frozen=True)
class RopeScaling:
    """llama3-style frequency scaling (rope_type 'llama3'); None on ModelConfig means plain RoPE."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)


# What EngineConfig.kv_cache_dtype accepts: a KVCacheSpec logical dtype that the store and attention kernels
# handle, or "auto" for the compute dtype. int8 / int4 caches keep scales (kv_cache_spec.scales_for).
KV_CACHE_DTYPES = ("auto", "float32", "float16", "bfloat16", "int8", "int4")
KERNEL_BACKENDS = ("auto", "torch", "triton")  # kernels/registry.py's KernelRegistry.for_device backends
# Tensor-parallel all-reduce: bf16 = unquantized in the compute dtype (engine/tp/comm.py), int8 = 8-bit.
TP_COMMS = ("bf16", "int8")

# What EngineConfig.weights accepts (engine/quantize applies it to the built model): auto = the weights file's
# numbers dequantized to the compute dtype; bf16 = the same, and the compute dtype must be bfloat16;
# w8 = per-channel int8 weights, activations in the compute dtype (weight-only); w8a8 = int8 weights and
# per-token int8 activations; w4a16 = group-wise int4 weights, 16-bit activations.
WEIGHT_SCHEMES = ("auto", "bf16", "w8", "w8a8", "w4a16")


class PrefillFairness(Protocol):
    """The fair-prefill and split-fused fields EngineConfig and SchedulerConfig share (EngineConfig's
    become the scheduler's)."""

    long_prefill_token_threshold: int
    max_long_partial_prefills: int
    fused_step_max_slowdown: float


def check_prefill_fairness(config: PrefillFairness) -> None:
    """Raises ValueError naming the first bad field; both configs check here, so they cannot disagree."""
    require_at_least(config, 0, "long_prefill_token_threshold")
    require_at_least(config, 1, "max_long_partial_prefills")
    if config.fused_step_max_slowdown and config.fused_step_max_slowdown <= 1.0:
        raise ValueError(f"fused_step_max_slowdown must be 0 (off) or > 1, "
                         f"got {config.fused_step_max_slowdown}")


@dataclass(frozen=True)
class EngineConfig:
    """How one worker runs the model. Defaults suit the embedded model on a 2-core CPU."""

    model_path: str | None = None  # GGUF file or HF directory; None = embedded SmolLM2-135M-Instruct
    device: str = "cpu"
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 | float16
    kv_cache_dtype: str = "auto"  # KV_CACHE_DTYPES; auto = compute dtype
    weights: str = "auto"  # WEIGHT_SCHEMES: how the projections hold their weights (engine/quantize)
    block_size: int = 16
    num_kv_blocks: int = 512
    max_batch_tokens: int = 512  # token budget per step (decode tokens first, then prefill chunks)
    max_num_seqs: int = 32
    max_model_len: int | None = None  # None = model's context length
    num_threads: int = 0  # torch intra-op threads for this worker; 0 = torch's default
    # Cores this worker's process is pinned to (deploy/affinity.py plans them); () = not pinned.
    cpu_affinity: tuple[int, ...] = ()
    # auto: Triton kernels on CUDA, torch references elsewhere; torch: references everywhere (debugging,
    # numerics comparisons); triton: Triton or fail at engine start.
    kernels: str = "auto"
    cuda_graphs: bool = True  # CUDA: decode-only steps that fit a batch bucket replay captured graphs
    decode_lookahead: bool = True  # CUDA graphs: launch the next decode step before reading this one's tokens
    tp_size: int = 1  # tensor-parallel ranks of this worker (engine/tp/), each holding 1/tp_size of the model
    tp_comm: str = "bf16"  # TP_COMMS: how row-parallel outputs are all-reduced
    # Row-parallel GEMMs split along tokens into this many chunks, each chunk's all-reduce in flight while the
    # next multiplies; only for steps of >= tp_overlap_chunks * tp_overlap_min_tokens tokens (prefill), as
    # decode-sized chunks cost more in per-call overhead than they hide (bench/engine/tp.py measures both).
    # 0 = measured at engine start (engine/tp/overlap.py) for a max_batch_tokens step.
    tp_overlap_chunks: int = 1
    tp_overlap_min_tokens: int = 64
    # Reuse the KV of full prompt blocks computed before (chain-hashed, LRU-evicted when blocks run out).
    # On by default: a lookup costs one blake2b per 16 tokens, and a miss computes what it did without.
    prefix_caching: bool = True
    # Fair prefill (engine/scheduler_types.py): while others run or wait, a prompt with more than this many
    # tokens left computes at most this many per step, beside decodes and new short prompts; at most
    # max_long_partial_prefills such prompts progress at once. 0 = a prompt may take the whole budget.
    long_prefill_token_threshold: int = 128
    max_long_partial_prefills: int = 1
    # Split-fused steps (engine/step_cost.py): with decodes running, prefill tokens beside them are paid from
    # a time credit, so the decode batch's steps take on average at most this many times its decode-only
    # steps, by costs the scheduler times from its own steps. 0 = off: the token budget and the threshold
    # alone. 1.35, under issue 14's 1.5x TPOT goal: a request's TPOT lands at about this ratio to the
    # decode-only step, so a target of 1.5 measured 1.23-1.54x at p99 on the 2-core box, 1.35 measured
    # 1.30x, 1.02x and 1.14x with no TTFT cost seen (docs/benchmarks.md, "Split-fused steps run flat on CPU").
    fused_step_max_slowdown: float = 1.35
    # Speculative decoding (engine/spec/speculator.py): drafter, draft length, the head's file.
    spec: SpecConfig = field(default_factory=SpecConfig)

    def __post_init__(self) -> None:
        if self.kernels not in KERNEL_BACKENDS:
            raise ValueError(f"kernels must be one of {KERNEL_BACKENDS}, got {self.kernels!r}")
        check_prefill_fairness(self)
        require_at_least(self, 0, "num_threads")
        if len(set(self.cpu_affinity)) != len(self.cpu_affinity) or any(c < 0 for c in self.cpu_affinity):
            raise ValueError(f"cpu_affinity must be distinct non-negative core ids, got {self.cpu_affinity}")
        require_at_least(self, 1, "block_size", "num_kv_blocks", "max_batch_tokens", "max_num_seqs",
                         "tp_size", "tp_overlap_min_tokens")
        if self.tp_overlap_chunks < 0:
            raise ValueError(f"tp_overlap_chunks must be >= 0 (0 = measured), got {self.tp_overlap_chunks}")
        if self.tp_comm not in TP_COMMS:
            raise ValueError(f"tp_comm must be one of {TP_COMMS}, got {self.tp_comm!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype {self.kv_cache_dtype!r} is not supported; "
                             f"expected one of {', '.join(KV_CACHE_DTYPES)}")
        if self.weights not in WEIGHT_SCHEMES:
            raise ValueError(f"weights {self.weights!r} is not supported; "
                             f"expected one of {', '.join(WEIGHT_SCHEMES)}")
        if self.spec.enabled and self.tp_size > 1:
            raise ValueError("speculative decoding (spec) does not run with tp_size > 1 yet")
        if self.weights == "bf16" and self.dtype != "bfloat16":
            raise ValueError(f"weights 'bf16' needs dtype 'bfloat16' (got dtype {self.dtype!r})")

    @property
    def resolved_kv_cache_dtype(self) -> str:
        """The KV cache's logical dtype: kv_cache_dtype, with "auto" meaning the compute dtype."""
        return self.dtype if self.kv_cache_dtype == "auto" else self.kv_cache_dtype
