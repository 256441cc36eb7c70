"""Qwen3-MoE: Qwen3's attention, and in its sparse layers a mixture of experts
(softmax router over all experts, top-k, renormalised when config.norm_topk_prob)
in place of the dense MLP. Layers listed in config.mlp_only_layers, or off the
config.decoder_sparse_step grid, keep a dense MLP."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from braid.layers.linear import ReplicatedLinear
from braid.layers.moe.layer import FusedMoE
from braid.models.llama import dense_mlp
from braid.models.moe_weights import expert_weight_target, num_experts_of
from braid.models.qwen3 import Qwen3ForCausalLM


class Qwen3MoeSparseBlock(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        num_experts = num_experts_of(config)
        self.gate = ReplicatedLinear(config.hidden_size, num_experts)  # the router
        self.experts = FusedMoE(num_experts, config.num_experts_per_tok, config.hidden_size,
                                config.moe_intermediate_size, renormalize=bool(config.norm_topk_prob),
                                hidden_act=getattr(config, "hidden_act", "silu"))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.experts(hidden_states, self.gate(hidden_states))


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    def _make_mlp(self, config: Any, layer_idx: int) -> nn.Module:
        sparse = (layer_idx not in (getattr(config, "mlp_only_layers", None) or [])
                  and num_experts_of(config) > 0 and (layer_idx + 1) % config.decoder_sparse_step == 0)
        return Qwen3MoeSparseBlock(config) if sparse else dense_mlp(config, layer_idx)

    def _expert_weight(self, name: str) -> tuple[str, str, int] | None:
        return expert_weight_target(name)
