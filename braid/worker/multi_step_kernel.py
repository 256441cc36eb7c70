"""Triton kernel behind braid.worker.multi_step.advance_decode_inputs (torch reference there)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["num_reqs", "stride_bt"])  # see layers/triton_ops/__init__.py
def _advance_kernel(input_ids_ptr, positions_ptr, seq_lens_ptr, slot_mapping_ptr, block_table_ptr, sampled_ptr,
                    num_reqs, stride_bt, block_size, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < num_reqs
    token = tl.load(sampled_ptr + rows, mask=mask, other=0)
    pos = tl.load(positions_ptr + rows, mask=mask, other=0) + 1
    seq_len = tl.load(seq_lens_ptr + rows, mask=mask, other=0) + 1
    block = tl.load(block_table_ptr + rows.to(tl.int64) * stride_bt + pos // block_size, mask=mask, other=0)
    tl.store(input_ids_ptr + rows, token.to(input_ids_ptr.dtype.element_ty), mask=mask)
    tl.store(positions_ptr + rows, pos, mask=mask)
    tl.store(seq_lens_ptr + rows, seq_len, mask=mask)
    slot = block.to(tl.int64) * block_size + pos % block_size
    tl.store(slot_mapping_ptr + rows, slot.to(slot_mapping_ptr.dtype.element_ty), mask=mask)


def advance_decode_inputs_triton(input_ids, positions, seq_lens, slot_mapping, block_table, sampled, num_reqs: int,
                                 block_size: int) -> None:
    block = 256
    _advance_kernel[(triton.cdiv(num_reqs, block),)](
        input_ids, positions, seq_lens, slot_mapping, block_table, sampled, num_reqs, block_table.stride(0),
        block_size, BLOCK=block, num_warps=4,
    )
