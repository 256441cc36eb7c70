"""What every worker process does, whichever executor started it (mp or Ray): join the
process group, build the model for its rank, and report each launched pass in order."""
from __future__ import annotations

import dataclasses
import os
import queue
import traceback
from typing import Callable

from braid.config import EngineConfig

# Environment every worker starts with (multi-GPU hosts here must not use NVLink multicast).
WORKER_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class WorkerError(RuntimeError):
    """A worker process died or raised: the engine cannot go on."""


def start_worker(rank: int, config: EngineConfig, init_method: str, cuda_index: int):
    """Join the default group as `rank` (NCCL on GPU, gloo on CPU), build the TP/PP groups
    and this rank's slice of the model. Returns (worker, tracer)."""
    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)
    import torch
    import torch.distributed as dist

    from braid.distributed import parallel_state
    from braid.gc_heap import freeze_startup_heap
    from braid.observe.trace import make_tracer
    from braid.worker.worker import Worker

    freeze_startup_heap()  # a full collection over torch's heap would stall this rank's stage
    parallel = config.parallel
    device = config.device.device
    if device.type == "cuda":
        device = torch.device("cuda", cuda_index)
        torch.cuda.set_device(device)
        config = dataclasses.replace(config, device=dataclasses.replace(config.device, device=device))
    else:  # share the host's cores between the ranks
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // parallel.world_size))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=init_method, rank=rank,
                            world_size=parallel.world_size)
    parallel_state.init_model_parallel(parallel.tensor_parallel_size, parallel.pipeline_parallel_size,
                                       pp_layer_partition=parallel.pp_layer_partition,
                                       expert_parallel=parallel.enable_expert_parallel,
                                       all2all_backend=parallel.all2all_backend,
                                       dp_size=parallel.data_parallel_size)
    # Each rank writes its own timeline (per-stage GPU busy under pipeline parallelism).
    tracer = make_tracer(config.trace_dir, f"worker-{rank}")
    return Worker(config, tracer), tracer


def launched_passes(config: EngineConfig, scheduler_output) -> int:
    """Passes one execute call launches: all of the batch's, or with interleaved multi-step
    (pipeline parallelism) the first only — the engine core launches the rest one by one."""
    return 1 if config.scheduler.interleaves_passes else scheduler_output.num_steps


def report_passes(passes: "queue.Queue", deliver: Callable | None, on_error: Callable[[str], None]) -> None:
    """Thread body: wait for each launched pass's tokens in launch order and hand them to
    `deliver` (the output rank) or drop them (every other rank still waits, so its errors
    surface). Launches go on meanwhile in the caller's thread: the next batch (async
    scheduling, the next micro-batch) is enqueued while this one runs."""
    try:
        while True:
            pending = passes.get()
            if pending is None:
                return
            out = pending.result()
            if deliver is not None:
                deliver(out)
    except Exception:  # noqa: BLE001 - the engine core hears of it through on_error
        on_error(traceback.format_exc())


def destroy_process_group() -> None:
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - teardown
        pass
