#!/usr/bin/env bash
# Serve a real model shape with random weights and sweep the load generator over concurrency.
#   [CONCURRENCY=1,16,64,256] [TAG=name] benchmarks/serve_sweep.sh SHAPE OUTDIR [extra braid serve flags...]
# e.g. benchmarks/serve_sweep.sh llama3-8b $OUT --max-num-seqs 256
set -u
shape=$1; out=$2; shift 2
port=${PORT:-8321}
concurrency=${CONCURRENCY:-1,16,64,256}
tag=${TAG:-$shape}
# The plot needs matplotlib, which GPU images may lack; the JSON does not.
plot=""; python -c "import matplotlib" 2>/dev/null && plot="--plot $out/serve_$tag.png"
model_dir=$(mktemp -d /tmp/braid-shape-XXXX)
python -m braid.bench.shapes "$shape" "$model_dir" >/dev/null
python -m braid.entrypoints.cli serve "$model_dir" --served-model-name "$shape" --load-format dummy \
  --dtype bfloat16 --port "$port" --max-model-len 1024 --no-enable-prefix-caching "$@" > "$out/server_$tag.log" 2>&1 &
server=$!
for _ in $(seq 1 180); do
  curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
  kill -0 $server 2>/dev/null || { echo "server died"; tail -30 "$out/server_$tag.log"; exit 1; }
  sleep 1
done
python -m braid.entrypoints.cli bench serve --base-url "http://127.0.0.1:$port" --model "$shape" \
  --input-len 512 --output-len 256 --num-prompts 256 --prompts-per-concurrency 4 \
  --max-concurrency "$concurrency" --num-warmups 2 --result-json "$out/serve_$tag.json" $plot \
  --metadata "shape=$shape" "server_args=--load-format dummy --dtype bfloat16 --max-model-len 1024 --no-enable-prefix-caching $*"
rc=$?
kill -TERM $server; wait $server
pgrep -f braid-engine-core && echo "WARNING: engine core left behind"
exit $rc
