"""What the completions and chat endpoints share: errors in OpenAI's shape, the
model-name check, OpenAI fields -> SamplingParams, the context-length check, and
merging the output streams of several prompts."""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncIterator

from pydantic import BaseModel, ValidationError

from braid.entrypoints.protocol import (
    UNSUPPORTED_FIELDS,
    ChatCompletionRequest,
    CompletionRequest,
    ErrorInfo,
    ErrorResponse,
    UsageInfo,
)
from braid.errors import EngineDeadError
from braid.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# A request may ask for at most this many samples (each is its own engine request).
MAX_N = 128


class APIError(Exception):
    """An error answered to the client as {"error": {...}} with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: int | str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param
        self.code = status if code is None else code

    def body(self) -> dict[str, Any]:
        info = ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=info).model_dump()


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


# Names a ValueError's first word may be taken for: the request fields.
_PARAMS = frozenset(CompletionRequest.model_fields) | frozenset(ChatCompletionRequest.model_fields)


def from_value_error(e: ValueError) -> APIError:
    """Engine and SamplingParams errors start with the name of the offending field."""
    message = str(e)
    first = message.split(" ", 1)[0]
    return bad_request(message, first if first in _PARAMS else None)


def parse_json(model: type[BaseModel], raw: bytes) -> Any:
    """Validate a request body; malformed JSON and wrong types are 400s naming the field."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        first = errors[0]
        if first["type"] == "json_invalid":
            raise bad_request(f"malformed JSON body: {first['msg']}") from None
        if first["type"] == "model_type":
            raise bad_request("the request body must be a JSON object") from None
        # A union field reports one error per alternative, its loc ending in the alternative's
        # type (stop.str, stop.list[str]): the param is the path all the errors share.
        shared = _common_prefix([err["loc"] for err in errors]) or first["loc"][:1]
        param = ".".join(str(p) for p in shared) or None
        fields = sorted({str(err["loc"][0]) for err in errors if err["loc"]})
        detail = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in errors[:4])
        raise bad_request(f"invalid request field(s) {', '.join(fields)}: {detail}", param) from None


def _common_prefix(paths: list[tuple]) -> tuple:
    prefix = paths[0]
    for path in paths[1:]:
        n = 0
        while n < min(len(prefix), len(path)) and prefix[n] == path[n]:
            n += 1
        prefix = prefix[:n]
    return tuple(prefix)


