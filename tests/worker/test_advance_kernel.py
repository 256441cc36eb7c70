"""The multi-step input advance: Triton kernel (CPU interpreter / GPU) against the torch reference."""
import pytest
import torch

from braid.worker.multi_step import advance_decode_inputs_ref
from braid.worker.multi_step_kernel import advance_decode_inputs_triton

# The interpreter runs Triton on CPU tensors only where tests/conftest.py turned it on (no CUDA).
DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_reqs", [1, 5, 300])
def test_advance_matches_reference(device, num_reqs):
    g = torch.Generator().manual_seed(num_reqs)
    rows, block_size, max_blocks = num_reqs + 3, 16, 8  # 3 padded rows must stay untouched
    block_table = torch.randint(0, 1000, (rows, max_blocks), generator=g, dtype=torch.int32)
    positions = torch.randint(0, block_size * max_blocks - 1, (rows,), generator=g)
    state = dict(input_ids=torch.randint(0, 50, (rows,), generator=g), positions=positions,
                 seq_lens=(positions + 1).to(torch.int32), slot_mapping=torch.full((rows,), -1, dtype=torch.int64),
                 block_table=block_table)
    sampled = torch.randint(0, 50_000, (num_reqs,), generator=g)
    want = {k: v.clone() for k, v in state.items()}
    got = {k: v.clone().to(device) for k, v in state.items()}
    advance_decode_inputs_ref(want["input_ids"], want["positions"], want["seq_lens"], want["slot_mapping"],
                              want["block_table"], sampled, num_reqs, block_size)
    advance_decode_inputs_triton(got["input_ids"], got["positions"], got["seq_lens"], got["slot_mapping"],
                                 got["block_table"], sampled.to(device), num_reqs, block_size)
    for k in want:
        assert torch.equal(got[k].cpu(), want[k]), k
    assert torch.equal(want["input_ids"][:num_reqs], sampled)
    assert torch.all(want["slot_mapping"][num_reqs:] == -1)
