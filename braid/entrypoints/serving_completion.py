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
from braid.entrypoints.protocol import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    now,
    random_id,
)


def completion_logprobs(tokenizer, token_ids: list[int], entries: list, start_offset: int = 0) -> CompletionLogprobs:
    """Legacy logprobs of `token_ids`; an entry of None (the first prompt token) has no logprob."""
    result = CompletionLogprobs()
    offset = start_offset
    for tid, entry in zip(token_ids, entries):
        chosen = entry.get(tid) if entry else None
        if chosen is None:
            token = tokenizer.decode([tid])
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
        else:
            token = chosen.decoded_token if chosen.decoded_token is not None else tokenizer.decode([tid])
            result.token_logprobs.append(chosen.logprob)
            top: dict[str, float] = {}
            for lp in entry.values():  # the sampled token first; tokens that decode alike keep the first
                top.setdefault(lp.decoded_token or "", lp.logprob)
            result.top_logprobs.append(top)
        result.tokens.append(token)
        result.text_offset.append(offset)
        offset += len(token)
    return result


def _extend(a: CompletionLogprobs, b: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(text_offset=a.text_offset + b.text_offset, token_logprobs=a.token_logprobs + b.token_logprobs,
                              tokens=a.tokens + b.tokens, top_logprobs=a.top_logprobs + b.top_logprobs)


def _end_offset(lp: CompletionLogprobs, start: int) -> int:
    return lp.text_offset[-1] + len(lp.tokens[-1]) if lp.tokens else start


class OpenAIServingCompletion(OpenAIServing):
    def _prompts(self, prompt) -> list[tuple[str, list[int]]]:
        """Normalize the four prompt forms to (text, token ids) pairs."""
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
            if isinstance(item, str):
                result.append((item, self.tokenizer.encode(item)))
            else:
                vocab = self.engine.input_processor.vocab_size
                if not item or any(not 0 <= t < vocab for t in item):
                    raise bad_request(f"prompt token ids must be in [0, {vocab}) and not empty", "prompt")
                result.append((self.tokenizer.decode(item), list(item)))
        return result

    async def create(self, request: CompletionRequest) -> CompletionResponse | AsyncIterator[str]:
        model = self.check_model(request.model)
        self.check_common(request)
        if request.suffix:
            raise bad_request("suffix is not supported", "suffix")
        if request.best_of is not None and request.best_of != request.n:
            raise bad_request("best_of is not supported (it must equal n when given)", "best_of")
        prompts = self._prompts(request.prompt)
        self.check_engine()
        request_id = random_id("cmpl")
        prompt_logprobs = request.logprobs if request.echo else None
        inputs = []
        for i, (text, ids) in enumerate(prompts):
            max_tokens = self.max_tokens_for(len(ids), request.max_tokens)
            params = self.sampling_params(request, max_tokens=max_tokens, logprobs=request.logprobs,
                                          prompt_logprobs=prompt_logprobs)
            engine_prompt = {"prompt": text, "prompt_token_ids": ids}
            self.validate_prompt(f"{request_id}-{i}", engine_prompt, params)
            inputs.append((f"{request_id}-{i}", engine_prompt, params))
        gens = [self.engine.generate(p, sp, rid) for rid, p, sp in inputs]
        texts = [text for text, _ in prompts]
        if request.stream:
            return self._stream(request, request_id, model, gens, texts)
        return await self._full(request, request_id, model, gens, texts)

    def _echo_logprobs(self, out) -> CompletionLogprobs:
        return completion_logprobs(self.tokenizer, out.prompt_token_ids, out.prompt_logprobs or [None])

    async def _full(self, request: CompletionRequest, request_id: str, model: str, gens, texts) -> CompletionResponse:
        outs = await final_outputs(gens)
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for i, out in enumerate(outs):
            prompt_tokens += len(out.prompt_token_ids)
            for c in out.outputs:
                completion_tokens += len(c.token_ids)
                text = texts[i] + c.text if request.echo else c.text
                logprobs = None
                if request.logprobs is not None:
                    prefix = self._echo_logprobs(out) if request.echo else CompletionLogprobs()
                    logprobs = _extend(prefix, completion_logprobs(self.tokenizer, c.token_ids, c.logprobs or [],
                                                                   _end_offset(prefix, 0)))
                choices.append(CompletionChoice(index=i * request.n + c.index, text=text, logprobs=logprobs,
                                                finish_reason=c.finish_reason, stop_reason=c.stop_reason))
        return CompletionResponse(id=request_id, created=now(), model=model, choices=choices,
                                  usage=usage(prompt_tokens, completion_tokens))

    async def _stream(self, request: CompletionRequest, request_id: str, model: str, gens, texts) -> AsyncIterator[str]:
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
                    delta = c.text[sent_text.get(index, 0):]
                    new_ids = c.token_ids[sent_tokens.get(index, 0):]
                    logprobs = None
                    if request.logprobs is not None:
                        prefix = self._echo_logprobs(out) if request.echo and first else CompletionLogprobs()
                        start = _end_offset(prefix, offsets.get(index, 0))
                        lp_new = (c.logprobs or [])[sent_tokens.get(index, 0):]
                        logprobs = _extend(prefix, completion_logprobs(self.tokenizer, new_ids, lp_new, start))
                        offsets[index] = _end_offset(logprobs, start)
                    if request.echo and first:
                        delta = texts[i] + delta
                    if not delta and not new_ids and c.finish_reason is None and not first:
                        continue
                    sent_text[index] = len(c.text)
                    sent_tokens[index] = len(c.token_ids)
                    if c.finish_reason is not None:
                        finished.add(index)
                        completion_tokens[index] = len(c.token_ids)
                    chunk = CompletionChunk(id=request_id, created=created, model=model, choices=[CompletionChoice(
                        index=index, text=delta, logprobs=logprobs, finish_reason=c.finish_reason,
                        stop_reason=c.stop_reason)])
                    yield sse(chunk, exclude)
            if include_usage:
                total = usage(sum(prompt_tokens.values()), sum(completion_tokens.values()))
                yield sse(CompletionChunk(id=request_id, created=created, model=model, choices=[], usage=total))
        except Exception as e:  # noqa: BLE001 - the stream has started: report in-band
            yield stream_error(e)
        yield SSE_DONE
