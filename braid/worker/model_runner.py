"""Runs the model for one scheduled step: inputs -> forward -> logits -> sampler."""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch

from braid.config import EngineConfig
from braid.distributed.comm import (
    pp_recv, pp_recv_into, pp_send)
from braid.distributed.parallel_state import (
    get_layout, get_pp_size, is_first_pp_stage, is_last_pp_stage)
from braid.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from braid.forward_context import ForwardContext, set_forward_context
from braid.layers.attention.backend import get_attention_backend, kv_cache_shape
from braid.layers.attention.metadata import build_attention_metadata
from braid.layers.sampler import Sampler
from braid.layers.sampling_metadata import SamplingMetadata, SamplingRow
from braid.worker.batch_inputs import build_host_batch, pack_to_device, upload
from braid.worker.cuda_graphs import DecodeCudaGraphs
from braid.worker.async_output import AsyncModelRunnerOutput
from braid.worker.logprobs import prompt_logprobs_for_chunk
from braid.worker.multi_step import advance_decode_inputs
from braid.worker.multi_step_passes import MultiStepBatch, MultiStepMixin
from braid.worker.request_state import CachedRequestState
from braid.worker.dbo_steps import DboStepsMixin
from braid.worker.kernel_warmup import warm_up_batches
from braid.worker.ubatch_split import agree_on_step

logger = logging.getLogger(__name__)


