"""The engine core in its own process: private sockets, no pickle, clear startup
errors, and a dead core reported instead of a hang."""
import asyncio
import os
import stat

import pytest

from braid.engine import serialization as ser
from braid.engine.arg_utils import EngineArgs
from braid.engine.async_llm import AsyncLLM
from braid.errors import EngineDeadError
from braid.sampling_params import SamplingParams
from tests.tiny_checkpoints import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("tiny"))


def _args(model, **kw):
    kw.setdefault("max_model_len", 128)
    return EngineArgs(model=model, kv_cache_memory="8MiB", **kw)


def test_messages_are_msgpack_never_pickle():
    import pickle

    from braid.engine.messages import EngineCoreRequest

    frames = ser.encode(ser.ADD, EngineCoreRequest("r", [1, 2], SamplingParams(stop=["x"])))
    assert frames[0] == ser.ADD and not frames[1].startswith(b"\x80")  # no pickle protocol header
    kind, body = ser.decode(frames)
    assert body.request_id == "r" and body.sampling_params.stop == ["x"]
    evil = pickle.dumps(EngineCoreRequest("r", [1], SamplingParams()))
    for bad in ([ser.ADD, evil], [b"exec", b""], [ser.ADD], [ser.ABORT, b"\xff\xff"]):
        with pytest.raises(ValueError):
            ser.decode(bad)


def test_startup_error_is_a_clear_value_error():
    with pytest.raises(ValueError, match="does not exist"):
        AsyncLLM.from_engine_args(_args("/no/such/model"))


def test_private_ipc_dir_streaming_and_dead_core(tiny):
    # Room for a request far longer than the kill takes (a 100-token one could finish first on a busy host).
    llm = AsyncLLM.from_engine_args(_args(tiny, max_model_len=1024))
    try:
        mode = stat.S_IMODE(os.stat(llm.client.ipc_dir).st_mode)
        assert mode == 0o700

        async def scenario():
            params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
            outs = [o async for o in llm.generate("Hello world", params, "a")]
            assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 6
            # Outputs stream: more than one update for a multi-token request.
            assert len(outs) > 1
            with pytest.raises(ValueError, match="empty"):
                async for _ in llm.generate("", params, "bad"):
                    pass
            assert await llm.call_utility("num_free_blocks") == await llm.call_utility("num_blocks")

            # Kill the core mid-request: the waiting request fails fast, health turns bad.
            long = SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True)
            agen = llm.generate("Hello world", long, "b")
            await agen.__anext__()
            llm.client.process.kill()
            with pytest.raises(EngineDeadError):
                await asyncio.wait_for(agen.__anext__(), timeout=10)
            with pytest.raises(EngineDeadError):
                llm.check_health()

        asyncio.run(scenario())
    finally:
        llm.shutdown()
    assert not llm.client.process.is_alive()
    assert not os.path.exists(llm.client.ipc_dir)


def test_served_trace_is_written_when_the_core_is_terminated(tiny, tmp_path):
    # `braid serve --trace-dir` ends its engine core with SIGTERM; the spans buffered in the
    # core (a short run never fills the buffer) must still reach the file.
    from braid.observe.trace_summary import load_trace_events, trace_files

    llm = AsyncLLM.from_engine_args(_args(tiny, trace_dir=str(tmp_path)))
    try:
        async def scenario():
            params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
            return [o async for o in llm.generate("Hello world", params, "t")]

        assert asyncio.run(scenario())[-1].finished
    finally:
        llm.shutdown()
    assert llm.client.process.exitcode == 0
    files = trace_files(str(tmp_path))
    assert len(files) == 1 and "engine-core" in files[0]
    steps = [e for e in load_trace_events(files[0]) if e.get("name") == "step"]
    assert len(steps) >= 4


