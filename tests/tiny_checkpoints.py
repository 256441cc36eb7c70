"""Tiny random HF checkpoints (safetensors + tokenizer) for tests.

    make_tiny_checkpoint(arch, path, *, seed=0, shard=False, **overrides) -> path

arch: "llama", "mistral", "qwen2", "qwen3". Writes config.json,
generation_config.json, model.safetensors (or shards + model.safetensors.index.json
with shard=True), and a tokenizer (tokenizer.json, tokenizer_config.json, chat template)
loadable with AutoTokenizer. `overrides` go into the transformers config
(e.g. num_hidden_layers=4, tie_word_embeddings=True, rope_scaling={...}).

Tokenizer: a byte-level BPE with 384 tokens trained in a few milliseconds on a
fixed English corpus (any text encodes; ids 0..2 are <|endoftext|> (pad/unk),
<|im_start|> (bos), <|im_end|> (eos)); the model's vocab_size equals it.

Greedy robustness: tiny random models have nearly flat logits with the default
init (std 0.02), so greedy tokens would flip on 1e-6 noise. These use
initializer_range=0.2 (attention/MLP outputs comparable to the residual) and
re-draw the LM head (the embedding when tied) with std 0.5, so logits have std
~4 and the top-1/top-2 gap is typically ~1 (over hundreds of greedy steps the
smallest seen was ~1e-2), far above float32 noise.

Shapes (all small): hidden 64, 2 layers, 4 query heads, 2 KV heads, head_dim 16,
intermediate 128, max_position_embeddings 1024.
- llama: untied LM head;
- mistral: sliding_window=12 (shorter than most test sequences, so the window is exercised);
- qwen2: q/k/v bias, tied embeddings;
- qwen3: q/k norms, explicit head_dim=32 (q width 128 != hidden 64), tied embeddings.
- qwen3_moe: qwen3's attention (untied head), every layer a mixture of 8 experts
  (moe_intermediate_size 32), top-2, renormalised (mlp_only_layers makes some dense).
- mixtral: mistral's attention (no window), every layer a mixture of 8 experts
  (intermediate_size 32), top-2, renormalised; `block_sparse_moe` / w1 w2 w3 names.
- deepseek_v2: multi-head latent attention (kv_lora_rank 32, rope 16, nope 16, v 24,
  no q compression; q_lora_rank=24 adds it), 3 layers, the first dense, then 8 routed
  experts top-2 plus 1 shared expert, greedy routing (topk_method/n_group/topk_group
  overrides give group-limited routing).
"""
from __future__ import annotations

import functools
import os
from typing import Any

import torch

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "deepseek_v2", "mixtral")

TOKENIZER_VOCAB_SIZE = 384
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine.",
    "Hello world! How are you today? I am fine, thank you, and you?",
    "Paged attention stores keys and values in fixed-size blocks of memory.",
    "Once upon a time there was a little engine that could, and it did.",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ? ' \" # $ % & @",
    "def main():\n    print('hello')\n    return 0\n",
] * 4

INIT_STD = 0.2
LM_HEAD_STD = 0.5


@functools.lru_cache(maxsize=1)
def _build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = _CHAT_TEMPLATE
    assert len(fast) == TOKENIZER_VOCAB_SIZE, len(fast)
    assert (fast.pad_token_id, fast.bos_token_id, fast.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
    return fast


def make_tiny_tokenizer(path: str | os.PathLike) -> str:
    """Write just the tiny tokenizer into path."""
    os.makedirs(path, exist_ok=True)
    _build_tokenizer().save_pretrained(str(path))
    return str(path)


def tiny_config(arch: str, **overrides: Any):
    """The transformers config make_tiny_checkpoint uses (architectures set)."""
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    common: dict[str, Any] = dict(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        initializer_range=INIT_STD,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        hidden_act="silu",
    )
    if arch == "llama":
        cls, name = transformers.LlamaConfig, "LlamaForCausalLM"
        common.update(tie_word_embeddings=False, rope_theta=10000.0)
    elif arch == "mistral":
        cls, name = transformers.MistralConfig, "MistralForCausalLM"
        common.update(tie_word_embeddings=False, sliding_window=12, head_dim=16, rope_theta=10000.0)
    elif arch == "qwen2":
        cls, name = transformers.Qwen2Config, "Qwen2ForCausalLM"
        common.update(tie_word_embeddings=True, use_sliding_window=False, rope_theta=10000.0)
    elif arch == "mixtral":
        cls, name = transformers.MixtralConfig, "MixtralForCausalLM"
        common.update(tie_word_embeddings=False, sliding_window=None, rope_theta=10000.0, intermediate_size=32,
                      num_local_experts=8, num_experts_per_tok=2, router_jitter_noise=0.0)
    elif arch == "qwen3_moe":
        cls, name = transformers.Qwen3MoeConfig, "Qwen3MoeForCausalLM"
        common.update(tie_word_embeddings=False, head_dim=32, use_sliding_window=False, attention_bias=False,
                      rope_theta=10000.0, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      decoder_sparse_step=1, norm_topk_prob=True, mlp_only_layers=[])
    elif arch == "deepseek_v2":
        cls, name = transformers.DeepseekV2Config, "DeepseekV2ForCausalLM"
        common.update(tie_word_embeddings=False, num_hidden_layers=3, num_key_value_heads=4, q_lora_rank=None,
                      kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=24, head_dim=16,
                      n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32,
                      first_k_dense_replace=1, topk_method="greedy", routed_scaling_factor=1.0,
                      norm_topk_prob=False, rope_theta=10000.0, attention_bias=False)
    else:
        cls, name = transformers.Qwen3Config, "Qwen3ForCausalLM"
        common.update(tie_word_embeddings=True, head_dim=32, use_sliding_window=False, attention_bias=False, rope_theta=10000.0)
    common.update(overrides)
    config = cls(**common)
    config.architectures = [name]
    return config


def make_tiny_checkpoint(arch: str, path, *, seed: int = 0, shard: bool = False, **overrides: Any) -> str:
    """Write a tiny random HF checkpoint of `arch` (+ tokenizer) into path; returns str(path)."""
    import transformers

    config = tiny_config(arch, **overrides)
    path = str(path)
    os.makedirs(path, exist_ok=True)
    model_cls = getattr(transformers, config.architectures[0])
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        # Re-draw every weight matrix explicitly (independent of transformers' init
        # details, which differ between versions), norms stay at 1.
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=gen) * INIT_STD)
            elif name.endswith(".bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * INIT_STD)
        head = model.get_output_embeddings().weight
        head.copy_(torch.randn(head.shape, generator=gen) * LM_HEAD_STD)
    save_kwargs: dict[str, Any] = {}
    if shard:
        save_kwargs["max_shard_size"] = "100KB"
    model.save_pretrained(path, **save_kwargs)
    make_tiny_tokenizer(path)
    if shard and not os.path.exists(os.path.join(path, "model.safetensors.index.json")):
        raise RuntimeError("save_pretrained did not shard the tiny checkpoint")
    return path
