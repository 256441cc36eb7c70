"""Chat rendering shared by LLM.chat and the server, and prompt truncation (no server needed)."""
import pytest
from transformers import AutoTokenizer

from braid.entrypoints.chat_utils import ChatInputError, render_chat
from braid.entrypoints.openai_serving import _truncate_keeping_specials
from tests.tiny_checkpoints import make_tiny_tokenizer

MESSAGES = [{"role": "user", "content": "hi"}]
TOOLS = [{"type": "function", "function": {"name": "f"}}]


@pytest.fixture()
def tokenizer(tmp_path):
    return AutoTokenizer.from_pretrained(make_tiny_tokenizer(tmp_path / "tok"))


def test_named_templates_are_left_to_transformers(tokenizer):
    """A tokenizer may carry several named templates (a dict): transformers picks "tool_use"
    when tools are given, else "default"; braid must not pass the dict on as the template."""
    default = tokenizer.chat_template
    tokenizer.chat_template = {"default": default, "tool_use": "{% for m in messages %}TOOLS {{ m['content'] }}{% endfor %}"}
    text, ids = render_chat(tokenizer, MESSAGES)
    assert text == tokenizer.apply_chat_template(MESSAGES, chat_template=default, add_generation_prompt=True,
                                                 tokenize=False)
    assert ids == tokenizer.encode(text, add_special_tokens=False)
    assert render_chat(tokenizer, MESSAGES, tools=TOOLS)[0] == "TOOLS hi"
    assert render_chat(tokenizer, MESSAGES, chat_template="X{{ messages[0]['content'] }}")[0] == "Xhi"


def test_content_parts_and_bad_messages(tokenizer):
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert render_chat(tokenizer, parts)[0] == render_chat(tokenizer, [{"role": "user", "content": "a\nb"}])[0]
    cases = [
        ([], "messages"),
        ([{"content": "no role"}], "messages.0"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "messages.0.content"),
        ([{"role": "user", "content": 5}], "messages.0.content"),
    ]
    for messages, param in cases:
        with pytest.raises(ChatInputError) as e:
            render_chat(tokenizer, messages)
        assert e.value.param == param
    with pytest.raises(ChatInputError) as e:
        render_chat(tokenizer, MESSAGES, continue_final_message=True)
    assert e.value.param == "continue_final_message"
    tokenizer.chat_template = None
    with pytest.raises(ChatInputError, match="no chat template"):
        render_chat(tokenizer, MESSAGES)


def test_truncation_keeps_the_tokenizers_special_tokens():
    # [BOS] + text (+ [EOS]): the last k tokens of the text, the specials kept (the tokenizer's own
    # left truncation); without specials, simply the last k.
    assert _truncate_keeping_specials([1, 5, 6, 7, 8], [5, 6, 7, 8], 3) == [1, 7, 8]
    assert _truncate_keeping_specials([1, 5, 6, 7, 8, 2], [5, 6, 7, 8], 4) == [1, 7, 8, 2]
    assert _truncate_keeping_specials([5, 6, 7], [5, 6, 7], 2) == [6, 7]
    assert _truncate_keeping_specials([1, 5, 6], [5, 6], 1) == [6]
