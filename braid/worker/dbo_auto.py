"""Dual-batch overlap's `auto` policy: split a step only where splitting was measured to pay.

At start-up every rank times dummy steps of a few sizes both ways — whole, as the
engine would run them (a CUDA graph for decode batches where graphs exist, eagerly
otherwise), and split into two micro-batches on the ubatching threads — and all ranks
(data- and tensor-parallel) keep the slowest rank's times (one all-reduce), so every rank
holds the same table, and votes and splits alike. A step splits when, at the largest measured size not
above its token count, the split step was faster by more than the margin.

Why whole-step times instead of a model built from per-layer compute and communication
times: what often decides is neither, but the host's launch work, which splitting
doubles for eager micro-batches (and CUDA graphs remove only from the whole step). The
measured step includes everything the step will pay.

The dummy steps must cost what real ones do: random token ids (with identical ids every
token of a MoE model goes to the same few experts, so a step reads a few experts' weights
where a real one reads them all — and splitting, which reads them twice, looked cheap),
real contexts over distinct KV blocks, and whole and split runs alternated so drift falls on
both alike.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class DboTable:
    # (tokens, whole-step ms, split-step ms), ascending tokens.
    decode: list[tuple[int, float, float]] = field(default_factory=list)
    prefill: list[tuple[int, float, float]] = field(default_factory=list)
    margin: float = 0.02  # split only for a gain above measurement noise

    def pays(self, num_tokens: int, decode_only: bool) -> bool:
        rows = self.decode if decode_only else self.prefill
        below = [r for r in rows if r[0] <= num_tokens]
        if not below:
            return False
        _, whole_ms, split_ms = below[-1]
        return split_ms < whole_ms * (1 - self.margin)

    def as_dict(self) -> dict:
        return {"decode": [list(r) for r in self.decode], "prefill": [list(r) for r in self.prefill]}


def calibration_sizes(smallest: int, largest: int) -> list[int]:
    """Powers of two from `smallest` (rounded up to one) to `largest`, and `largest` itself."""
    if largest < smallest:
        return []
    sizes, n = [], 1
    while n < smallest:
        n *= 2
    while n < largest:
        sizes.append(n)
        n *= 2
    return sizes + [largest]


def prefill_shape(num_tokens: int, max_len: int) -> tuple[list[int], list[int]]:
    """A dummy prefill step of num_tokens: whole prompts of up to max_len tokens each."""
    length = max(1, min(num_tokens, max_len))
    query = [length] * (num_tokens // length) + ([num_tokens % length] if num_tokens % length else [])
    return query, list(query)


def decode_shape(num_reqs: int, context: int, max_len: int, kv_tokens: int) -> tuple[list[int], list[int]]:
    """A dummy decode step: num_reqs one-token queries over a context of `context` tokens,
    shortened to fit --max-model-len and, all together, the KV pool."""
    seq_len = max(1, min(context, max_len, kv_tokens // max(1, num_reqs)))
    return [1] * num_reqs, [seq_len] * num_reqs


def spread_blocks(seq_lens: list[int], block_size: int, num_blocks: int) -> list[list[int]]:
    """Block tables for a dummy step: consecutive, distinct blocks (wrapping round the pool),
    so its attention reads as much KV as a real step's rather than one block over and over."""
    tables, nxt = [], 0
    for s in seq_lens:
        n = -(-s // block_size)
        tables.append([(nxt + j) % num_blocks for j in range(n)])
        nxt = (nxt + n) % num_blocks
    return tables


def paired_median_ms(fn_a: Callable[[], None], fn_b: Callable[[], None], sync: Callable[[], None],
                     reps: int = 5) -> tuple[float, float]:
    """Median ms of fn_a and of fn_b, their runs alternated (after one warm-up run of each:
    kernel compilation, allocator pools)."""
    fn_a()
    fn_b()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(reps):
        for fn, out in ((fn_a, times[0]), (fn_b, times[1])):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[0]), statistics.median(times[1])


def calibrate(step: Callable[[list[int], list[int], bool], None], sync: Callable[[], None],
              decode_sizes: list[int], prefill_sizes: list[int], max_len: int,
              decode_shape_of: Callable[[int], tuple[list[int], list[int]]] | None = None) -> DboTable:
    """step(query_lens, seq_lens, split) runs one dummy step; returns the measured table.
    decode_shape_of(n): a decode step's (query_lens, seq_lens) (default: contexts of one token)."""
    table = DboTable()
    for n in decode_sizes:
        q, s = decode_shape_of(n) if decode_shape_of is not None else ([1] * n, [1] * n)
        table.decode.append((n, *paired_median_ms(lambda: step(q, s, False), lambda: step(q, s, True), sync)))
    for n in prefill_sizes:
        q, s = prefill_shape(n, max_len)
        table.prefill.append((n, *paired_median_ms(lambda: step(q, s, False), lambda: step(q, s, True), sync)))
    return table
