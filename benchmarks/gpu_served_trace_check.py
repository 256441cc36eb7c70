"""GPU check: a served (AsyncLLM) TP=2 engine with --trace-dir stops on SIGTERM with exit code 0,
and the engine core and both NCCL workers write their timelines; a TP=2 start that fails in the
workers (a truncated checkpoint) leaves no worker and no rendezvous directory."""
import asyncio
import glob
import os
import subprocess
import sys
import tempfile
import time

from braid.engine.arg_utils import EngineArgs
from braid.engine.async_llm import AsyncLLM
from braid.sampling_params import SamplingParams


def main() -> int:
    tmp = tempfile.mkdtemp()
    model = os.path.join(tmp, "model")
    subprocess.run([sys.executable, "-m", "braid.bench.shapes", "llama3-8b", model], check=True,
                   capture_output=True)
    trace = os.path.join(tmp, "trace")
    llm = AsyncLLM.from_engine_args(EngineArgs(model=model, load_format="dummy", tensor_parallel_size=2,
                                               max_model_len=512, trace_dir=trace))

    async def one():
        params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
        return [o async for o in llm.generate({"prompt_token_ids": list(range(10, 60))}, params, "r")]

    ok = asyncio.run(one())[-1].finished
    t0 = time.monotonic()
    llm.shutdown()
    took = time.monotonic() - t0
    files = sorted(os.path.basename(f).rsplit("-", 1)[0] for f in glob.glob(trace + "/*.json"))
    print(f"served TP=2: finished={ok} exit={llm.client.process.exitcode} shutdown {took:.2f}s traces={files}")
    good = ok and llm.client.process.exitcode == 0 and files == [
        "braid-trace-engine-core", "braid-trace-worker-0", "braid-trace-worker-1"]
    dirs = set(glob.glob("/dev/shm/braid-dist-*"))
    bad = os.path.join(tmp, "bad")
    subprocess.run([sys.executable, "-m", "braid.bench.shapes", "llama3-8b", bad], check=True, capture_output=True)
    from safetensors.torch import save_file
    import torch
    save_file({"model.embed_tokens.weight": torch.zeros(3, 3)}, os.path.join(bad, "model.safetensors"))
    from braid import LLM
    try:
        LLM(bad, tensor_parallel_size=2, max_model_len=512)
        print("bad checkpoint: started (unexpected)")
        good = False
    except Exception as e:  # noqa: BLE001
        left = set(glob.glob("/dev/shm/braid-dist-*")) - dirs
        print(f"bad checkpoint: {type(e).__name__}: {str(e).splitlines()[-1][:160]}; leftover dirs {sorted(left)}")
        good = good and not left
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
