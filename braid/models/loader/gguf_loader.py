"""GGUF checkpoints (llama.cpp) through the `gguf` package.

Tensors are dequantized to float32 with gguf.quants.dequantize and renamed to
HF names (token_embd -> model.embed_tokens, blk.N.attn_q -> model.layers.N.
self_attn.q_proj, ...). For llama-architecture files the Q and K rows are
un-permuted: llama.cpp's convert_hf_to_gguf reorders them from HF's
rotate-half layout to its interleaved rope layout, and we need HF's.

`gguf_hf_config(path)` builds the transformers config from the metadata.
The GGUFReader parses every metadata field when it opens a file; it is cached
per path, and reads through a plain ndarray view of its memory map (below).
"""
from __future__ import annotations

import functools
import logging
import os
import re
from typing import Any, Iterator

import numpy as np
import torch

logger = logging.getLogger(__name__)

# GGUF per-block tensor name -> HF name inside model.layers.N
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)$")
_TOP_RE = re.compile(r"^([a-z_0-9]+)\.(weight|bias)$")

# general.architecture -> (transformers config class, HF architecture)
_GGUF_ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}


@functools.cache
def _plain_view_reader_class():  # gguf is imported only when a GGUF file is read
    import gguf

    class PlainViewReader(gguf.GGUFReader):
        """GGUFReader whose `data` is a plain ndarray view of its np.memmap. Every metadata value
        is a slice of `data`, and slicing a memmap runs memmap's Python __array_finalize__: for
        SmolLM2's 49k-token vocabulary that is 2.3M calls, and the reader takes 2.8 s instead of 1.2 s.
        The view maps the same file pages, so tensors stay zero-copy."""

        @property
        def data(self) -> np.ndarray:
            return self._plain_data

        @data.setter
        def data(self, value: np.ndarray) -> None:
            self._plain_data = value.view(np.ndarray)

    return PlainViewReader


@functools.lru_cache(maxsize=4)
def _reader(path: str, mtime: float):
    try:
        return _plain_view_reader_class()(path)
    except Exception as e:
        raise ValueError(f"cannot read GGUF file {path} (corrupt or truncated?): {e}") from None


def get_reader(path: str):
    """A cached gguf.GGUFReader for path."""
    path = os.path.abspath(path)
    return _reader(path, os.path.getmtime(path))


def metadata_value(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def gguf_to_hf_name(name: str) -> str:
    """HF parameter name of a GGUF tensor; ValueError if it has none."""
    m = _BLOCK_RE.match(name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    m = _TOP_RE.match(name)
    if m and m.group(1) in _TOP_NAMES:
        return f"{_TOP_NAMES[m.group(1)]}.{m.group(2)}"
    raise ValueError(f"GGUF tensor {name!r} has no counterpart in the supported models")


def reverse_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf's `permute` (rows: [n_head, 2, d/2] <- [n_head, d/2, 2])."""
    rows = weights.shape[0]
    return weights.reshape(n_head, rows // n_head // 2, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _dequantize(tensor) -> np.ndarray:
    from braid.models.loader.gguf_dequant import dequantize

    shape = [int(x) for x in reversed(tensor.shape)]  # ggml order is reversed
    arr = dequantize(tensor.data, tensor.tensor_type)
    # writable and C-contiguous (F32 tensors come back as views of the read-only memmap)
    return np.require(np.asarray(arr, dtype=np.float32).reshape(shape), requirements=["C", "W"])


def gguf_weights(path: str, hf_config: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 CPU tensor) for every tensor in the GGUF file."""
    reader = get_reader(path)
    arch = metadata_value(reader, "general.architecture")
    permute = arch == "llama"
    n_head = hf_config.num_attention_heads
    n_kv = getattr(hf_config, "num_key_value_heads", None) or n_head
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":
            continue  # rejected at config time; see gguf_hf_config
        hf_name = gguf_to_hf_name(tensor.name)
        arr = _dequantize(tensor)
        if permute and (".q_proj." in hf_name or ".k_proj." in hf_name):
            arr = reverse_permute(arr, n_head if ".q_proj." in hf_name else n_kv)
        yield hf_name, torch.from_numpy(np.ascontiguousarray(arr))  # reverse_permute may return a view


def gguf_hf_config(path: str):
    """A transformers PretrainedConfig (architectures set) from the GGUF metadata."""
    import transformers

    reader = get_reader(path)
    arch = metadata_value(reader, "general.architecture")
    if arch not in _GGUF_ARCHS:
        raise ValueError(f"GGUF file {path}: unsupported architecture {arch!r}; supported: {', '.join(_GGUF_ARCHS)}")
    config_cls, hf_arch = _GGUF_ARCHS[arch]
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise ValueError(
            f"GGUF file {path} carries rope frequency factors (rope_freqs, Llama 3.1-style rope scaling), "
            "which are not supported; use the HF safetensors checkpoint"
        )

    def get(key: str, default: Any = None) -> Any:
        return metadata_value(reader, f"{arch}.{key}", default)

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    kv_heads = get("attention.head_count_kv", heads)
    vocab = get("vocab_size")
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
        vocab = int(embd.shape[1]) if tokens is None else len(tokens.data)
    kwargs: dict[str, Any] = dict(
        architectures=[hf_arch],
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(kv_heads),
        head_dim=int(get("attention.key_length", hidden // heads)),
        max_position_embeddings=int(get("context_length", 4096)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in tensor_names,
    )
    scaling_type = get("rope.scaling.type")
    if scaling_type not in (None, "none"):
        scaling: dict[str, Any] = {"rope_type": scaling_type, "factor": float(get("rope.scaling.factor", 1.0))}
        orig = get("rope.scaling.original_context_length")
        if orig is not None:
            scaling["original_max_position_embeddings"] = int(orig)
        kwargs["rope_scaling"] = scaling
    window = get("attention.sliding_window")
    if window and arch == "llama":
        config_cls, kwargs["architectures"] = "MistralConfig", ["MistralForCausalLM"]
        kwargs["sliding_window"] = int(window)
    for key, tok_key in (
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
        ("pad_token_id", "tokenizer.ggml.padding_token_id"),
    ):
        value = metadata_value(reader, tok_key)
        if value is not None:
            kwargs[key] = int(value)
    if arch == "llama":
        kwargs["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    config = getattr(transformers, config_cls)(**kwargs)
    config.architectures = kwargs["architectures"]
    return config
