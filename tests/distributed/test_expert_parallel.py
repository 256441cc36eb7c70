"""Expert parallelism with gloo ranks: FusedMoE with whole experts per rank, tokens
moved by all-to-all or by all-gather + reduce-scatter, equals the single-device layer
— with DP=2 (each rank its own tokens, EP group = both ranks), TP=2 (shared tokens,
each TP rank dispatching its slice) and DP=2 x TP=2; the async dispatch/combine hooks
give the same result."""
import os

import pytest
import torch

from braid.distributed import parallel_state as ps
from tests.distributed.test_tensor_parallel import _init_dist, _spawn, _teardown

pytestmark = pytest.mark.distributed

E, K, H, INTER = 8, 2, 32, 24


def _weights():
    g = torch.Generator().manual_seed(0)
    gate = torch.randn(E, H, generator=g)
    experts = [(torch.randn(INTER, H, generator=g) / H ** 0.5, torch.randn(INTER, H, generator=g) / H ** 0.5,
                torch.randn(H, INTER, generator=g) / INTER ** 0.5) for _ in range(E)]
    return gate, experts


def _tokens(replica: int, n: int) -> torch.Tensor:
    return torch.randn(n, H, generator=torch.Generator().manual_seed(100 + replica))


def _layer():
    from braid.layers.moe.layer import FusedMoE

    layer = FusedMoE(E, K, H, INTER, renormalize=True)
    _, experts = _weights()
    for e, (w1, w3, w2) in enumerate(experts):
        layer.weight_loader(layer.w13_weight, w1, "w1", e)
        layer.weight_loader(layer.w13_weight, w3, "w3", e)
        layer.weight_loader(layer.w2_weight, w2, "w2", e)
    return layer


def _worker(rank, world_size, init_file, dp_size, out_dir, backend):
    from braid.forward_context import ForwardContext, set_forward_context

    _init_dist(rank, world_size, init_file)
    try:
        tp_size = world_size // dp_size
        layout = ps.init_model_parallel(tp_size, dp_size=dp_size, expert_parallel=True, all2all_backend=backend)
        layer = _layer()
        assert layer.num_local_experts == E // world_size and layer.first_expert == layout.ep_rank * (E // world_size)
        gate, _ = _weights()
        # 0 tokens on one replica: an idle rank still takes part in every exchange.
        x = _tokens(layout.dp_rank, [13, 0][layout.dp_rank] if dp_size == 2 and world_size == 2 else 13)
        # The replicas' agreed count (the model runner's DP vote): the all-gather pads to it.
        with set_forward_context(ForwardContext(None, [], None, dp_padded_tokens=13)):
            out = layer(x, x @ gate.t())
            torch.save(out, os.path.join(out_dir, f"out{rank}.pt"))
        # The async form: hooks wait for the transfers.
        w, ids = layer.route(x @ gate.t())
        if backend == "all_to_all":
            arrived, wait = layer.dispatcher.dispatch(x, ids, w, async_op=True)
            wait()
            assert arrived.hidden.shape[0] == sum(arrived.recv_counts)
        else:
            gathered, wait = layer.dispatcher.dispatch(x, ids, w, 13, async_op=True)
            wait()
            assert gathered.hidden.shape[0] == 13 * layout.ep_size
            out_rows = gathered.hidden.float() * 0 + 1  # each rank adds 1 to every row
            part, wait = layer.dispatcher.combine(out_rows, gathered, async_op=True)
            wait()
            assert part.shape[0] == x.shape[0] and bool((part == layout.ep_size).all())
    finally:
        _teardown()


@pytest.mark.parametrize("backend", ["all_to_all", "allgather_reducescatter"])
@pytest.mark.parametrize("world_size,dp_size", [(2, 2), (2, 1), (4, 2)], ids=["dp2", "tp2", "dp2-tp2"])
def test_expert_parallel_equals_single_device(tmp_path, world_size, dp_size, backend):
    _spawn(_worker, world_size, str(tmp_path / "dist_init"), dp_size, str(tmp_path), backend)
    ref = _layer()
    gate, _ = _weights()
    tp_size = world_size // dp_size
    for rank in range(world_size):
        replica = rank // tp_size
        x = _tokens(replica, [13, 0][replica] if dp_size == 2 and world_size == 2 else 13)
        want = ref(x, x @ gate.t())
        got = torch.load(tmp_path / f"out{rank}.pt")
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
