"""--generation-config (the model's sampling defaults) and --chat-template (a template that
also renders tools), offline and served."""
import json
import subprocess
import sys

import httpx
import openai
import pytest

from braid.generation_defaults import load_sampling_defaults
from tests.entrypoints.server_utils import RemoteServer
from tests.tiny_checkpoints import make_tiny_checkpoint

MODEL = "tiny"
PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Hello world! How are you today?"}]
TEMPLATE = ("{% if tools %}[tools]{% for t in tools %} {{ t['function']['name'] }}{% endfor %}\n{% endif %}"
            "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {}}}}]


def _write_generation_config(folder, **values) -> None:
    path = folder / "generation_config.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**data, **values}))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny checkpoint whose generation_config.json asks for greedy decoding and 5 new tokens."""
    folder = tmp_path_factory.mktemp("tiny-llama-genconfig")
    make_tiny_checkpoint("llama", folder)
    _write_generation_config(folder, temperature=0.0, max_new_tokens=5, top_k=50, top_p=0.9)
    return str(folder)


def test_sampling_defaults_from_the_file(checkpoint, tmp_path):
    # top_k 50 is transformers' own default: it says nothing, as in vLLM (the file's diff).
    assert load_sampling_defaults(checkpoint) == {"temperature": 0.0, "top_p": 0.9, "max_tokens": 5}
    assert load_sampling_defaults(checkpoint, "vllm") == {}
    other = tmp_path / "other"
    other.mkdir()
    _write_generation_config(other, repetition_penalty=1.3, min_p=0.05)
    assert load_sampling_defaults(checkpoint, str(other)) == {"repetition_penalty": 1.3, "min_p": 0.05}
    assert load_sampling_defaults(str(tmp_path)) == {}  # no file: library defaults
    assert load_sampling_defaults(str(tmp_path / "model.gguf")) == {}  # a GGUF file has none
    with pytest.raises(ValueError, match="--generation-config"):
        load_sampling_defaults(checkpoint, str(tmp_path / "missing"))
    for bad in ("{not json", "[1, 2]", '{"top_p": 0}'):  # malformed, not an object, an invalid value
        (other / "generation_config.json").write_text(bad)
        with pytest.raises(ValueError, match="--generation-config"):
            load_sampling_defaults(checkpoint, str(other))


def test_offline_generate_uses_the_model_defaults(checkpoint):
    from braid import LLM, SamplingParams

    llm = LLM(checkpoint, device="cpu", dtype="float32", max_model_len=128, kv_cache_memory="64MiB")
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.top_p, defaults.max_tokens) == (0.0, 0.9, 5)
    (out,) = llm.generate(PROMPT, use_tqdm=False)
    (greedy,) = llm.generate(PROMPT, SamplingParams(temperature=0, top_p=0.9, max_tokens=5, ignore_eos=True),
                             use_tqdm=False)
    assert out.outputs[0].token_ids == greedy.outputs[0].token_ids[:len(out.outputs[0].token_ids)]
    assert len(out.outputs[0].token_ids) <= 5
    with pytest.raises(ValueError, match="--generation-config"):
        LLM(checkpoint, device="cpu", generation_config="/no/such/folder")


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "chat.jinja"
    template.write_text(TEMPLATE)
    srv = RemoteServer(checkpoint, "--served-model-name", MODEL, "--max-model-len", "128", "--device", "cpu",
                       "--dtype", "float32", "--chat-template", str(template))
    yield srv
    srv.stop()


def test_server_requests_take_the_model_defaults(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body={"ignore_eos": True})
    assert plain.usage.completion_tokens == 5  # max_new_tokens
    greedy = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, top_p=0.9,
                                            max_tokens=5, extra_body={"ignore_eos": True})
    assert plain.choices[0].message.content == greedy.choices[0].message.content
    # A request's own values win.
    longer = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=7,
                                            extra_body={"ignore_eos": True})
    assert longer.usage.completion_tokens == 7
    # Completions without max_tokens (null) take max_new_tokens too (vLLM, both endpoints).
    r = httpx.post(server.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": None, "ignore_eos": True})
    assert r.json()["usage"]["completion_tokens"] == 5
    samples = {client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=s,
                                         extra_body={"ignore_eos": True}).choices[0].text for s in range(4)}
    assert len(samples) > 1


def test_server_uses_the_given_chat_template(server, checkpoint):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(checkpoint)
    text = hf.apply_chat_template(MESSAGES, chat_template=TEMPLATE, add_generation_prompt=True, tokenize=False)
    assert text.startswith("[user] Hello")  # not the tokenizer's own template
    expected = hf.encode(text, add_special_tokens=False)
    r = httpx.post(server.url + "/tokenize", json={"messages": MESSAGES})
    assert r.json()["tokens"] == expected
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert chat.usage.prompt_tokens == len(expected)


@pytest.mark.parametrize("template", ["no/such/template.jinja", "{% for %}"])
def test_a_bad_chat_template_is_a_clear_error(checkpoint, template):
    """A missing file, or a template that does not compile: the server does not start."""
    r = subprocess.run([sys.executable, "-m", "braid.entrypoints.cli", "serve", checkpoint, "--device", "cpu",
                        "--chat-template", template, "--port", "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "--chat-template" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_tools_with_tool_choice_none_go_into_the_template(server, checkpoint):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(checkpoint)
    text = hf.apply_chat_template(MESSAGES, tools=TOOLS, chat_template=TEMPLATE, add_generation_prompt=True,
                                  tokenize=False)
    assert text.startswith("[tools] get_weather")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="none")
    assert r.usage.prompt_tokens == len(hf.encode(text, add_special_tokens=False))
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert plain.usage.prompt_tokens < r.usage.prompt_tokens
