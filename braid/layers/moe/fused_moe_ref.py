"""The torch reference of the fused experts (and the CPU path): each expert runs
its tokens through gate/up -> SiLU-and-mul -> down; outputs are weighted by the
router and summed over a token's k experts."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def fused_experts_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                      topk_ids: torch.Tensor) -> torch.Tensor:
    """x [T, H]; w13 [E, 2I, H] (gate rows then up rows); w2 [E, H, I];
    topk_weights [T, k] (fp32), topk_ids [T, k] (ids outside [0, E) are skipped:
    experts held by other ranks). Returns [T, H] in x's dtype."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    num_experts, inter = w13.shape[0], w2.shape[2]
    for e in topk_ids.unique().tolist():
        if not 0 <= e < num_experts:
            continue
        token, slot = torch.where(topk_ids == e)
        gate_up = F.linear(x[token], w13[e])
        h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        y = F.linear(h, w2[e])
        out.index_add_(0, token, y.float() * topk_weights[token, slot, None])
    return out.to(x.dtype)
