"""Engine configuration: frozen dataclasses built once and validated at startup.

Flag names follow vLLM where the concept is the same. An unsupported value
or combination raises ValueError naming the flag.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used: building the CLI parser (bench, trace) needs none
    import torch

# --dtype names -> torch dtype attribute names
_DTYPES = {"float32": "float32", "float": "float32", "bfloat16": "bfloat16", "float16": "float16", "half": "float16"}
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")


def resolve_dtype(dtype: str | torch.dtype, hf_config: Any, device: torch.device) -> torch.dtype:
    """--dtype auto: on GPU the checkpoint's float16 or bfloat16, else bfloat16 (float32 checkpoints too, as
    vLLM); float32 on CPU."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        declared = getattr(hf_config, "torch_dtype", None) or getattr(hf_config, "dtype", None)
        if isinstance(declared, str):
            declared = getattr(torch, _DTYPES.get(declared, ""), None)
        return declared if declared in (torch.float16, torch.bfloat16) else torch.bfloat16
    if dtype not in _DTYPES:
        raise ValueError(f"--dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}")
    return getattr(torch, _DTYPES[dtype])


def _cpu() -> torch.device:
    import torch

    return torch.device("cpu")


def kv_cache_geometry(hf_config) -> tuple[int, int]:
    """(KV heads, width of one cached entry) of a model. Multi-head latent attention
    (DeepSeek-V2) caches one compressed entry per token: the latent plus the rotary part."""
    c = hf_config
    if getattr(c, "kv_lora_rank", None):
        return 1, c.kv_lora_rank + c.qk_rope_head_dim
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return heads, getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


