#!/usr/bin/env bash
# Where a dual-batch-overlap step's time goes on 2 GPUs: DP=2 x EP, DeepSeek-V2-Lite shape,
# eager, DBO on, decode at 64 tokens per rank, with py-spy sampling every process's threads;
# then DBO off (eager) for the same steps. Needs the py-spy wheel in .whl/.
source benchmarks/gpu_setup.sh
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out=${OUT:-/tmp/out}
mkdir -p "$out"
python benchmarks/dbo_step.py --dp 2 --modes on --eager --decode 64 --steps 64 --repeats 1 --prefill 4096 \
  --out "$out/dbo_profile_on.json" > /tmp/on.txt 2>&1 &
pid=$!
for _ in $(seq 120); do grep -q warm /tmp/on.txt && break; sleep 1; done
sleep 3
timeout 40 /tmp/site/bin/py-spy record -p $pid --subprocesses --threads --idle -d 10 -r 100 -f raw \
  -o "$out/pyspy_dbo_on.txt" > /tmp/pyspy.log 2>&1 || tail -5 /tmp/pyspy.log
wait $pid
grep -E "ms/step|ERROR" /tmp/on.txt
timeout 150 python benchmarks/dbo_step.py --dp 2 --modes off --eager --decode 64 --steps 16 --repeats 1 --prefill 4096 \
  --out "$out/dbo_profile_off.json" 2>&1 | grep -E "ms/step|ERROR"
python - "$out/pyspy_dbo_on.txt" <<'PY'
import collections, sys
# raw format: "frame;frame;... count" per line; print the hottest leaf frames per thread.
leaf = collections.Counter(); total = collections.Counter()
for line in open(sys.argv[1]):
    stack, _, n = line.rstrip().rpartition(" ")
    frames = stack.split(";")
    who = [f for f in frames[:3] if f.startswith(("process", "thread"))]
    thread = (who[0][:30] + " " + who[-1][:40]) if who else frames[0][:70]
    body = [f for f in frames if not f.startswith(("process", "thread"))]
    total[thread] += int(n)
    leaf[(thread, " < ".join(x[:60] for x in body[-1:-4:-1]))] += int(n)
for t, n in total.most_common(12):
    print(f"{n:6d} {t}")
for (t, f), n in leaf.most_common(45):
    print(f"{n:6d} {t[:70]:70s} {f}")
PY
