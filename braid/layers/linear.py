"""Linear layers sharded for tensor parallelism (Megatron style).

Each layer holds only its TP rank's shard, and each parameter carries a
`weight_loader(param, loaded_weight, shard_id=None)` that copies the rank's
slice of a full checkpoint tensor into it. With one TP rank the shard is the
whole tensor.

- ColumnParallelLinear: output features split over ranks; no communication.
- RowParallelLinear: input features split; partial outputs summed with
  `tensor_model_parallel_all_reduce` (identity for tp=1); bias added once (rank 0).
- QKVParallelLinear: fused q/k/v projection (shard ids "q", "k", "v"); KV heads
  are replicated when there are fewer of them than ranks.
- MergedColumnParallelLinear: several column projections fused along the
  output (gate/up: shard ids 0 and 1).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from braid.distributed.comm import tensor_model_parallel_all_gather, tensor_model_parallel_all_reduce
from braid.distributed.parallel_state import get_tp_rank, get_tp_size


def divide(numerator: int, denominator: int) -> int:
    if numerator % denominator:
        raise ValueError(f"{numerator} is not divisible by the tensor-parallel size {denominator}")
    return numerator // denominator


def _check_shape(param: torch.Tensor, loaded: torch.Tensor, what: str) -> None:
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(f"shape mismatch loading {what}: parameter shard {tuple(param.shape)}, checkpoint slice {tuple(loaded.shape)}")


def check_full_shape(loaded: torch.Tensor, expected: tuple, what: str) -> None:
    """The whole checkpoint tensor, before any slicing: a larger one would otherwise be cut
    down to the rows this rank reads and load without a word."""
    if tuple(loaded.shape) != tuple(expected):
        raise ValueError(f"shape mismatch loading {what}: the model's config gives {tuple(expected)}, "
                         f"the checkpoint has {tuple(loaded.shape)}")


def _copy(param: torch.Tensor, loaded: torch.Tensor, what: str) -> None:
    _check_shape(param, loaded, what)
    with torch.no_grad():
        param.copy_(loaded)


# Decode-size GEMMs (a few token rows against a large weight) run braid's Triton
# skinny GEMM on CUDA: it reads weights ~3-9% faster than cuBLAS at these sizes
# (benchmarks/skinny_gemm.py). BRAID_SKINNY_GEMM=0 keeps cuBLAS everywhere.
SKINNY_MAX_ROWS = 64
SKINNY_MIN_WEIGHT_ELEMENTS = 1 << 22  # below ~8 MB a GEMM is launch-bound either way
_SKINNY_ENABLED = os.environ.get("BRAID_SKINNY_GEMM", "1") != "0"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with the Triton skinny GEMM for few rows on CUDA."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (_SKINNY_ENABLED and x.is_cuda and 0 < rows <= SKINNY_MAX_ROWS and weight.numel() >= SKINNY_MIN_WEIGHT_ELEMENTS
            and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype and weight.is_contiguous()
            and (bias is None or bias.dtype == x.dtype)):
        from braid.layers.triton_ops.skinny_gemm import config_for_rows, skinny_gemm

        y = skinny_gemm(x.reshape(rows, x.shape[-1]), weight, bias, config_for_rows(rows))
        return y.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class LinearBase(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool, tp_dim: int | None) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.tp_rank = get_tp_rank()
        self.tp_size = get_tp_size()
        self.tp_dim = tp_dim  # dimension of the weight that is split: 0 (output), 1 (input), None (replicated)

    def _make_params(self, out_features: int, in_features: int, bias: bool) -> None:
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, tp_size={self.tp_size}, bias={self.bias is not None}"


class ReplicatedLinear(LinearBase):
    """The full weight on every rank."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__(input_size, output_size, bias, tp_dim=None)
        self._make_params(output_size, input_size, bias)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        _copy(param, loaded_weight, type(self).__name__)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class ColumnParallelLinear(LinearBase):
    """y = x A^T + b with A split along its output rows: rank r holds rows
    [r * out/tp, (r+1) * out/tp). gather_output=True all-gathers the full y."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, gather_output: bool = False) -> None:
        super().__init__(input_size, output_size, bias, tp_dim=0)
        self.gather_output = gather_output
        self.output_size_per_partition = divide(output_size, self.tp_size)
        self._make_params(self.output_size_per_partition, input_size, bias)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        size = param.shape[0]
        check_full_shape(loaded_weight, (size * self.tp_size, *param.shape[1:]), type(self).__name__)
        _copy(param, loaded_weight.narrow(0, self.tp_rank * size, size), type(self).__name__)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.bias)
        if self.gather_output:
            y = tensor_model_parallel_all_gather(y, dim=-1)
        return y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input fused into one
    matmul; shard_id i loads the i-th (e.g. 0 = gate_proj, 1 = up_proj).
    Each rank holds its slice of every part, parts concatenated."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False, gather_output: bool = False) -> None:
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias, gather_output)
        for size in self.output_sizes:
            divide(size, self.tp_size)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if shard_id is None:  # an already fused checkpoint tensor: split it into its parts
            check_full_shape(loaded_weight, (sum(self.output_sizes), *param.shape[1:]), "MergedColumnParallelLinear")
            offset = 0
            for i, size in enumerate(self.output_sizes):
                self.weight_loader(param, loaded_weight.narrow(0, offset, size), i)
                offset += size
            return
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"MergedColumnParallelLinear: shard_id must be in 0..{len(self.output_sizes) - 1}, got {shard_id!r}")
        check_full_shape(loaded_weight, (self.output_sizes[shard_id], *param.shape[1:]),
                          f"MergedColumnParallelLinear shard {shard_id}")
        shard_size = self.output_sizes[shard_id] // self.tp_size
        shard_offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        src = loaded_weight.narrow(0, self.tp_rank * shard_size, shard_size)
        _copy(param.data.narrow(0, shard_offset, shard_size), src, f"MergedColumnParallelLinear shard {shard_id}")


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection. Output layout per rank: [q heads | k heads | v heads].

    Query heads are split over ranks; KV heads too, or replicated (each rank
    keeps the one KV head its query heads use) when tp_size > num_kv_heads.
    """

    def __init__(
        self,
        hidden_size: int,
        head_size: int,
        total_num_heads: int,
        total_num_kv_heads: int | None = None,
        bias: bool = False,
    ) -> None:
        total_num_kv_heads = total_num_kv_heads or total_num_heads
        tp_size = get_tp_size()
        self.head_size = head_size
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads
        self.num_heads = divide(total_num_heads, tp_size)
        if tp_size >= total_num_kv_heads:
            self.num_kv_heads = 1
            self.num_kv_head_replicas = divide(tp_size, total_num_kv_heads)
        else:
            self.num_kv_heads = divide(total_num_kv_heads, tp_size)
            self.num_kv_head_replicas = 1
        output_size = (self.num_heads + 2 * self.num_kv_heads) * tp_size * head_size
        super().__init__(hidden_size, output_size, bias, gather_output=False)
        self.q_size = self.num_heads * head_size
        self.kv_size = self.num_kv_heads * head_size

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if shard_id is None:  # an already fused qkv checkpoint tensor
            q = self.total_num_heads * self.head_size
            kv = self.total_num_kv_heads * self.head_size
            check_full_shape(loaded_weight, (q + 2 * kv, *param.shape[1:]), "QKVParallelLinear")
            self.weight_loader(param, loaded_weight.narrow(0, 0, q), "q")
            self.weight_loader(param, loaded_weight.narrow(0, q, kv), "k")
            self.weight_loader(param, loaded_weight.narrow(0, q + kv, kv), "v")
            return
        if shard_id == "q":
            offset, size, rank = 0, self.q_size, self.tp_rank
        elif shard_id == "k":
            offset, size, rank = self.q_size, self.kv_size, self.tp_rank // self.num_kv_head_replicas
        elif shard_id == "v":
            offset, size, rank = self.q_size + self.kv_size, self.kv_size, self.tp_rank // self.num_kv_head_replicas
        else:
            raise ValueError(f"QKVParallelLinear: shard_id must be 'q', 'k' or 'v', got {shard_id!r}")
        heads = self.total_num_heads if shard_id == "q" else self.total_num_kv_heads
        check_full_shape(loaded_weight, (heads * self.head_size, *param.shape[1:]), f"QKVParallelLinear shard {shard_id}")
        src = loaded_weight.narrow(0, rank * size, size)
        _copy(param.data.narrow(0, offset, size), src, f"QKVParallelLinear shard {shard_id}")


class RowParallelLinear(LinearBase):
    """y = x A^T + b with A split along its input columns; x arrives already
    split (the output of a column-parallel layer). Partial products are summed
    over ranks by tensor_model_parallel_all_reduce; the bias is added once (rank 0)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, reduce_results: bool = True) -> None:
        super().__init__(input_size, output_size, bias, tp_dim=1)
        self.reduce_results = reduce_results
        self.input_size_per_partition = divide(input_size, self.tp_size)
        self._make_params(output_size, self.input_size_per_partition, bias)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if param.dim() == 1:  # bias: not split
            _copy(param, loaded_weight, "RowParallelLinear bias")
            return
        size = param.shape[1]
        check_full_shape(loaded_weight, (param.shape[0], size * self.tp_size), "RowParallelLinear")
        _copy(param, loaded_weight.narrow(1, self.tp_rank * size, size), "RowParallelLinear")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The bias joins on rank 0 only, so the sum over ranks adds it once.
        y = linear(x, self.weight, self.bias if self.tp_rank == 0 else None)
        if self.reduce_results and self.tp_size > 1:
            y = tensor_model_parallel_all_reduce(y)
        return y
