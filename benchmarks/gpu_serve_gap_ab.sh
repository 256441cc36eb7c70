#!/usr/bin/env bash
# The served front end's latency (client TTFT/e2e minus the server's own histograms) at one
# concurrency, for up to three variants in one lease (hosts differ between leases):
#   old  braid/ reverted by ab_rev.patch (locally: git diff OLD HEAD -- braid > ab_rev.patch)
#   new  the tree
#   std  the tree with uvicorn's C pieces importable (httptools parser, uvloop event loop)
# Each variant: one server (Llama-3-8B shape, dummy bf16, async), a warm-up run, then REPEATS
# measured runs, each scraped before and after.   [VARIANTS="old new std"] [REPEATS=2] [CONCURRENCY=64]
source benchmarks/gpu_setup.sh
out=${OUT:-/tmp/out}; port=8321; c=${CONCURRENCY:-64}; repeats=${REPEATS:-2}
model_dir=$(mktemp -d /tmp/braid-shape-XXXX)
python -m braid.bench.shapes llama3-8b "$model_dir" >/dev/null
# uvicorn picks httptools and braid serve picks uvloop when they import: keep them apart unless the
# variant asks (the image has its own uvloop: a stand-in module hides it).
mkdir -p /tmp/std /tmp/hide && mv /tmp/site/httptools* /tmp/site/uvloop* /tmp/std/ 2>/dev/null
echo 'raise ImportError("hidden for the A/B")' > /tmp/hide/uvloop.py
if [ -f ab_rev.patch ]; then
  rm -rf /tmp/old && mkdir /tmp/old && cp -r braid benchmarks ab_rev.patch /tmp/old/
  (cd /tmp/old && patch -s -R -p1 < ab_rev.patch) || exit 1
fi
bench() {
  python -m braid.entrypoints.cli bench serve --base-url http://127.0.0.1:$port --model llama3-8b \
    --input-len 512 --output-len 256 --max-concurrency $c --num-warmups 0 "$@"
}
for v in ${VARIANTS:-old new std}; do
  d=$PWD; path=/tmp/hide:/tmp/site:$PWD; commit=$BRAID_GIT_COMMIT
  [ "$v" = old ] && d=/tmp/old && path=/tmp/hide:/tmp/site:/tmp/old && commit=${OLD_COMMIT:-unknown-old}
  [ "$v" = std ] && path=/tmp/std:/tmp/site:$PWD
  (cd "$d" && exec env BRAID_GIT_COMMIT=$commit PYTHONPATH=$path python -m braid.entrypoints.cli serve "$model_dir" \
     --served-model-name llama3-8b --load-format dummy --dtype bfloat16 --port $port --max-model-len 1024 \
     --no-enable-prefix-caching --max-num-seqs 256 --async-scheduling > "$out/server_gap_$v.log" 2>&1) &
  server=$!
  for _ in $(seq 1 180); do curl -sf http://127.0.0.1:$port/health >/dev/null && break; sleep 1; done
  PYTHONPATH=$path python -c "
import importlib.util as u
try:
    import uvloop; loop = True
except ImportError:
    loop = False
print('$v: httptools', bool(u.find_spec('httptools')), 'uvloop', loop)"
  bench --num-prompts $c --seed 99 >/dev/null 2>&1  # warm-up wave
  for i in $(seq "$repeats"); do
    curl -s http://127.0.0.1:$port/metrics > /tmp/before.txt
    BRAID_GIT_COMMIT=$commit bench --num-prompts $((4 * c)) --seed $i --result-json "$out/gap_${v}_$i.json" \
      --metadata "variant=$v" >/dev/null 2>&1
    sleep 1
    curl -s http://127.0.0.1:$port/metrics > /tmp/after.txt
    echo "== $v run $i"
    python benchmarks/served_metrics_summary.py /tmp/before.txt /tmp/after.txt "$out/gap_${v}_$i.json" \
      --out "$out/served_gap_${v}_$i.json" | grep -E "client"
  done
  kill -TERM $server; wait $server
done
tar czf "$out/gap_ab.tgz" -C "$out" $(cd "$out" && ls gap_*.json served_gap_*.json server_gap_*.log) && \
  rm -f "$out"/gap_*.json "$out"/served_gap_*.json "$out"/server_gap_*.log
