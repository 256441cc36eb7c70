"""Logprobs as plain lists for the engine core: sampled-token logprobs and prompt logprobs."""
from __future__ import annotations

import torch

from braid.engine.messages import TokenLogprobs
from braid.layers.sampler import LogprobsTensors, compute_logprobs_tensors
from braid.worker.request_state import CachedRequestState


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
    """Logprobs of prompt token p+1 given tokens up to p, for prompt positions p in this chunk."""
    first, end = computed_before, min(computed_before + num_tokens, state.num_prompt_tokens - 1)
    if end <= first:
        return None
    logits = model.compute_logits(hidden[query_start : query_start + (end - first)])
    targets = torch.tensor(state.prompt_token_ids[first + 1 : end + 1], device=logits.device)
    n = state.sampling_params.prompt_logprobs
    return to_token_logprobs(compute_logprobs_tensors(logits, targets, n))
