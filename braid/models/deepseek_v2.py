"""DeepSeek-V2 (and V2-Lite): multi-head latent attention, and mixture-of-experts
layers with shared experts after the first `first_k_dense_replace` dense layers.

Multi-head latent attention (MLA). Each token's keys and values come from one
compressed latent c (kv_lora_rank wide, RMS-normed) and one rotary key part k_pe
shared by all heads; the cache holds exactly [c | k_pe] per token (one "KV head").
Attention runs in the latent space ("absorbed" form): each head's q_nope is mapped
through that head's key up-projection (W_kb) into latent space, so its score
against a cached entry is q_lat . c + q_pe . k_pe, and the head's output is the
softmax-weighted sum of c mapped through its value up-projection (W_vb). That is
the same arithmetic as HF's expand-then-attend, reordered. The attention kernels
read [c | k_pe] as both the K and the V entry (the first kv_lora_rank dims of the
output are the weighted latent); the model runner stores it once (its V plane is a
stride-0 view of the K plane).

DeepSeek rotates (q_pe, k_pe) as interleaved pairs (2i, 2i+1). Taking the even then
the odd dimensions turns that into the rotate-half layout the rotary kernel
implements, and since only q_pe . k_pe is ever used, the reordering changes nothing.

Routing: softmax over the routed experts in float32, top-k ("greedy"), or top-k
within the best `topk_group` of `n_group` groups ("group_limited_greedy"), weights
scaled by routed_scaling_factor and not renormalised. Shared experts are a dense
MLP added to the routed experts' output.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from braid.distributed.parallel_state import get_tp_size
from braid.layers.attention.layer import Attention
from braid.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear, divide
from braid.layers.moe.layer import FusedMoE
from braid.layers.norm import RMSNorm
from braid.layers.rotary import RotaryEmbedding, get_rope_from_config, rope_params_from_config, rope_type_of, yarn_mscale
from braid.models.llama import LlamaForCausalLM, LlamaMLP, dense_mlp
from braid.models.moe_weights import expert_weight_target, num_experts_of

# HF's DeepseekV2RMSNorm default, used for the q/kv latents (not config.rms_norm_eps).
_LATENT_NORM_EPS = 1e-6


class DeepseekV2MLAttention(nn.Module):
    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = divide(config.num_attention_heads, get_tp_size())
        self.nope, self.rope, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.rank = config.kv_lora_rank
        qk_dim = self.nope + self.rope
        total_heads = config.num_attention_heads
        self.q_lora_rank = getattr(config, "q_lora_rank", None)
        if self.q_lora_rank:
            self.q_a_proj = ReplicatedLinear(hidden, self.q_lora_rank, bias=bool(config.attention_bias))
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, eps=_LATENT_NORM_EPS)
            self.q_b_proj = ColumnParallelLinear(self.q_lora_rank, total_heads * qk_dim, bias=False)
        else:
            self.q_proj = ColumnParallelLinear(hidden, total_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = ReplicatedLinear(hidden, self.rank + self.rope, bias=bool(config.attention_bias))
        self.kv_a_layernorm = RMSNorm(self.rank, eps=_LATENT_NORM_EPS)
        self.kv_b_proj = ColumnParallelLinear(self.rank, total_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = RowParallelLinear(total_heads * self.v_dim, hidden, bias=bool(config.attention_bias))
        self.rotary_emb: RotaryEmbedding = get_rope_from_config(config, self.rope)
        # YaRN also sharpens the softmax: scale x mscale(factor, mscale_all_dim)^2, as DeepSeek does.
        scale = qk_dim ** -0.5
        _, scaling = rope_params_from_config(config)
        if rope_type_of(scaling) == "yarn" and scaling.get("mscale_all_dim"):
            scale *= yarn_mscale(float(scaling["factor"]), float(scaling["mscale_all_dim"])) ** 2
        self.register_buffer("deinterleave", torch.cat([torch.arange(0, self.rope, 2), torch.arange(1, self.rope, 2)]),
                             persistent=False)
        self.attn = Attention(self.num_heads, self.rank + self.rope, 1, scale=scale, layer_idx=layer_idx)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        t, h = hidden_states.shape[0], self.num_heads
        if self.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        else:
            q = self.q_proj(hidden_states)
        q_nope, q_pe = q.view(t, h, self.nope + self.rope).split([self.nope, self.rope], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(hidden_states).split([self.rank, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent.contiguous())
        q_pe = q_pe[..., self.deinterleave].reshape(t, h * self.rope)
        k_pe = k_pe[..., self.deinterleave].contiguous()
        q_pe, k_pe = self.rotary_emb(positions, q_pe, k_pe)
        w_kb, w_vb = self.kv_b_proj.weight.view(h, self.nope + self.v_dim, self.rank).split([self.nope, self.v_dim], 1)
        q_latent = torch.einsum("thn,hnr->thr", q_nope, w_kb)
        query = torch.cat([q_latent, q_pe.view(t, h, self.rope)], dim=-1).reshape(t, h * (self.rank + self.rope))
        entry = torch.cat([latent, k_pe], dim=-1)  # what the cache holds for this token
        out_latent = self.attn(query, entry, entry).view(t, h, self.rank + self.rope)[..., : self.rank]
        out = torch.einsum("thr,hvr->thv", out_latent, w_vb).reshape(t, h * self.v_dim)
        return self.o_proj(out)


def grouped_topk(router_logits: torch.Tensor, top_k: int, method: str, num_groups: int | None,
                 topk_groups: int | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    scores = router_logits.float().softmax(dim=-1)
    if method == "group_limited_greedy":
        num_experts = scores.shape[-1]
        group_best = scores.view(-1, num_groups, num_experts // num_groups).max(dim=-1).values
        chosen = torch.topk(group_best, k=topk_groups, dim=-1).indices
        keep = torch.zeros_like(group_best).scatter_(1, chosen, 1.0).bool()
        scores = scores.masked_fill(~keep.repeat_interleave(num_experts // num_groups, dim=-1), 0.0)
    elif method != "greedy":
        raise ValueError(f"unsupported DeepSeek topk_method {method!r}; supported: greedy, group_limited_greedy")
    weights, ids = torch.topk(scores, k=top_k, dim=-1)
    return weights * scale, ids


class DeepseekV2MoE(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        num_experts = num_experts_of(config)
        self.gate = ReplicatedLinear(config.hidden_size, num_experts)  # the router (run in float32)
        top_k = config.num_experts_per_tok

        def route(logits):
            return grouped_topk(logits, top_k, config.topk_method, getattr(config, "n_group", None),
                                getattr(config, "topk_group", None), float(config.routed_scaling_factor))

        self.experts = FusedMoE(num_experts, top_k, config.hidden_size, config.moe_intermediate_size, route=route,
                                hidden_act=getattr(config, "hidden_act", "silu"))
        shared = getattr(config, "n_shared_experts", 0) or 0
        self.shared_experts = (LlamaMLP(config.hidden_size, config.moe_intermediate_size * shared,
                                        getattr(config, "hidden_act", "silu")) if shared else None)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden_states.float(), self.gate.weight.float())
        out = self.experts(hidden_states, logits)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden_states)
        return out


class DeepseekV2ForCausalLM(LlamaForCausalLM):
    # q/k/v are not fused here (MLA has its own projections); gate/up of dense MLPs are.
    stacked_params_mapping = [(".gate_up_proj", ".gate_proj", 0), (".gate_up_proj", ".up_proj", 1)]

    def _make_attention(self, config: Any, layer_idx: int, rotary_emb, switches: dict) -> nn.Module:
        return DeepseekV2MLAttention(config, layer_idx)

    def _make_mlp(self, config: Any, layer_idx: int) -> nn.Module:
        if num_experts_of(config) and layer_idx >= config.first_k_dense_replace:
            return DeepseekV2MoE(config)
        return dense_mlp(config, layer_idx)

    def _expert_weight(self, name: str) -> tuple[str, str, int] | None:
        return expert_weight_target(name)
