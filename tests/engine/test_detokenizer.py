"""Incremental detokenization: the Rust stream (fast tokenizers) emits exactly the chunks of
the Python prefix/read-offset path, and the text both build is what HF's tokenizer decodes."""
import random

import pytest

from braid.engine.detokenizer import IncrementalDetokenizer
from braid.transformers_utils import default_model_path, load_tokenizer

TEXTS = ["Héllo wörld! 日本語のテキスト 😀 emoji 🚀 and code: def f(x): return x**2",
         "  leading spaces\n\nnewlines\ttabs", "Ünïcödé ñ 中文 한국어 العربية"]


class PythonPathOnly:
    """The tokenizer without its Rust backend: the detokenizer takes the Python path."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer

    def decode(self, ids, skip_special_tokens):
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(default_model_path())


def _sequences(tokenizer, rng):
    for trial in range(400):
        prompt = tokenizer.encode(rng.choice(TEXTS), add_special_tokens=False)[: rng.randrange(1, 12)]
        if trial % 2:
            ids = tokenizer.encode(rng.choice(TEXTS) * 2, add_special_tokens=False)
        else:  # any id, special tokens and stray bytes of multi-byte characters included
            ids = [rng.randrange(len(tokenizer)) for _ in range(30)]
        yield prompt, ids, trial % 3 != 0


def test_rust_stream_emits_the_python_paths_chunks(tokenizer):
    rng = random.Random(0)
    streamed = 0
    for prompt, ids, skip in _sequences(tokenizer, rng):
        fast = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip)
        slow = IncrementalDetokenizer(PythonPathOnly(tokenizer), prompt, skip_special_tokens=skip)
        assert slow._stream is None
        streamed += fast._stream is not None
        step = rng.randrange(1, 4)  # one token per call, or a few (multi-step outputs)
        for i in range(0, len(ids), step):
            assert fast.add_tokens(ids[i : i + step]) == slow.add_tokens(ids[i : i + step]), (prompt, ids[: i + step])
        assert fast.output_text == slow.output_text
    assert streamed > 300  # the Rust path ran for (nearly) every sequence


def test_text_is_what_the_tokenizer_decodes(tokenizer):
    for text in TEXTS:
        prompt = tokenizer.encode("Say:", add_special_tokens=False)
        ids = tokenizer.encode(text, add_special_tokens=False)
        det = IncrementalDetokenizer(tokenizer, prompt)
        assert det._stream is not None
        for token_id in ids:
            det.add_tokens([token_id])
        context = tokenizer.decode(prompt[-5:])
        assert det.output_text == tokenizer.decode(prompt[-5:] + ids)[len(context):]


def test_a_context_cut_mid_character_takes_the_python_path(tokenizer):
    emoji = tokenizer.encode("😀", add_special_tokens=False)
    assert len(emoji) > 1  # byte-level pieces
    det = IncrementalDetokenizer(tokenizer, emoji[:1])
    assert det._stream is None
    assert det.add_tokens(emoji[1:]) == IncrementalDetokenizer(PythonPathOnly(tokenizer), emoji[:1]).add_tokens(
        emoji[1:])
