"""Shared timing for the benchmark suite: providers side by side, rooflines, extra_info.

run(benchmark, fn, device, bytes_moved=None, flops=None) times fn with pytest-benchmark (on CUDA
each round ends with torch.cuda.synchronize; warm-up rounds first) and records in extra_info the
median's GB/s and TFLOP/s, their fraction of the roofline measured once per run (device-to-device
copy bandwidth, bf16 matmul rate), the peak memory and the device and versions.
"""

import functools
import platform

import torch


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def versions():
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda}


def _median_cuda_ms(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


@functools.cache
def roofline(device):
    """(copy GB/s counting read + write, bf16 matmul TFLOP/s), measured once on this device."""
    if device != "cuda":
        return None, None
    src = torch.empty(2**28, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = _median_cuda_ms(lambda: dst.copy_(src))
    gbps = 2 * src.numel() / ms / 1e6
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = _median_cuda_ms(lambda: a @ b, reps=10)
    tflops = 2 * 8192**3 / ms / 1e9
    torch.cuda.empty_cache()
    return gbps, tflops


def run(benchmark, fn, device, bytes_moved=None, flops=None, tokens=None, rounds=None):
    """Time fn and fill benchmark.extra_info; returns fn's last result."""
    cuda = device == "cuda"
    if cuda:
        def timed():
            out = fn()
            torch.cuda.synchronize()
            return out

        for _ in range(3):
            timed()
        torch.cuda.reset_peak_memory_stats()
    else:
        timed = fn
    result = benchmark.pedantic(timed, rounds=rounds or (30 if cuda else 5), iterations=1,
                                warmup_rounds=1)
    info = benchmark.extra_info
    info.update(device=device_name(device), **versions())
    stats = getattr(benchmark, "stats", None)
    median = stats.stats.median if stats is not None and hasattr(stats, "stats") else None
    if cuda:
        info["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    peak_bw, peak_flops = roofline(device)
    if median:
        if bytes_moved:
            info["gbps"] = bytes_moved / median / 1e9
            if peak_bw:
                info["roofline_frac"] = info["gbps"] / peak_bw
                info["copy_gbps"] = peak_bw
        if flops:
            info["tflops"] = flops / median / 1e12
            if peak_flops:
                info["roofline_frac"] = info["tflops"] / peak_flops
                info["matmul_tflops"] = peak_flops
        if tokens:
            info["tokens_per_s"] = tokens / median
    return result


def devices():
    """Devices to benchmark on: CUDA when present, else CPU."""
    return ["cuda"] if torch.cuda.is_available() else ["cpu"]
