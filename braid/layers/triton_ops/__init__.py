"""Fused Triton kernels for the decoder layers (the layers' CUDA path).

    rms_norm.rms_norm(x, weight, eps) -> out
    rms_norm.add_rms_norm(x, residual, weight, eps) -> (out, x + residual)
    rms_norm.fused_add_rms_norm(x, residual, weight, eps)     in place, as vLLM's
    rotary.rotary_embedding_(positions, q, k, cos_cache, sin_cache, head_dim, rotary_dim)  in place
    silu_mul.silu_and_mul(x) -> out

Import them from their modules. This package re-exports nothing, so importing
it does not import triton and the function rms_norm never shadows the module
rms_norm. Torch references live beside the layers (braid.layers.norm, rotary,
activation) and are what CPU runs.
"""
