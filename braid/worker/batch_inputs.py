"""Flatten the scheduled requests of one step into model inputs.

Pure host-side work with numpy; the result is uploaded to the device once.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from braid.layers.attention.metadata import AttentionMetadata
from braid.worker.request_state import CachedRequestState


@dataclass
class BatchInputs:
    input_ids: torch.Tensor  # [T] long, device
    positions: torch.Tensor  # [T] long, device
    attn_metadata: AttentionMetadata
    # Index into the flat tokens of each request's last scheduled token.
    last_token_indices: np.ndarray
    query_start_loc: np.ndarray  # [num_reqs + 1]
    num_computed_before: np.ndarray  # [num_reqs] tokens computed before this step


def prepare_inputs(
    requests: list[CachedRequestState],
    num_tokens: list[int],
    block_size: int,
    device: torch.device,
) -> BatchInputs:
    num_reqs = len(requests)
    query_lens = np.asarray(num_tokens, dtype=np.int64)
    starts = np.asarray([r.num_computed_tokens for r in requests], dtype=np.int64)
    seq_lens = starts + query_lens
    query_start_loc = np.zeros(num_reqs + 1, dtype=np.int64)
    np.cumsum(query_lens, out=query_start_loc[1:])
    total = int(query_start_loc[-1])

    # Position of every flat token: its request's start plus its offset in the query.
    req_of_token = np.repeat(np.arange(num_reqs), query_lens)
    positions = starts[req_of_token] + (np.arange(total) - query_start_loc[req_of_token])

    input_ids = np.empty(total, dtype=np.int64)
    for i, (r, s, n) in enumerate(zip(requests, starts, query_lens)):
        input_ids[query_start_loc[i] : query_start_loc[i + 1]] = r.token_ids[s : s + n]

    max_blocks = max((len(r.block_ids) for r in requests), default=1) or 1
    block_table = np.zeros((num_reqs, max_blocks), dtype=np.int32)
    for i, r in enumerate(requests):
        block_table[i, : len(r.block_ids)] = r.block_ids
    block_of_token = block_table[req_of_token, positions // block_size].astype(np.int64)
    slot_mapping = block_of_token * block_size + positions % block_size

    qsl_cpu = torch.from_numpy(query_start_loc.astype(np.int32))
    seq_cpu = torch.from_numpy(seq_lens.astype(np.int32))
    metadata = AttentionMetadata(
        num_actual_tokens=total,
        query_start_loc=qsl_cpu.to(device, non_blocking=True),
        seq_lens=seq_cpu.to(device, non_blocking=True),
        block_table=torch.from_numpy(block_table).to(device, non_blocking=True),
        slot_mapping=torch.from_numpy(slot_mapping).to(device, non_blocking=True),
        max_query_len=int(query_lens.max(initial=0)),
        max_seq_len=int(seq_lens.max(initial=0)),
        query_start_loc_cpu=qsl_cpu,
        seq_lens_cpu=seq_cpu,
    )
    return BatchInputs(
        input_ids=torch.from_numpy(input_ids).to(device, non_blocking=True),
        positions=torch.from_numpy(positions).to(device, non_blocking=True),
        attn_metadata=metadata,
        last_token_indices=query_start_loc[1:] - 1,
        query_start_loc=query_start_loc,
        num_computed_before=starts,
    )
