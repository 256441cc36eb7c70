"""Batch-dependent integer arguments of the Triton kernels are not specialized on: Triton
would otherwise compile a new variant mid-run the first time a value class (1, a multiple
of 16, other) shows up, stalling every GPU of a pipeline (triton_ops/__init__.py). The
compile-free steady state itself is checked on GPU in tests/engine/test_gpu_cuda_graphs.py."""
import pytest

pytest.importorskip("triton")

from braid.layers.attention.triton_decode_attention import _split_kv_decode_kernel  # noqa: E402
from braid.layers.attention.triton_unified_attention import _unified_attention_kernel  # noqa: E402
from braid.layers.moe.fused_moe_kernel import _moe_gemm_kernel  # noqa: E402
from braid.layers.triton_ops.rotary import _rotary_kernel  # noqa: E402
from braid.layers.triton_ops.skinny_gemm import _skinny_gemm_kernel, _split_k_reduce_kernel  # noqa: E402
from braid.worker.multi_step_kernel import _advance_kernel  # noqa: E402

BATCH_DEPENDENT = {
    _unified_attention_kernel: {"num_reqs", "stride_bt"},
    _split_kv_decode_kernel: {"stride_bt"},
    _rotary_kernel: {"num_slots"},
    _skinny_gemm_kernel: {"M", "stride_os"},
    _split_k_reduce_kernel: {"MN"},
    _advance_kernel: {"num_reqs", "stride_bt"},
    _moe_gemm_kernel: {"num_pairs"},
}


@pytest.mark.parametrize("kernel", BATCH_DEPENDENT, ids=lambda k: k.__name__)
def test_batch_dependent_arguments_are_not_specialized(kernel):
    if hasattr(kernel, "params"):  # compiled
        unspecialized = {p.name for p in kernel.params if p.do_not_specialize}
    else:  # the interpreter (TRITON_INTERPRET=1) keeps the decorator's arguments
        unspecialized = set(kernel.kwargs["do_not_specialize"] or ())
        assert unspecialized <= set(kernel.arg_names)
    assert unspecialized == BATCH_DEPENDENT[kernel]
