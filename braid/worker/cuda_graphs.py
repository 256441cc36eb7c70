"""CUDA graphs for decode-only batches.

A decode step launches hundreds of small kernels; replaying them as one graph
takes the CPU out of the step. One graph per batch-size bucket up to
max_num_seqs, all sharing one memory pool; a batch is padded up to the next
bucket. Inputs live in persistent device buffers that each step overwrites;
padded rows write no KV (slot -1) and attend to one harmless cached slot.

Dual-batch overlap (`split_compute`): for each bucket of at least the DBO decode
threshold a second graph holds the step as two micro-batches — rows [0, S/2) and
[S/2, S) — run at capture time on the ubatching threads, so the graph's dependency
graph keeps one micro-batch's collectives beside the other's compute and the replay
needs no threads and no host work.

Under pipeline parallelism each stage captures its own layers: a later stage's
graph reads the hidden states and residual from static buffers that the receive
from the previous stage fills just before the replay; a stage's outputs are sent
on after it. The send/receive stay outside the graph.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from braid.forward_context import ForwardContext, set_forward_context
from braid.layers.attention.metadata import AttentionMetadata
from braid.worker.batch_inputs import HostBatch
from braid.worker.multi_step import advance_decode_inputs

logger = logging.getLogger(__name__)


def capture_sizes(max_batch_size: int) -> list[int]:
    """Bucket sizes: dense where padding would waste most, every 16 beyond."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch_size]
    sizes += list(range(16, max_batch_size, 16))
    return sorted(set(sizes + [max_batch_size]))


STAGING_SLOTS = 8