def test_abandoned_requests_count_as_aborted_in_the_metrics(tiny):
    from braid.observe.metrics import EngineMetrics

    metrics = EngineMetrics("m")
    llm = AsyncLLM.from_engine_args(_args(tiny, max_model_len=1024), metrics=metrics)

    def finished(reason):
        return metrics.registry.get_sample_value("braid:request_success_total",
                                                 {"model_name": "m", "finished_reason": reason})

    try:
        assert (finished("stop"), finished("length"), finished("abort")) == (0, 0, 0)  # series exist from the start

        async def scenario():
            long = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True, n=2)
            agen = llm.generate("Hello world", long, "gone")
            await agen.__anext__()
            await agen.aclose()  # the client went away
            short = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
            return [o async for o in llm.generate("Hello world", short, "done")]

        assert asyncio.run(scenario())[-1].finished
        assert (finished("length"), finished("abort")) == (1, 2)  # the abandoned request's two samples
        itl = metrics.registry.get_sample_value("braid:inter_token_latency_seconds_count", {"model_name": "m"})
        assert itl >= 2  # the finished request's 3 tokens came in at least 2 later steps than its first
    finally:
        llm.shutdown()


def test_a_failed_core_reports_its_error_even_when_its_exit_is_seen_first():
    """The core sends an ERROR naming the cause (e.g. a DP rank's worker died), then exits; the
    frontend may see the exit before it reads the message. The cause must still be what the
    requests get (they used to get 'the engine core process exited (exit code None)')."""
    class Exited:
        exitcode = 1

        def join(self, timeout=None):
            pass

    async def scenario():
        read_fd, write_fd = os.pipe()
        llm = object.__new__(AsyncLLM)
        llm.client = type("Client", (), {"process": Exited(), "sentinel": read_fd})()
        llm.dead_reason, llm._dead, llm._utility_futures = None, asyncio.Event(), {}
        queue = asyncio.Queue()
        llm._queues = {"r": queue}
        try:
            llm._on_core_exit()  # the exit is seen first...
            await asyncio.sleep(0.01)
            llm._fail_all("the engine core failed: WorkerError: worker rank 1 died")  # ...then the error read
            first = await queue.get()
            assert isinstance(first, EngineDeadError) and "worker rank 1" in str(first)
            await llm._exit_task
            assert "worker rank 1" in llm.dead_reason
        finally:
            os.close(read_fd)
            os.close(write_fd)

    asyncio.run(scenario())


def test_a_request_that_arrives_during_a_step_is_queued_from_its_arrival(tmp_path):
    """The core takes requests in between steps; one that arrives while a step runs has been
    waiting since it arrived, and its queue time must say so (not start after the step)."""
    import threading
    import time
    from contextlib import nullcontext
    from types import SimpleNamespace

    import zmq

    from braid.engine.core_proc import EngineCoreProc
    from braid.engine.messages import EngineCoreOutputs, EngineCoreRequest

    class OneLongStep:
        tracer = SimpleNamespace(cpu_span=lambda name: nullcontext())
        executor = None

        def __init__(self):
            self.steps, self.added, self.step_end = 0, [], None

        def has_unfinished_requests(self):
            return self.steps < 2

        def add_request(self, request, received_ts=None):
            self.added.append((request.request_id, received_ts, time.monotonic()))

        def step(self):
            self.steps += 1
            if self.steps == 1:  # runs until the request has arrived
                while proc.inbox.empty() and time.monotonic() < deadline:
                    time.sleep(0.01)
                self.step_end = time.monotonic()
            return EngineCoreOutputs()

        def make_stats(self):
            return None

    ctx = zmq.Context()
    to_core, from_core = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    to_core.bind(f"ipc://{tmp_path}/in")
    from_core.bind(f"ipc://{tmp_path}/out")
    core, deadline = OneLongStep(), time.monotonic() + 30
    proc = EngineCoreProc(core, f"ipc://{tmp_path}/in", f"ipc://{tmp_path}/out")
    loop = threading.Thread(target=proc.run, args=(os.getppid(),), daemon=True)
    loop.start()
    try:
        while core.steps == 0:
            time.sleep(0.01)
        to_core.send_multipart(ser.encode(ser.ADD, EngineCoreRequest("r", [1, 2], SamplingParams(max_tokens=1))))
        while not core.added and time.monotonic() < deadline:
            time.sleep(0.01)
        (request_id, received_ts, taken_in_ts), = core.added
        assert received_ts < core.step_end <= taken_in_ts
    finally:
        proc.stop_requested = True
        loop.join(5)
        to_core.close(linger=0)
        from_core.close(linger=0)
        ctx.term()
        proc.close()
