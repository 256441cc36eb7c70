"""load_model: build the model for a ModelConfig on a device and fill its weights.

Load formats: "safetensors" (HF folder), "gguf" (llama.cpp file), "dummy"
(random weights, no checkpoint read), "auto" (gguf for a .gguf file, else
safetensors). The model is built directly on the target device in the target
dtype, so nothing is materialised twice.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterator

import torch
from torch import nn

from braid.config import LOAD_FORMATS, ModelConfig
from braid.models.registry import get_model_class

logger = logging.getLogger(__name__)


def resolve_load_format(load_format: str, model_path: str) -> str:
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"--load-format must be one of {', '.join(LOAD_FORMATS)}; got {load_format!r}")
    is_gguf = str(model_path).endswith(".gguf")
    if load_format == "auto":
        return "gguf" if is_gguf else "safetensors"
    if load_format == "gguf" and not is_gguf:
        raise ValueError(f"--load-format gguf needs a .gguf file, got {model_path}")
    if load_format == "safetensors" and is_gguf:
        raise ValueError(f"--load-format safetensors needs a checkpoint folder, got the GGUF file {model_path}")
    return load_format


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_model(model_config: ModelConfig, device: torch.device | str) -> nn.Module:
    """The model in eval mode, parameters in model_config.dtype on device, weights loaded."""
    device = torch.device(device)
    fmt = resolve_load_format(model_config.load_format, model_config.model)
    model_cls = get_model_class(model_config.hf_config)
    start = time.perf_counter()
    with _default_dtype(model_config.dtype), torch.device(device):
        model = model_cls(model_config.hf_config)
    if fmt == "dummy":
        from braid.models.loader.dummy_loader import init_dummy_weights

        init_dummy_weights(model, seed=model_config.seed)
    elif fmt == "gguf":
        from braid.models.loader.gguf_loader import gguf_weights

        model.load_weights(gguf_weights(model_config.model, model_config.hf_config))
    else:
        from braid.models.loader.safetensors_loader import safetensors_weights

        model.load_weights(safetensors_weights(model_config.model))
    model.eval()
    logger.info(
        "loaded %s (%s weights, %s) on %s in %.1fs",
        model_cls.__name__, fmt, model_config.dtype, device, time.perf_counter() - start,
    )
    return model


__all__ = ["load_model", "resolve_load_format"]
