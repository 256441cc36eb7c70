"""Chat messages -> the chat template's text and token ids, for LLM.chat and the server alike."""
from __future__ import annotations

from typing import Any, Mapping, Sequence


class ChatInputError(ValueError):
    """Messages or options the chat template cannot take; `param` names the request field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _content_text(content: Any, i: int) -> str:
    """OpenAI content: a string, or a list of parts of which only text is supported (joined by newlines)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise ChatInputError(f"messages[{i}].content: only text content parts are supported, got type {kind!r}",
                                     f"messages.{i}.content")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ChatInputError(f"messages[{i}].content must be a string or a list of parts, got {type(content).__name__}",
                         f"messages.{i}.content")


def template_messages(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """Messages (dicts, or pydantic models with extra fields) as the template sees them:
    every key kept (name, tool_call_id, ...), content made plain text."""
    result = []
    for i, message in enumerate(messages):
        if hasattr(message, "model_dump"):
            message = {**(message.model_extra or {}), "role": message.role, "content": message.content}
        if not isinstance(message, Mapping) or "role" not in message:
            raise ChatInputError(f"messages[{i}] must be an object with a role", f"messages.{i}")
        result.append({**message, "content": _content_text(message.get("content"), i)})
    return result


def render_chat(tokenizer, messages: Sequence[Any], *, chat_template: str | None = None,
                add_generation_prompt: bool = True, continue_final_message: bool = False,
                tools: list[dict[str, Any]] | None = None, chat_template_kwargs: dict[str, Any] | None = None,
                add_special_tokens: bool = False) -> tuple[str, list[int]]:
    """The chat template's text and its token ids (the template already holds the special
    tokens it wants, so none are added by default). Bad input is a ChatInputError.
    chat_template overrides the tokenizer's; otherwise transformers picks the tokenizer's
    (which may be several named templates, e.g. "default" and "tool_use")."""
    if not (chat_template or getattr(tokenizer, "chat_template", None)):
        raise ChatInputError("this model's tokenizer has no chat template (give one with --chat-template or "
                             "chat_template=); use a plain prompt instead", "messages")
    if not messages:
        raise ChatInputError("messages must not be empty", "messages")
    if continue_final_message and add_generation_prompt:
        raise ChatInputError("continue_final_message and add_generation_prompt cannot both be true",
                             "continue_final_message")
    conversation = template_messages(messages)
    try:
        text = tokenizer.apply_chat_template(conversation, chat_template=chat_template,
                                             add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message, tools=tools,
                                             tokenize=False, **(chat_template_kwargs or {}))
    except Exception as e:  # noqa: BLE001 - jinja errors (raise_exception, bad roles) are the input's fault
        raise ChatInputError(f"the chat template failed on these messages: {e}", "messages") from None
    return text, tokenizer.encode(text, add_special_tokens=add_special_tokens)


def compile_chat_template(template: str) -> None:
    """Raise ValueError now if the template does not compile, as transformers compiles it
    (its extensions included), without a tokenizer: so before any model loads. Where this
    transformers has no such helper, check_chat_template catches it once the tokenizer is up."""
    from jinja2 import TemplateSyntaxError

    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:
        return
    try:
        _compile_jinja_template(template)
    except TemplateSyntaxError as e:
        raise ValueError(f"--chat-template does not compile: {e}") from None


def check_chat_template(tokenizer, template: str) -> None:
    """Fail now, not at the first request, on a template that does not compile (rendered once
    through transformers; errors that depend on the messages are left to the requests)."""
    from jinja2 import TemplateSyntaxError

    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=template, tokenize=False)
    except TemplateSyntaxError as e:
        raise ValueError(f"--chat-template does not compile: {e}") from None
    except Exception:  # noqa: BLE001 - e.g. raise_exception on this probe conversation
        pass
