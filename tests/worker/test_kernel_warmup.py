"""Start-up kernel warm-up: which batch shapes it runs, and that running them leaves the
KV cache and the requests' results untouched."""
import torch

from braid import LLM, SamplingParams
from braid.layers.attention.triton_backend import choose_num_splits
from braid.layers.triton_ops.pdl import PDL_MAX_TOKENS
from braid.layers.triton_ops.skinny_gemm import block_m_for
from braid.worker.kernel_warmup import PREFILL_LENGTHS, decode_sizes, warm_up_batches
from tests.tiny_checkpoints import make_tiny_checkpoint


def _choice(rows: int, heads: int) -> tuple[int, int, bool]:
    return choose_num_splits(1, rows, heads), block_m_for(rows), rows <= PDL_MAX_TOKENS


def test_decode_sizes_cover_every_kernel_choice_once():
    for max_seqs, heads in ((256, 8), (32, 2), (48, 5), (1, 1)):
        sizes = decode_sizes(max_seqs, heads)
        chosen = {_choice(r, heads) for r in sizes}
        assert len(chosen) == len(sizes)  # one batch per choice
        assert chosen == {_choice(r, heads) for r in range(1, max_seqs + 1)}  # and every choice
    assert decode_sizes(256, 8) == [1, 5, 9, 17, 33, 65]  # 65: the first batch launched without PDL


def test_warm_up_batches_respect_the_token_budget():
    assert warm_up_batches(256, 40, 8, decode=False) == [[2], [32]]
    batches = warm_up_batches(256, 16, 8, decode=True)
    assert batches == [[2], [1], [1] * 5, [1] * 9]
    assert [[n] for n in PREFILL_LENGTHS] == warm_up_batches(4, 10_000, 8, decode=False)


def test_warm_up_writes_no_kv_and_changes_no_result(tmp_path):
    path = make_tiny_checkpoint("llama", tmp_path / "llama")
    llm = LLM(path, dtype="float32", kv_cache_memory="4MiB", max_model_len=128, max_num_seqs=8, enforce_eager=True)
    runner = llm.llm_engine.engine_core.executor.worker.model_runner
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (3, 20, 40)]
    first = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    caches = [c.clone() for c in runner.kv_caches]
    assert any(c.abs().sum() > 0 for c in caches)
    runner.warm_up_kernels()  # decode batches too: no CUDA graphs here
    assert all(torch.equal(a, b) for a, b in zip(caches, runner.kv_caches))
    # The prefix cache still serves the same blocks: same tokens again.
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == first
    assert llm.llm_engine.last_stats.prefix_cache_hits > 0
