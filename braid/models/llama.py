"""Llama-family decoder (Llama, Mistral, Qwen2; Qwen3 in qwen3.py) on flat packed tokens.

One implementation with a few switches, set per model class:
- qkv_bias: q/k/v projections have a bias (Qwen2) — o_proj's bias follows
  config.attention_bias (Llama/Qwen3) or is absent (Qwen2);
- qk_norm: per-head RMSNorm of q and k before rotary (Qwen3);
- sliding window per layer: config.layer_types when present, else the
  class's `_sliding_window` (Mistral: config.sliding_window everywhere).

Model API (the model runner relies on it):
    model = LlamaForCausalLM(hf_config)          # build under the target device/dtype
    hidden = model(input_ids [T], positions [T])  # inside set_forward_context
    logits = model.compute_logits(hidden [N, H])  # [N, vocab] float32
    model.load_weights(iter of (hf_name, tensor)) # fuses q/k/v and gate/up

Decoder layers live in `model.model.layers` (an nn.ModuleList); each knows its
global `layer_idx`, which indexes the KV cache list of the forward context.
`model.model.start_layer/end_layer` bound the layers this instance runs: all of
them on one device, a pipeline stage's share otherwise (the others are empty
placeholders that hold no weights, and their checkpoint tensors are skipped).
"""
from __future__ import annotations

import re
from typing import Any, Iterable

import torch
from torch import nn

from braid.distributed.parallel_state import pp_layer_range
from braid.layers.activation import SiluAndMul, require_silu
from braid.layers.attention.layer import Attention
from braid.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from braid.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from braid.layers.norm import RMSNorm
from braid.layers.rotary import RotaryEmbedding, get_rope_from_config

