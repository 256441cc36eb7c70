#!/usr/bin/env bash
# Where the served front end spends its CPU under load: the same run as gpu_serve_metrics_check.sh
# (Llama-3-8B shape, dummy bf16, async, one concurrency) with py-spy sampling the server (front end
# and engine core) and the load generator. Writes collapsed stacks under $OUT for
# benchmarks/pyspy_summary.py.   [CONCURRENCY=64] bash benchmarks/gpu_serve_profile.sh
source benchmarks/gpu_setup.sh
out=${OUT:-/tmp/out}; port=8321; c=${CONCURRENCY:-64}; rate=${PYSPY_RATE:-250}
spy=/tmp/site/bin/py-spy
model_dir=$(mktemp -d /tmp/braid-shape-XXXX)
python -m braid.bench.shapes llama3-8b "$model_dir" >/dev/null
$spy record --nonblocking --subprocesses --threads --rate $rate --format raw --output "$out/pyspy_server.txt" -- \
  python -m braid.entrypoints.cli serve "$model_dir" --served-model-name llama3-8b --load-format dummy \
  --dtype bfloat16 --port $port --max-model-len 1024 --no-enable-prefix-caching --max-num-seqs 256 \
  --async-scheduling > "$out/server_profile.log" 2>&1 &
spy_server=$!
for _ in $(seq 1 180); do curl -sf http://127.0.0.1:$port/health >/dev/null && break; sleep 1; done
date +%s.%N > "$out/profile_window.txt"
$spy record --nonblocking --threads --rate $rate --format raw --output "$out/pyspy_client.txt" -- \
  python -m braid.entrypoints.cli bench serve --base-url http://127.0.0.1:$port --model llama3-8b \
    --input-len 512 --output-len 256 --num-prompts $((4 * c)) --max-concurrency $c --num-warmups 0 \
    --result-json "$out/serve_profile_c$c.json" --metadata "shape=llama3-8b" 2>&1 | grep -E "Mean TTFT|Mean TPOT|Request throughput"
date +%s.%N >> "$out/profile_window.txt"
pkill -TERM -f "^python -m braid.entrypoints.cli serve" ; wait $spy_server
python benchmarks/pyspy_summary.py "$out/pyspy_server.txt" "$out/pyspy_client.txt" --rate $rate --out "$out/serve_profile_summary_c$c.json"
gzip -f "$out/pyspy_server.txt" "$out/pyspy_client.txt"
