"""Default sampling parameters from a model's generation_config.json (vLLM's
--generation-config): a request that leaves temperature, top_p, ... unset gets the
model author's values instead of the library defaults."""
from __future__ import annotations

import json
import logging
import os
from typing import Any

from braid.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# generation_config.json key -> SamplingParams field, with transformers' GenerationConfig
# default: a value equal to that default says nothing (vLLM reads the file's diff from it).
_KEYS: dict[str, tuple[str, Any]] = {
    "temperature": ("temperature", 1.0),
    "top_p": ("top_p", 1.0),
    "top_k": ("top_k", 50),
    "min_p": ("min_p", None),
    "repetition_penalty": ("repetition_penalty", 1.0),
    "max_new_tokens": ("max_tokens", None),
}


def validate_generation_config(value: str) -> None:
    if value not in ("auto", "vllm") and not os.path.isdir(value):
        raise ValueError(f"--generation-config must be auto, vllm or a folder holding generation_config.json; "
                         f"got {value!r}")


def load_sampling_defaults(model_path: str, generation_config: str = "auto") -> dict[str, Any]:
    """SamplingParams fields -> defaults. generation_config: 'auto' (the model folder's
    file), 'vllm' (none: the library defaults), or a folder holding the file."""
    validate_generation_config(generation_config)
    if generation_config == "vllm":
        return {}
    folder = model_path if generation_config == "auto" else generation_config
    path = os.path.join(folder, "generation_config.json") if folder and os.path.isdir(folder) else None
    if path is None or not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"--generation-config: cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--generation-config: {path} must hold a JSON object")
    defaults = {}
    for key, (field, hf_default) in _KEYS.items():
        value = data.get(key)
        if value is not None and value != hf_default:
            defaults[field] = value
    try:  # a bad value is the model's fault: say so now, not in every request's error
        SamplingParams(**defaults)
    except ValueError as e:
        raise ValueError(f"--generation-config: {path} holds an invalid default: {e}") from None
    if defaults:
        logger.info("default sampling parameters from %s: %s (--generation-config vllm ignores them)", path, defaults)
    return defaults