class ModelRunner(DboStepsMixin, MultiStepMixin):
    def __init__(self, config: EngineConfig, tracer=None) -> None:
        from braid.models.loader import load_model
        from braid.observe.trace import NULL_TRACER

        self.config = config
        self.tracer = tracer or NULL_TRACER
        self.device = config.device.device
        self.block_size = config.cache.block_size
        self.model = load_model(config.model, self.device)
        if self.tracer.enabled and self.device.type == "cuda":
            self.tracer.calibrate_gpu(self.device)  # its one sync stays out of the first step
        self.sampler = Sampler()
        self.attn_backend = get_attention_backend(config.device.attention_backend)
        self.requests: dict[str, CachedRequestState] = {}
        self.preempted: dict[str, CachedRequestState] = {}
        self.kv_caches: list[torch.Tensor] = []
        self.cuda_graphs: DecodeCudaGraphs | None = None
        # The last step's sampled ids on the device, and each sampling request's row in them.
        self.prev_sampled: torch.Tensor | None = None
        self.prev_sampled_rows: dict[str, int] = {}
        # Interleaved multi-step batches (pipeline parallelism) with passes still to launch, by batch id.
        self._multi_step_batches: dict = {}
        # Sampled ids travel to the host on their own stream (see async_output).
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._ubatches = None  # dual-batch overlap's threads and streams
        self.num_dbo_steps = 0
        # Expert parallelism by all-gather over DP replicas: this step's agreed MoE token
        # count (whole step; each DBO micro-batch), None when each forward uses its own.
        self._dp_tokens: int | None = None
        self._dbo_dp_tokens: int | None = None
        self.dbo_table = None  # --dbo-policy auto: measured at start-up (dbo_auto.py)

    @property
    def use_cuda_graphs(self) -> bool:
        """Graphs need a CUDA device and the Triton backend (the torch reference reads host values);
        expert parallelism's all-to-all runs eagerly (its split sizes come from the host)."""
        parallel = self.config.parallel
        return (self.device.type == "cuda" and not self.config.device.enforce_eager
                and self.attn_backend.name == "triton"
                and not (parallel.enable_expert_parallel and parallel.all2all_backend == "all_to_all"))

    @property
    def _dp_pads_moe(self) -> bool:
        """Expert parallelism over data-parallel replicas by all-gather: every replica's MoE
        layers must see one token count per step, agreed on before the forward."""
        parallel = self.config.parallel
        return (parallel.data_parallel_size > 1 and parallel.enable_expert_parallel
                and parallel.all2all_backend == "allgather_reducescatter")

    @property
    def layer_range(self) -> tuple[int, int]:
        return self.model.model.start_layer, self.model.model.end_layer

    # ---- KV cache ----------------------------------------------------------------
    @property
    def num_kv_heads(self) -> int:
        """KV heads this rank caches: its share under tensor parallelism (one replica when
        there are more ranks than KV heads, as QKVParallelLinear shards them)."""
        from braid.distributed.parallel_state import get_tp_size

        total, tp = self.config.model.num_kv_heads, get_tp_size()
        return 1 if tp >= total else total // tp

    @property
    def kv_planes(self) -> int:
        """K and V planes stored: 2, or 1 under MLA, whose cached entry is both K and V."""
        return 1 if self.config.model.is_mla else 2

    def kv_bytes_per_block(self) -> int:
        m = self.config.model
        per_layer = self.kv_planes * self.block_size * self.num_kv_heads * m.head_dim
        start, end = self.layer_range  # a pipeline stage caches its own layers only
        return per_layer * (end - start) * torch.tensor([], dtype=m.dtype).element_size()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        m = self.config.model
        shape = kv_cache_shape(num_blocks, self.block_size, self.num_kv_heads, m.head_dim)
        start, end = self.layer_range
        # Under MLA the V plane is the K plane (stride 0): one compressed entry per token.
        whole = torch.zeros((end - start, self.kv_planes, *shape[1:]), dtype=m.dtype, device=self.device)
        whole = whole.expand(end - start, *shape)
        self.num_kv_blocks = num_blocks
        # Indexed by global layer id; other stages' layers have no cache here.
        self.kv_caches = [None] * start + list(whole.unbind(0)) + [None] * (m.num_layers - end)
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB)", num_blocks, self.block_size,
                    whole.untyped_storage().nbytes() / 2**30)
        if self.use_cuda_graphs:
            sched = self.config.scheduler
            stage_input = None if is_first_pp_stage() else (m.hf_config.hidden_size, m.dtype)
            overlap = self.config.overlap
            self.cuda_graphs = DecodeCudaGraphs(
                self._compute, self.attn_backend, self.kv_caches, sched.max_num_seqs, sched.max_model_len,
                self.block_size, self.device, stage_input,
                split_compute=self._split_graph_forward if overlap.enable_dbo else None,
                split_min_size=overlap.dbo_decode_token_threshold)
            self.cuda_graphs.capture()
        if self.device.type == "cuda":
            self.warm_up_kernels()
        if self.config.overlap.enable_dbo and self.config.overlap.dbo_policy == "auto":
            self._calibrate_dbo()

    @torch.inference_mode()
    def warm_up_kernels(self) -> None:
        """Eager forwards of the batch shapes that pick kernel variants the profile run and
        CUDA-graph capture did not compile (kernel_warmup.py). They write no KV (slot -1)
        and sample nothing; every rank runs the same shapes, so collectives match."""
        sched = self.config.scheduler
        batches = warm_up_batches(sched.max_num_seqs, min(sched.max_num_batched_tokens, sched.max_model_len),
                                  self.num_kv_heads, decode=self.cuda_graphs is None)
        hidden_size = self.config.model.hf_config.hidden_size
        for query_lens in batches:
            num_tokens = sum(query_lens)
            blocks = list(range(-(-max(query_lens) // self.block_size)))
            md = build_attention_metadata(query_lens, query_lens, [blocks] * len(query_lens), self.block_size,
                                          self.device)
            md = dataclasses.replace(md, slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64,
                                                                 device=self.device))
            ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
            positions = torch.cat([torch.arange(n, device=self.device) for n in query_lens])
            stage_input = (None, None) if is_first_pp_stage() else tuple(
                torch.zeros(num_tokens, hidden_size, dtype=self.config.model.dtype, device=self.device)
                for _ in range(2))
            with set_forward_context(ForwardContext(md, self.kv_caches, self.attn_backend,
                                                    dp_padded_tokens=num_tokens if self._dp_pads_moe else None)):
                self._compute(ids, positions, *stage_input)
        if sched.num_scheduler_steps > 1:
            # Multi-step's on-device input advance would otherwise compile in the first
            # multi-step pass; one row of each input, with the dtypes and alignment of the real ones.
            long = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(4)]
            ints = [torch.ones((1, 1), dtype=torch.int32, device=self.device) for _ in range(2)]
            advance_decode_inputs(long[0], long[1], ints[0].view(1), long[2], ints[1], long[3], 1, self.block_size)

    @torch.inference_mode()
    def profile_peak_memory(self) -> int:
        """Run the largest batch once on a throwaway cache; return the peak bytes it allocated."""
        sched = self.config.scheduler
        num_tokens = min(sched.max_num_batched_tokens, sched.max_model_len * sched.max_num_seqs)
        num_reqs = max(1, min(sched.max_num_seqs, num_tokens))
        per_req = [num_tokens // num_reqs] * num_reqs
        per_req[0] += num_tokens - sum(per_req)
        blocks_per_req = [-(-n // self.block_size) for n in per_req]
        m = self.config.model
        cache = torch.zeros(kv_cache_shape(sum(blocks_per_req), self.block_size, self.num_kv_heads, m.head_dim),
                            dtype=m.dtype, device=self.device)
        tables, next_block = [], 0
        for nb in blocks_per_req:
            tables.append(list(range(next_block, next_block + nb)))
            next_block += nb
        meta = build_attention_metadata(per_req, per_req, tables, self.block_size, self.device)
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        positions = torch.cat([torch.arange(n, device=self.device) for n in per_req])
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        ctx = ForwardContext(meta, [cache] * m.num_layers, self.attn_backend)
        with set_forward_context(ctx):
            hidden = self.model(ids, positions)
        logits = self.model.compute_logits(hidden[meta.query_start_loc[1:].long() - 1])
        self.sampler(logits, SamplingMetadata.build(
            [SamplingRow(_profile_params(), [], [], None) for _ in range(num_reqs)], m.vocab_size, self.device))
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        del cache, hidden, logits
        torch.cuda.empty_cache()
        return peak

    # ---- request state -----------------------------------------------------------
    def _update_states(self, so: SchedulerOutput) -> None:
        # Preempted before finished: a request may be both when the news of an unlaunched
        # (empty) schedule comes with the next one (EngineCore defers it).
        for req_id in so.preempted_req_ids:
            state = self.requests.pop(req_id, None)
            if state is not None:
                self.preempted[req_id] = state
        for req_id in so.finished_req_ids:
            self.requests.pop(req_id, None)
            self.preempted.pop(req_id, None)
        if self._multi_step_batches:
            self._mark_dead_rows(so.finished_req_ids | so.preempted_req_ids)
        for new in so.scheduled_new_reqs:
            params = new.sampling_params
            resumed = self.preempted.pop(new.req_id, None)
            generator = resumed.generator if resumed is not None else None
            if generator is None and params.seed is not None and not params.greedy:
                generator = torch.Generator(device=self.device)
                generator.manual_seed(params.seed)
            self.requests[new.req_id] = CachedRequestState(
                req_id=new.req_id,
                prompt_token_ids=list(new.prompt_token_ids),
                token_ids=list(new.prompt_token_ids) + list(new.output_token_ids),
                sampling_params=params,
                block_ids=list(new.block_ids),
                num_computed_tokens=new.num_computed_tokens,
                generator=generator,
                num_prompt_logprobs_done=resumed.num_prompt_logprobs_done if resumed is not None else 0,
            )
        for cached in so.scheduled_cached_reqs:
            state = self.requests[cached.req_id]
            state.token_ids.extend(cached.new_token_ids)
            state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    # ---- one step ----------------------------------------------------------------
    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        """Run one scheduled step (so.num_steps == 1) and wait for its tokens."""
        outputs = self.execute_model_async(so)
        assert len(outputs) == 1, "execute_model runs single steps; use execute_model_async for multi-step"
        return outputs[0].result()

    @torch.inference_mode()
    def execute_model_async(self, so: SchedulerOutput) -> list[AsyncModelRunnerOutput]:
        """Launch the step's so.num_steps forward passes without waiting for the GPU (except
        for prompt logprobs); one pending output per pass, in order."""
        self._update_states(so)
        req_ids = list(so.num_scheduled_tokens)
        if not req_ids:
            if get_layout().dp_size > 1:
                # The other replicas' MoE collectives need this one too, for each of their passes.
                self._dummy_forward(so.num_steps)
            return [AsyncModelRunnerOutput.empty() for _ in range(so.num_steps)]
        states = [self.requests[r] for r in req_ids]
        num_tokens = [so.num_scheduled_tokens[r] for r in req_ids]
        tracer = self.tracer
        # Only requests whose every known token is computed after this step sample a
        # token; a partial prefill chunk samples nothing (and draws no random numbers).
        seq_ends = np.asarray([s.num_computed_tokens + n for s, n in zip(states, num_tokens)])
        rows = [i for i, s in enumerate(states) if seq_ends[i] >= len(s.token_ids)]
        with tracer.cpu_span("prepare_inputs"):
            host = build_host_batch(states, num_tokens, self.block_size)
            pending_src = self._pending_sources(host, req_ids)
            logits_indices = host.last_token_indices[rows]
        batch = None
        use_graph = self.cuda_graphs is not None and self.cuda_graphs.can_run(host)
        use_graph, dbo_split = self._agree_step(host.num_tokens, use_graph, self._dbo_wish(host, num_tokens))
        # A split decode step replays its two-micro-batch graph where the (agreed) bucket has
        # one, else runs eagerly; every DP rank decides alike from the same agreed values.
        split_graph = use_graph and dbo_split is not None and self.cuda_graphs.can_split(host.num_reqs,
                                                                                           self._dp_tokens or 0)
        use_graph = use_graph and (dbo_split is None or split_graph)
        with tracer.cpu_span("launch", tokens=host.num_tokens, cuda_graph=use_graph, dbo=dbo_split is not None):
            # A later pipeline stage waits for the previous one outside its GPU span: the
            # timeline counts a stage busy only while it computes.
            stage_input = self._receive(host.num_tokens, use_graph)
            with tracer.gpu_span("forward"):
                if use_graph:
                    out = self.cuda_graphs.run(host, self.prev_sampled, pending_src, min_size=self._dp_tokens or 0,
                                               split=split_graph)
                    self.num_dbo_steps += split_graph
                    # A decode batch samples every row, in order: no gather needed.
                    every_row = len(rows) == host.num_tokens
                    logits_idx = None if every_row else pack_to_device([logits_indices], self.device)[0]
                else:
                    batch = upload(host, self.device, logits_indices, pending_src)
                    if pending_src is not None:
                        batch.input_ids.index_copy_(0, batch.pending_dst,
                                                    self.prev_sampled.index_select(0, batch.pending_src))
                    if dbo_split is not None:
                        out = self._forward_dbo(batch.input_ids, batch.positions, host.block_table, dbo_split,
                                                host.num_tokens)
                    else:
                        out = self._forward_eager(batch, stage_input)
                    logits_idx = batch.logits_indices
            hidden = self._send_on(out)
        outputs = [self._sample_and_send(states, req_ids, rows, seq_ends, hidden, logits_idx, host, num_tokens)]
        for state, n in zip(states, num_tokens):
            state.num_computed_tokens += n

        # Multi-step: the decode batch's further passes (multi_step_passes.py).
        ms = MultiStepBatch(states, req_ids, rows, seq_ends, logits_idx, batch, host.seq_lens.copy(), host.num_tokens,
                            passes_left=so.num_steps - 1, dp_rows=self._dp_tokens or 0)
        return outputs + self._further_passes(ms, so.batch_id)

    @property
    def _layer_tracer(self):
        """Eager forwards on a traced GPU run time attention and MoE parts per layer."""
        return self.tracer if self.tracer.enabled and self.device.type == "cuda" else None

    # ---- data parallelism: one step shape on every replica ---------------------------
    def _agree_step(self, num_tokens: int, local_graph: bool, split) -> tuple[bool, object]:
        """The data-parallel replicas' agreement on this step, in one all-reduce (one host
        sync) where they need one: under expert parallelism by all-gather every replica pads
        its MoE inputs to the largest token count and replays a CUDA graph only if all can
        (the same bucket everywhere); with dual-batch overlap none splits unless all vote to.
        Sets the padded counts; returns (use_graph, the split or None)."""
        self._dp_tokens = self._dbo_dp_tokens = None
        pads = self._dp_pads_moe
        if not (pads or self.config.overlap.enable_dbo):
            return local_graph, split
        agreed = agree_on_step(split is not None, num_tokens, local_graph, self._dp_vote_group, self.device)
        if pads:
            # Each micro-batch holds at most half (rounded up) of its rank's tokens, so at most
            # half of the largest rank's: the count every replica's MoE layers pad to.
            self._dp_tokens, self._dbo_dp_tokens = agreed.most_tokens, (agreed.most_tokens + 1) // 2
            local_graph = agreed.graph
        return local_graph, (split if agreed.split else None)

    def _dummy_forward(self, num_passes: int = 1) -> None:
        """One token through the model that writes no KV (slot -1) and samples nothing: a
        data-parallel replica with nothing scheduled still takes part in every collective
        (and in the dual-batch-overlap vote, where it votes no). Under expert parallelism
        by all-gather it pads to the others' count, and replays their CUDA graph. With
        multi-step the others run num_passes passes after one agreement: so does this one.
        Without expert parallelism no collective of a forward spans replicas (each replica's
        TP ranks idle together): the vote, where there is one, is all it owes the others."""
        use_graph, _ = self._agree_step(1, self.cuda_graphs is not None, None)
        if not self.config.parallel.enable_expert_parallel:
            return
        if use_graph:
            for _ in range(num_passes):
                with self.tracer.cpu_span("dummy_batch", cuda_graph=True):
                    self.cuda_graphs.run_idle(self._dp_tokens)
            return
        md = build_attention_metadata([1], [1], [[0]], self.block_size, self.device)
        md = dataclasses.replace(md, slot_mapping=torch.full((1,), -1, dtype=torch.int64, device=self.device))
        zeros = torch.zeros(1, dtype=torch.int64, device=self.device)
        for _ in range(num_passes):  # one set of inputs for every pass
            with self.tracer.cpu_span("dummy_batch"), set_forward_context(
                    ForwardContext(md, self.kv_caches, self.attn_backend, self._layer_tracer, self._dp_tokens)):
                self._compute(zeros, zeros)

    def _forward_eager(self, batch, stage_input=None):
        with set_forward_context(ForwardContext(batch.attn_metadata, self.kv_caches, self.attn_backend,
                                                self._layer_tracer, self._dp_tokens)):
            return self._compute(batch.input_ids, batch.positions, *(stage_input or (None, None)))

    def _receive(self, num_tokens: int, use_graph: bool):
        """A later pipeline stage's inputs from the previous stage: straight into the CUDA
        graph's static buffers (returns None), or as new tensors (hidden, residual)."""
        if is_first_pp_stage():
            return None
        with self.tracer.cpu_span("pp_recv"):
            if use_graph:
                pp_recv_into(self.cuda_graphs.stage_input_rows(num_tokens))
                return None
            shape = (num_tokens, self.config.model.hf_config.hidden_size)
            return pp_recv([shape, shape], self.config.model.dtype, self.device)

    def _compute(self, input_ids, positions, hidden=None, residual=None):
        """This rank's part of the forward (what a CUDA graph captures): the whole model, or a
        pipeline stage's layers; (hidden, residual) for a stage that passes them on."""
        if get_pp_size() == 1:
            return self.model(input_ids, positions)
        inner = self.model.model
        if is_first_pp_stage():
            hidden = inner.embed_input_ids(input_ids)
        hidden, residual = inner.forward_layers(positions, hidden, residual)
        if not is_last_pp_stage():
            return hidden, residual
        hidden, _ = inner.norm(hidden, residual)
        return hidden

    def _send_on(self, out):
        """A stage that is not the last sends its (hidden, residual) on and samples nothing."""
        if isinstance(out, tuple):
            with self.tracer.cpu_span("pp_send"):
                pp_send(list(out))
            return None
        return out

    def _sample_and_send(self, states, req_ids, rows, seq_ends, hidden, logits_idx, host=None,
                         num_tokens=None) -> AsyncModelRunnerOutput:
        """Sample this pass's tokens and start their copy to the host."""
        if hidden is None:  # not the last pipeline stage: nothing to sample or report
            return AsyncModelRunnerOutput(req_ids, [], None, None, [], {})
        with self.tracer.cpu_span("sample"), self.tracer.gpu_span("sample"):
            sampled, logprobs = self._sample(states, rows, seq_ends, hidden, logits_idx)
        # The next pass's (or step's) inputs may include these samples before the host sees them.
        self.prev_sampled = sampled
        self.prev_sampled_rows = {req_ids[i]: j for j, i in enumerate(rows)}
        prompt_lps = {}
        if host is not None:  # prompts only run in a step's first pass
            for i, state in enumerate(states):
                if state.sampling_params.prompt_logprobs is not None:
                    chunk = prompt_logprobs_for_chunk(self.model, hidden, state, int(host.query_start_loc[i]),
                                                      int(host.num_computed_before[i]), num_tokens[i])
                    if chunk is not None:
                        prompt_lps[state.req_id] = chunk
        wanted = [states[i].sampling_params.logprobs for i in rows]
        return AsyncModelRunnerOutput(req_ids, rows, sampled, logprobs, wanted, prompt_lps, self.copy_stream)

    def _pending_sources(self, host, req_ids: list[str]) -> np.ndarray | None:
        """Row of the previous step's samples that feeds each pending input token."""
        if not len(host.pending_req_index):
            return None
        try:
            return np.asarray([self.prev_sampled_rows[req_ids[i]] for i in host.pending_req_index], dtype=np.int64)
        except KeyError as e:
            raise RuntimeError(f"request {e.args[0]} has a pending input token but did not sample in the "
                               f"previous step") from None

    def _sample(self, states, rows_to_sample: list[int], seq_ends: np.ndarray, hidden: torch.Tensor,
                logits_idx: torch.Tensor | None):
        """Sample one token for each listed row, on the device; returns (ids [N], logprobs tensors or None).
        logits_idx: each row's last token in `hidden` (None: hidden holds exactly those rows)."""
        if not rows_to_sample:
            return None, None
        logits = self.model.compute_logits(hidden if logits_idx is None else hidden[logits_idx])
        rows = []
        for i in rows_to_sample:
            s = states[i]
            # Tokens generated before this one, counted from positions: the host's copy of
            # the outputs may lag one token behind (async scheduling).
            num_generated = int(seq_ends[i]) - s.num_prompt_tokens
            rows.append(SamplingRow(s.sampling_params, s.prompt_token_ids, s.output_token_ids, s.generator,
                                    num_output_tokens=num_generated))
        out = self.sampler(logits, SamplingMetadata.build(rows, logits.shape[-1], self.device))
        return out.sampled_token_ids, out.logprobs


def _profile_params():
    from braid.sampling_params import SamplingParams

    # Exercise the widest sampling path: top-k/top-p filtering and logprobs.
    return SamplingParams(temperature=1.0, top_p=0.9, top_k=50, logprobs=20)
