"""Engine arguments: one dataclass, its CLI flags (vLLM's names), and the validated EngineConfig."""
from __future__ import annotations

import argparse
import logging
import operator
import re
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from braid.config import (
    LOAD_FORMATS,
    CacheConfig,
    DeviceConfig,
    OverlapConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    resolve_dtype,
)

if TYPE_CHECKING:  # imported where used: `braid bench` and `braid trace` build this parser without torch
    import torch

logger = logging.getLogger(__name__)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'2GiB', '512MB', '1e9'-free plain bytes -> bytes (binary units either way)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"--kv-cache-memory must be a size like 2GiB or 512MiB, got {text!r}")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


@dataclass
class EngineArgs:
    model: str | None = None
    tokenizer: str | None = None
    generation_config: str = "auto"
    max_logprobs: int = 20
    dtype: str = "auto"
    load_format: str = "auto"
    max_model_len: int | None = None
    seed: int | None = 0
    device: str = "auto"
    attention_backend: str = "auto"
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_memory: str | int | None = None
    enable_prefix_caching: bool = True
    num_gpu_blocks_override: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int = 0
    enforce_eager: bool = False
    async_scheduling: bool = False
    num_scheduler_steps: int = 1
    multi_step_stream_outputs: bool = True
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    max_concurrent_batches: int | None = None
    pp_layer_partition: str | None = None
    enable_expert_parallel: bool = False
    all2all_backend: str = "allgather_reducescatter"
    data_parallel_size: int = 1
    enable_dbo: bool = False
    dbo_decode_token_threshold: int = 32
    dbo_prefill_token_threshold: int = 512
    dbo_policy: str = "threshold"
    distributed_executor_backend: str | None = None
    trace_dir: str | None = None

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser, model_positional: bool = True) -> argparse.ArgumentParser:
        if model_positional:
            parser.add_argument("model", nargs="?", default=None,
                                help="Hugging Face folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
        else:
            parser.add_argument("--model", default=None, help="Hugging Face folder or .gguf file")
        parser.add_argument("--tokenizer", default=None)
        parser.add_argument("--generation-config", default="auto",
                            help="default sampling parameters of requests that leave them unset: 'auto' (the "
                                 "model folder's generation_config.json), 'vllm' (library defaults), or a folder")
        parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float", "bfloat16", "float16", "half"])
        parser.add_argument("--load-format", default="auto", choices=list(LOAD_FORMATS))
        parser.add_argument("--max-logprobs", type=int, default=20,
                            help="most logprobs / prompt_logprobs a request may ask for (-1: the vocabulary)")
        parser.add_argument("--max-model-len", type=int, default=None)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        parser.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"])
        parser.add_argument("--block-size", type=int, default=16)
        parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
        parser.add_argument("--kv-cache-memory", default=None,
                            help="KV cache size, e.g. 2GiB (default on CPU: 2GiB; on GPU: from --gpu-memory-utilization)")
        parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
        parser.add_argument("--num-gpu-blocks-override", type=int, default=None)
        parser.add_argument("--max-num-seqs", type=int, default=256)
        parser.add_argument("--max-num-batched-tokens", type=int, default=None)
        parser.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True)
        parser.add_argument("--long-prefill-token-threshold", type=int, default=0)
        parser.add_argument("--enforce-eager", action="store_true",
                            help="run every step eagerly (no CUDA graphs for decode batches)")
        parser.add_argument("--async-scheduling", action="store_true",
                            help="schedule and launch the next step while the current one runs on the device")
        parser.add_argument("--num-scheduler-steps", type=int, default=1,
                            help="decode-only batches run N forward passes per schedule without a host sync")
        parser.add_argument("--multi-step-stream-outputs", action=argparse.BooleanOptionalAction, default=True,
                            help="with --num-scheduler-steps: report each pass's tokens as they land")
        parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
        parser.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
        parser.add_argument("--enable-dbo", action="store_true",
                            help="dual-batch overlap: run large steps as two micro-batches whose collectives "
                                 "overlap the other's compute")
        parser.add_argument("--dbo-decode-token-threshold", type=int, default=32)
        parser.add_argument("--dbo-prefill-token-threshold", type=int, default=512)
        parser.add_argument("--dbo-policy", default="threshold", choices=["threshold", "auto"],
                            help="threshold: split every step at or above the thresholds; auto: also time steps "
                                 "whole and split at start-up and split only sizes where that was faster")
        parser.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                            help="model replicas, each with its own scheduler and KV cache, stepping together "
                                 "(MoE layers exchange tokens between them with --enable-expert-parallel)")
        parser.add_argument("--enable-expert-parallel", action="store_true",
                            help="MoE models: shard whole experts over the ranks and move tokens to them "
                                 "(instead of slicing every expert)")
        parser.add_argument("--all2all-backend", default="allgather_reducescatter",
                            choices=["allgather_reducescatter", "all_to_all"],
                            help="expert parallelism's token exchange: allgather_reducescatter (static shapes, "
                                 "CUDA graphs) or all_to_all (each token only to its experts' ranks; eager)")
        parser.add_argument("--pp-layer-partition", default=None,
                            help="layers per pipeline stage, comma separated, e.g. 15,17 (default: even)")
        parser.add_argument("--max-concurrent-batches", type=int, default=None,
                            help="batches launched and not yet reported (default: --pipeline-parallel-size, "
                                 "+1 with --async-scheduling); above the stage count, also how many ways the "
                                 "running requests split")
        parser.add_argument("--distributed-executor-backend", default=None, choices=["uni", "mp", "ray"],
                            help="uni: one device in process; mp: one worker process per rank; ray: one Ray "
                                 "actor per rank, on the Ray cluster at RAY_ADDRESS or a local one "
                                 "(default: mp when more than one rank)")
        parser.add_argument("--trace-dir", default=None,
                            help="write a Chrome/Perfetto timeline of engine steps here; read it with "
                                 "`braid trace summarize DIR`")
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "EngineArgs":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})

    def _parallel_config(self) -> ParallelConfig:
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            value = getattr(self, name)
            try:
                if isinstance(value, bool):
                    raise TypeError
                setattr(self, name, operator.index(value))  # ints, numpy ints; not "2", 2.0 or True
            except TypeError:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer, got {value!r}") from None
        world = self.tensor_parallel_size * self.pipeline_parallel_size * max(1, self.data_parallel_size)
        backend = self.distributed_executor_backend or ("mp" if world > 1 else "uni")
        partition = None
        if self.pp_layer_partition:
            try:
                partition = tuple(int(x) for x in str(self.pp_layer_partition).split(","))
            except ValueError:
                raise ValueError(f"--pp-layer-partition must be comma-separated layer counts, e.g. 15,17; "
                                 f"got {self.pp_layer_partition!r}") from None
        return ParallelConfig(self.tensor_parallel_size, self.pipeline_parallel_size, backend, partition,
                              self.enable_expert_parallel, self.data_parallel_size, self.all2all_backend)

    def _device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was given, but no CUDA device is available")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda; got {self.device!r}")
        return torch.device("cuda", 0) if self.device == "cuda" else torch.device("cpu")

    def _seed(self) -> int:
        """--seed: an integer in [0, 2**63); None draws one (every rank then shares it)."""
        if self.seed is None:
            import secrets

            seed = secrets.randbits(32)
            logger.info("--seed not set: using %d", seed)
            return seed
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"--seed must be an integer in [0, 2**63) or None, got {self.seed!r}")
        return self.seed

    def create_engine_config(self) -> EngineConfig:
        import torch

        from braid.transformers_utils import load_hf_config, resolve_model_path

        from braid.generation_defaults import validate_generation_config

        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"--load-format must be one of {', '.join(LOAD_FORMATS)}; got {self.load_format!r}")
        validate_generation_config(self.generation_config)
        seed = self._seed()
        if self.max_logprobs < -1:
            raise ValueError(f"--max-logprobs must be -1 (no cap) or >= 0, got {self.max_logprobs}")
        model_path = resolve_model_path(self.model)
        hf_config = load_hf_config(model_path)
        device = self._device()
        dtype = resolve_dtype(self.dtype, hf_config, device)

        max_pos = getattr(hf_config, "max_position_embeddings", None) or 2048
        max_model_len = max_pos if self.max_model_len is None else self.max_model_len
        if max_model_len < 2:
            raise ValueError(f"--max-model-len must be >= 2, got {max_model_len}")
        if max_model_len > max_pos:
            raise ValueError(f"--max-model-len ({max_model_len}) exceeds the model's max_position_embeddings ({max_pos})")

        parallel = self._parallel_config()
        tp, pp = self.tensor_parallel_size, self.pipeline_parallel_size
        if pp > hf_config.num_hidden_layers:
            raise ValueError(f"--pipeline-parallel-size {pp} exceeds the model's {hf_config.num_hidden_layers} layers")
        if parallel.pp_layer_partition and sum(parallel.pp_layer_partition) != hf_config.num_hidden_layers:
            raise ValueError(f"--pp-layer-partition {self.pp_layer_partition} must sum to the model's "
                             f"{hf_config.num_hidden_layers} layers")
        dp = self.data_parallel_size
        if dp > 1:
            if pp > 1:
                raise ValueError(f"--data-parallel-size {dp} with --pipeline-parallel-size is not supported yet")
        if self.enable_expert_parallel:
            from braid.models.moe_weights import num_experts_of

            experts = num_experts_of(hf_config)
            if not experts:
                raise ValueError("--enable-expert-parallel needs a mixture-of-experts model")
            if experts % (dp * tp):
                raise ValueError(f"--enable-expert-parallel: the expert-parallel size {dp * tp} (data x tensor "
                                 f"parallel) must divide the model's {experts} experts")
        if self.enable_dbo and pp > 1:
            raise ValueError("--enable-dbo with --pipeline-parallel-size > 1 is not supported yet")
        if tp > 1:
            _check_tensor_parallel_shapes(hf_config, tp, self.enable_expert_parallel)
        if device.type == "cuda" and parallel.distributed_executor_backend == "mp" and parallel.world_size > torch.cuda.device_count():
            raise ValueError(f"--tensor-parallel-size x --pipeline-parallel-size x --data-parallel-size = "
                             f"{parallel.world_size} GPUs, but this host has {torch.cuda.device_count()}")

        backend = self.attention_backend
        if backend == "auto":
            backend = "triton" if device.type == "cuda" else "torch"
        if backend not in ("torch", "triton"):
            raise ValueError(f"--attention-backend must be auto, torch or triton; got {backend!r}")

        batched = self.max_num_batched_tokens
        if batched is None:
            batched = 8192 if device.type == "cuda" else 2048
            if not self.enable_chunked_prefill:
                batched = max(batched, max_model_len)
        return EngineConfig(
            model=ModelConfig(
                model=model_path,
                hf_config=hf_config,
                dtype=dtype,
                load_format=self.load_format,
                max_model_len=max_model_len,
                tokenizer=self.tokenizer,
                seed=seed,
                generation_config=self.generation_config,
                max_logprobs=self.max_logprobs,
            ),
            cache=CacheConfig(
                block_size=self.block_size,
                gpu_memory_utilization=self.gpu_memory_utilization,
                kv_cache_memory=parse_size(self.kv_cache_memory) if self.kv_cache_memory is not None else None,
                enable_prefix_caching=self.enable_prefix_caching,
                num_gpu_blocks_override=self.num_gpu_blocks_override,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=self.max_num_seqs,
                max_num_batched_tokens=batched,
                max_model_len=max_model_len,
                enable_chunked_prefill=self.enable_chunked_prefill,
                long_prefill_token_threshold=self.long_prefill_token_threshold,
                async_scheduling=self.async_scheduling,
                num_scheduler_steps=self.num_scheduler_steps,
                multi_step_stream_outputs=self.multi_step_stream_outputs,
                pipeline_parallel_size=pp,
                max_concurrent_batches=self.max_concurrent_batches,
            ),
            device=DeviceConfig(device=device, attention_backend=backend, enforce_eager=self.enforce_eager),
            parallel=parallel,
            overlap=OverlapConfig(self.enable_dbo, self.dbo_decode_token_threshold,
                                  self.dbo_prefill_token_threshold, self.dbo_policy),
            trace_dir=self.trace_dir,
        )


