"""The model runner's dual-batch-overlap steps (a mixin of ModelRunner): the per-step
decision (policy, then every data-parallel rank's vote), running a step as two
micro-batches on the ubatching threads, and the auto policy's start-up measurements."""
from __future__ import annotations

import logging

import numpy as np
import torch

from braid.distributed.parallel_state import get_dp_group, get_layout
from braid.forward_context import ForwardContext, set_forward_context
from braid.layers.attention.metadata import build_attention_metadata
from braid.worker.ubatch_split import should_try_split, split_ubatches
from braid.worker.ubatching import UBatchGroup

logger = logging.getLogger(__name__)


class DboStepsMixin:
    def _dbo_wish(self, host, num_tokens: list[int]):
        """This rank's two micro-batches for the step, or None: the policy's wish (threshold:
        at least the threshold's tokens; auto: that, and the start-up table says splitting
        pays). The data-parallel ranks then vote (ModelRunner._agree_step): none splits
        unless all do."""
        overlap = self.config.overlap
        if not overlap.enable_dbo:
            return None
        decode_only = host.max_query_len == 1
        wants = should_try_split(host.num_tokens, decode_only, overlap.dbo_decode_token_threshold,
                                 overlap.dbo_prefill_token_threshold)
        if wants and self.dbo_table is not None:  # auto: only where splitting was measured to pay
            wants = self.dbo_table.pays(host.num_tokens, decode_only)
        return split_ubatches(num_tokens, host.seq_lens.tolist()) if wants else None

    @property
    def _dp_vote_group(self):
        return get_dp_group() if get_layout().dp_size > 1 else None

    def _forward_dbo(self, input_ids, positions, block_table, split, num_tokens: int) -> torch.Tensor:
        """The step as two micro-batches on two threads; each collective is a hand-over point
        (distributed/comm.py), so one micro-batch's communication overlaps the other's compute."""
        def micro_batch(mb):
            def run():
                tables = [row.tolist() for row in block_table[mb.req_start:mb.req_end]]
                md = build_attention_metadata(list(mb.query_lens), list(mb.seq_lens), tables, self.block_size,
                                              self.device)
                with set_forward_context(ForwardContext(md, self.kv_caches, self.attn_backend, self._layer_tracer,
                                                        self._dbo_dp_tokens)):
                    return self._compute(input_ids[mb.token_start:mb.token_end],
                                         positions[mb.token_start:mb.token_end])
            return run

        if self._ubatches is None:
            self._ubatches = UBatchGroup(self.device, self._layer_tracer)
        with self.tracer.cpu_span("dbo", tokens=num_tokens):
            outs = self._ubatches.run([micro_batch(mb) for mb in split], require_equal_yields=True)
        self.num_dbo_steps += 1
        return torch.cat(outs)

    def _split_graph_forward(self, input_ids, positions, contexts) -> torch.Tensor:
        """The DBO decode step over a CUDA graph's static rows: halves [0, S/2) and [S/2, S)
        as two micro-batches (cuda_graphs.DecodeCudaGraphs captures this). A fresh group per
        call: its compute stream must be the stream current now (the capture stream)."""
        half = input_ids.shape[0] // 2

        def micro_batch(i):
            def run():
                with set_forward_context(contexts[i]):
                    return self._compute(input_ids[i * half:(i + 1) * half], positions[i * half:(i + 1) * half])
            return run

        outs = UBatchGroup(self.device).run([micro_batch(0), micro_batch(1)], require_equal_yields=True)
        return torch.cat(outs)

    # ---- dual-batch overlap: the auto policy's start-up measurements ------------------
    def _calibrate_dbo(self) -> None:
        """Time dummy steps whole and split at a few sizes (dbo_auto.py); every rank keeps the
        slowest rank's times, so all hold one table and vote (and split) alike."""
        from braid.worker.dbo_auto import calibrate, calibration_sizes, decode_shape

        overlap, sched = self.config.overlap, self.config.scheduler
        decode = calibration_sizes(overlap.dbo_decode_token_threshold, sched.max_num_seqs)
        prefill = calibration_sizes(overlap.dbo_prefill_token_threshold, sched.max_num_batched_tokens)
        sync = (lambda: torch.cuda.synchronize(self.device)) if self.device.type == "cuda" else (lambda: None)
        with torch.inference_mode():
            # Decode at a context of 512 tokens (W1's prompt length) where the pool and limit allow.
            table = calibrate(self._dummy_step, sync, decode, prefill, sched.max_model_len,
                              lambda n: decode_shape(n, 512, sched.max_model_len - 1,
                                                     self.num_kv_blocks * self.block_size))
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_world_size() > 1:
            # Over every rank, not only the DP group: the TP ranks of a replica must split the
            # same steps too (DBO refuses pipeline parallelism, so every rank runs every step).
            rows = table.decode + table.prefill
            times = torch.tensor([[w, sp] for _, w, sp in rows], dtype=torch.float64, device=self.device)
            dist.all_reduce(times, op=dist.ReduceOp.MAX)
            merged = [(n, w, sp) for (n, _, _), (w, sp) in zip(rows, times.tolist())]
            table.decode, table.prefill = merged[:len(table.decode)], merged[len(table.decode):]
        self._dbo_dp_tokens = self._dp_tokens = None
        self.dbo_table = table
        with self.tracer.cpu_span("dbo_calibration", **table.as_dict()):
            pass
        logger.info("DBO auto policy (tokens, whole ms, split ms): decode %s; prefill %s",
                    [(n, round(w, 2), round(sp, 2)) for n, w, sp in table.decode],
                    [(n, round(w, 2), round(sp, 2)) for n, w, sp in table.prefill])

    def _dummy_step(self, query_lens: list[int], seq_lens: list[int], split: bool) -> None:
        """One start-up step as a real step of that shape would run: a decode batch from its
        CUDA graph if there is one, else eagerly; or as two micro-batches. Random token ids and
        distinct KV blocks (dbo_auto.py says why); before any request owns a block, so the KV it
        writes is overwritten before anyone reads it."""
        from braid.worker.dbo_auto import spread_blocks

        num_tokens = sum(query_lens)
        blocks = spread_blocks(seq_lens, self.block_size, self.num_kv_blocks)
        positions = torch.tensor([p for q, s in zip(query_lens, seq_lens) for p in range(s - q, s)],
                                 dtype=torch.int64, device=self.device)
        ids = torch.randint(0, self.config.model.vocab_size, (num_tokens,),
                            generator=torch.Generator().manual_seed(num_tokens))
        input_ids = ids.to(self.device)
        pads = self._dp_pads_moe
        self._dp_tokens = num_tokens if pads else None
        self._dbo_dp_tokens = (num_tokens + 1) // 2 if pads else None
        width = max(len(b) for b in blocks)
        table = np.asarray([b + [0] * (width - len(b)) for b in blocks], dtype=np.int32)
        decode_graph = (self.cuda_graphs is not None and max(query_lens) == 1
                        and num_tokens <= self.cuda_graphs.max_batch_size)
        if decode_graph and (not split or self.cuda_graphs.can_split(num_tokens)):
            self.cuda_graphs.run_calibration(ids.numpy(), np.asarray(seq_lens, dtype=np.int32), table, split)
        elif split:
            self._forward_dbo(input_ids, positions, table, split_ubatches(query_lens, seq_lens), num_tokens)
        else:
            md = build_attention_metadata(query_lens, seq_lens, blocks, self.block_size, self.device)
            with set_forward_context(ForwardContext(md, self.kv_caches, self.attn_backend, None, self._dp_tokens)):
                self._compute(input_ids, positions)
