"""OpenAI API shapes: requests (validated by pydantic), responses, stream chunks, errors.

Unknown request fields are accepted and ignored, as vLLM does. The vLLM and OpenAI
fields braid does not support, but that would change the result if ignored, are
listed in UNSUPPORTED_FIELDS and rejected (unless given their neutral value).
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


# ---- errors --------------------------------------------------------------------------


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ---- requests ------------------------------------------------------------------------


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's usage in every chunk: refused when true (not built)


class ResponseFormat(_Request):
    type: str


# Field -> the values that ask for nothing. vLLM extensions braid lacks (structured
# outputs, token filters, beam search, priority scheduling, per-request templates,
# embeddings as input): any other value is a 400, since ignoring it would change the answer.
UNSUPPORTED_FIELDS: dict[str, tuple[Any, ...]] = {
    **dict.fromkeys(("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs",
                     "structural_tag", "chat_template", "prompt_embeds", "logits_processors"), (None,)),
    **dict.fromkeys(("allowed_token_ids", "bad_words", "documents"), (None, [])),
    "use_beam_search": (None, False),
    "priority": (None, 0),
    "spaces_between_special_tokens": (None, True),
}


class _SamplingFields(_Request):
    """Sampling fields shared by both endpoints (vLLM's names for the non-OpenAI ones).
    Extra fields are kept (model_extra) so that UNSUPPORTED_FIELDS can be checked."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    # vLLM extensions
    truncate_prompt_tokens: int | None = None  # keep the prompt's last k tokens; -1: as many as fit
    prompt_logprobs: int | None = None
    return_tokens_as_token_ids: bool = False  # logprobs name tokens "token_id:<id>"


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # 0 with echo: score the prompt only (vLLM)
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    add_special_tokens: bool = True


class ChatMessage(BaseModel):
    """One message; extra keys (name, tool_call_id, ...) pass through to the chat template."""

    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # leave the last (assistant) message open and extend it
    add_special_tokens: bool = False  # the chat template has them already
    chat_template_kwargs: dict[str, Any] | None = None
    echo: bool = False  # vLLM: prepend the last message; not supported


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


# ---- responses -----------------------------------------------------------------------


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    """The legacy completions logprobs shape."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class _ChoiceEnd(BaseModel):
    """Why a choice stopped: set on its last chunk (or the whole response)."""

    finish_reason: str | None = None
    stop_reason: int | str | None = None


class _ResponseHead(BaseModel):
    """The fields every completion response and stream chunk carries."""

    id: str
    created: int
    model: str
    system_fingerprint: str | None = None


class PromptLogprob(BaseModel):
    """One entry of vLLM's prompt_logprobs (token id -> this)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class CompletionStreamChoice(_ChoiceEnd):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None


class CompletionChoice(CompletionStreamChoice):
    prompt_logprobs: list[dict[int, PromptLogprob] | None] | None = None


class CompletionResponse(_ResponseHead):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None


class ChatCompletionChoice(_ChoiceEnd):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(_ResponseHead):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    prompt_logprobs: list[dict[int, PromptLogprob] | None] | None = None


class ChatStreamChoice(_ChoiceEnd):
    index: int
    delta: dict[str, Any]  # {"role": ...} and/or {"content": ...}; {} on the last chunk
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(_ResponseHead):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class CompletionChunk(_ResponseHead):
    object: Literal["text_completion"] = "text_completion"  # as the whole response (OpenAI)
    choices: list[CompletionStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "braid"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str
