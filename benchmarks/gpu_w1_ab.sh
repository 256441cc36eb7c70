#!/usr/bin/env bash
# W1 A/B in one lease (hosts differ by up to 18% between leases, so only same-lease pairs
# compare). Locally first:  git diff OLD HEAD -- braid > ab_rev.patch   (untracked: it travels)
# On the device:            OLD_COMMIT=<OLD sha> bash benchmarks/gpu_w1_ab.sh [ENGINE] [ROUNDS]
# Runs the tree and a copy with braid/ reverted by the patch, alternated ROUNDS times
# (2 repeats each), writing w1_ab_{new,old}_N.json under $OUT.
source benchmarks/gpu_setup.sh
engine=${1:-braid-async}
rounds=${2:-2}
[ -f ab_rev.patch ] || { echo "ab_rev.patch missing (see the header)"; exit 1; }
rm -rf /tmp/old && mkdir /tmp/old && cp -r braid benchmarks ab_rev.patch /tmp/old/
(cd /tmp/old && patch -s -R -p1 < ab_rev.patch) || exit 1
for i in $(seq "$rounds"); do
  for v in new old; do
    d=$PWD; commit=$BRAID_GIT_COMMIT
    [ "$v" = old ] && d=/tmp/old && commit=${OLD_COMMIT:-unknown-old}
    (cd "$d" && BRAID_GIT_COMMIT=$commit PYTHONPATH=$d timeout 200 python benchmarks/w1_throughput.py --engines "$engine" --repeats 2 \
       --out "$OUT/w1_ab_${v}_$i.json" 2>&1 | grep -E "braid" | sed "s/^/$v /")
  done
done