def _check_tensor_parallel_shapes(hf_config, tp: int, expert_parallel: bool) -> None:
    """Every width tensor parallelism splits must split evenly (or, for KV heads, be replicated
    evenly); otherwise the workers would fail building the model, naming no flag."""
    def need_divides(name: str, value) -> None:
        if value is not None and value % tp:
            raise ValueError(f"--tensor-parallel-size {tp} must divide the model's {name} ({value})")

    need_divides("num_attention_heads", getattr(hf_config, "num_attention_heads", None))
    need_divides("intermediate_size", getattr(hf_config, "intermediate_size", None))
    kv = getattr(hf_config, "num_key_value_heads", None)
    latent_kv = getattr(hf_config, "kv_lora_rank", None)  # MLA: one shared latent, no KV heads to split
    if kv and not latent_kv and kv % tp and tp % kv:
        raise ValueError(f"--tensor-parallel-size {tp} must divide the model's num_key_value_heads ({kv}), "
                         f"or be a multiple of it (the KV heads are then replicated)")
    moe_inter = getattr(hf_config, "moe_intermediate_size", None)
    if moe_inter is not None:
        if not expert_parallel:  # with expert parallelism, experts stay whole
            need_divides("moe_intermediate_size", moe_inter)
        shared = getattr(hf_config, "n_shared_experts", 0) or 0
        if shared:  # shared experts are one tensor-parallel MLP of this width, expert parallel or not
            need_divides("moe_intermediate_size x n_shared_experts", moe_inter * shared)
