"""The fused-experts Triton kernel equals its torch reference (and the reference equals
a plain per-token loop): random inputs, several expert counts and top-k, tokens that all
pick one expert, pairs routed to other ranks' experts (dropped). The kernel runs in
Triton's interpreter on CPU and natively on the GPU."""
import pytest
import torch
import torch.nn.functional as F

from braid.layers.moe.align import align_by_expert
from braid.layers.moe.fused_moe_ref import fused_experts_ref
from braid.layers.moe.routing import softmax_topk

triton = pytest.importorskip("triton")


def _loop_reference(x, w13, w2, weights, ids):
    """Token by token, slot by slot: the definition."""
    inter = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for s in range(ids.shape[1]):
            e = int(ids[t, s])
            if not 0 <= e < w13.shape[0]:
                continue
            gu = w13[e].double() @ x[t].double()
            h = F.silu(gu[:inter]) * gu[inter:]
            out[t] += float(weights[t, s]) * (w2[e].double() @ h)
    return out


def _inputs(num_tokens, num_experts, top_k, hidden=48, inter=40, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=g).to(dtype)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=g) / hidden ** 0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, generator=g) / inter ** 0.5).to(dtype)
    weights, ids = softmax_topk(torch.randn(num_tokens, num_experts, generator=g), top_k, renormalize=True)
    return [t.to(device) for t in (x, w13, w2, weights, ids)]


def test_reference_equals_the_per_token_loop():
    x, w13, w2, weights, ids = _inputs(9, 6, 2)
    ids[0, 1] = 6  # another rank's expert: contributes nothing
    torch.testing.assert_close(fused_experts_ref(x, w13, w2, weights, ids).double(),
                               _loop_reference(x, w13, w2, weights, ids), atol=1e-5, rtol=1e-5)


def test_align_sorts_pairs_by_expert_in_padded_blocks():
    ids = torch.tensor([[2, 0], [2, 5], [0, 2], [7, 1]])  # expert 7 is not local (num_experts 6)
    sorted_ids, block_expert = align_by_expert(ids, num_experts=6, block_m=4)
    pad = ids.numel()
    blocks = sorted_ids.view(-1, 4)
    seen = {}
    for b, e in zip(blocks.tolist(), block_expert.tolist()):
        if e < 0:
            assert all(p == pad for p in b)
            continue
        for p in b:
            if p != pad:
                assert int(ids.view(-1)[p]) == e
                seen[p] = e
    assert sorted(seen) == [p for p in range(pad) if int(ids.view(-1)[p]) < 6]


@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(1, 4, 1), (7, 8, 2), (33, 16, 4), (70, 3, 2)])
def test_triton_kernel_equals_reference(num_tokens, num_experts, top_k):
    from braid.layers.moe.fused_moe_kernel import fused_experts_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, w13, w2, weights, ids = _inputs(num_tokens, num_experts, top_k, device=device)
    if num_tokens > 5:
        ids[:5] = 0  # a crowded expert: several blocks of one expert
        ids[5, 0] = num_experts  # another rank's expert
    want = fused_experts_ref(x, w13, w2, weights, ids)
    torch.testing.assert_close(fused_experts_triton(x, w13, w2, weights, ids), want, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_kernel_bf16_on_gpu():
    from braid.layers.moe.fused_moe_kernel import fused_experts_triton

    x, w13, w2, weights, ids = _inputs(300, 64, 6, hidden=256, inter=128, dtype=torch.bfloat16, device="cuda")
    want = fused_experts_ref(x.float(), w13.float(), w2.float(), weights, ids)
    torch.testing.assert_close(fused_experts_triton(x, w13, w2, weights, ids).float(), want, atol=3e-2, rtol=3e-2)
