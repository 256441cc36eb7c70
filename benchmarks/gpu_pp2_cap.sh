source benchmarks/gpu_setup.sh
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
timeout 200 python -m pytest tests/distributed/test_gpu_parallel.py -m gpu -q -p no:cacheprovider --tb=short 2>&1 | grep -E "^E |Error|passed|failed" | tail -8
run() { CUDA_VISIBLE_DEVICES=$1 timeout 340 python benchmarks/w1_throughput.py --shape $2 --engines $3 --trace-dir /tmp/t-$4 --out $OUT/w1_$2_$4.json > $OUT/w1_$2_$4.log 2>&1; }
run 0,1 llama3-8b braid-pp2,braid-pp2-async pp2cap &
run 2,3 llama3-70b braid-pp2 pp2cap &
wait
for f in $OUT/*.log; do grep -E "floor|braid|rror" $f | grep -v Warning | tail -4; done
