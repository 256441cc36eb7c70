"""Bad input gets a clear ValueError, changes no state, and other requests still complete."""
import os

import pytest

from braid import LLM, SamplingParams
from tests.engine.conftest import assert_pool_full


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return LLM(smollm2_path, max_model_len=64, kv_cache_memory="64MiB")


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=-3), "max_tokens"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(temperature=-0.1), "temperature"),
        (dict(top_k=-5), "top_k"),
        (dict(min_p=2.0), "min_p"),
        (dict(n=0), "n"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(stop=[""]), "stop"),
        (dict(stop=5), "stop"),
        (dict(stop_token_ids=["a"]), "stop_token_ids"),
        (dict(seed=True), "seed"),
        (dict(top_k=True), "top_k"),
        (dict(logprobs=1.5), "logprobs"),
        (dict(min_tokens=1.5), "min_tokens"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        SamplingParams(**kwargs)


def test_bad_prompts_raise_and_change_nothing(llm):
    engine = llm.llm_engine
    good = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected = llm.generate("Hello there", good, use_tqdm=False)[0].outputs[0].token_ids

    # A request in flight when the bad ones arrive.
    engine.add_request("inflight", "Hello there", good)
    for bad, why in [("", "empty"), ([], "empty"), ("word " * 100, "max-model-len"),
                     ([10**9], r"\[0, "), ({"foo": 1}, "prompt"),
                     ({"prompt": "Hi", "multi_modal_data": {"image": object()}}, "multi_modal_data")]:
        with pytest.raises(ValueError, match=why):
            engine.add_request("bad", bad, good)
        assert "bad" not in engine.output_processor.requests
    # A batch with one bad prompt is refused whole.
    with pytest.raises(ValueError, match="empty"):
        llm.generate(["fine prompt", ""], good, use_tqdm=False)
    with pytest.raises(ValueError, match="max-logprobs"):  # vLLM's default cap: 20
        engine.add_request("bad", "Hello", SamplingParams(logprobs=21))

    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert list(finished) == ["inflight"]
    assert finished["inflight"].outputs[0].token_ids == expected
    assert_pool_full(llm)


def test_duplicate_request_id_is_refused(llm):
    engine = llm.llm_engine
    p = SamplingParams(max_tokens=2)
    engine.add_request("dup", "hi", p)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("dup", "hi", p)
    engine.abort_request(["dup"])
    assert_pool_full(llm)


def test_unknown_model_path():
    with pytest.raises(ValueError, match="does not exist"):
        LLM("/nonexistent/model/folder")


def test_corrupt_safetensors_file(tmp_path):
    from tests.tiny_checkpoints import make_tiny_checkpoint

    path = make_tiny_checkpoint("llama", tmp_path / "ckpt")
    weights = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    target = os.path.join(path, weights[0])
    with open(target, "r+b") as f:
        f.truncate(os.path.getsize(target) // 2)
    with pytest.raises(ValueError, match="safetensors"):
        LLM(str(path))


@pytest.mark.parametrize("flags, name", [
    (dict(dtype="float8"), "--dtype"),
    (dict(load_format="pickle"), "--load-format"),
    (dict(block_size=12), "--block-size"),
    (dict(max_num_seqs=0), "--max-num-seqs"),
    (dict(gpu_memory_utilization=1.5), "--gpu-memory-utilization"),
    (dict(kv_cache_memory="lots"), "--kv-cache-memory"),
    (dict(attention_backend="flash"), "--attention-backend"),
    (dict(max_model_len=10**7), "--max-model-len"),
    (dict(max_model_len=0), "--max-model-len"),
    (dict(seed=-1), "--seed"),
    (dict(seed="7"), "--seed"),
    (dict(max_logprobs=-2), "--max-logprobs"),
])
def test_bad_engine_flags_name_the_flag(smollm2_path, flags, name):
    with pytest.raises(ValueError, match=name):
        LLM(smollm2_path, **flags)


def test_an_interrupted_generate_leaves_no_request_behind(llm, monkeypatch):
    engine = llm.llm_engine
    real_step, calls = engine.step, []

    def step_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(engine, "step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(["a", "b", "c"], SamplingParams(max_tokens=20, ignore_eos=True), use_tqdm=False)
    monkeypatch.undo()
    assert_pool_full(llm)  # the three requests were aborted and their KV blocks freed
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert len(out) == 1 and out[0].finished
