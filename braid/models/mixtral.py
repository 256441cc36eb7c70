"""Mixtral: Mistral's attention (optional sliding window), and in every layer a mixture
of experts — softmax router over all experts, top-k, the k weights renormalised to sum
to one — in place of the dense MLP. Checkpoints name the block `block_sparse_moe` and
each expert's gate/down/up `w1`/`w2`/`w3`, as FusedMoE's shards do."""
from __future__ import annotations

import re
from typing import Any, Iterable

import torch
from torch import nn

from braid.layers.linear import ReplicatedLinear
from braid.layers.moe.layer import FusedMoE
from braid.models.llama import MistralForCausalLM

_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(w1|w2|w3)\.weight$")


class MixtralSparseBlock(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.gate = ReplicatedLinear(config.hidden_size, config.num_local_experts)  # the router
        self.experts = FusedMoE(config.num_local_experts, config.num_experts_per_tok, config.hidden_size,
                                config.intermediate_size, renormalize=True,
                                hidden_act=getattr(config, "hidden_act", "silu"))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.experts(hidden_states, self.gate(hidden_states))


class MixtralForCausalLM(MistralForCausalLM):
    def _make_mlp(self, config: Any, layer_idx: int) -> nn.Module:
        return MixtralSparseBlock(config)

    def _expert_weight(self, name: str) -> tuple[str, str, int] | None:
        m = _EXPERT.match(name)
        if m is None:
            return None
        param = "w2_weight" if m.group(3) == "w2" else "w13_weight"
        return f"{m.group(1)}.{param}", m.group(3), int(m.group(2))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # The layer's MoE block is `mlp` here, `block_sparse_moe` in checkpoints.
        return super().load_weights((name.replace(".block_sparse_moe.", ".mlp."), t) for name, t in weights)
