"""Greedy decoding and prompt logprobs with Hugging Face transformers: the reference nobody here wrote."""
from __future__ import annotations

import os
from functools import lru_cache

import torch


@lru_cache(maxsize=4)
def load_hf_model(model_path: str):
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=torch.float32, attn_implementation="eager")
    if model_path.endswith(".gguf"):
        model = AutoModelForCausalLM.from_pretrained(os.path.dirname(model_path),
                                                     gguf_file=os.path.basename(model_path), **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    return model.eval()


@torch.inference_mode()
def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, stop_ids: set[int] = frozenset()) -> list[int]:
    """Plain greedy loop over HF's KV cache; stops after a token in stop_ids (which is kept)."""
    out = model(torch.tensor([prompt_ids]), use_cache=True)
    past, generated = out.past_key_values, []
    for _ in range(max_new_tokens):
        token = int(out.logits[0, -1].argmax())
        generated.append(token)
        if token in stop_ids:
            break
        out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
    return generated


@torch.inference_mode()
def hf_prompt_logprobs(model, prompt_ids: list[int]) -> torch.Tensor:
    """log p(prompt[t+1] | prompt[:t+1]) for t = 0..len-2, float64."""
    logits = model(torch.tensor([prompt_ids])).logits[0].double()
    lp = torch.log_softmax(logits, dim=-1)
    return lp[:-1].gather(1, torch.tensor(prompt_ids[1:])[:, None])[:, 0]
