"""The further passes of a multi-step decode batch (a mixin of ModelRunner), fed from the
device: each pass's samples become the next pass's inputs without a host round trip
(under pipeline parallelism the last stage sends them to the first).

Without pipeline parallelism a batch's passes are launched back to back. With it they are
interleaved with other micro-batches' passes (the engine core launches each further pass
with `continue_model_async`): a pass waits on the GPU for its own previous pass to leave
the last stage, and the micro-batches queued between them keep every stage busy meanwhile.
Each batch then keeps its own inputs (a CUDA graph's input buffers are shared: saved after
each pass, restored before the next) and last samples. The last stage sends a pass's
samples as soon as they are drawn, and the first stage posts the matching receive while
handling the same pass, so the two sides pair sends and receives in one order whatever
the interleaving; the first stage's next pass waits for them on the GPU, not the host.

A request that finishes or is aborted while its batch still has passes to launch may see
its KV blocks handed to a new batch launched in between; its later passes then write no KV
(slot -1) and the scheduler drops their tokens. Passes launched before the new batch are
ahead of it on the stream, as without interleaving. (Preemption cannot take such a request:
the scheduler picks victims with no passes in flight in this mode; a preempted one is
masked all the same.)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from braid.distributed.comm import pp_irecv_from_last_stage, pp_isend_to_first_stage
from braid.distributed.parallel_state import get_pp_size, is_first_pp_stage, is_last_pp_stage
from braid.worker.async_output import AsyncModelRunnerOutput
from braid.worker.batch_inputs import pack_to_device
from braid.worker.multi_step import advance_decode_inputs


@dataclass
class MultiStepBatch:
    states: list
    req_ids: list[str]
    rows: list[int]
    seq_ends: np.ndarray
    logits_idx: torch.Tensor | None
    batch: object | None          # the eager batch's device inputs; None: the CUDA graph's
    seq_lens_cpu: np.ndarray
    num_tokens: int
    passes_left: int
    graph_inputs: torch.Tensor | None = None  # interleaved graph batches: saved input buffers
    sampled: torch.Tensor | None = None       # interleaved: this batch's last samples (last stage)
    dead_rows: list[int] = field(default_factory=list)
    dead_rows_dev: torch.Tensor | None = None  # dead_rows on the device (uploaded once per change)
    # Interleaved under pipeline parallelism: the posted receive of the next pass's tokens
    # (first stage, (tokens, work)); the send of the last samples (last stage, its work).
    incoming: tuple | None = None
    outgoing: object | None = None
    # Data parallelism under expert parallelism by all-gather: the rows every replica's passes
    # pad their MoE inputs to (agreed in the first pass; an idle replica replays that bucket).
    dp_rows: int = 0


class MultiStepMixin:
    def _further_passes(self, ms: MultiStepBatch, batch_id: int) -> list[AsyncModelRunnerOutput]:
        """Launch the batch's remaining passes now, or keep them for continue_model_async."""
        if ms.passes_left and self.config.scheduler.interleaves_passes:
            self._exchange_samples(ms)
            self._save_for_next_pass(ms)
            self._multi_step_batches[batch_id] = ms
            return []
        outputs = []
        while ms.passes_left:
            outputs.append(self._next_pass(ms))
        return outputs

    @torch.inference_mode()
    def continue_model_async(self, batch_id: int) -> list[AsyncModelRunnerOutput]:
        """Launch the next pass of an interleaved multi-step batch (pipeline parallelism)."""
        ms = self._multi_step_batches[batch_id]
        if ms.graph_inputs is not None:
            self.cuda_graphs.restore_inputs(ms.graph_inputs)
        if ms.sampled is not None:
            self.prev_sampled = ms.sampled
        out = self._next_pass(ms)
        self._exchange_samples(ms)
        if ms.passes_left:
            self._save_for_next_pass(ms)
        else:
            del self._multi_step_batches[batch_id]
        return [out]

    def _save_for_next_pass(self, ms: MultiStepBatch) -> None:
        if ms.batch is None:
            ms.graph_inputs = self.cuda_graphs.save_inputs(ms.graph_inputs)
        ms.sampled = self.prev_sampled if is_last_pp_stage() else None

    def _mark_dead_rows(self, req_ids) -> None:
        """Requests finished or preempted (their blocks may go to others): no more KV writes
        from the passes of theirs still to launch."""
        gone = set(req_ids)
        if not gone:
            return
        for ms in self._multi_step_batches.values():
            newly = [i for i, r in enumerate(ms.req_ids) if r in gone and i not in ms.dead_rows]
            if newly:
                ms.dead_rows += newly
                ms.dead_rows_dev = None

    def _next_pass(self, ms: MultiStepBatch) -> AsyncModelRunnerOutput:
        tracer = self.tracer
        n = len(ms.states)
        ms.seq_ends = ms.seq_ends + 1
        if ms.dead_rows and ms.dead_rows_dev is None:
            # Pinned, non-blocking: a plain torch.tensor(..., device=cuda) would wait for the stream.
            ms.dead_rows_dev = pack_to_device([np.asarray(ms.dead_rows, dtype=np.int64)], self.device)[0]
        dead = ms.dead_rows_dev
        with tracer.cpu_span("launch", tokens=ms.num_tokens, cuda_graph=ms.batch is None):
            sampled = self._samples_for_next_pass(ms)
            stage_input = self._receive(ms.num_tokens, ms.batch is None)
            with tracer.gpu_span("forward"):
                if ms.batch is None:
                    out = self.cuda_graphs.run_next(sampled, n, dead, ms.dp_rows)
                else:
                    batch = ms.batch
                    ms.seq_lens_cpu = ms.seq_lens_cpu + 1
                    md = batch.attn_metadata
                    advance_decode_inputs(batch.input_ids, batch.positions, md.seq_lens, md.slot_mapping,
                                          md.block_table, sampled, n, self.block_size)
                    if dead is not None:
                        md.slot_mapping.index_fill_(0, dead, -1)
                    batch.attn_metadata = dataclasses.replace(md, max_seq_len=md.max_seq_len + 1,
                                                              seq_lens_cpu=torch.from_numpy(ms.seq_lens_cpu))
                    out = self._forward_eager(batch, stage_input)
            hidden = self._send_on(out)
        output = self._sample_and_send(ms.states, ms.req_ids, ms.rows, ms.seq_ends, hidden, ms.logits_idx)
        for state in ms.states:
            state.num_computed_tokens += 1
        ms.passes_left -= 1
        return output

    # ---- multi-step under pipeline parallelism -------------------------------------
    def _exchange_samples(self, ms: MultiStepBatch) -> None:
        """After a pass of an interleaved batch: the last stage sends its samples to the first
        (when another pass follows), the first posts the receive; both in message order."""
        if ms.outgoing is not None:
            ms.outgoing.wait()  # long done on the device: only releases the work
            ms.outgoing = None
        if not ms.passes_left:
            return
        if is_last_pp_stage():
            ms.outgoing = pp_isend_to_first_stage(self.prev_sampled)
        elif is_first_pp_stage():
            ms.incoming = pp_irecv_from_last_stage(len(ms.states), self.device)

    def _samples_for_next_pass(self, ms: MultiStepBatch) -> torch.Tensor:
        """The tokens the next pass's inputs become: this rank's samples, the last stage's (first
        stage of a pipeline), or — on later stages, which read hidden states, not token ids — the
        inputs themselves (advancing them then only moves positions and cache slots on)."""
        if get_pp_size() == 1:
            return self.prev_sampled
        if is_first_pp_stage():
            tokens, work = ms.incoming
            ms.incoming = None
            work.wait()
            return tokens
        return self.cuda_graphs.dev["input_ids"] if ms.batch is None else ms.batch.input_ids
