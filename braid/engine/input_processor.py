"""Turn a user prompt into a validated EngineCoreRequest, or raise ValueError changing nothing."""
from __future__ import annotations

import copy
from typing import Any

from braid.engine.messages import EngineCoreRequest
from braid.sampling_params import SamplingParams

# A prompt: text, token ids, or {"prompt": text} / {"prompt_token_ids": ids}.
PromptType = str | list[int] | dict[str, Any]


def _token_ids(ids) -> list[int]:
    # bool is an int subclass, and floats would only fail later inside a step.
    if not isinstance(ids, (list, tuple)) or any(type(t) is not int for t in ids):
        raise ValueError("prompt token ids must be a list of integers")
    return list(ids)


_PROMPT_KEYS = ("prompt", "prompt_token_ids")


class InputProcessor:
    def __init__(self, tokenizer, max_model_len: int, vocab_size: int, eos_token_ids: list[int],
                 max_logprobs: int = 20) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.max_logprobs = vocab_size if max_logprobs == -1 else max_logprobs  # --max-logprobs

    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            unknown = sorted(k for k, v in prompt.items() if k not in _PROMPT_KEYS and v is not None)
            if unknown:  # e.g. multi_modal_data: dropping it would answer a different question
                raise ValueError(f"prompt keys {unknown} are not supported (only {', '.join(_PROMPT_KEYS)}: "
                                 f"braid serves text-only models)")
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), _token_ids(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)):
            return None, _token_ids(prompt)
        raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def process(self, request_id: str, prompt: PromptType, params: SamplingParams) -> tuple[str | None, EngineCoreRequest]:
        text, ids = self.tokenize(prompt)
        if not ids:
            raise ValueError("prompt is empty: it must contain at least one token")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens, but the model's context is --max-model-len "
                f"{self.max_model_len} tokens, which must leave room for at least one output token"
            )
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        if any(type(t) is not int or not 0 <= t < self.vocab_size for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be integers in [0, {self.vocab_size})")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(params, name)
            if n is not None and n > min(self.max_logprobs, self.vocab_size):
                raise ValueError(f"{name} ({n}) exceeds --max-logprobs ({self.max_logprobs}; -1 allows the "
                                 f"vocabulary, {self.vocab_size})")
        params = copy.copy(params)
        params.eos_token_ids = list(self.eos_token_ids)
        room = self.max_model_len - len(ids)
        params.max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        if params.min_tokens > params.max_tokens:
            raise ValueError(f"min_tokens ({params.min_tokens}) exceeds the room left in the context ({room} tokens)")
        return text, EngineCoreRequest(request_id, ids, params)
