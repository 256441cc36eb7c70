"""GPU: the Triton attention backend against the torch reference on SmolLM2.

float32: identical greedy tokens. bfloat16: logprobs within 0.1 (max) and 0.01
(mean) of the torch reference run in bfloat16 — the difference is only the
kernels' accumulation order, far below bf16's own rounding of the weights.
"""
import pytest
import torch

from braid.bench.backend_agreement import compare

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_triton_equals_reference_in_float32(smollm2_path):
    r = compare(smollm2_path, "float32")
    assert all(r["greedy_identical"]), r
    assert r["prompt_logprob_max_abs_diff"] < 1e-3, r


def test_triton_close_to_reference_in_bfloat16(smollm2_path):
    r = compare(smollm2_path, "bfloat16")
    assert r["prompt_logprob_max_abs_diff"] < 0.1 and r["prompt_logprob_mean_abs_diff"] < 0.01, r
    assert r["sample_logprob_max_abs_diff"] < 0.1, r
