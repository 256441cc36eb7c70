"""The GGUF tokenizer's disk cache gives back exactly the tokenizer transformers converts."""
import os

import pytest

from braid.models.loader import gguf_tokenizer as gt
from braid.transformers_utils import default_model_path

TEXTS = [
    "The capital of France is",
    "  leading spaces, trailing tabs\t\t\nand lines\n\n",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "émigré naïve façade — 東京 🚀 ünïcödé",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "",
]
CONVERSATION = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And times 3?"},
]


@pytest.fixture(scope="module")
def model_path():
    try:
        return default_model_path()
    except RuntimeError as e:
        pytest.skip(str(e))


@pytest.fixture()
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("BRAID_CACHE_ROOT", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _not_again(path):
    raise AssertionError("converted again although the cache holds the tokenizer")


def assert_same_tokenizer(a, b):
    assert type(a) is type(b) and len(a) == len(b)
    assert a.get_vocab() == b.get_vocab()
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "all_special_ids"):
        assert getattr(a, attr) == getattr(b, attr), attr
    for text in TEXTS:
        for special in (True, False):
            ids = a.encode(text, add_special_tokens=special)
            assert ids == b.encode(text, add_special_tokens=special), (text, special)
            for skip in (True, False):
                assert a.decode(ids, skip_special_tokens=skip) == b.decode(ids, skip_special_tokens=skip)
    # The detokenizer picks its path by clean_up_tokenization_spaces.
    assert a.clean_up_tokenization_spaces == b.clean_up_tokenization_spaces
    assert a.chat_template == b.chat_template
    for conversation in (CONVERSATION, CONVERSATION[1:]):  # without a system turn the template adds one
        for prompt in (True, False):
            render = dict(add_generation_prompt=prompt, tokenize=False)
            assert a.apply_chat_template(conversation, **render) == b.apply_chat_template(conversation, **render)


def test_cached_tokenizer_is_the_converted_one(model_path, cache_root, monkeypatch):
    converted = gt.load_gguf_tokenizer(model_path)  # converts, then writes the cache
    entry = gt.tokenizer_cache_dir(model_path)
    assert entry.startswith(str(cache_root)) and os.path.isfile(os.path.join(entry, "tokenizer.json"))
    assert not [n for n in os.listdir(os.path.dirname(entry)) if n.startswith(".staging-")]
    assert os.stat(entry).st_mode & 0o055 == 0o055  # other users may read it
    assert converted.chat_template and "<|im_start|>" in converted.apply_chat_template(CONVERSATION, tokenize=False)

    monkeypatch.setattr(gt, "convert_gguf_tokenizer", _not_again)
    cached = gt.load_gguf_tokenizer(model_path)
    assert cached is not converted
    assert_same_tokenizer(converted, cached)

    # A damaged entry is converted again and replaced, with a warning, not an error.
    with open(os.path.join(entry, "tokenizer.json"), "w") as f:
        f.write("{ not json")
    monkeypatch.setattr(gt, "convert_gguf_tokenizer", lambda path: converted)
    assert gt.load_gguf_tokenizer(model_path) is converted
    monkeypatch.setattr(gt, "convert_gguf_tokenizer", _not_again)
    assert_same_tokenizer(converted, gt.load_gguf_tokenizer(model_path))


def test_unwritable_cache_root_still_loads(model_path, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("BRAID_CACHE_ROOT", str(blocker))
    sentinel = object()
    monkeypatch.setattr(gt, "convert_gguf_tokenizer", lambda path: sentinel)
    assert gt.load_gguf_tokenizer(model_path) is sentinel  # _save could not create the folder
    assert blocker.read_text() == "not a folder"


def test_failed_save_leaves_no_staging_folder(model_path, cache_root, monkeypatch):
    class Unsavable:
        def save_pretrained(self, folder):
            open(os.path.join(folder, "half"), "w").close()
            raise TypeError("not serializable")

    monkeypatch.setattr(gt, "convert_gguf_tokenizer", lambda path: Unsavable())
    assert isinstance(gt.load_gguf_tokenizer(model_path), Unsavable)  # the cache is best effort
    assert os.listdir(os.path.dirname(gt.tokenizer_cache_dir(model_path))) == []


def test_no_cache_without_an_absolute_root(model_path, monkeypatch):
    monkeypatch.delenv("BRAID_CACHE_ROOT", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # ignored: not absolute
    monkeypatch.setenv("HOME", "not-absolute")
    assert gt.cache_root() is None and gt.tokenizer_cache_dir(model_path) is None
    sentinel = object()
    monkeypatch.setattr(gt, "convert_gguf_tokenizer", lambda path: sentinel)
    assert gt.load_gguf_tokenizer(model_path) is sentinel


def test_cache_key_follows_the_file_and_the_root(tmp_path, monkeypatch):
    monkeypatch.setenv("BRAID_CACHE_ROOT", str(tmp_path / "one"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    first = gt.tokenizer_cache_dir(str(f))
    assert first.startswith(str(tmp_path / "one")) and first == gt.tokenizer_cache_dir(str(f))
    os.utime(f, ns=(1, 1))  # a replaced file (same name) gets a new entry
    assert gt.tokenizer_cache_dir(str(f)) != first
    monkeypatch.delenv("BRAID_CACHE_ROOT")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gt.cache_root() == str(tmp_path / "xdg" / "braid")
