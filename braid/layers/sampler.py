"""Token sampling on the device, with vLLM V1 semantics.

Order: logprobs of the raw logits -> min_tokens masking -> penalties ->
greedy argmax -> temperature -> min_p -> top_k / top_p -> exponential-race
sampling. Everything is vectorised over the batch and no step reads a value
back to the host; only the per-request generators loop in Python.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from braid.layers.sampling_metadata import SamplingMetadata

_NEG_INF = float("-inf")


@dataclass
class LogprobsTensors:
    token_ids: torch.Tensor  # int64 [N, k+1]: column 0 the target/sampled token, then top-k ids
    logprobs: torch.Tensor  # float32 [N, k+1]
    ranks: torch.Tensor  # int64 [N]: rank of the column-0 token, 1 = best

    def to(self, device, non_blocking: bool = False) -> "LogprobsTensors":
        return LogprobsTensors(self.token_ids.to(device, non_blocking=non_blocking),
                               self.logprobs.to(device, non_blocking=non_blocking),
                               self.ranks.to(device, non_blocking=non_blocking))


def gather_logprobs(logprobs: torch.Tensor, num_logprobs: int, token_ids: torch.Tensor) -> LogprobsTensors:
    """Top-`num_logprobs` entries of float32 `logprobs` [N, V], with `token_ids` [N] in front."""
    token_ids = token_ids.to(torch.int64)
    token_lp = logprobs.gather(-1, token_ids.unsqueeze(-1))  # [N, 1]
    # Rank as in vLLM: number of tokens at least as likely (1 = best).
    ranks = (logprobs >= token_lp).sum(-1)
    if num_logprobs > 0:
        top_lp, top_ids = torch.topk(logprobs, num_logprobs, dim=-1)
        ids = torch.cat((token_ids.unsqueeze(-1), top_ids), dim=1)
        lps = torch.cat((token_lp, top_lp), dim=1)
    else:
        ids, lps = token_ids.unsqueeze(-1), token_lp
    return LogprobsTensors(ids, lps, ranks)


def compute_logprobs(logits: torch.Tensor, num_logprobs: int, token_ids: torch.Tensor) -> LogprobsTensors:
    """Logprobs (log_softmax in float32) of `token_ids` [N] under `logits` [N, V], plus the top n.

    For prompt logprobs, row t holds the logits at prompt position t and the
    target is prompt token t+1. Chunk N when the prompt is long: this
    allocates [N, V] float32.
    """
    return gather_logprobs(torch.log_softmax(logits.float(), dim=-1), num_logprobs, token_ids)


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # int64 [B]
    logprobs: LogprobsTensors | None  # None when no row asked for logprobs


class Sampler(nn.Module):
    def forward(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        md = metadata
        assert logits.dim() == 2 and logits.shape[1] == md.vocab_size, (
            f"logits {tuple(logits.shape)} do not match vocab_size {md.vocab_size}")
        # Up to the temperature step every op is out of place: the caller's
        # logits are never modified.
        logits = logits.float()

        raw_logprobs = None
        if md.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits, dim=-1)

        if md.stop_mask_rows is not None:
            logits = logits.index_put((md.stop_mask_rows, md.stop_mask_cols),
                                      logits.new_full((), _NEG_INF))
        if not md.no_penalties:
            logits = apply_penalties(logits, md)

        greedy_ids = None
        if not md.all_random:
            greedy_ids = logits.argmax(dim=-1)
        if md.all_greedy:
            sampled = greedy_ids
        else:
            random_ids = self._sample_random(logits, md)
            sampled = random_ids if md.all_random else torch.where(md.greedy_mask, greedy_ids, random_ids)

        lp = None
        if raw_logprobs is not None:
            lp = gather_logprobs(raw_logprobs, md.max_num_logprobs, sampled)
        return SamplerOutput(sampled_token_ids=sampled, logprobs=lp)

    @staticmethod
    def _sample_random(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        logits = logits / md.temperature.unsqueeze(1)  # new tensor: in place from here on
        if not md.no_min_p:
            logits = apply_min_p(logits, md.min_p)
        if not (md.no_top_k and md.no_top_p):
            logits = apply_top_k_top_p(logits, md.top_k, md.top_p, md.max_top_k)
        probs = torch.softmax(logits, dim=-1)
        return exponential_race(probs, md.generators)


def apply_penalties(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Repetition (prompt + output), frequency and presence (output only) penalties, as in vLLM."""
    b, v = logits.shape
    out_counts = _bincount(md.output_token_ids, b, v)
    out_mask = out_counts > 0
    if md.prompt_token_ids is not None:
        seen = out_mask | (_bincount(md.prompt_token_ids, b, v) > 0)
        rp = md.repetition_penalties.unsqueeze(1)
        penalised = torch.where(logits > 0, logits / rp, logits * rp)
        logits = torch.where(seen, penalised, logits)
    logits = logits - md.frequency_penalties.unsqueeze(1) * out_counts.to(logits.dtype)
    logits = logits - md.presence_penalties.unsqueeze(1) * out_mask.to(logits.dtype)
    return logits


