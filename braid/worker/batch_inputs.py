"""Flatten the scheduled requests of one step into model inputs.

Host-side work with numpy first (HostBatch); then either one upload into fresh
device tensors (eager) or a copy into a CUDA graph's persistent buffers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from braid.layers.attention.metadata import AttentionMetadata
from braid.worker.request_state import CachedRequestState


@dataclass
class HostBatch:
    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64
    query_start_loc: np.ndarray  # [R + 1] int32
    seq_lens: np.ndarray  # [R] int32
    block_table: np.ndarray  # [R, max_blocks] int32
    num_computed_before: np.ndarray  # [R] tokens computed before this step
    max_query_len: int
    max_seq_len: int
    # Async scheduling: flat indices of input tokens the host does not know yet (each
    # request's previous sampled token, still on the GPU), and the request row of each.
    pending_token_index: np.ndarray  # [P] int64
    pending_req_index: np.ndarray  # [P] int64

    @property
    def num_tokens(self) -> int:
        return int(self.query_start_loc[-1])

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens)

    @property
    def last_token_indices(self) -> np.ndarray:
        """Index into the flat tokens of each request's last scheduled token."""
        return self.query_start_loc[1:].astype(np.int64) - 1


@dataclass
class BatchInputs:
    input_ids: torch.Tensor  # [T] long, device
    positions: torch.Tensor  # [T] long, device
    attn_metadata: AttentionMetadata
    logits_indices: torch.Tensor  # [N] long: flat index of each sampling request's last token
    pending_dst: torch.Tensor  # [P] long: input slots to fill from the previous step's samples
    pending_src: torch.Tensor  # [P] long: ... and the sample rows that fill them


def build_host_batch(requests: list[CachedRequestState], num_tokens: list[int], block_size: int) -> HostBatch:
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
    pending_token, pending_req = [], []
    for i, (r, s, n) in enumerate(zip(requests, starts, query_lens)):
        known = r.token_ids[s : s + n]
        lo = int(query_start_loc[i])
        input_ids[lo : lo + len(known)] = known
        if len(known) < n:  # the step before this one samples the last input token
            if len(known) != n - 1:
                raise RuntimeError(f"request {r.req_id}: {n - len(known)} unknown input tokens; at most one "
                                   f"(the previous step's sample) can be pending")
            input_ids[lo + n - 1] = 0
            pending_token.append(lo + n - 1)
            pending_req.append(i)

    max_blocks = max((len(r.block_ids) for r in requests), default=1) or 1
    block_table = np.zeros((num_reqs, max_blocks), dtype=np.int32)
    for i, r in enumerate(requests):
        block_table[i, : len(r.block_ids)] = r.block_ids
    block_of_token = block_table[req_of_token, positions // block_size].astype(np.int64)
    slot_mapping = block_of_token * block_size + positions % block_size
    return HostBatch(
        input_ids=input_ids,
        positions=positions,
        slot_mapping=slot_mapping,
        query_start_loc=query_start_loc.astype(np.int32),
        seq_lens=seq_lens.astype(np.int32),
        block_table=block_table,
        num_computed_before=starts,
        max_query_len=int(query_lens.max(initial=0)),
        max_seq_len=int(seq_lens.max(initial=0)),
        pending_token_index=np.asarray(pending_token, dtype=np.int64),
        pending_req_index=np.asarray(pending_req, dtype=np.int64),
    )


PACK_ALIGN = 16


def packed_layout(arrays: list[np.ndarray]) -> tuple[list[int], int]:
    """Byte offset of each array in the packed upload, and the total size.

    Every view starts 16-byte aligned: Triton specializes a pointer argument on
    16-byte alignment, so a view whose alignment changed with the batch's shapes
    would compile a kernel variant mid-run (layers/triton_ops/__init__.py).
    """
    offsets, total = [], 0
    for a in arrays:
        offsets.append(total)
        total += -(-a.nbytes // PACK_ALIGN) * PACK_ALIGN
    return offsets, total


def pack_to_device(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Copy host arrays to the device with one upload, without a stream sync.

    A copy from pageable memory waits for the device to drain the stream (CUDA stages it);
    one pinned buffer holding every array goes behind the queued work instead. On the CPU
    the arrays are simply wrapped.
    """
    if device.type != "cuda":
        return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
    offsets, total = packed_layout(arrays)
    staging = torch.empty(max(total, 8), dtype=torch.uint8, pin_memory=True)
    flat = staging.numpy()
    for a, off in zip(arrays, offsets):
        flat[off : off + a.nbytes] = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
    on_device = staging.to(device, non_blocking=True)
    return [on_device[off : off + a.nbytes].view(_TORCH_DTYPE[a.dtype]).view(a.shape)
            for a, off in zip(arrays, offsets)]


_TORCH_DTYPE = {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32}


def upload(host: HostBatch, device: torch.device, logits_indices: np.ndarray,
           pending_src: np.ndarray | None) -> BatchInputs:
    """Fresh device tensors for an eager forward, all from one packed upload."""
    if pending_src is None:
        pending_src = np.zeros(0, dtype=np.int64)
    (input_ids, positions, qsl, seq_lens, block_table, slot_mapping, logits_idx, pending_dst,
     pending_src_dev) = pack_to_device(
        [host.input_ids, host.positions, host.query_start_loc, host.seq_lens, host.block_table, host.slot_mapping,
         logits_indices.astype(np.int64), host.pending_token_index, pending_src.astype(np.int64)], device)
    metadata = AttentionMetadata(
        num_actual_tokens=host.num_tokens,
        query_start_loc=qsl,
        seq_lens=seq_lens,
        block_table=block_table,
        slot_mapping=slot_mapping,
        max_query_len=host.max_query_len,
        max_seq_len=host.max_seq_len,
        query_start_loc_cpu=torch.from_numpy(host.query_start_loc),
        seq_lens_cpu=torch.from_numpy(host.seq_lens),
    )
    return BatchInputs(input_ids=input_ids, positions=positions, attn_metadata=metadata,
                       logits_indices=logits_idx, pending_dst=pending_dst, pending_src=pending_src_dev)
