"""Tensor parallelism with real process groups: 2 (or 4) gloo ranks on CPU.

Each rank is a process started with torch.multiprocessing; the default group is
initialised from a file:// in tmp_path. The model-level tests build a tiny
checkpoint in the parent, compute the single-device (tp=1) logits there, and
have each rank `init_model_parallel(2)` *before* building the model (layers
read the layout at construction), load the same checkpoint sharded, and run a
packed prefill of two prompts (then a few decode steps) through the torch
reference attention over a paged cache holding only the rank's KV heads. The
ranks save their (all-gathered) logits; the parent compares them with the
single-device ones.
"""
from __future__ import annotations

import datetime
import os
import random
import time

import pytest
import torch
import torch.multiprocessing as mp

from braid.config import ModelConfig
from braid.distributed import parallel_state as ps
from braid.distributed.comm import tensor_model_parallel_all_gather, tensor_model_parallel_all_reduce
from braid.forward_context import ForwardContext, set_forward_context
from braid.layers.attention.backend import get_attention_backend, kv_cache_shape
from braid.layers.attention.metadata import build_attention_metadata
from braid.models.loader import load_model
from braid.transformers_utils import load_hf_config
from tests.tiny_checkpoints import make_tiny_checkpoint

pytestmark = pytest.mark.distributed

ATOL = 1e-5
RTOL = 1e-5
BLOCK_SIZE = 4
DECODE_STEPS = 3
DEADLINE_S = 50.0
PROMPTS = [
    [1, 17, 250, 33, 99, 5, 300, 42, 7, 120, 64, 201, 88, 19, 3, 150, 77, 260, 11],
    [1, 45, 9, 310, 27],
]


# ----------------------------------------------------------------------------- harness


def _spawn(fn, world_size: int, *args) -> None:
    """Run fn(rank, world_size, *args) in world_size processes; fail (never hang) past DEADLINE_S."""
    ctx = mp.start_processes(fn, args=(world_size, *args), nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=1.0):  # join raises if a rank failed (and terminates the others)
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            for p in ctx.processes:
                p.join(5)
            pytest.fail(f"distributed ranks did not finish within {DEADLINE_S:.0f} s")


def _init_dist(rank: int, world_size: int, init_file: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=30),
    )


def _mark_ok(out_dir: str, rank: int) -> None:
    with open(os.path.join(out_dir, f"ok{rank}"), "w") as f:
        f.write("ok")


def _assert_all_ok(out_dir, world_size: int) -> None:
    for r in range(world_size):
        assert os.path.exists(os.path.join(out_dir, f"ok{r}")), f"rank {r} did not finish its checks"


def _teardown() -> None:
    import torch.distributed as dist

    ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _model_config(path: str) -> ModelConfig:
    return ModelConfig(model=path, hf_config=load_hf_config(path), dtype=torch.float32, load_format="auto", max_model_len=256)