def _bincount(tokens: torch.Tensor, b: int, v: int) -> torch.Tensor:
    """Per-row counts [B, V] of `tokens` [B, L] right-padded with `v`."""
    counts = torch.zeros(b, v + 1, dtype=torch.int64, device=tokens.device)
    counts.scatter_add_(1, tokens, torch.ones_like(tokens))
    return counts[:, :v]


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p * (the row's top probability)."""
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return logits.masked_fill_(probs < threshold, _NEG_INF)


def apply_top_k_top_p(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None,
                      max_top_k: int | None = None) -> torch.Tensor:
    """Mask logits outside each row's top k and top-p nucleus (k >= V / p = 1.0: off).

    top-p keeps the smallest set of most likely tokens whose mass is >= p, and
    never less than the single most likely token. Ties at the k-th value are kept.
    `max_top_k` (a host int, the largest k of the rows that use top-k) lets
    top-k alone run as one `topk` instead of a full sort.
    """
    v = logits.shape[1]
    if p is None:
        if max_top_k is None:
            max_top_k = v
        kk = k.clamp(1, max_top_k)
        thresh = logits.topk(max_top_k, dim=-1).values.gather(1, (kk - 1).unsqueeze(1))
        thresh = thresh.masked_fill_((k >= v).unsqueeze(1), _NEG_INF)  # rows with top-k off
        return logits.masked_fill_(logits < thresh, _NEG_INF)
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    if k is not None:
        kth = sorted_logits.gather(1, (v - k.clamp(1, v)).unsqueeze(1))
        sorted_logits.masked_fill_(sorted_logits < kth, _NEG_INF)
    probs = torch.softmax(sorted_logits, dim=-1)
    cum = torch.cumsum(probs, dim=-1)
    # Ascending order: drop a token when the mass at or below it is <= 1 - p,
    # i.e. the tokens above it already hold >= p. The top token always stays.
    drop = cum <= (1.0 - p).unsqueeze(1)
    drop[:, -1] = False
    sorted_logits.masked_fill_(drop, _NEG_INF)
    return logits.scatter_(1, order, sorted_logits)


def exponential_race(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """Sample one token per row: argmax(probs / q), q ~ Exp(1) (the Gumbel-max trick in disguise).

    Rows with their own generator draw q only from it, so a seeded request
    samples the same tokens whatever batch it is in.
    """
    q = torch.empty_like(probs)
    if len(generators) != probs.shape[0]:
        q.exponential_()
    for i, gen in generators.items():
        q[i].exponential_(generator=gen)
    # q == 0 would turn a masked 0/0 into NaN, which argmax would pick.
    q.clamp_(min=torch.finfo(q.dtype).tiny)
    return probs.div_(q).argmax(dim=-1)
