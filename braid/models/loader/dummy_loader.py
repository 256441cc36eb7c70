"""Random weights for any config, so real-shaped benchmarks run without a checkpoint.

Matrices and biases: uniform in [-scale, scale] (default 1e-3: activations stay
small and finite through any depth); RMSNorm weights: 1. Generated on the
parameters' own device (an 8B model fills in well under a second on a GPU),
seeded by model_config.seed.
"""
from __future__ import annotations

import torch
from torch import nn

from braid.layers.norm import RMSNorm


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0, scale: float = 1e-3) -> None:
    norm_params = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    generators: dict[torch.device, torch.Generator] = {}
    for _, param in model.named_parameters():
        if id(param) in norm_params:
            param.fill_(1.0)
            continue
        gen = generators.get(param.device)
        if gen is None:
            gen = generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
        param.uniform_(-scale, scale, generator=gen)
