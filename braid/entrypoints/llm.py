"""The offline API: braid.LLM(model=...).generate(...) and .chat(...)."""
from __future__ import annotations

import itertools
from typing import Any, Callable, Sequence

from braid.engine.arg_utils import EngineArgs
from braid.engine.input_processor import PromptType
from braid.engine.llm_engine import LLMEngine
from braid.entrypoints.chat_utils import render_chat
from braid.outputs import RequestOutput
from braid.sampling_params import SamplingParams

Conversation = list[dict[str, Any]]


class LLM:
    """An LLM engine for offline batched generation.

    LLM(model=None) loads the embedded SmolLM2-135M-Instruct; any EngineArgs field
    (dtype, max_model_len, kv_cache_memory, enable_prefix_caching, ...) is a keyword.
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        self.engine_args = EngineArgs(model=model, **kwargs)
        self.llm_engine = LLMEngine.from_engine_args(self.engine_args)
        self._ids = itertools.count()
        self._sampling_defaults = self.llm_engine.config.model.sampling_defaults()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What generate/chat use when given no sampling_params: the model's
        generation_config.json values over the library defaults (--generation-config)."""
        return SamplingParams(**self._sampling_defaults)

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | Callable[..., Any] = True,
    ) -> list[RequestOutput]:
        if prompts is None:
            raise ValueError("prompts must be a prompt or a list of prompts, got None")
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"got {len(params_list)} sampling_params for {len(prompts)} prompts")
        request_ids = []
        try:
            for prompt, params in zip(prompts, params_list):
                request_id = str(next(self._ids))
                self.llm_engine.add_request(request_id, prompt, params)
                request_ids.append(request_id)
        except BaseException:
            self.llm_engine.abort_request(request_ids)  # all or nothing (also on Ctrl-C)
            raise
        return self._run(request_ids, use_tqdm)

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | Callable[..., Any] = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or several, through the chat template (as the
        server's chat endpoint: text content parts are joined; bad messages are a ValueError)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conversation in conversations:
            text, ids = render_chat(self.get_tokenizer(), conversation, chat_template=chat_template,
                                    add_generation_prompt=add_generation_prompt,
                                    continue_final_message=continue_final_message, tools=tools,
                                    chat_template_kwargs=chat_template_kwargs)
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool | Callable[..., Any]) -> list[RequestOutput]:
        """Step until these requests finish. use_tqdm: a progress bar, or (as vLLM) the tqdm-like class to use."""
        pending = set(request_ids)
        finished: dict[str, RequestOutput] = {}
        bar = None
        try:
            if use_tqdm:
                from tqdm.auto import tqdm

                make_bar = use_tqdm if callable(use_tqdm) else tqdm
                bar = make_bar(total=len(request_ids), desc="Processed prompts", dynamic_ncols=True)
            while pending:
                for output in self.llm_engine.step(final_only=True):
                    if output.finished and output.request_id in pending:
                        pending.discard(output.request_id)
                        finished[output.request_id] = output
                        if bar is not None:
                            bar.update(1)
        except BaseException:  # e.g. Ctrl-C: the unfinished requests must not run on in later calls
            self.llm_engine.abort_request(sorted(pending))
            raise
        finally:
            if bar is not None:
                bar.close()
        return [finished[r] for r in request_ids]
