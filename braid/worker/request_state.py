"""The worker's own copy of a running request, kept in step with the scheduler by diffs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from braid.sampling_params import SamplingParams


@dataclass
class CachedRequestState:
    req_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # prompt + outputs known so far
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    generator: torch.Generator | None
    # Prompt positions whose logprobs were already reported (a preempted request
    # recomputes its prompt; it must not report them twice).
    num_prompt_logprobs_done: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]
