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

Integer arguments that change from batch to batch (row counts, a block table's row
stride) are named in each kernel's `do_not_specialize`: Triton otherwise compiles a
variant per value class (1, a multiple of 16, other) the first time it meets one, mid-run,
for 0.2-0.8 s while every GPU of a pipeline waits (measured before the change: 27
compiles per worker, ~3 s of a 7.7 s W1 run with PP=4).
"""
