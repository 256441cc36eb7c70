#!/usr/bin/env bash
# Served request-phase metrics under load: braid serve (Llama-3-8B shape, dummy bf16, async),
# braid bench serve at one concurrency (no warm-up: the counts must match), then /metrics scraped; prints the server's histogram
# means next to the client's and the phase identities (queue + inference vs e2e).
#   [CONCURRENCY=64] bash benchmarks/gpu_serve_metrics_check.sh   (writes under $OUT)
source benchmarks/gpu_setup.sh
out=${OUT:-/tmp/out}; port=8321; c=${CONCURRENCY:-64}
model_dir=$(mktemp -d /tmp/braid-shape-XXXX)
python -m braid.bench.shapes llama3-8b "$model_dir" >/dev/null
python -m braid.entrypoints.cli serve "$model_dir" --served-model-name llama3-8b --load-format dummy \
  --dtype bfloat16 --port $port --max-model-len 1024 --no-enable-prefix-caching --max-num-seqs 256 \
  --async-scheduling > "$out/server_metrics_check.log" 2>&1 &
server=$!
for _ in $(seq 1 180); do curl -sf http://127.0.0.1:$port/health >/dev/null && break; sleep 1; done
curl -s http://127.0.0.1:$port/metrics > "$out/metrics_before.txt"
python -m braid.entrypoints.cli bench serve --base-url http://127.0.0.1:$port --model llama3-8b \
  --input-len 512 --output-len 256 --num-prompts $((4 * c)) --max-concurrency $c --num-warmups 0 \
  --result-json "$out/serve_metrics_check_c$c.json" --metadata "shape=llama3-8b" 2>&1 | grep -E "Mean TTFT|Mean TPOT|Request throughput"
sleep 1
curl -s http://127.0.0.1:$port/metrics > "$out/metrics_after.txt"
kill -TERM $server; wait $server
python benchmarks/served_metrics_summary.py "$out/metrics_before.txt" "$out/metrics_after.txt" \
  "$out/serve_metrics_check_c$c.json" --out "$out/served_metrics_check_c$c.json"
