"""Logprobs as plain lists for the engine core: sampled-token logprobs and prompt logprobs."""
from __future__ import annotations

import torch

from braid.engine.messages import TokenLogprobs
from braid.layers.sampler import LogprobsTensors, compute_logprobs
from braid.worker.request_state import CachedRequestState

# Rows of vocab-sized float32 logits materialised at once for prompt logprobs.
_PROMPT_LOGPROBS_ROWS = 512


def to_token_logprobs(t: LogprobsTensors) -> list[TokenLogprobs]:
    ids, lps, ranks = t.token_ids.tolist(), t.logprobs.tolist(), t.ranks.tolist()
    return [(i, l, r) for i, l, r in zip(ids, lps, ranks)]


def prompt_logprobs_for_chunk(
    model: torch.nn.Module,
    hidden: torch.Tensor,
    state: CachedRequestState,
    query_start: int,
    computed_before: int,
    num_tokens: int,
) -> list[TokenLogprobs] | None:
    """Logprobs of prompt token p+1 given tokens up to p, for prompt positions p in this chunk
    not reported before (a recomputed prompt after preemption reports nothing twice)."""
    first = max(computed_before, state.num_prompt_logprobs_done)
    end = min(computed_before + num_tokens, state.num_prompt_tokens - 1)
    if end <= first:
        return None
    state.num_prompt_logprobs_done = end
    n = state.sampling_params.prompt_logprobs
    result: list[TokenLogprobs] = []
    for lo in range(first, end, _PROMPT_LOGPROBS_ROWS):
        hi = min(lo + _PROMPT_LOGPROBS_ROWS, end)
        rows = hidden[query_start + lo - computed_before : query_start + hi - computed_before]
        targets = torch.tensor(state.prompt_token_ids[lo + 1 : hi + 1], device=hidden.device)
        result.extend(to_token_logprobs(compute_logprobs(model.compute_logits(rows), n, targets)))
    return result
