"""Qwen3: the Llama decoder with per-head RMSNorm of q and k before rotary,
an explicit head_dim (q width may differ from hidden_size) and no q/k/v bias."""
from __future__ import annotations

from braid.models.llama import Qwen2ForCausalLM


class Qwen3ForCausalLM(Qwen2ForCausalLM):
    qkv_bias = False  # config.attention_bias decides (False in released models)
    o_bias_follows_attention_bias = True
    qk_norm = True
