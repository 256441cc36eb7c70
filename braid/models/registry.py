"""Model classes by HF architecture name (hf_config.architectures)."""
from __future__ import annotations

import importlib
from typing import Any

from torch import nn

# architecture -> (module, class)
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("braid.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("braid.models.llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("braid.models.llama", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("braid.models.qwen3", "Qwen3ForCausalLM"),
    "Qwen3MoeForCausalLM": ("braid.models.qwen3_moe", "Qwen3MoeForCausalLM"),
    "MixtralForCausalLM": ("braid.models.mixtral", "MixtralForCausalLM"),
    "DeepseekV2ForCausalLM": ("braid.models.deepseek_v2", "DeepseekV2ForCausalLM"),
}


def supported_architectures() -> list[str]:
    return list(_MODELS)


def get_model_class(hf_config: Any) -> type[nn.Module]:
    archs = list(getattr(hf_config, "architectures", None) or [])
    for arch in archs:
        if arch in _MODELS:
            module, name = _MODELS[arch]
            return getattr(importlib.import_module(module), name)
    raise ValueError(
        f"unsupported model architecture {archs or '(none in config)'}; supported: {', '.join(_MODELS)}"
    )
