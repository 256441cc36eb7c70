"""HF safetensors checkpoints: one model.safetensors, or shards listed in
model.safetensors.index.json. Tensors are yielded one at a time on the CPU;
the model's weight loaders copy them into place (and onto the device)."""
from __future__ import annotations

import json
import os
from typing import Iterator

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"


def safetensors_files(model_dir: str) -> list[str]:
    """The checkpoint's .safetensors files, in a stable order. ValueError if there are none or a shard is missing."""
    if not os.path.isdir(model_dir):
        raise ValueError(f"model path {model_dir} is not a directory of safetensors files")
    index_path = os.path.join(model_dir, INDEX_FILE)
    if os.path.exists(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"cannot read safetensors index {index_path}: {e}") from None
        files = [os.path.join(model_dir, name) for name in sorted(set(weight_map.values()))]
        for path in files:
            if not os.path.exists(path):
                raise ValueError(f"safetensors shard {path} listed in {index_path} does not exist")
        return files
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(single):
        return [single]
    files = sorted(os.path.join(model_dir, n) for n in os.listdir(model_dir) if n.endswith(".safetensors"))
    if not files:
        raise ValueError(f"no .safetensors weights in {model_dir} (only safetensors and GGUF checkpoints are supported)")
    return files


def _read_file(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        handle = safe_open(path, framework="pt", device="cpu")
        names = list(handle.keys())
    except Exception as e:  # SafetensorError, OSError, ...
        raise ValueError(f"cannot read safetensors file {path} (corrupt or truncated?): {e}") from None
    for name in names:
        try:
            tensor = handle.get_tensor(name)
        except Exception as e:
            raise ValueError(f"cannot read tensor {name!r} from safetensors file {path} (corrupt or truncated?): {e}") from None
        yield name, tensor


def safetensors_weights(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, CPU tensor) for every tensor of the checkpoint in model_dir."""
    for path in safetensors_files(model_dir):
        yield from _read_file(path)
