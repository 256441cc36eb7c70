"""POST /v1/chat/completions: messages -> the tokenizer's chat template -> one engine
request (n samples) -> a response or an SSE stream."""
from __future__ import annotations

from typing import Any, AsyncIterator

from braid.entrypoints.chat_utils import ChatInputError, render_chat
from braid.entrypoints.openai_serving import (
    SSE_DONE,
    APIError,
    OpenAIServing,
    bad_request,
    final_output,
    merge,
    sse,
    stream_error,
    usage,
)
from braid.entrypoints.logprob_shapes import chat_logprobs, prompt_logprobs
from braid.entrypoints.protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatResponseMessage,
    ChatStreamChoice,
    now,
    random_id,
)


class OpenAIServingChat(OpenAIServing):
    def __init__(self, engine, served_model_names: list[str], sampling_defaults: dict[str, Any] | None = None,
                 chat_template: str | None = None) -> None:
        super().__init__(engine, served_model_names, sampling_defaults)
        self.chat_template = chat_template  # --chat-template: used instead of the tokenizer's own

    def render(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
               kwargs: dict[str, Any] | None = None, *, continue_final_message: bool = False,
               tools: list[dict[str, Any]] | None = None, add_special_tokens: bool = False) -> tuple[str, list[int]]:
        """The chat template's text and its token ids; bad messages are a 400."""
        try:
            return render_chat(self.tokenizer, messages, chat_template=self.chat_template,
                               add_generation_prompt=add_generation_prompt,
                               continue_final_message=continue_final_message, tools=tools,
                               chat_template_kwargs=kwargs, add_special_tokens=add_special_tokens)
        except ChatInputError as e:
            raise bad_request(str(e), e.param) from None

    @staticmethod
    def _check_tools(request: ChatCompletionRequest) -> None:
        """Tools may be shown to the model (tool_choice "none"); braid parses no tool calls."""
        choice = request.tool_choice
        if choice is not None and choice != "none" and not request.tools:
            raise bad_request("when tool_choice is given (other than 'none'), tools must be set", "tool_choice")
        if request.tools and choice != "none":
            raise bad_request("tool calls are not supported (braid has no tool-call parser); send tool_choice "
                              "'none' to put the tools in the prompt and get plain text", "tool_choice")

    async def create(self, request: ChatCompletionRequest) -> ChatCompletionResponse | AsyncIterator[str]:
        model = self.check_model(request.model)
        self.check_common(request)
        self._check_tools(request)
        if request.echo:
            raise bad_request("echo is not supported for chat completions", "echo")
        if request.top_logprobs is not None and not request.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
        text, ids = self.render(request.messages, request.add_generation_prompt, request.chat_template_kwargs,
                                continue_final_message=request.continue_final_message, tools=request.tools or None,
                                add_special_tokens=request.add_special_tokens)
        text, ids = self.truncate(request, text, ids)
        self.check_engine()
        param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        max_tokens = self.max_tokens_for(len(ids), max_tokens, param)
        top_n = request.top_logprobs or 0
        params = self.sampling_params(request, max_tokens=max_tokens, logprobs=top_n if request.logprobs else None,
                                      prompt_logprobs=None if request.stream else request.prompt_logprobs)
        request_id = random_id("chatcmpl")
        prompt = {"prompt": text, "prompt_token_ids": ids}
        try:
            self.validate_prompt(request_id, prompt, params)
        except APIError as e:  # chat's top-n is top_logprobs (the engine calls it logprobs)
            if e.param == "logprobs":
                e.param = "top_logprobs"
            raise
        gen = self.engine.generate(prompt, params, request_id)
        if request.stream:
            return self._stream(request, request_id, model, gen)
        return await self._full(request, request_id, model, gen)

    def _logprobs(self, request: ChatCompletionRequest, token_ids, entries) -> ChatLogprobs | None:
        if not request.logprobs:
            return None
        return chat_logprobs(self.tokenizer, token_ids, entries or [], request.top_logprobs or 0,
                             request.return_tokens_as_token_ids)

    async def _full(self, request, request_id: str, model: str, gen) -> ChatCompletionResponse:
        out = await final_output(gen)
        choices = [
            ChatCompletionChoice(index=c.index, message=ChatResponseMessage(content=c.text),
                                 logprobs=self._logprobs(request, c.token_ids, c.logprobs),
                                 finish_reason=c.finish_reason, stop_reason=c.stop_reason)
            for c in out.outputs
        ]
        completion_tokens = sum(len(c.token_ids) for c in out.outputs)
        scored = None
        if request.prompt_logprobs is not None:
            scored = prompt_logprobs(self.tokenizer, out.prompt_token_ids, out.prompt_logprobs,
                                     request.prompt_logprobs)
        return ChatCompletionResponse(id=request_id, created=now(), model=model, choices=choices,
                                      usage=usage(len(out.prompt_token_ids), completion_tokens),
                                      prompt_logprobs=scored)

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
