"""FusedMoE: a layer's experts as two stacked weights, w13 [E, 2I, H] (each expert's
gate rows, then its up rows) and w2 [E, H, I], run by the fused Triton kernel on CUDA
and by the torch reference elsewhere.

Tensor parallelism: every rank holds every expert's slice of the intermediate
dimension and the outputs are summed (all-reduce), as for a row-parallel MLP.

Expert parallelism (--enable-expert-parallel): rank r of the EP group holds experts
[r*E/ep, (r+1)*E/ep) whole. The TP ranks of a replica hold the same tokens, so each
takes its slice of them and exchanges it over the EP group (dispatch.py: all-gather +
reduce-scatter, every replica padded to the step's agreed token count, or all-to-all);
an all-gather over the TP group puts the token slices together again."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from braid.distributed.comm import overlapped, tensor_model_parallel_all_gather, tensor_model_parallel_all_reduce
from braid.distributed.parallel_state import get_ep_group, get_layout, get_tp_rank, get_tp_size
from braid.forward_context import dp_padded_tokens, layer_span
from braid.layers.activation import require_silu
from braid.layers.linear import check_full_shape, divide
from braid.layers.moe.fused_moe_ref import fused_experts_ref
from braid.layers.moe.routing import softmax_topk


def fused_experts(x, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    if x.is_cuda:
        from braid.layers.moe.fused_moe_kernel import fused_experts_triton  # triton only where CUDA is

        return fused_experts_triton(x, w13, w2, topk_weights, topk_ids)
    return fused_experts_ref(x, w13, w2, topk_weights, topk_ids)


class FusedMoE(nn.Module):
    # Checkpoint shard ids: gate (w1) and up (w3) rows of w13, down (w2).
    SHARDS = {"w13_weight": ("w1", "w3"), "w2_weight": ("w2",)}

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 renormalize: bool = True, route: Callable | None = None, hidden_act: str = "silu") -> None:
        super().__init__()
        require_silu(hidden_act, "the experts")  # the fused kernels compute SiLU(gate) * up
        self.hidden_size = hidden_size
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.route = route or (lambda logits: softmax_topk(logits, top_k, renormalize))
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        layout = get_layout()
        self.ep_size = layout.ep_size if layout.expert_parallel else 1
        if self.ep_size > 1:
            if num_experts % self.ep_size:
                raise ValueError(f"--enable-expert-parallel: {self.ep_size} ranks do not divide {num_experts} experts")
            from braid.layers.moe.dispatch import AllGatherDispatcher, AllToAllDispatcher

            local = num_experts // self.ep_size
            self.first_expert = layout.ep_rank * local
            self.inter = intermediate_size  # whole experts: no slicing
            self.gather_all = layout.all2all_backend == "allgather_reducescatter"
            self.dispatcher = (AllGatherDispatcher(get_ep_group(), self.ep_size, self.first_expert)
                               if self.gather_all else AllToAllDispatcher(get_ep_group(), self.ep_size, local))
        else:
            local, self.first_expert = num_experts, 0
            self.inter = divide(intermediate_size, self.tp_size)
        self.num_local_experts = local
        self.w13_weight = nn.Parameter(torch.empty(local, 2 * self.inter, hidden_size), requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(local, hidden_size, self.inter), requires_grad=False)
        for name in self.SHARDS:
            param = getattr(self, name)
            param.weight_loader = self.weight_loader
            param.expected_shards = {(shard, e) for shard in self.SHARDS[name] for e in range(num_experts)}

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str, expert_id: int) -> None:
        """Copy this rank's slice of one expert's HF tensor: gate/up [I, H] rows, down [H, I] columns
        (whole tensors under expert parallelism, where other ranks' experts are skipped)."""
        expert_id -= self.first_expert
        if not 0 <= expert_id < self.num_local_experts:
            return  # another EP rank's expert
        if self.ep_size > 1:
            lo, hi = 0, self.inter
        else:
            lo, hi = self.tp_rank * self.inter, (self.tp_rank + 1) * self.inter
        full_inter = self.inter if self.ep_size > 1 else self.inter * self.tp_size
        what = f"expert {expert_id + self.first_expert} {shard_id}"
        if shard_id in ("w1", "w3"):
            check_full_shape(loaded, (full_inter, self.hidden_size), what)
            part = loaded[lo:hi]
            dst = param[expert_id, : self.inter] if shard_id == "w1" else param[expert_id, self.inter:]
        elif shard_id == "w2":
            check_full_shape(loaded, (self.hidden_size, full_inter), what)
            part, dst = loaded[:, lo:hi], param[expert_id]
        else:
            raise ValueError(f"unknown expert shard {shard_id!r}")
        if tuple(part.shape) != tuple(dst.shape):
            raise ValueError(f"shape mismatch loading expert {expert_id} {shard_id}: parameter slice "
                             f"{tuple(dst.shape)}, checkpoint slice {tuple(part.shape)}")
        with torch.no_grad():
            dst.copy_(part)

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        if self.ep_size > 1:
            return self._forward_expert_parallel(hidden_states, router_logits)
        topk_weights, topk_ids = self.route(router_logits)
        with layer_span("moe_experts"):
            out = fused_experts(hidden_states, self.w13_weight, self.w2_weight, topk_weights, topk_ids)
        if self.tp_size == 1:
            return out
        with layer_span("moe_all_reduce"):
            return tensor_model_parallel_all_reduce(out)

    def _forward_expert_parallel(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        num_tokens = x.shape[0]
        # Every replica's count this step (the all-gather needs one size on every EP rank).
        padded = dp_padded_tokens() or num_tokens
        per_rank = -(-padded // self.tp_size)  # this TP rank's slice of the (shared) tokens
        lo = min(num_tokens, self.tp_rank * per_rank)
        hi = min(num_tokens, lo + per_rank)
        topk_weights, topk_ids = self.route(router_logits[lo:hi])
        if self.gather_all:
            with layer_span("moe_dispatch"):
                gathered, _ = overlapped(lambda: self.dispatcher.dispatch(x[lo:hi], topk_ids, topk_weights, per_rank))
            with layer_span("moe_experts"):
                out_rows = fused_experts(gathered.hidden, self.w13_weight, self.w2_weight, gathered.topk_weights,
                                         gathered.topk_ids)
            with layer_span("moe_combine"):
                part, _ = overlapped(lambda: self.dispatcher.combine(out_rows, gathered))
        else:
            with layer_span("moe_dispatch"):
                arrived, _ = overlapped(lambda: self.dispatcher.dispatch(x[lo:hi], topk_ids, topk_weights))
            # Each arrived row is one pair: its expert, weighted by the router.
            with layer_span("moe_experts"):
                out_rows = fused_experts(arrived.hidden, self.w13_weight, self.w2_weight, arrived.weights[:, None],
                                         arrived.expert_ids[:, None])
            with layer_span("moe_combine"):
                part, _ = overlapped(lambda: self.dispatcher.combine(out_rows, arrived))
        part = part.to(x.dtype)
        if self.tp_size == 1:
            return part
        padded_part = part.new_zeros((per_rank, part.shape[1]))
        padded_part[: hi - lo] = part
        return tensor_model_parallel_all_gather(padded_part, dim=0)[:num_tokens]

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts} ({self.num_local_experts} here, ep {self.ep_size}), top_k={self.top_k}, "
                f"intermediate={self.inter} (tp {self.tp_size}), renormalize={self.renormalize}")