@torch.no_grad()
def _run_model(model: torch.nn.Module) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Packed prefill of PROMPTS, then DECODE_STEPS greedy decode steps for both together, over a
    NaN-filled paged cache with scattered block tables. The cache holds the model's per-rank KV
    heads. Returns (prompt logits per request, greedy tokens per request)."""
    cfg = model.config
    attn0 = model.model.layers[0].self_attn
    num_kv_heads, head_dim = attn0.num_kv_heads, attn0.head_dim
    num_blocks = 64
    shape = kv_cache_shape(num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    kv_caches = [torch.full(shape, float("nan")) for _ in range(cfg.num_hidden_layers)]
    free = list(range(num_blocks))
    random.Random(0).shuffle(free)
    tables = []
    for p in PROMPTS:
        n = -(-(len(p) + DECODE_STEPS + 1) // BLOCK_SIZE)
        tables.append(free[:n])
        free = free[n:]
    backend = get_attention_backend("torch")

    def step(chunks, starts):
        ids = torch.tensor([t for c in chunks for t in c], dtype=torch.long)
        positions = torch.tensor([s + i for c, s in zip(chunks, starts) for i in range(len(c))], dtype=torch.long)
        query_lens = [len(c) for c in chunks]
        seq_lens = [s + len(c) for c, s in zip(chunks, starts)]
        md = build_attention_metadata(query_lens, seq_lens, tables, BLOCK_SIZE, "cpu")
        with set_forward_context(ForwardContext(md, kv_caches, backend)):
            hidden = model(ids, positions)
        return list(model.compute_logits(hidden).split(query_lens))

    prompt_logits = step(PROMPTS, [0, 0])
    outs = [[int(lg[-1].argmax())] for lg in prompt_logits]
    for _ in range(DECODE_STEPS):
        starts = [len(p) + len(o) - 1 for p, o in zip(PROMPTS, outs)]
        for o, lg in zip(outs, step([[o[-1]] for o in outs], starts)):
            o.append(int(lg[-1].argmax()))
    return prompt_logits, outs


def _tp_model_worker(rank: int, world_size: int, init_file: str, path: str, out_dir: str) -> None:
    _init_dist(rank, world_size, init_file)
    try:
        layout = ps.init_model_parallel(world_size)
        assert (layout.tp_rank, layout.tp_size) == (rank, world_size)
        model = load_model(_model_config(path), torch.device("cpu"))
        attn = model.model.layers[0].self_attn
        info = {
            "num_heads": attn.num_heads,
            "num_kv_heads": attn.num_kv_heads,
            "embed_rows": model.model.embed_tokens.weight.shape[0],
            "o_proj_in": model.model.layers[0].self_attn.o_proj.weight.shape[1],
        }
        logits, tokens = _run_model(model)
        torch.save({"logits": logits, "tokens": tokens, "info": info}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        _teardown()


# ----------------------------------------------------------------------------- model level

MODEL_CASES = [
    pytest.param("llama", {}, id="llama-kv2-split"),
    pytest.param("llama", {"num_key_value_heads": 1}, id="llama-kv1-replicated"),
    pytest.param("qwen3", {}, id="qwen3-qknorm-tied"),
    pytest.param("qwen2", {"num_key_value_heads": 1}, id="qwen2-qkv-bias-tied-kv1"),
]


@pytest.mark.parametrize("arch,overrides", MODEL_CASES)
def test_tp2_model_matches_single_device(tmp_path, arch, overrides):
    path = make_tiny_checkpoint(arch, tmp_path / arch, seed=3, **overrides)
    cfg = load_hf_config(path)
    assert ps.get_tp_size() == 1  # the reference is built with the single-device layout
    ref_model = load_model(_model_config(path), torch.device("cpu"))
    ref_logits, ref_tokens = _run_model(ref_model)

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    _spawn(_tp_model_worker, 2, str(tmp_path / "dist_init"), path, str(out_dir))

    total_kv = cfg.num_key_value_heads
    for rank in range(2):
        res = torch.load(out_dir / f"rank{rank}.pt")
        info = res["info"]
        # the rank really holds a shard
        assert info["num_heads"] == cfg.num_attention_heads // 2
        assert info["num_kv_heads"] == max(1, total_kv // 2)
        assert info["embed_rows"] == cfg.vocab_size // 2
        assert info["o_proj_in"] == cfg.num_attention_heads * ref_model.model.layers[0].self_attn.head_dim // 2
        for ours, ref in zip(res["logits"], ref_logits):
            assert ours.shape == ref.shape
            torch.testing.assert_close(ours, ref, atol=ATOL, rtol=RTOL)
        assert res["tokens"] == ref_tokens, f"rank {rank}: greedy tokens differ"


# ----------------------------------------------------------------------------- groups and collectives


def _collectives_worker(rank: int, world_size: int, init_file: str, tp_size: int, out_dir: str) -> None:
    import torch.distributed as dist

    _init_dist(rank, world_size, init_file)
    try:
        pp_size = world_size // tp_size
        layout = ps.init_model_parallel(tp_size, pp_size)
        tp_rank, pp_rank = rank % tp_size, rank // tp_size
        assert layout == ps.ParallelLayout(tp_rank=tp_rank, tp_size=tp_size, pp_rank=pp_rank, pp_size=pp_size)
        assert ps.get_tp_ranks() == tuple(range(pp_rank * tp_size, (pp_rank + 1) * tp_size))
        assert ps.get_pp_ranks() == tuple(range(tp_rank, world_size, tp_size))
        assert dist.get_world_size(ps.get_tp_group()) == tp_size
        with pytest.raises(RuntimeError, match="already initialised"):
            ps.init_model_parallel(tp_size, pp_size)

        # all-reduce sums over the TP group only (not over pipeline stages)
        x = torch.full((3, 2), float(rank + 1))
        summed = tensor_model_parallel_all_reduce(x)
        expected = float(sum(r + 1 for r in ps.get_tp_ranks()))
        assert torch.equal(summed, torch.full((3, 2), expected))
        # non-contiguous input
        y = torch.arange(6.0).reshape(2, 3).t() * (rank + 1)
        assert torch.equal(tensor_model_parallel_all_reduce(y), torch.arange(6.0).reshape(2, 3).t() * expected)

        # all-gather concatenates in TP-rank order, along any dim
        part = torch.full((2, 3), float(rank))
        g = tensor_model_parallel_all_gather(part, dim=-1)
        assert torch.equal(g, torch.cat([torch.full((2, 3), float(r)) for r in ps.get_tp_ranks()], dim=1))
        g0 = tensor_model_parallel_all_gather(torch.arange(4.0).reshape(2, 2) + 10 * rank, dim=0)
        assert torch.equal(g0, torch.cat([torch.arange(4.0).reshape(2, 2) + 10 * r for r in ps.get_tp_ranks()], dim=0))

        ps.destroy_model_parallel()
        assert ps.get_layout() == ps.ParallelLayout() and ps.get_tp_group() is None
        z = torch.ones(2)
        assert tensor_model_parallel_all_reduce(z) is z  # identity again
        _mark_ok(out_dir, rank)
    finally:
        _teardown()


@pytest.mark.parametrize("world_size,tp_size", [(2, 2), (4, 2)], ids=["tp2", "tp2-pp2"])
def test_groups_and_collectives(tmp_path, world_size, tp_size):
    _spawn(_collectives_worker, world_size, str(tmp_path / "dist_init"), tp_size, str(tmp_path))
    _assert_all_ok(tmp_path, world_size)


def _dp_ep_worker(rank: int, world_size: int, init_file: str, dp_size: int, pp_size: int, out_dir: str) -> None:
    import torch.distributed as dist

    _init_dist(rank, world_size, init_file)
    try:
        tp_size = world_size // (dp_size * pp_size)
        layout = ps.init_model_parallel(tp_size, pp_size, dp_size=dp_size)
        # rank = (dp * pp_size + pp) * tp_size + tp
        dp_rank, rest = divmod(rank, pp_size * tp_size)
        pp_rank, tp_rank = divmod(rest, tp_size)
        assert (layout.dp_rank, layout.pp_rank, layout.tp_rank) == (dp_rank, pp_rank, tp_rank)
        stage = [r for r in range(world_size) if (r // tp_size) % pp_size == pp_rank]
        assert ps.get_ep_ranks() == tuple(stage)           # every DP x TP rank of this stage
        assert layout.ep_size == len(stage) and ps.get_ep_ranks()[layout.ep_rank] == rank
        assert ps.get_dp_ranks() == tuple(r for r in stage if r % tp_size == tp_rank)
        assert ps.get_tp_ranks() == tuple(range(rank - tp_rank, rank - tp_rank + tp_size))
        # A sum over each group sees exactly its members.
        for group, members in ((ps.get_dp_group(), ps.get_dp_ranks()), (ps.get_ep_group(), ps.get_ep_ranks())):
            x = torch.tensor([float(2 ** rank)])
            dist.all_reduce(x, group=group)
            assert x.item() == sum(2 ** r for r in members)
        _mark_ok(out_dir, rank)
    finally:
        _teardown()


@pytest.mark.parametrize("dp_size,pp_size", [(2, 1), (2, 2)], ids=["dp2-tp2", "dp2-pp2"])
def test_dp_and_ep_groups(tmp_path, dp_size, pp_size):
    _spawn(_dp_ep_worker, 4, str(tmp_path / "dist_init"), dp_size, pp_size, str(tmp_path))
    _assert_all_ok(tmp_path, 4)


def _failing_worker(rank: int, world_size: int, init_file: str) -> None:
    _init_dist(rank, world_size, init_file)
    try:
        ps.init_model_parallel(world_size)
        if rank == 1:
            raise ValueError("rank 1 fails on purpose")
        tensor_model_parallel_all_reduce(torch.ones(1))  # rank 0 would wait here for rank 1
    finally:
        _teardown()


def test_a_failing_rank_fails_the_test_fast(tmp_path):
    start = time.monotonic()
    # Whichever rank is reported first: rank 1's own error, or rank 0's collective
    # failing because its peer is gone. Either way the run fails, and fails fast.
    with pytest.raises(Exception, match="rank 1 fails on purpose|Connection reset|Connection closed|[Tt]imed out"):
        _spawn(_failing_worker, 2, str(tmp_path / "dist_init"))
    assert time.monotonic() - start < DEADLINE_S


def test_single_device_layout_without_torch_distributed():
    import torch.distributed as dist

    assert not dist.is_initialized()
    assert (ps.get_tp_rank(), ps.get_tp_size(), ps.get_pp_rank(), ps.get_pp_size()) == (0, 1, 0, 1)
    assert ps.get_tp_group() is None
    x = torch.randn(3, 4)
    assert tensor_model_parallel_all_reduce(x) is x
    assert tensor_model_parallel_all_gather(x, dim=0) is x
    with pytest.raises(RuntimeError, match="process group"):
        ps.init_model_parallel(2)
    ps.destroy_model_parallel()  # harmless when nothing was initialised
    assert ps.get_layout() == ps.ParallelLayout()