class DecodeCudaGraphs:
    """`compute(input_ids, positions, hidden, residual)` runs this rank's part of the model:
    the whole model (returns hidden states), or a pipeline stage (hidden and residual are
    the previous stage's outputs, None on the first; returns the final hidden states on the
    last stage, (hidden, residual) on the others). `stage_input` = (hidden_size, dtype) when
    this stage receives them."""

    def __init__(self, compute, backend, kv_caches: list[torch.Tensor], max_batch_size: int, max_model_len: int,
                 block_size: int, device: torch.device, stage_input: tuple[int, torch.dtype] | None = None,
                 split_compute=None, split_min_size: int | None = None) -> None:
        self.compute = compute
        # split_compute(input_ids, positions, (context0, context1)) -> hidden: the DBO forward.
        self.split_compute = split_compute
        self.split_min_size = split_min_size
        self.backend = backend
        self.kv_caches = kv_caches
        self.max_model_len = max_model_len
        self.sizes = capture_sizes(max_batch_size)
        self.max_batch_size = self.sizes[-1]
        self.block_size = block_size
        self.max_blocks = -(-max_model_len // block_size)
        n = self.max_batch_size
        # All per-step inputs live in one byte buffer, staged in pinned host buffers of the
        # same layout, so a step uploads them with a single copy.
        layout = [("input_ids", torch.int64, (n,)), ("positions", torch.int64, (n,)),
                  ("slot_mapping", torch.int64, (n,)), ("seq_lens", torch.int32, (n,)),
                  ("block_table", torch.int32, (n, self.max_blocks)),
                  # Async scheduling: input slots filled on the GPU from the previous step's samples.
                  ("pending_dst", torch.int64, (n,)), ("pending_src", torch.int64, (n,))]
        total = sum(_nbytes(dtype, shape) for _, dtype, shape in layout)
        self.device_buffer = torch.zeros(total, dtype=torch.uint8, device=device)
        self.dev: dict[str, torch.Tensor] = _typed_views(self.device_buffer, layout)
        # The host fills one of a ring of pinned staging buffers while the uploads from the
        # others may still wait in the stream (interleaved multi-step queues other batches'
        # passes ahead of a new batch's upload); it waits only for the upload STAGING_SLOTS back.
        self._staging = [torch.zeros(total, dtype=torch.uint8, pin_memory=True) for _ in range(STAGING_SLOTS)]
        self._staging_views = [{name: view.numpy() for name, view in _typed_views(buf, layout).items()}
                               for buf in self._staging]
        self._staged: list[torch.cuda.Event | None] = [None] * STAGING_SLOTS
        for views in self._staging_views:
            views["slot_mapping"][:] = -1
            views["seq_lens"][:] = 1
        self._slot = 0
        self.host: dict[str, np.ndarray] = self._staging_views[0]
        self.device_buffer.copy_(self._staging[0])
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)  # one token per request
        # A later pipeline stage's inputs: the previous stage's hidden states and residual.
        self.stage_inputs = None
        if stage_input is not None:
            hidden_size, dtype = stage_input
            self.stage_inputs = torch.zeros((2, n, hidden_size), dtype=dtype, device=device).unbind(0)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.split_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.num_split_replays = 0
        self.memory_bytes = 0

    def _context(self, size: int, start: int = 0, dp_padded_tokens: int | None = None) -> ForwardContext:
        """Rows [start, start + size) of the static buffers as one decode batch."""
        end = start + size
        metadata = AttentionMetadata(
            num_actual_tokens=size,
            query_start_loc=self.query_start_loc[: size + 1],  # one token per row, from any start
            seq_lens=self.dev["seq_lens"][start:end],
            block_table=self.dev["block_table"][start:end],
            slot_mapping=self.dev["slot_mapping"][start:end],
            max_query_len=1,
            # Kernel choices must hold for any context the graph will see.
            max_seq_len=self.max_model_len,
            query_start_loc_cpu=None,
            seq_lens_cpu=None,
        )
        return ForwardContext(metadata, self.kv_caches, self.backend, dp_padded_tokens=dp_padded_tokens)

    @torch.inference_mode()
    def capture(self) -> None:
        before = torch.cuda.memory_reserved()
        pool = None
        for size in reversed(self.sizes):  # largest first: smaller graphs reuse its pool
            ctx = self._context(size)
            args = (self.dev["input_ids"][:size], self.dev["positions"][:size], *self._stage_inputs(size))
            with set_forward_context(ctx):  # warm-up compiles kernels outside the capture
                self.compute(*args)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool), set_forward_context(ctx):
                hidden = self.compute(*args)
            pool = graph.pool() if pool is None else pool
            self.graphs[size] = (graph, hidden)
        for size in reversed(self.split_sizes):
            half = size // 2
            contexts = (self._context(half, 0, half), self._context(half, half, half))
            args = (self.dev["input_ids"][:size], self.dev["positions"][:size], contexts)
            self.split_compute(*args)  # warm-up outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            # The micro-batch threads launch into this capture: only this thread's calls are checked.
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                hidden = self.split_compute(*args)
            self.split_graphs[size] = (graph, hidden)
        torch.cuda.synchronize()
        self.memory_bytes = torch.cuda.memory_reserved() - before
        logger.info("captured %d decode CUDA graphs (batch 1..%d; %d split for dual-batch overlap) using %.2f GiB",
                    len(self.graphs), self.max_batch_size, len(self.split_graphs), self.memory_bytes / 2**30)

    @property
    def split_sizes(self) -> list[int]:
        """Buckets that also get a two-micro-batch graph: even, at least the DBO threshold."""
        if self.split_compute is None or self.stage_inputs is not None:
            return []
        return [s for s in self.sizes if s % 2 == 0 and s >= max(2, self.split_min_size or 2)]

    def can_split(self, num_reqs: int, min_size: int = 0) -> bool:
        """A split graph exists for this batch's bucket (each half then holds S/2 rows)."""
        return self.bucket(max(num_reqs, min_size)) in self.split_graphs

    def _stage_inputs(self, size: int) -> tuple:
        if self.stage_inputs is None:
            return None, None
        return tuple(t[:size] for t in self.stage_inputs)

    def stage_input_rows(self, num_reqs: int) -> list[torch.Tensor]:
        """Where a later pipeline stage receives this batch's hidden states and residual."""
        return list(self._stage_inputs(num_reqs))

    def can_run(self, host: HostBatch) -> bool:
        return host.max_query_len == 1 and host.num_tokens == host.num_reqs <= self.max_batch_size

    def bucket(self, num_reqs: int) -> int:
        return next(s for s in self.sizes if s >= num_reqs)

    def _pad_rows(self, start: int, size: int) -> None:
        """Rows [start, size) of the staging buffers become padding: no KV write (slot -1),
        one harmless cached slot to attend to."""
        h = self.host
        h["slot_mapping"][start:size] = -1
        h["seq_lens"][start:size] = 1
        h["block_table"][start:size] = 0

    def run(self, host: HostBatch, prev_sampled: torch.Tensor | None = None,
            pending_src: np.ndarray | None = None, min_size: int = 0, split: bool = False):
        """Replay the bucket that fits this decode batch (and `min_size` rows: data-parallel
        replicas under expert parallelism share one bucket); returns `compute`'s outputs for
        its B rows.

        Input token host.pending_token_index[i] is prev_sampled[pending_src[i]] (async scheduling).
        A later pipeline stage has received its inputs into stage_input_rows(B) already."""
        b = host.num_reqs
        size = self.bucket(max(b, min_size))
        h = self._take_staging()
        h["input_ids"][:b] = host.input_ids
        h["positions"][:b] = host.positions
        h["slot_mapping"][:b] = host.slot_mapping
        h["seq_lens"][:b] = host.seq_lens
        width = host.block_table.shape[1]
        h["block_table"][:b, :width] = host.block_table
        self._pad_rows(b, size)
        num_pending = len(host.pending_token_index)
        h["pending_dst"][:num_pending] = host.pending_token_index
        if num_pending:
            h["pending_src"][:num_pending] = pending_src
        self._upload()  # the step's single upload
        if num_pending:
            dst = self.dev["pending_dst"][:num_pending]
            self.dev["input_ids"].index_copy_(0, dst, prev_sampled.index_select(0, self.dev["pending_src"][:num_pending]))
        graph, out = (self.split_graphs if split else self.graphs)[size]
        graph.replay()
        self.num_split_replays += split
        return tuple(t[:b] for t in out) if isinstance(out, tuple) else out[:b]


    def run_idle(self, num_reqs: int) -> None:
        """Replay the bucket for num_reqs rows on padding alone: a data-parallel replica with
        nothing to run still joins the other replicas' MoE collectives, at their size."""
        size = self.bucket(num_reqs)
        self._take_staging()
        self._pad_rows(0, size)
        self._upload_and_replay(size, split=False)

    def run_calibration(self, input_ids: np.ndarray, seq_lens: np.ndarray, block_table: np.ndarray,
                        split: bool) -> None:
        """Replay the bucket (whole or split) over these rows as a decode step would, writing no
        KV (slot -1): the DBO auto policy's start-up timing."""
        n = len(input_ids)
        size = self.bucket(n)
        h = self._take_staging()
        h["input_ids"][:n] = input_ids
        h["positions"][:n] = seq_lens - 1
        h["seq_lens"][:n] = seq_lens
        h["block_table"][:n, :block_table.shape[1]] = block_table
        h["slot_mapping"][:n] = -1
        self._pad_rows(n, size)
        self._upload_and_replay(size, split)

    def save_inputs(self, into: torch.Tensor | None = None) -> torch.Tensor:
        """A copy (on the stream, after the work queued so far) of every input buffer: an
        interleaved multi-step batch keeps its inputs while other batches replay in between."""
        if into is None:
            return self.device_buffer.clone()
        return into.copy_(self.device_buffer)

    def restore_inputs(self, saved: torch.Tensor) -> None:
        self.device_buffer.copy_(saved)

    def _take_staging(self) -> dict[str, np.ndarray]:
        """The next staging buffer's views (self.host), once its last upload has landed."""
        self._slot = (self._slot + 1) % STAGING_SLOTS
        uploaded = self._staged[self._slot]
        if uploaded is not None:
            uploaded.synchronize()
        self.host = self._staging_views[self._slot]
        return self.host

    def _upload(self) -> None:
        self.device_buffer.copy_(self._staging[self._slot], non_blocking=True)
        self._staged[self._slot] = torch.cuda.Event()
        self._staged[self._slot].record()

    def _upload_and_replay(self, size: int, split: bool) -> None:
        self._upload()
        (self.split_graphs if split else self.graphs)[size][0].replay()

    def run_next(self, sampled: torch.Tensor, num_reqs: int, dead_rows: torch.Tensor | None = None,
                 min_size: int = 0):
        """The next pass of a multi-step run over the batch of the last run() (or of the inputs
        restore_inputs put back): every request's input becomes its sampled token one position
        on, advanced on the device; dead_rows write no KV; then replay. `min_size` as in run():
        every pass of a data-parallel step replays the bucket its first pass agreed on (the
        replicas' MoE collectives move that many rows). A later pipeline stage has received its
        inputs into stage_input_rows(B) already."""
        size = self.bucket(max(num_reqs, min_size))
        d = self.dev
        advance_decode_inputs(d["input_ids"], d["positions"], d["seq_lens"], d["slot_mapping"], d["block_table"],
                              sampled, num_reqs, self.block_size)
        if dead_rows is not None:
            d["slot_mapping"].index_fill_(0, dead_rows, -1)
        graph, out = self.graphs[size]
        graph.replay()
        return tuple(t[:num_reqs] for t in out) if isinstance(out, tuple) else out[:num_reqs]


def _typed_views(buffer: torch.Tensor, layout) -> dict[str, torch.Tensor]:
    """Views of a byte buffer, one per (name, dtype, shape) of the layout, in order."""
    views, offset = {}, 0
    for name, dtype, shape in layout:
        size = _nbytes(dtype, shape)
        views[name] = buffer[offset : offset + size].view(dtype).view(shape)
        offset += size
    return views


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()


def estimate_graph_memory(peak_activation_bytes: int, max_num_seqs: int, max_num_batched_tokens: int) -> int:
    """Memory the graph pool will hold, reserved before sizing the KV cache: the
    activations of the largest decode batch, scaled from the profiled prefill peak."""
    share = min(1.0, max_num_seqs / max(1, max_num_batched_tokens))
    return int(peak_activation_bytes * share) + 256 * 2**20
