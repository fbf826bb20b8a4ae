"""Measured ceilings of the device and the timer the benchmark uses.

The benchmark reports each kernel as a fraction of what this GPU actually does, not of a spec sheet:
bandwidth from a large device-to-device copy (bytes read + bytes written), matrix throughput from a large
bf16 matmul on random data (zeros run faster and would flatter the ceiling).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


def time_ms(fn, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median time of fn() in milliseconds, timed with CUDA events (triton.testing.do_bench flushes L2)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def host_us(fn, calls: int = 200) -> float:
    """Host time per call in microseconds: `calls` back-to-back calls without waiting for the GPU.

    When this exceeds the GPU time of the call, the kernel is launch-bound (CUDA graphs would hide it).
    """
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return 1e6 * elapsed / calls


def time_graph_ms(fns: list, replays: int = 10, trials: int = 5) -> float:
    """GPU time per call in ms with launch overhead removed: the calls captured in one CUDA graph.

    `fns` are the same call on different input buffers (their total larger than L2), so replays read
    from memory, not from cache. Median over `trials` of `replays` graph replays.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compile, allocate) outside the capture
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / (replays * len(fns)))
    return sorted(times)[len(times) // 2]


@dataclass(frozen=True)
class Peaks:
    """What the benchmark divides by: copy bandwidth in GB/s and bf16 matmul rate in TFLOP/s."""

    device_name: str
    copy_gbps: float
    matmul_tflops: float


def measure_peaks(device: torch.device) -> Peaks:
    """Copy 1 GiB device-to-device and multiply two 8192 x 8192 bf16 matrices; take the medians."""
    src = torch.empty(2**28, dtype=torch.float32, device=device).uniform_()  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src))
    copy_gbps = 2 * src.numel() * src.element_size() / copy_ms / 1e6
    del src, dst
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    mm_ms = time_ms(lambda: a @ b)
    matmul_tflops = 2 * n**3 / mm_ms / 1e9
    return Peaks(torch.cuda.get_device_name(device), copy_gbps, matmul_tflops)
