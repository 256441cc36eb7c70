#!/usr/bin/env bash
# 4 x H200: W1 8B PP=4 async traced with the stall probes (gc, Triton compiles, pp_recv/pp_send spans),
# printing what the host did during the largest all-GPU gaps; then DBO off vs auto, DP=4 x EP prefill 4096
# tokens per rank over NVLink and with NCCL P2P off (auto calibrated on random ids, real contexts).
source benchmarks/gpu_setup.sh; export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1; t0=$SECONDS
timeout 150 python benchmarks/w1_throughput.py --shape llama3-8b --engines braid-pp4-async --trace-dir /tmp/trpp4 --out $OUT/w1_pp4_probe.json > $OUT/w1_pp4_probe.log 2>&1; echo "w1 rc $? $((SECONDS-t0))s"; grep -E "floor|braid-" $OUT/w1_pp4_probe.log | grep -v Warn
python - <<'PY'
import json, os
d = json.load(open(os.environ["OUT"] + "/w1_pp4_probe.json"))
t = d["runs"]["braid-pp4-async"][0]["trace_summary"]
for c in t["cpu_spans"]:
    if c["name"] in ("gc", "triton_compile", "pp_recv", "pp_send", "launch"):
        print(c["process"], c["name"], c["count"], round(c["total_ms"], 1))
for g in t["gaps"][:5]:
    print("GAP", g["gpu"], round(g["at_ms"]), round(g["length_ms"]), [(o["process"].split("[")[0], o["name"], round(o["overlap_ms"]), o["count"]) for o in g["overlapping"][:8]])
PY
tar czf $OUT/trpp4.tgz -C /tmp trpp4 2>/dev/null; ls -la $OUT/trpp4.tgz
for link in nvlink nop2p; do
  [ $link = nop2p ] && export NCCL_P2P_DISABLE=1
  timeout 200 python benchmarks/dbo_step.py --dp 4 --decode "" --prefill 4096 --interleave --modes off,auto --out $OUT/dbo_dp4_prefill_auto_$link.json > $OUT/dbo_$link.log 2>&1; echo "$link rc $? $((SECONDS-t0))s"
  grep -E "ms/step|DBO auto policy|Error" $OUT/dbo_$link.log | sed 's/.*DBO auto/DBO auto/' | head -8
done
