"""GPU: decode batches replayed from CUDA graphs give the same greedy tokens as eager
runs, across padding buckets, architectures and dtypes; async scheduling on top of
graphs gives them too, and so does multi-step (inputs advanced on the device, graph
replayed per pass), alone and with async scheduling."""
import gc

import pytest
import torch

from braid import LLM, SamplingParams
from tests.engine.conftest import assert_pool_full
from tests.tiny_checkpoints import make_tiny_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _tokens(model, dtype, enforce_eager, prompts, async_scheduling=False, num_scheduler_steps=1):
    llm = LLM(model, dtype=dtype, enforce_eager=enforce_eager, max_model_len=256, kv_cache_memory="1GiB",
              max_num_seqs=32, async_scheduling=async_scheduling, num_scheduler_steps=num_scheduler_steps)
    runner = llm.llm_engine.engine_core.executor.worker.model_runner
    assert (runner.cuda_graphs is not None) == (not enforce_eager)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    assert_pool_full(llm)
    del llm, runner
    gc.collect()
    torch.cuda.empty_cache()
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graphs_equal_eager(tmp_path, arch, dtype):
    model = make_tiny_checkpoint(arch, tmp_path / arch)
    g = torch.Generator().manual_seed(0)
    # 1, 3 and 21 requests hit exact and padded buckets; lengths vary.
    for n in (1, 3, 21):
        prompts = [torch.randint(3, 380, (int(torch.randint(2, 40, (1,), generator=g)),), generator=g).tolist()
                   for _ in range(n)]
        eager = _tokens(model, dtype, True, prompts)
        assert _tokens(model, dtype, False, prompts) == eager
        assert _tokens(model, dtype, False, prompts, async_scheduling=True) == eager
        assert _tokens(model, dtype, True, prompts, async_scheduling=True) == eager
        assert _tokens(model, dtype, False, prompts, num_scheduler_steps=8) == eager
        assert _tokens(model, dtype, False, prompts, async_scheduling=True, num_scheduler_steps=8) == eager
        assert _tokens(model, dtype, True, prompts, num_scheduler_steps=8) == eager


def test_overlap_modes_keep_logprobs(tmp_path):
    """fp32 on the GPU: multi-step + async scheduling report the same tokens as plain eager steps,
    and their logprobs agree within 1e-3 (batch composition changes kernel shapes and order)."""
    model = make_tiny_checkpoint("llama", tmp_path / "llama")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 380, (int(torch.randint(2, 40, (1,), generator=g)),), generator=g).tolist()
               for _ in range(12)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=3)

    def run(**kw):
        llm = LLM(model, dtype="float32", max_model_len=256, kv_cache_memory="1GiB", max_num_seqs=32, **kw)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert_pool_full(llm)
        del llm
        gc.collect()
        torch.cuda.empty_cache()
        return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]

    want = run(enforce_eager=True)
    for kw in (dict(num_scheduler_steps=8), dict(num_scheduler_steps=8, async_scheduling=True),
               dict(async_scheduling=True)):
        got = run(**kw)
        for (g_ids, g_lps), (w_ids, w_lps) in zip(got, want):
            assert g_ids == w_ids, kw
            for g_pos, w_pos in zip(g_lps, w_lps):
                assert g_pos.keys() == w_pos.keys(), kw
                assert max(abs(g_pos[t].logprob - w_pos[t].logprob) for t in w_pos) < 1e-3, kw


def _record_compiles(monkeypatch) -> list[tuple[str, str]]:
    """Every Triton compile from now on, by kernel name: its specializations (argument types,
    and which pointers and ints Triton took as 16-aligned or equal to 1), so a failure shows
    how a mid-run variant differs from the warm ones."""
    knobs = pytest.importorskip("triton").knobs
    compiles: list[tuple[str, str]] = []
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook",
                        lambda *a, **k: compiles.append((k["fn"].name, f"{k['compile']['signature']} "
                                                         f"{k['compile']['configs']} {k['compile']['constants']}")))
    return compiles


@pytest.mark.parametrize("eager", [False, True], ids=["graphs", "eager"])
def test_multi_step_compiles_nothing_after_start_up(tmp_path, monkeypatch, eager):
    """Multi-step's on-device input advance is compiled at start-up, not in the first
    multi-step pass (each mid-run compile stalls a step)."""
    from braid.worker.multi_step_kernel import _advance_kernel

    compiles = _record_compiles(monkeypatch)
    _advance_kernel.device_caches.clear()  # compiled by an earlier test or not, it compiles again here
    model = make_tiny_checkpoint("llama", tmp_path / "llama")
    llm = LLM(model, dtype="bfloat16", max_model_len=256, kv_cache_memory="1GiB", max_num_seqs=32,
              num_scheduler_steps=4, async_scheduling=True, enforce_eager=eager)
    warm = len(compiles)
    assert any(name == "_advance_kernel" for name, _ in compiles), compiles
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    llm.generate([{"prompt_token_ids": [3, 4, 5, 6][: 1 + i % 4]} for i in range(9)], params, use_tqdm=False)
    late = [(name, spec) for name, spec in compiles[warm:] if name == "_advance_kernel"]
    assert late == [], late
    assert_pool_full(llm)


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["graphs", "eager"])
def test_no_triton_compile_once_warm(tmp_path, monkeypatch, enforce_eager):
    """After one round of requests, batches of other sizes and prompt lengths (row counts of 1,
    multiples of 16 and others; block tables of other widths; decode batches over 64 rows, whose
    kernels launch without PDL) compile no Triton kernel: a compile mid-run stalls the step for
    0.2-0.8 s (layers/triton_ops/__init__.py)."""
    compiles = _record_compiles(monkeypatch)
    model = make_tiny_checkpoint("llama", tmp_path / "llama")
    llm = LLM(model, dtype="bfloat16", max_model_len=256, kv_cache_memory="1GiB", max_num_seqs=96,
              enforce_eager=enforce_eager)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    g = torch.Generator().manual_seed(2)

    def run(n, lo, hi):
        prompts = [torch.randint(3, 380, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
                   for _ in range(n)]
        llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)

    run(5, 2, 40)
    warm = len(compiles)
    for n, lo, hi in ((1, 2, 3), (16, 32, 33), (17, 100, 140), (32, 2, 200), (80, 2, 20)):
        run(n, lo, hi)
    late = compiles[warm:]
    assert late == [], "\n".join(f"{name}: {spec}\n  warm: " + "\n  warm: ".join(
        s for n, s in compiles[:warm] if n == name) for name, spec in late)
    assert_pool_full(llm)