def sse(data: BaseModel | dict, exclude: set[str] | None = None) -> str:
    if isinstance(data, BaseModel):
        return f"data: {data.model_dump_json(exclude=exclude)}\n\n"
    return f"data: {json.dumps(data)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class OpenAIServing:
    """Shared state of the endpoints: the engine and the names it is served under."""

    def __init__(self, engine, served_model_names: list[str], sampling_defaults: dict[str, Any] | None = None) -> None:
        self.engine = engine
        self.served_model_names = list(served_model_names)
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        # What a request leaves unset (the model's generation_config.json; generation_defaults).
        self.sampling_defaults = dict(sampling_defaults or {})

    def check_model(self, model: str | None) -> str:
        """The name to answer with; 404 for a model this server does not serve."""
        if model is None:
            return self.served_model_names[0]
        if model not in self.served_model_names:
            raise APIError(404, f"The model `{model}` does not exist. This server serves: "
                           f"{', '.join(self.served_model_names)}.", param="model", code="model_not_found")
        return model

    def check_engine(self) -> None:
        self.engine.check_health()  # EngineDeadError -> 503 in the app's handler

    def check_common(self, request) -> None:
        if not 1 <= request.n <= MAX_N:
            raise bad_request(f"n must be in [1, {MAX_N}], got {request.n}", "n")
        if request.stream_options is not None and not request.stream:
            raise bad_request("stream_options can only be given when stream is true", "stream_options")
        if request.stream_options is not None and request.stream_options.continuous_usage_stats:
            raise bad_request("stream_options.continuous_usage_stats is not supported by braid (include_usage is)",
                              "stream_options")
        if request.logit_bias:
            raise bad_request("logit_bias is not supported", "logit_bias")
        extra = request.model_extra or {}
        for name, neutral in UNSUPPORTED_FIELDS.items():
            if name in extra and not any(extra[name] == v and type(extra[name]) is type(v) for v in neutral):
                raise bad_request(f"{name} is not supported by braid", name)
        if request.response_format is not None and request.response_format.type != "text":
            raise bad_request(f"response_format type {request.response_format.type!r} is not supported "
                              f"(only 'text')", "response_format")
        if request.prompt_logprobs and request.stream:  # as vLLM: 0 passes (and streams nothing)
            raise bad_request("prompt_logprobs is not available when stream is true", "prompt_logprobs")
        k = request.truncate_prompt_tokens
        if k is not None and k != -1 and k < 1:
            raise bad_request(f"truncate_prompt_tokens must be -1 or at least 1, got {k}", "truncate_prompt_tokens")

    def truncate(self, request, text: str | None, ids: list[int],
                 plain_ids: list[int] | None = None) -> tuple[str | None, list[int]]:
        """vLLM's truncate_prompt_tokens: keep the prompt's last k tokens (-1: the context).
        plain_ids: a text prompt's ids without the special tokens the tokenizer adds (BOS...):
        those stay, as the tokenizer's own left truncation keeps them. A prompt without text
        (token ids) stays without."""
        k = request.truncate_prompt_tokens
        if k is None:
            return text, ids
        k = self.max_model_len if k == -1 else k
        if len(ids) <= k:
            return text, ids
        ids = ids[-k:] if plain_ids is None else _truncate_keeping_specials(ids, plain_ids, k)
        return (None if text is None else self.tokenizer.decode(ids)), ids

    def max_tokens_for(self, num_prompt_tokens: int, max_tokens: int | None, param: str = "max_tokens") -> int | None:
        """Check that the prompt and the requested output fit in the context (vLLM's message).
        No max_tokens: the model's max_new_tokens (generation_config.json) as far as the
        context allows, else None (the rest of the context)."""
        if max_tokens is None and "max_tokens" in self.sampling_defaults and num_prompt_tokens < self.max_model_len:
            max_tokens = min(self.sampling_defaults["max_tokens"], self.max_model_len - num_prompt_tokens)
        if max_tokens is not None and max_tokens < 1:
            raise bad_request(f"{param} must be at least 1, got {max_tokens}", param)
        if num_prompt_tokens >= self.max_model_len:
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt has "
                f"{num_prompt_tokens} tokens, which leaves no room for output. Please reduce the length of the "
                f"prompt.", "prompt")
        if max_tokens is not None and num_prompt_tokens + max_tokens > self.max_model_len:
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, {max_tokens} in the "
                f"completion). Please reduce the length of the prompt or of {param}.", param)
        return max_tokens

    def sampling_params(self, request, *, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        # Their upper bound (--max-logprobs) is the engine's check, in validate_prompt.
        def pick(name: str, library_default):
            value = getattr(request, name)
            return self.sampling_defaults.get(name, library_default) if value is None else value

        try:
            return SamplingParams(
                n=request.n,
                temperature=pick("temperature", 1.0),
                top_p=pick("top_p", 1.0),
                top_k=pick("top_k", 0),
                min_p=pick("min_p", 0.0),
                seed=request.seed,
                presence_penalty=pick("presence_penalty", 0.0),
                frequency_penalty=pick("frequency_penalty", 0.0),
                repetition_penalty=pick("repetition_penalty", 1.0),
                max_tokens=max_tokens,
                min_tokens=request.min_tokens,
                stop=request.stop,
                stop_token_ids=request.stop_token_ids,
                ignore_eos=request.ignore_eos,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                include_stop_str_in_output=request.include_stop_str_in_output,
                skip_special_tokens=request.skip_special_tokens,
            )
        except ValueError as e:
            raise from_value_error(e) from None

    def validate_prompt(self, request_id: str, prompt: dict, params: SamplingParams) -> None:
        """Run the engine's own input checks now, so a stream never starts on bad input."""
        try:
            self.engine.validate(request_id, prompt, params)
        except ValueError as e:
            raise from_value_error(e) from None


def _truncate_keeping_specials(ids: list[int], plain: list[int], k: int) -> list[int]:
    """The last k tokens of `ids` = specials + `plain` + specials, keeping the specials."""
    extra = len(ids) - len(plain)
    if k <= extra or extra < 0:
        return ids[-k:]
    lead = next((i for i in range(extra + 1) if ids[i:i + len(plain)] == plain), 0)
    return ids[:lead] + plain[len(plain) - (k - extra):] + ids[lead + len(plain):]


def usage(prompt_tokens: int, completion_tokens: int) -> UsageInfo:
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)


async def final_output(gen: AsyncIterator):
    """Drain one request's stream; the last output is the whole result."""
    last = None
    async for last in gen:
        pass
    return last


async def final_outputs(gens: list[AsyncIterator]) -> list:
    """Final outputs of several requests; if one fails or this is cancelled, the rest are aborted."""
    tasks = [asyncio.create_task(final_output(g)) for g in gens]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def api_error_for(e: BaseException) -> APIError:
    """The client-facing error for an exception raised while serving a request."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, EngineDeadError):
        return APIError(503, f"the engine is not running: {e}", type="service_unavailable")
    if isinstance(e, ValueError):
        return from_value_error(e)
    logger.error("internal error while serving a request", exc_info=e)
    return APIError(500, f"internal server error: {type(e).__name__}: {e}", type="server_error")


def stream_error(e: BaseException) -> str:
    """An error after a stream has started: one SSE event in OpenAI's error shape (then [DONE])."""
    return sse(api_error_for(e).body())


async def merge(gens: list[AsyncIterator]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave several requests' streams as (stream index, output). Closing this
    generator cancels every stream, which aborts their requests in the engine."""
    if len(gens) == 1:
        try:
            async for item in gens[0]:
                yield 0, item
        finally:
            await gens[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, gen: AsyncIterator) -> None:
        try:
            async for item in gen:
                queue.put_nowait((i, item))
            queue.put_nowait((i, done))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
