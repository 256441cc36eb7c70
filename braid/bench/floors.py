"""Physical ceilings measured on the device, and the floors they imply."""
from __future__ import annotations

import torch


def _median_ms(fn, iters: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def graph_median_ms(fn, calls: int = 1, replays: int = 10) -> float:
    """Median ms per call of `fn` (which makes `calls` calls) replayed as one CUDA graph:
    GPU time without the host's launch latency, as in a decode step's graph."""
    fn()  # compile / pick algorithms outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2] / calls


def weight_copies(n: int, k: int, total_bytes: int = 2**30) -> list[torch.Tensor]:
    """Distinct bf16 [n, k] weights filling ~total_bytes (at least two), so a GEMM timed over
    them in turn reads its weights from HBM, not from the 50 MB L2."""
    copies = max(2, -(-total_bytes // (n * k * 2)))
    return [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(copies)]


def measure_copy_bandwidth(nbytes: int = 4 * 2**30) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src))
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / (ms / 1e3)


def measure_matmul_rate(n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """Dense matmul rate in FLOP/s on random data."""
    a = torch.randn(n, n, dtype=dtype, device="cuda")
    b = torch.randn(n, n, dtype=dtype, device="cuda")
    ms = _median_ms(lambda: a @ b)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 / (ms / 1e3)


def decode_bytes(num_params: int, embed_params: int, hidden: int, batch: int, context: int, num_layers: int,
                 num_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """Bytes one decode step must read: every weight once (but only `batch` rows of the
    input embedding table) plus each request's KV cache over its context."""
    weights = (num_params - embed_params + batch * hidden) * dtype_bytes
    kv = batch * context * num_layers * 2 * num_kv_heads * head_dim * dtype_bytes
    return int(weights + kv)
