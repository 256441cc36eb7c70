"""Real model shapes for benchmarks with random weights (--load-format dummy)."""
from __future__ import annotations

import json
import os
import tempfile

SHAPES = {
    "llama3-8b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
        rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
        hidden_act="silu", torch_dtype="bfloat16", bos_token_id=128000, eos_token_id=128001),
    "llama3-70b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=8192, intermediate_size=28672,
        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
        rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
        hidden_act="silu", torch_dtype="bfloat16", bos_token_id=128000, eos_token_id=128001),
    "smollm2-135m": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
        rope_theta=100000.0, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
        hidden_act="silu", torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2),
}


def write_synthetic_tokenizer(directory: str, vocab_size: int, eos_token_id: int) -> None:
    """A word-level tokenizer whose tokens are "t0" .. "t{vocab_size-1}": it covers every id a
    random-weight model can emit, so a dummy model can be served and detokenized like a real one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"t{eos_token_id}", unk_token="t0")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant:{% endif %}")
    fast.save_pretrained(directory)


def write_shape(name: str, directory: str | None = None, tokenizer: bool = True) -> str:
    """Write config.json of a named shape (and a synthetic tokenizer) into a folder,
    a fresh temporary one by default. Serve it with --load-format dummy."""
    if name not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known: {', '.join(SHAPES)}")
    directory = directory or tempfile.mkdtemp(prefix=f"braid-{name}-")
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(SHAPES[name], f, indent=2)
    if tokenizer:
        write_synthetic_tokenizer(directory, SHAPES[name]["vocab_size"], SHAPES[name]["eos_token_id"])
    return directory


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description="Write a real model shape (config + synthetic tokenizer) to a folder")
    p.add_argument("shape", choices=sorted(SHAPES))
    p.add_argument("directory")
    args = p.parse_args()
    os.makedirs(args.directory, exist_ok=True)
    print(write_shape(args.shape, args.directory))


if __name__ == "__main__":
    main()
