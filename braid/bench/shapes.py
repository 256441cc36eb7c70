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
    # DeepSeek-V2-Lite's public config (yarn rope scaling included); max_position_embeddings
    # 8192 instead of 163840 only keeps the rotary cos/sin caches small.
    "deepseek-v2-lite": dict(
        architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
        n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6, routed_scaling_factor=1.0,
        kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128,
        head_dim=64, topk_method="greedy", n_group=1, topk_group=1, first_k_dense_replace=1, norm_topk_prob=False,
        vocab_size=102400, max_position_embeddings=8192, rope_theta=10000.0, rms_norm_eps=1e-6,
        rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
                          mscale=0.707, mscale_all_dim=0.707),
        tie_word_embeddings=False, hidden_act="silu", torch_dtype="bfloat16", bos_token_id=100000,
        eos_token_id=100001, attention_bias=False),
    "qwen3-30b-a3b": dict(
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144,
        moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
        head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu", torch_dtype="bfloat16",
        bos_token_id=151643, eos_token_id=151645, attention_bias=False, use_sliding_window=False),
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
