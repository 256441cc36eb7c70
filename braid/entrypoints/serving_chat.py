"""POST /v1/chat/completions: messages -> the tokenizer's chat template -> one engine
request (n samples) -> a response or an SSE stream."""
from __future__ import annotations

from typing import Any, AsyncIterator

from braid.entrypoints.openai_serving import (
    SSE_DONE,
    OpenAIServing,
    bad_request,
    final_output,
    merge,
    sse,
    stream_error,
    usage,
)
from braid.entrypoints.protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatResponseMessage,
    ChatStreamChoice,
    ChatTokenLogprob,
    TopLogprob,
    now,
    random_id,
)


def chat_logprobs(tokenizer, token_ids: list[int], entries: list, top_n: int) -> ChatLogprobs:
    content = []
    for tid, entry in zip(token_ids, entries):
        chosen = entry[tid]
        token = chosen.decoded_token if chosen.decoded_token is not None else tokenizer.decode([tid])
        top = sorted((lp for lp in entry.values() if lp.rank is not None and lp.rank <= top_n),
                     key=lambda lp: lp.rank)[:top_n]
        content.append(ChatTokenLogprob(
            token=token, logprob=chosen.logprob, bytes=list(token.encode("utf-8")),
            top_logprobs=[TopLogprob(token=lp.decoded_token or "", logprob=lp.logprob,
                                     bytes=list((lp.decoded_token or "").encode("utf-8"))) for lp in top]))
    return ChatLogprobs(content=content)


def _message_dict(message: ChatMessage, i: int) -> dict[str, Any]:
    content = message.content
    if isinstance(content, list):  # content parts: only text is supported
        texts = []
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"messages[{i}].content: only text content parts are supported, "
                                  f"got type {part.get('type')!r}", f"messages.{i}.content")
            texts.append(part["text"])
        content = "\n".join(texts)
    return {**(message.model_extra or {}), "role": message.role, "content": content if content is not None else ""}


class OpenAIServingChat(OpenAIServing):
    def render(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
               kwargs: dict[str, Any] | None = None) -> tuple[str, list[int]]:
        """The chat template's text and its token ids (the template already has the special tokens)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise bad_request("this model's tokenizer has no chat template; use /v1/completions instead", "messages")
        if not messages:
            raise bad_request("messages must not be empty", "messages")
        conversation = [_message_dict(m, i) for i, m in enumerate(messages)]
        try:
            text = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                                      tokenize=False, **(kwargs or {}))
        except Exception as e:  # noqa: BLE001 - jinja errors (raise_exception, bad roles) are the input's fault
            raise bad_request(f"the chat template failed on these messages: {e}", "messages") from None
        return text, self.tokenizer.encode(text, add_special_tokens=False)

    async def create(self, request: ChatCompletionRequest) -> ChatCompletionResponse | AsyncIterator[str]:
        model = self.check_model(request.model)
        self.check_common(request)
        if request.response_format is not None and request.response_format.type != "text":
            raise bad_request(f"response_format type {request.response_format.type!r} is not supported "
                              f"(only 'text')", "response_format")
        if request.tools:
            raise bad_request("tools are not supported", "tools")
        if request.top_logprobs is not None and not request.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
        text, ids = self.render(request.messages, request.add_generation_prompt, request.chat_template_kwargs)
        self.check_engine()
        param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        max_tokens = self.max_tokens_for(len(ids), max_tokens, param)
        top_n = request.top_logprobs or 0
        params = self.sampling_params(request, max_tokens=max_tokens, logprobs=top_n if request.logprobs else None)
        request_id = random_id("chatcmpl")
        prompt = {"prompt": text, "prompt_token_ids": ids}
        self.validate_prompt(request_id, prompt, params)
        gen = self.engine.generate(prompt, params, request_id)
        if request.stream:
            return self._stream(request, request_id, model, gen)
        return await self._full(request, request_id, model, gen)

    def _logprobs(self, request: ChatCompletionRequest, token_ids, entries) -> ChatLogprobs | None:
        if not request.logprobs:
            return None
        return chat_logprobs(self.tokenizer, token_ids, entries or [], request.top_logprobs or 0)

    async def _full(self, request, request_id: str, model: str, gen) -> ChatCompletionResponse:
        out = await final_output(gen)
        choices = [
            ChatCompletionChoice(index=c.index, message=ChatResponseMessage(content=c.text),
                                 logprobs=self._logprobs(request, c.token_ids, c.logprobs),
                                 finish_reason=c.finish_reason, stop_reason=c.stop_reason)
            for c in out.outputs
        ]
        completion_tokens = sum(len(c.token_ids) for c in out.outputs)
        return ChatCompletionResponse(id=request_id, created=now(), model=model, choices=choices,
                                      usage=usage(len(out.prompt_token_ids), completion_tokens))

    async def _stream(self, request, request_id: str, model: str, gen) -> AsyncIterator[str]:
        created = now()
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        exclude = None if include_usage else {"usage"}

        def chunk(choice: ChatStreamChoice) -> str:
            return sse(ChatCompletionChunk(id=request_id, created=created, model=model, choices=[choice]), exclude)

        sent_text = [0] * request.n
        sent_tokens = [0] * request.n
        finished = [False] * request.n
        prompt_tokens = completion_tokens = 0
        try:
            for index in range(request.n):
                yield chunk(ChatStreamChoice(index=index, delta={"role": "assistant", "content": ""}))
            async for _, out in merge([gen]):
                prompt_tokens = len(out.prompt_token_ids)
                for c in out.outputs:
                    i = c.index
                    if finished[i]:
                        continue
                    delta = c.text[sent_text[i]:]
                    new_ids = c.token_ids[sent_tokens[i]:]
                    if not delta and c.finish_reason is None and not (new_ids and request.logprobs):
                        continue
                    logprobs = self._logprobs(request, new_ids, (c.logprobs or [])[sent_tokens[i]:])
                    sent_text[i], sent_tokens[i] = len(c.text), len(c.token_ids)
                    if c.finish_reason is not None:
                        finished[i] = True
                        completion_tokens += len(c.token_ids)
                    yield chunk(ChatStreamChoice(index=i, delta={"content": delta} if delta else {}, logprobs=logprobs,
                                                 finish_reason=c.finish_reason, stop_reason=c.stop_reason))
            if include_usage:
                yield sse(ChatCompletionChunk(id=request_id, created=created, model=model, choices=[],
                                              usage=usage(prompt_tokens, completion_tokens)))
        except Exception as e:  # noqa: BLE001 - the stream has started: report in-band
            yield stream_error(e)
        yield SSE_DONE
