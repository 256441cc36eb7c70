"""Where an HF checkpoint's per-expert tensors go in a FusedMoE layer:
`<prefix>.mlp.experts.<e>.{gate,up,down}_proj.weight` -> `<prefix>.mlp.experts.{w13,w2}_weight`."""
from __future__ import annotations

import re
from typing import Any

_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_SHARD = {"gate_proj": ("w13_weight", "w1"), "up_proj": ("w13_weight", "w3"), "down_proj": ("w2_weight", "w2")}


def expert_weight_target(name: str) -> tuple[str, str, int] | None:
    """(parameter, shard id, expert id) for one expert's tensor, else None."""
    m = _EXPERT.match(name)
    if m is None:
        return None
    param, shard = _SHARD[m.group(3)]
    return f"{m.group(1)}.{param}", shard, int(m.group(2))


def num_experts_of(config: Any) -> int:
    return (getattr(config, "num_experts", None) or getattr(config, "n_routed_experts", None)
            or getattr(config, "num_local_experts", None) or 0)
