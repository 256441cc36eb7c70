"""Batched, on-device sampling parameters for one step.

The model runner builds one `SamplingMetadata` per step from the scheduled
requests (one `SamplingRow` each, in batch order) and hands it to the
`Sampler`. All list-to-tensor work happens here, on the CPU, so that
`Sampler.forward` never has to sync with the host. Flags computed here let the
common batch (all greedy, no penalties, no logprobs) skip every optional step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from braid.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """One request's sampling state at this step."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    # Per-request generator on the sampling device, seeded from params.seed;
    # None when the request is unseeded (the default device generator is used).
    generator: torch.Generator | None = None
    # Tokens generated before this one, when output_token_ids lags behind (async
    # scheduling: the previous token's id is still on the GPU). None: len(output_token_ids).
    num_output_tokens: int | None = None

    @property
    def num_generated(self) -> int:
        return len(self.output_token_ids) if self.num_output_tokens is None else self.num_output_tokens


@dataclass
class SamplingMetadata:
    vocab_size: int
    num_rows: int

    # Greedy / random split. Greedy rows get temperature 1.0 here (never used).
    all_greedy: bool
    all_random: bool
    temperature: torch.Tensor | None  # float32 [B]; None when all_greedy
    greedy_mask: torch.Tensor | None  # bool [B]; None when all_greedy or all_random

    # Filters. None when off for every row. Rows with the filter off hold a
    # neutral value (top_k = vocab_size, top_p = 1.0, min_p = 0.0).
    no_top_k: bool
    no_top_p: bool
    no_min_p: bool
    top_k: torch.Tensor | None  # int64 [B]
    top_p: torch.Tensor | None  # float32 [B]
    min_p: torch.Tensor | None  # float32 [B]
    max_top_k: int | None  # largest top_k among rows that use it (host int, avoids a sync)

    # Per-row generators: batch row index -> generator.
    generators: dict[int, torch.Generator]

    # Penalties. None when no_penalties. Token tensors are right-padded with
    # vocab_size (an id that falls off the end of the vocabulary).
    no_penalties: bool
    presence_penalties: torch.Tensor | None  # float32 [B]
    frequency_penalties: torch.Tensor | None  # float32 [B]
    repetition_penalties: torch.Tensor | None  # float32 [B]
    prompt_token_ids: torch.Tensor | None  # int64 [B, max_prompt_len]; None unless some rp != 1
    output_token_ids: torch.Tensor | None  # int64 [B, max_output_len]

    # min_tokens: (rows, cols) of logits that must be -inf this step; None if none.
    stop_mask_rows: torch.Tensor | None  # int64 [N]
    stop_mask_cols: torch.Tensor | None  # int64 [N]

    # Largest `logprobs` asked for in the batch; None when no row wants logprobs.
    max_num_logprobs: int | None

    @classmethod
    def build(cls, rows: list[SamplingRow], vocab_size: int, device) -> "SamplingMetadata":
        device = torch.device(device)
        pin = device.type == "cuda" and torch.cuda.is_available()

        def to_dev(data, dtype) -> torch.Tensor:
            t = torch.tensor(data, dtype=dtype)
            if pin:
                t = t.pin_memory()
            return t.to(device, non_blocking=pin)

        params = [r.params for r in rows]
        n = len(rows)
        greedy = [p.greedy for p in params]
        all_greedy = all(greedy)
        all_random = not any(greedy)

        temperature = None
        greedy_mask = None
        if not all_greedy:
            temperature = to_dev([1.0 if g else float(p.temperature) for g, p in zip(greedy, params)],
                                 torch.float32)
            if not all_random:
                greedy_mask = to_dev(greedy, torch.bool)

        # Filters only matter for random rows.
        rand_params = [p for p, g in zip(params, greedy) if not g]
        no_top_k = not any(0 < p.top_k < vocab_size for p in rand_params)
        no_top_p = not any(p.top_p < 1.0 for p in rand_params)
        no_min_p = not any(p.min_p > 0.0 for p in rand_params)
        top_k = None if no_top_k else to_dev(
            [min(p.top_k, vocab_size) if (p.top_k > 0 and not g) else vocab_size
             for p, g in zip(params, greedy)], torch.int64)
        max_top_k = None if no_top_k else max(
            min(p.top_k, vocab_size) for p in rand_params if 0 < p.top_k < vocab_size)
        top_p = None if no_top_p else to_dev(
            [1.0 if g else float(p.top_p) for p, g in zip(params, greedy)], torch.float32)
        min_p = None if no_min_p else to_dev(
            [0.0 if g else float(p.min_p) for p, g in zip(params, greedy)], torch.float32)

        generators = {i: r.generator for i, r in enumerate(rows)
                      if r.generator is not None and not greedy[i]}

        use_rep = any(p.repetition_penalty != 1.0 for p in params)
        use_out = any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params)
        no_penalties = not (use_rep or use_out)
        presence = frequency = repetition = prompt_ids = output_ids = None
        if not no_penalties:
            presence = to_dev([float(p.presence_penalty) for p in params], torch.float32)
            frequency = to_dev([float(p.frequency_penalty) for p in params], torch.float32)
            repetition = to_dev([float(p.repetition_penalty) for p in params], torch.float32)
            output_ids = to_dev(_pad([r.output_token_ids for r in rows], vocab_size), torch.int64)
            if use_rep:
                prompt_ids = to_dev(_pad([r.prompt_token_ids for r in rows], vocab_size), torch.int64)

        mask_rows: list[int] = []
        mask_cols: list[int] = []
        for i, r in enumerate(rows):
            if r.num_generated < r.params.min_tokens:
                for t in sorted(r.params.all_stop_token_ids()):
                    if 0 <= t < vocab_size:
                        mask_rows.append(i)
                        mask_cols.append(t)
        stop_rows = stop_cols = None
        if mask_rows:
            stop_rows = to_dev(mask_rows, torch.int64)
            stop_cols = to_dev(mask_cols, torch.int64)

        wanted = [p.logprobs for p in params if p.logprobs is not None]
        max_num_logprobs = min(max(wanted), vocab_size) if wanted else None

        return cls(
            vocab_size=vocab_size, num_rows=n,
            all_greedy=all_greedy, all_random=all_random,
            temperature=temperature, greedy_mask=greedy_mask,
            no_top_k=no_top_k, no_top_p=no_top_p, no_min_p=no_min_p,
            top_k=top_k, top_p=top_p, min_p=min_p, max_top_k=max_top_k,
            generators=generators,
            no_penalties=no_penalties,
            presence_penalties=presence, frequency_penalties=frequency,
            repetition_penalties=repetition,
            prompt_token_ids=prompt_ids, output_token_ids=output_ids,
            stop_mask_rows=stop_rows, stop_mask_cols=stop_cols,
            max_num_logprobs=max_num_logprobs,
        )


def _pad(seqs: list[list[int]], pad: int) -> list[list[int]]:
    width = max((len(s) for s in seqs), default=0)
    width = max(width, 1)  # keep a real column so scatter has a valid shape
    return [list(s) + [pad] * (width - len(s)) for s in seqs]
