"""Advance a decode batch's device inputs by one token, for the next pass of a multi-step run.

Every request's input becomes the token it just sampled, one position further on:

    input_ids[r] = sampled[r];  positions[r] += 1;  seq_lens[r] += 1
    slot_mapping[r] = block_table[r, positions[r] // block_size] * block_size + positions[r] % block_size

for the first num_reqs rows only (a CUDA graph's padded rows keep writing nowhere). On
CUDA this is one small Triton kernel, so a multi-step run needs no host work and no sync
between passes; advance_decode_inputs_ref is the torch reference and the CPU path.
"""
from __future__ import annotations

import torch


def advance_decode_inputs_ref(input_ids, positions, seq_lens, slot_mapping, block_table, sampled, num_reqs: int,
                              block_size: int) -> None:
    rows = slice(0, num_reqs)
    input_ids[rows] = sampled[:num_reqs].to(input_ids.dtype)
    positions[rows] += 1
    seq_lens[rows] += 1
    pos = positions[rows]
    blocks = block_table[rows].gather(1, (pos // block_size).unsqueeze(1).to(torch.int64)).squeeze(1)
    slot_mapping[rows] = blocks.to(slot_mapping.dtype) * block_size + pos % block_size


def advance_decode_inputs(input_ids, positions, seq_lens, slot_mapping, block_table, sampled, num_reqs: int,
                          block_size: int) -> None:
    """In place; see the module docstring."""
    if num_reqs == 0:
        return
    if not input_ids.is_cuda:
        advance_decode_inputs_ref(input_ids, positions, seq_lens, slot_mapping, block_table, sampled, num_reqs,
                                  block_size)
        return
    from braid.worker.multi_step_kernel import advance_decode_inputs_triton

    advance_decode_inputs_triton(input_ids, positions, seq_lens, slot_mapping, block_table, sampled, num_reqs,
                                 block_size)