@dataclass(frozen=True)
class ModelConfig:
    model: str  # a Hugging Face folder or a .gguf file
    hf_config: Any  # transformers.PretrainedConfig
    dtype: torch.dtype
    load_format: str
    max_model_len: int
    tokenizer: str | None = None
    seed: int = 0
    generation_config: str = "auto"  # where default sampling parameters come from (generation_defaults)
    max_logprobs: int = 20  # most top-n logprobs a request may ask for; -1: the vocabulary

    def sampling_defaults(self) -> dict[str, Any]:
        from braid.generation_defaults import load_sampling_defaults

        return load_sampling_defaults(self.model, self.generation_config)

    @property
    def num_layers(self) -> int:
        return self.hf_config.num_hidden_layers

    @property
    def is_mla(self) -> bool:
        """Multi-head latent attention (DeepSeek-V2): one compressed cache entry per token."""
        return bool(getattr(self.hf_config, "kv_lora_rank", None))

    @property
    def num_kv_heads(self) -> int:
        return kv_cache_geometry(self.hf_config)[0]

    @property
    def head_dim(self) -> int:
        """Width of one cached K (and V) entry."""
        return kv_cache_geometry(self.hf_config)[1]

    @property
    def vocab_size(self) -> int:
        return self.hf_config.vocab_size


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_memory: int | None = None  # bytes; CPU default is 2 GiB
    enable_prefix_caching: bool = True
    num_gpu_blocks_override: int | None = None

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"--block-size must be a power of two, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"--kv-cache-memory must be positive, got {self.kv_cache_memory}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ValueError(f"--num-gpu-blocks-override must be >= 1, got {self.num_gpu_blocks_override}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 8192
    enable_chunked_prefill: bool = True
    # A prefill longer than this is cut into chunks even when budget remains
    # (0: only the token budget limits it).
    long_prefill_token_threshold: int = 0
    # Schedule and launch step t+1 while step t runs on the device (two batches in flight).
    async_scheduling: bool = False
    # Decode-only batches run this many forward passes per schedule, with no host sync between.
    num_scheduler_steps: int = 1
    # Report each of those passes' tokens as they land (else all at the end of the run).
    multi_step_stream_outputs: bool = True
    # Pipeline parallelism: a request whose step is still in the pipeline is not scheduled
    # again (its next input is only known when its token comes back), and the running
    # requests are spread over this many micro-batches.
    pipeline_parallel_size: int = 1
    # Batches launched and not yet reported (None: one per pipeline stage, one more with
    # async scheduling). 1 with pipeline parallelism runs one batch through the stages at
    # a time: the baseline that micro-batching is measured against.
    max_concurrent_batches: int | None = None

    def __post_init__(self) -> None:
        if self.max_concurrent_batches is not None and self.max_concurrent_batches < 1:
            raise ValueError(f"--max-concurrent-batches must be >= 1, got {self.max_concurrent_batches}")
        if self.max_num_seqs < 1:
            raise ValueError(f"--max-num-seqs must be >= 1, got {self.max_num_seqs}")
        if not isinstance(self.num_scheduler_steps, int) or self.num_scheduler_steps < 1:
            raise ValueError(f"--num-scheduler-steps must be an integer >= 1, got {self.num_scheduler_steps!r}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"--max-num-batched-tokens must be >= 1, got {self.max_num_batched_tokens}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"--max-num-batched-tokens ({self.max_num_batched_tokens}) must be >= --max-model-len "
                f"({self.max_model_len}) when chunked prefill is off (--no-enable-chunked-prefill)"
            )

    @property
    def batches_in_flight(self) -> int:
        return self.max_concurrent_batches or self.pipeline_parallel_size + int(self.async_scheduling)

    @property
    def interleaves_passes(self) -> bool:
        """Multi-step under pipeline parallelism: the engine core launches a batch's further
        passes one at a time, between other micro-batches' (worker/multi_step_passes.py)."""
        return self.pipeline_parallel_size > 1 and self.num_scheduler_steps > 1

    @property
    def num_micro_batches(self) -> int:
        """How many ways the running requests are split under pipeline parallelism: one share
        per stage by default (async scheduling's extra slot gets none: more shares mean smaller
        batches, and a weight-bound stage reads its weights once per batch), or one per batch
        slot when --max-concurrent-batches asks for more slots than stages: a share's next
        pass waits for its tokens to come back round the pipeline, and the extra shares keep
        the stages busy meanwhile (worth it where passes are short, e.g. an 8B model)."""
        if self.pipeline_parallel_size == 1:
            return 1
        if self.max_concurrent_batches is not None:
            return self.max_concurrent_batches
        return min(self.pipeline_parallel_size, self.batches_in_flight)

    @property
    def max_running_seqs(self) -> int:
        """--max-num-seqs caps one batch; with micro-batches in the pipeline up to that many
        per stage run (vLLM's per-iteration meaning of the flag), so the stages are not left
        reading their weights for half-size batches. Slots beyond one per stage add none."""
        return self.max_num_seqs * max(1, min(self.pipeline_parallel_size, self.batches_in_flight))


@dataclass(frozen=True)
class DeviceConfig:
    device: torch.device = field(default_factory=_cpu)
    attention_backend: str = "torch"  # resolved: 'torch' or 'triton'
    enforce_eager: bool = False  # no CUDA graphs


@dataclass(frozen=True)
class OverlapConfig:
    """Dual-batch overlap: a step of at least the threshold's tokens runs as two micro-batches
    whose communication and compute overlap."""
    enable_dbo: bool = False
    dbo_decode_token_threshold: int = 32
    dbo_prefill_token_threshold: int = 512
    dbo_policy: str = "threshold"

    def __post_init__(self) -> None:
        if self.dbo_policy not in ("threshold", "auto"):
            raise ValueError(f"--dbo-policy must be threshold or auto, got {self.dbo_policy!r}")
        for flag, value in (("--dbo-decode-token-threshold", self.dbo_decode_token_threshold),
                            ("--dbo-prefill-token-threshold", self.dbo_prefill_token_threshold)):
            if value < 2:
                raise ValueError(f"{flag} must be >= 2 (a split needs a token on each side), got {value}")


ALL2ALL_BACKENDS = ("allgather_reducescatter", "all_to_all")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # "uni" (one device, in process), "mp" (one worker process per rank) or "ray" (one Ray actor per rank).
    distributed_executor_backend: str = "uni"
    # Layers per pipeline stage (None: an even split).
    pp_layer_partition: tuple[int, ...] | None = None
    # MoE experts sharded whole over the EP group (DP x TP ranks), tokens moved by all-to-all.
    enable_expert_parallel: bool = False
    # Model replicas, each with its own scheduler and KV cache, stepping together.
    data_parallel_size: int = 1
    # How expert parallelism moves tokens: "allgather_reducescatter" (every rank gathers all
    # ranks' tokens, padded to one size: static shapes, CUDA graphs) or "all_to_all" (each
    # pair to its expert's rank only; sizes from the host, eager).
    all2all_backend: str = "allgather_reducescatter"

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"--tensor-parallel-size must be >= 1, got {self.tensor_parallel_size}")
        if self.pipeline_parallel_size < 1:
            raise ValueError(f"--pipeline-parallel-size must be >= 1, got {self.pipeline_parallel_size}")
        if self.data_parallel_size < 1:
            raise ValueError(f"--data-parallel-size must be >= 1, got {self.data_parallel_size}")
        if self.all2all_backend not in ALL2ALL_BACKENDS:
            raise ValueError(f"--all2all-backend must be one of {', '.join(ALL2ALL_BACKENDS)}, "
                             f"got {self.all2all_backend!r}")
        if self.distributed_executor_backend not in ("uni", "mp", "ray"):
            raise ValueError(f"--distributed-executor-backend must be uni, mp or ray, "
                             f"got {self.distributed_executor_backend!r}")
        partition = self.pp_layer_partition
        if partition is not None and (len(partition) != self.pipeline_parallel_size or min(partition) < 1):
            raise ValueError(f"--pp-layer-partition {','.join(map(str, partition))} must give one layer count "
                             f"(>= 1) per stage of --pipeline-parallel-size {self.pipeline_parallel_size}")
        if self.world_size > 1 and self.distributed_executor_backend == "uni":
            raise ValueError("--distributed-executor-backend uni runs one device; use mp or ray for "
                             f"--tensor-parallel-size {self.tensor_parallel_size} x "
                             f"--pipeline-parallel-size {self.pipeline_parallel_size} x "
                             f"--data-parallel-size {self.data_parallel_size}")

    @property
    def output_rank(self) -> int:
        """The rank that reports sampled tokens: the last pipeline stage's first TP rank."""
        return (self.pipeline_parallel_size - 1) * self.tensor_parallel_size

    @property
    def output_ranks(self) -> list[int]:
        """Each DP replica's output rank, by DP rank."""
        replica = self.tensor_parallel_size * self.pipeline_parallel_size
        return [d * replica + self.output_rank for d in range(self.data_parallel_size)]

    @property
    def world_size(self) -> int:
        return self.data_parallel_size * self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    device: DeviceConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    overlap: OverlapConfig = field(default_factory=OverlapConfig)
    # Write a Chrome/Perfetto step timeline here (None: tracing off, at no cost).
    trace_dir: str | None = None