# HF checkpoint names of decoder-layer tensors: "model.layers.<i>.<...>".
_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
    if tuple(param.shape) != tuple(loaded_weight.shape):
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)}, checkpoint {tuple(loaded_weight.shape)}")
    with torch.no_grad():
        param.copy_(loaded_weight)


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, bias: bool = False) -> None:
        super().__init__()
        require_silu(hidden_act, "the MLP")
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, bias=bias)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaAttention(nn.Module):
    def __init__(
        self,
        config: Any,
        layer_idx: int,
        rotary_emb: RotaryEmbedding,
        *,
        qkv_bias: bool,
        o_bias: bool,
        qk_norm: bool,
        sliding_window: int | None,
    ) -> None:
        super().__init__()
        hidden_size = config.hidden_size
        self.head_dim = head_dim_of(config)
        total_heads = config.num_attention_heads
        total_kv_heads = getattr(config, "num_key_value_heads", None) or total_heads
        self.qkv_proj = QKVParallelLinear(hidden_size, self.head_dim, total_heads, total_kv_heads, bias=qkv_bias)
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(total_heads * self.head_dim, hidden_size, bias=o_bias)
        self.rotary_emb = rotary_emb
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.attn = Attention(
            self.num_heads,
            self.head_dim,
            self.num_kv_heads,
            scale=self.head_dim**-0.5,
            layer_idx=layer_idx,
            sliding_window=sliding_window,
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        num_tokens = hidden_states.shape[0]
        qkv = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm:
            q = self.q_norm(q.reshape(num_tokens, self.num_heads, self.head_dim)).view(num_tokens, self.q_size)
            k = self.k_norm(k.reshape(num_tokens, self.num_kv_heads, self.head_dim)).view(num_tokens, self.kv_size)
        return self.o_proj(self.attn(q, k, v, rotary=(self.rotary_emb, positions)))


def dense_mlp(config: Any, layer_idx: int) -> nn.Module:
    return LlamaMLP(config.hidden_size, config.intermediate_size, getattr(config, "hidden_act", "silu"),
                    bias=bool(getattr(config, "mlp_bias", False)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_idx: int, self_attn: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class PPMissingLayer(nn.Module):
    """Stands in for a decoder layer another pipeline stage runs (keeps global indices)."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this layer belongs to another pipeline stage")


def llama_attention(config: Any, layer_idx: int, rotary_emb: RotaryEmbedding, switches: dict) -> nn.Module:
    return LlamaAttention(config, layer_idx, rotary_emb, **switches)


class LlamaModel(nn.Module):
    def __init__(self, config: Any, layer_switches: list[dict], make_mlp=dense_mlp,
                 make_attention=llama_attention) -> None:
        super().__init__()
        self.config = config
        self.vocab_size = config.vocab_size
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        # One cos/sin cache shared by all layers.
        self.rotary_emb = get_rope_from_config(config, head_dim_of(config))
        self.start_layer, self.end_layer = pp_layer_range(config.num_hidden_layers)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, make_attention(config, i, self.rotary_emb, layer_switches[i]),
                              make_mlp(config, i))
            if self.start_layer <= i < self.end_layer else PPMissingLayer()
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward_layers(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None = None,
        start: int | None = None,
        end: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run layers [start, end) (indices into self.layers); returns (hidden, residual)."""
        start = self.start_layer if start is None else start
        end = self.end_layer if end is None else end
        for layer in self.layers[start:end]:
            hidden_states, residual = layer(positions, hidden_states, residual)
        return hidden_states, residual

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states, residual = self.forward_layers(positions, self.embed_input_ids(input_ids))
        if residual is None:  # no layers
            return self.norm(hidden_states)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    # HF name fragments that load into a slice of one of our fused parameters.
    stacked_params_mapping = [
        # (our parameter, HF name, shard id)
        (".qkv_proj", ".q_proj", "q"),
        (".qkv_proj", ".k_proj", "k"),
        (".qkv_proj", ".v_proj", "v"),
        (".gate_up_proj", ".gate_proj", 0),
        (".gate_up_proj", ".up_proj", 1),
    ]
    # Checkpoint entries that are not parameters here.
    ignored_weight_suffixes = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")

    qkv_bias = False  # q/k/v bias (Qwen2); otherwise config.attention_bias decides
    o_bias_follows_attention_bias = True
    qk_norm = False

    def __init__(self, hf_config: Any) -> None:
        super().__init__()
        self.config = hf_config
        switches = [self._layer_switches(hf_config, i) for i in range(hf_config.num_hidden_layers)]
        self.model = LlamaModel(hf_config, switches, self._make_mlp, self._make_attention)
        self.lm_head = ParallelLMHead(hf_config.vocab_size, hf_config.hidden_size)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)

    # -- per-architecture switches -------------------------------------------------

    def _layer_switches(self, config: Any, layer_idx: int) -> dict:
        attention_bias = bool(getattr(config, "attention_bias", False))
        return {
            "qkv_bias": self.qkv_bias or attention_bias,
            "o_bias": attention_bias if self.o_bias_follows_attention_bias else False,
            "qk_norm": self.qk_norm,
            "sliding_window": self._layer_sliding_window(config, layer_idx),
        }

    def _layer_sliding_window(self, config: Any, layer_idx: int) -> int | None:
        layer_types = getattr(config, "layer_types", None)
        window = getattr(config, "sliding_window", None)
        if layer_types is not None:
            return window if layer_types[layer_idx] == "sliding_attention" and window else None
        return self._sliding_window(config, layer_idx)

    def _sliding_window(self, config: Any, layer_idx: int) -> int | None:
        return None  # Llama: full attention

    def _make_mlp(self, config: Any, layer_idx: int) -> nn.Module:
        return dense_mlp(config, layer_idx)

    def _make_attention(self, config: Any, layer_idx: int, rotary_emb: RotaryEmbedding, switches: dict) -> nn.Module:
        return llama_attention(config, layer_idx, rotary_emb, switches)

    def _expert_weight(self, name: str) -> tuple[str, str, int] | None:
        """(parameter, shard id, expert id) when `name` is one expert's tensor of a fused MoE."""
        return None

    # -- model API --------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head.get_logits(hidden_states).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load HF-named tensors; returns the names of the parameters loaded.

        Raises ValueError for a checkpoint tensor with no parameter here, a
        shape mismatch, or parameters the checkpoint did not provide.
        """
        params = dict(self.named_parameters())
        # fused parameter -> the shard ids it is made of
        expected_shards: dict[str, set] = {}
        for target, _, shard in self.stacked_params_mapping:
            for pname in params:
                if target + "." in pname:
                    expected_shards.setdefault(pname, set()).add(shard)
        got_shards: dict[str, set] = {p: set() for p in expected_shards}
        got_experts: dict[str, set] = {}
        loaded: set[str] = set()
        start, end = self.model.start_layer, self.model.end_layer
        for name, tensor in weights:
            if name.endswith(self.ignored_weight_suffixes):
                continue
            layer = _LAYER_INDEX.match(name)
            if layer is not None and not start <= int(layer.group(1)) < end:
                if int(layer.group(1)) >= self.config.num_hidden_layers:
                    raise ValueError(f"unexpected weight {name!r} in checkpoint: the config has "
                                     f"{self.config.num_hidden_layers} layers (num_hidden_layers)")
                continue  # another pipeline stage's layer
            if self.tie_word_embeddings and name == "lm_head.weight":
                continue  # shares the embedding
            expert = self._expert_weight(name)
            if expert is not None:
                pname, shard, expert_id = expert
                param = params.get(pname)
                if param is None:
                    raise ValueError(f"unexpected weight {name!r} in checkpoint: no parameter {pname!r}")
                try:
                    param.weight_loader(param, tensor, shard, expert_id)
                except ValueError as e:
                    raise ValueError(f"loading {name!r}: {e}") from None
                got_experts.setdefault(pname, set()).add((shard, expert_id))
                if got_experts[pname] == param.expected_shards:
                    loaded.add(pname)
                continue
            for target, hf_part, shard in self.stacked_params_mapping:
                if hf_part + "." not in name:
                    continue
                pname = name.replace(hf_part + ".", target + ".")
                param = params.get(pname)
                if param is None:
                    raise ValueError(f"unexpected weight {name!r} in checkpoint: no parameter {pname!r} in {type(self).__name__}")
                try:
                    param.weight_loader(param, tensor, shard)
                except ValueError as e:
                    raise ValueError(f"loading {name!r}: {e}") from None
                got_shards[pname].add(shard)
                if got_shards[pname] == expected_shards[pname]:
                    loaded.add(pname)
                break
            else:
                param = params.get(name)
                if param is None:
                    raise ValueError(f"unexpected weight {name!r} in checkpoint: {type(self).__name__} has no such parameter")
                loader = getattr(param, "weight_loader", default_weight_loader)
                try:
                    loader(param, tensor)
                except ValueError as e:
                    raise ValueError(f"loading {name!r}: {e}") from None
                loaded.add(name)
        missing = self._checkpoint_names(sorted(set(params) - loaded), expected_shards, got_shards, got_experts, params)
        if missing:
            shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
            raise ValueError(f"checkpoint is missing weights for {type(self).__name__}: {shown}")
        return loaded

    def _checkpoint_names(self, missing: list[str], expected_shards, got_shards, got_experts, params) -> list[str]:
        """Unloaded parameters as the checkpoint names them: a fused qkv_proj missing its k part
        is `...k_proj.weight`, a fused expert tensor names the experts and parts it lacks."""
        names = []
        for pname in missing:
            if pname in expected_shards:
                lacking = expected_shards[pname] - got_shards[pname]
                names += [pname.replace(target + ".", hf_part + ".") for target, hf_part, shard
                          in self.stacked_params_mapping if shard in lacking and target + "." in pname]
            elif hasattr(params[pname], "expected_shards"):
                lacking = sorted(params[pname].expected_shards - got_experts.get(pname, set()),
                                 key=lambda se: (se[1], se[0]))
                parts = ", ".join(f"expert {e} {shard}" for shard, e in lacking[:4])
                names.append(f"{pname} ({parts}{', ...' if len(lacking) > 4 else ''})")
            else:
                names.append(pname)
        return names


class MistralForCausalLM(LlamaForCausalLM):
    def _sliding_window(self, config: Any, layer_idx: int) -> int | None:
        return getattr(config, "sliding_window", None)


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True
    o_bias_follows_attention_bias = False

    def _sliding_window(self, config: Any, layer_idx: int) -> int | None:
        # transformers 4.x Qwen2 configs (no layer_types)
        if getattr(config, "use_sliding_window", False) and layer_idx >= getattr(config, "max_window_layers", 0):
            return getattr(config, "sliding_window", None)
        return None
