"""What an attention backend needs to know about one forward pass.

Tokens of all requests are packed into one flat batch. Request r owns query
tokens query_start_loc[r]:query_start_loc[r+1]; after this step its context
holds seq_lens[r] tokens, so its query tokens sit at the last positions of
that context: position of query token i = seq_lens[r] - query_len[r] + i.
A request with query_len == 1 is a decode; with more, a (chunked) prefill
whose earlier context is already in the paged cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    num_actual_tokens: int
    # [num_reqs + 1] int32 on device: cumulative query lengths, starting at 0.
    query_start_loc: torch.Tensor
    # [num_reqs] int32 on device: context length after this step's tokens.
    seq_lens: torch.Tensor
    # [num_reqs, max_blocks_per_req] int32 on device: physical block ids.
    block_table: torch.Tensor
    # [num_tokens] int64 on device: cache slot of each token
    # (block_id * block_size + offset); a negative slot is not written (padding).
    slot_mapping: torch.Tensor
    max_query_len: int
    max_seq_len: int
    # Host copies, for backends that loop on the CPU (the torch reference);
    # None inside CUDA graphs, where only device-side values may be used.
    query_start_loc_cpu: torch.Tensor | None
    seq_lens_cpu: torch.Tensor | None

    @property
    def num_reqs(self) -> int:
        return self.seq_lens.shape[0]


def build_attention_metadata(
    query_lens: list[int],
    seq_lens: list[int],
    block_table: list[list[int]],
    block_size: int,
    device: torch.device | str,
) -> AttentionMetadata:
    """Metadata from plain lists: slots follow each request's block table.

    For tests and simple callers; the model runner fills persistent buffers instead.
    """
    slots: list[int] = []
    for q_len, s_len, blocks in zip(query_lens, seq_lens, block_table):
        for pos in range(s_len - q_len, s_len):
            slots.append(blocks[pos // block_size] * block_size + pos % block_size)
    width = max((len(b) for b in block_table), default=1) or 1
    table = torch.zeros(len(block_table), width, dtype=torch.int32)
    for i, blocks in enumerate(block_table):
        table[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
    qsl = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(query_lens, dtype=torch.int32), 0)
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    return AttentionMetadata(
        num_actual_tokens=int(sum(query_lens)),
        query_start_loc=qsl.to(device),
        seq_lens=seq.to(device),
        block_table=table.to(device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        max_query_len=max(query_lens, default=0),
        max_seq_len=max(seq_lens, default=0),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=seq,
    )
