"""Programmatic dependent launch (braid/layers/triton_ops/pdl.py).

A kernel launched with PDL may run beside the previous kernel of its stream, so it must
wait before its first read of anything a kernel wrote. CPU: the switch and the launch
keywords, and each PDL kernel's source waits before its first load. GPU: a chain of
dependent kernels (GEMM -> norm -> SiLU -> GEMM ...), eager and replayed from a CUDA graph,
gives the same bits with PDL off, on, and on with the GEMM's weight prefetch; so do an
engine's greedy tokens.
"""
import gc
import inspect

import pytest
import torch

from braid.layers.attention import triton_cache_write, triton_decode_attention, triton_unified_attention
from braid.layers.triton_ops import pdl, rms_norm, rotary, silu_mul, skinny_gemm

PDL_KERNELS = [
    skinny_gemm._skinny_gemm_kernel, skinny_gemm._split_k_reduce_kernel, rms_norm._rms_norm_kernel,
    silu_mul._silu_and_mul_kernel, rotary._rotary_kernel, triton_cache_write._write_kv_cache_kernel,
    triton_decode_attention._split_kv_decode_kernel, triton_decode_attention._merge_splits_kernel,
    triton_unified_attention._unified_attention_kernel,
]


@pytest.fixture
def pdl_env(monkeypatch):
    def set_mode(value: str):
        monkeypatch.setenv("BRAID_PDL", value)
        pdl.reset_cache()
    yield set_mode
    monkeypatch.delenv("BRAID_PDL", raising=False)
    pdl.reset_cache()


def test_bad_value_names_the_variable(pdl_env):
    pdl_env("yes")
    with pytest.raises(ValueError, match="BRAID_PDL"):
        pdl.pdl_mode()


def test_cpu_tensors_launch_without_pdl(pdl_env):
    pdl_env("2")
    assert pdl.pdl_launch(torch.zeros(2), 1) == {"USE_PDL": False}
    assert pdl.pdl_enabled(torch.zeros(2)) == 0


@pytest.mark.parametrize("kernel", PDL_KERNELS, ids=lambda k: k.fn.__name__)
def test_each_pdl_kernel_waits_before_its_first_load(kernel):
    src = inspect.getsource(kernel.fn)
    assert "USE_PDL" in inspect.signature(kernel.fn).parameters
    body = src.index("):\n", src.index("def ")) + 3  # after the signature
    enter = src.index("pdl_enter(USE_PDL)")
    # Only the weight prefetch (it reads no data into the kernel) may come before the wait.
    before = src[body:enter]
    for read in ("tl.load(", "tl.store(", "_find_request(", "attend_kv_tiles("):
        assert read not in before, f"{kernel.fn.__name__} touches memory before it waits for the previous kernel"


@pytest.mark.parametrize("k_per_split, block_k, stages, want", [(4096, 128, 5, 512), (4096, 256, 4, 1024),
                                                                 (256, 256, 4, 256), (384, 128, 2, 256)])
def test_prefetch_width_is_a_power_of_two_within_the_first_loads(k_per_split, block_k, stages, want):
    config = skinny_gemm.SkinnyConfig(block_k=block_k, num_stages=stages)
    assert skinny_gemm.prefetch_width(k_per_split, config) == want


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_only_small_steps_launch_with_pdl(pdl_env):
    pdl_env("1")
    x = torch.zeros(1, device="cuda")
    if not pdl.pdl_enabled(x):
        pytest.skip("this GPU or Triton has no programmatic dependent launch")
    assert pdl.pdl_launch(x, pdl.PDL_MAX_TOKENS) == {"USE_PDL": True, "launch_pdl": True}
    assert pdl.pdl_launch(x, pdl.PDL_MAX_TOKENS + 1) == {"USE_PDL": False}
    pdl_env("0")
    assert pdl.pdl_launch(x, 1) == {"USE_PDL": False}


def _chain(x, weights, norm_weight):
    """Dependent kernels back to back: each reads what the one before wrote."""
    h = x
    for w_up, w_down in weights:
        h = rms_norm.rms_norm(h, norm_weight, 1e-5)
        h = silu_mul.silu_and_mul(skinny_gemm.skinny_gemm(h, w_up, config=skinny_gemm.config_for_rows(h.shape[0])))
        h = skinny_gemm.skinny_gemm(h, w_down, config=skinny_gemm.config_for_rows(h.shape[0]))
    return h


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows", [1, 16, 64])
def test_dependent_chain_same_bits_with_and_without_pdl(pdl_env, rows):
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden, inter = 2048, 4096
    weights = [(torch.randn(2 * inter, hidden, device="cuda", generator=g, dtype=torch.bfloat16) / 45,
                torch.randn(hidden, inter, device="cuda", generator=g, dtype=torch.bfloat16) / 64) for _ in range(6)]
    norm_weight = torch.rand(hidden, device="cuda", generator=g, dtype=torch.bfloat16) + 0.5
    x = torch.randn(rows, hidden, device="cuda", generator=g, dtype=torch.bfloat16)
    results = {}
    for mode in ("0", "1", "2"):
        pdl_env(mode)
        eager = _chain(x, weights, norm_weight)
        static_x = x.clone()
        _chain(static_x, weights, norm_weight)  # compile before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = _chain(static_x, weights, norm_weight)
        replays = []
        for _ in range(3):
            graph.replay()
            replays.append(out.clone())
        torch.cuda.synchronize()
        results[mode] = (eager, replays)
    want = results["0"][0]
    assert torch.isfinite(want).all() and want.abs().sum() > 0
    for mode, (eager, replays) in results.items():
        assert torch.equal(eager, want), mode
        for r in replays:
            assert torch.equal(r, want), mode


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_engine_tokens_same_with_and_without_pdl(pdl_env, tmp_path):
    from braid import LLM, SamplingParams
    from tests.tiny_checkpoints import make_tiny_checkpoint

    model = make_tiny_checkpoint("llama", tmp_path / "llama")
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 380, (int(torch.randint(2, 40, (1,), generator=g)),), generator=g).tolist()
               for _ in range(21)]
    tokens = {}
    for mode in ("0", "1", "2"):
        pdl_env(mode)
        llm = LLM(model, dtype="bfloat16", max_model_len=256, kv_cache_memory="1GiB", max_num_seqs=32,
                  async_scheduling=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
        tokens[mode] = [o.outputs[0].token_ids for o in outs]
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    assert tokens["1"] == tokens["0"]
    assert tokens["2"] == tokens["0"]
