"""POST /v1/completions: prompts -> engine requests -> a response or an SSE stream."""
from __future__ import annotations

from typing import AsyncIterator

from braid.entrypoints.openai_serving import (
    SSE_DONE,
    OpenAIServing,
    bad_request,
    final_outputs,
    merge,
    sse,
    stream_error,
    usage,
)
from braid.entrypoints.logprob_shapes import completion_logprobs, end_offset, extend, prompt_logprobs
from braid.entrypoints.protocol import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamChoice,
    now,
    random_id,
)


class OpenAIServingCompletion(OpenAIServing):
    def _prompts(self, request: CompletionRequest) -> list[tuple[str | None, list[int]]]:
        """Normalize the four prompt forms to (text, token ids) pairs, truncated as asked. Token ids
        are decoded to text only for echo: decoding a long prompt costs the event loop about as much
        as the rest of the request's admission together."""
        prompt = request.prompt
        if isinstance(prompt, str):
            items = [prompt]
        elif not prompt:
            raise bad_request("prompt must not be empty", "prompt")
        elif isinstance(prompt[0], int):
            items = [prompt]
        else:
            items = list(prompt)
        result = []
        for item in items:
            plain = None
            if isinstance(item, str):
                text, ids = item, self.tokenizer.encode(item, add_special_tokens=request.add_special_tokens)
                if request.truncate_prompt_tokens is not None and request.add_special_tokens:
                    plain = self.tokenizer.encode(item, add_special_tokens=False)
            else:
                vocab = self.engine.input_processor.vocab_size
                if not item or any(not 0 <= t < vocab for t in item):
                    raise bad_request(f"prompt token ids must be in [0, {vocab}) and not empty", "prompt")
                text, ids = None, list(item)
            text, ids = self.truncate(request, text, ids, plain)
            if text is None and request.echo:
                text = self.tokenizer.decode(ids)
            result.append((text, ids))
        return result

    async def create(self, request: CompletionRequest) -> CompletionResponse | AsyncIterator[str]:
        model = self.check_model(request.model)
        self.check_common(request)
        if request.suffix:
            raise bad_request("suffix is not supported", "suffix")
        if request.best_of is not None and request.best_of != request.n:
            raise bad_request("best_of is not supported (it must equal n when given)", "best_of")
        prompts = self._prompts(request)
        self.check_engine()
        request_id = random_id("cmpl")
        # echo with max_tokens 0 scores the prompt (vLLM): one token is generated and dropped.
        score_only = request.echo and request.max_tokens == 0
        # The engine computes one top-n per prompt position; each response field trims to its own.
        asked = None if request.stream else request.prompt_logprobs
        wanted = [n for n in (asked, request.logprobs if request.echo else None) if n is not None]
        inputs = []
        for i, (text, ids) in enumerate(prompts):
            max_tokens = self.max_tokens_for(len(ids), 1 if score_only else request.max_tokens)
            params = self.sampling_params(request, max_tokens=max_tokens, logprobs=request.logprobs,
                                          prompt_logprobs=max(wanted) if wanted else None)
            engine_prompt = {"prompt": text, "prompt_token_ids": ids}
            self.validate_prompt(f"{request_id}-{i}", engine_prompt, params)
            inputs.append((f"{request_id}-{i}", engine_prompt, params))
        gens = [self.engine.generate(p, sp, rid) for rid, p, sp in inputs]
        texts = [text for text, _ in prompts]
        if request.stream:
            return self._stream(request, request_id, model, gens, texts, score_only)
        return await self._full(request, request_id, model, gens, texts, score_only)

    def _echo_logprobs(self, request: CompletionRequest, out) -> CompletionLogprobs:
        return completion_logprobs(self.tokenizer, out.prompt_token_ids, out.prompt_logprobs or [None],
                                   top_n=request.logprobs, as_ids=request.return_tokens_as_token_ids)

    def _logprobs(self, request: CompletionRequest, token_ids, entries, start: int) -> CompletionLogprobs:
        return completion_logprobs(self.tokenizer, token_ids, entries or [], start,
                                   top_n=request.logprobs, as_ids=request.return_tokens_as_token_ids)

    @staticmethod
    def _generated(c, score_only: bool):
        """(text, token ids, logprobs, finish_reason, stop_reason) of a sample as answered:
        a score-only request answers none of its one generated token."""
        if score_only:
            return "", [], [], "length" if c.finish_reason is not None else None, None
        return c.text, c.token_ids, c.logprobs or [], c.finish_reason, c.stop_reason

    async def _full(self, request: CompletionRequest, request_id: str, model: str, gens, texts,
                    score_only: bool) -> CompletionResponse:
        outs = await final_outputs(gens)
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for i, out in enumerate(outs):
            prompt_tokens += len(out.prompt_token_ids)
            scored = None
            if request.prompt_logprobs is not None:
                scored = prompt_logprobs(self.tokenizer, out.prompt_token_ids, out.prompt_logprobs,
                                         request.prompt_logprobs)
            for c in out.outputs:
                text, token_ids, entries, finish_reason, stop_reason = self._generated(c, score_only)
                completion_tokens += len(token_ids)
                text = texts[i] + text if request.echo else text
                logprobs = None
                if request.logprobs is not None:
                    prefix = self._echo_logprobs(request, out) if request.echo else CompletionLogprobs()
                    logprobs = extend(prefix, self._logprobs(request, token_ids, entries, end_offset(prefix, 0)))
                choices.append(CompletionChoice(index=i * request.n + c.index, text=text, logprobs=logprobs,
                                                prompt_logprobs=scored, finish_reason=finish_reason,
                                                stop_reason=stop_reason))
        return CompletionResponse(id=request_id, created=now(), model=model, choices=choices,
                                  usage=usage(prompt_tokens, completion_tokens))

    async def _stream(self, request: CompletionRequest, request_id: str, model: str, gens, texts,
                      score_only: bool) -> AsyncIterator[str]:
        created, n = now(), request.n
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        exclude = None if include_usage else {"usage"}
        sent_text: dict[int, int] = {}
        sent_tokens: dict[int, int] = {}
        offsets: dict[int, int] = {}
        finished: set[int] = set()
        prompt_tokens: dict[int, int] = {}
        completion_tokens: dict[int, int] = {}
        try:
            async for i, out in merge(gens):
                prompt_tokens[i] = len(out.prompt_token_ids)
                for c in out.outputs:
                    index = i * n + c.index
                    if index in finished:
                        continue
                    first = index not in sent_text
                    if first and not (c.token_ids or c.finish_reason):
                        continue  # the prompt is still being processed
                    text, token_ids, entries, finish_reason, stop_reason = self._generated(c, score_only)
                    delta = text[sent_text.get(index, 0):]
                    new_ids = token_ids[sent_tokens.get(index, 0):]
                    logprobs = None
                    if request.logprobs is not None:
                        prefix = self._echo_logprobs(request, out) if request.echo and first else CompletionLogprobs()
                        start = end_offset(prefix, offsets.get(index, 0))
                        lp_new = entries[sent_tokens.get(index, 0):]
                        logprobs = extend(prefix, self._logprobs(request, new_ids, lp_new, start))
                        offsets[index] = end_offset(logprobs, start)
                    if request.echo and first:
                        delta = texts[i] + delta
                    if not delta and not new_ids and finish_reason is None and not first:
                        continue
                    sent_text[index] = len(text)
                    sent_tokens[index] = len(token_ids)
                    if finish_reason is not None:
                        finished.add(index)
                        completion_tokens[index] = len(token_ids)
                    chunk = CompletionChunk(id=request_id, created=created, model=model, choices=[
                        CompletionStreamChoice(index=index, text=delta, logprobs=logprobs,
                                               finish_reason=finish_reason, stop_reason=stop_reason)])
                    yield sse(chunk, exclude)
            if include_usage:
                total = usage(sum(prompt_tokens.values()), sum(completion_tokens.values()))
                yield sse(CompletionChunk(id=request_id, created=created, model=model, choices=[], usage=total))
        except Exception as e:  # noqa: BLE001 - the stream has started: report in-band
            yield stream_error(e)
        yield SSE_DONE
