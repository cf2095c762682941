"""Shared timing for the benchmark suite: providers side by side, rooflines, extra_info.

run(benchmark, fn, device, bytes_moved=None, flops=None, tokens=None, rounds=None) times fn with
pytest-benchmark and records in extra_info the median's GB/s, TFLOP/s and tokens/s, their fraction of
the roofline measured once per run (device-to-device copy bandwidth, bf16 matmul rate), the peak
memory and the device and versions.

How a CUDA round is timed:
  * warm-up: 3 untimed calls (compiles, autotunes, allocator growth), then one warm-up round;
  * before every round (untimed, in pytest-benchmark's setup) the L2 cache is flushed by zeroing a
    buffer twice its size, then the device is synchronized, so small inputs are not timed hot;
  * the timed function calls fn and ends with torch.cuda.synchronize(), so the wall time covers the
    kernels; CUDA events around fn also give the device-side median (extra_info["gpu_median_ms"]);
  * pytest-benchmark reports the median among its statistics, and the rates use the median;
    roofline_frac is the larger of gbps / copy_gbps and tflops / matmul_tflops (the binding one).
Rounds: FASTBERT_BENCH_ROUNDS (default 15 on CUDA, 5 on CPU) unless the caller passes rounds=.
With --benchmark-disable fn runs once, untimed (a smoke test for CI).
"""

import contextlib
import functools
import os
import platform

import torch

CUDA_ROUNDS = 15
CPU_ROUNDS = 5
CUDA_WARMUP_CALLS = 3


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
    ms = _median_cuda_ms(functools.partial(dst.copy_, src))
    gbps = 2 * src.numel() / ms / 1e6
    src = dst = None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = _median_cuda_ms(functools.partial(torch.matmul, a, b), reps=10)
    tflops = 2 * 8192**3 / ms / 1e9
    a = b = None
    torch.cuda.empty_cache()
    return gbps, tflops


@functools.cache
def _l2_flush_buffer():
    """A uint8 CUDA buffer twice the L2 size (at least 64 MiB); zeroing it evicts the L2."""
    l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0)
    return torch.empty(max(2 * int(l2 or 0), 64 * 2**20), dtype=torch.uint8, device="cuda")


def flush_l2():
    _l2_flush_buffer().zero_()


def default_rounds(device):
    env = os.environ.get("FASTBERT_BENCH_ROUNDS")
    if env:
        n = int(env)
        if n < 1:
            raise ValueError(f"FASTBERT_BENCH_ROUNDS={env!r}; expected a positive integer")
        return n
    return CUDA_ROUNDS if device == "cuda" else CPU_ROUNDS


def _median_seconds(benchmark):
    stats = getattr(benchmark, "stats", None)
    inner = getattr(stats, "stats", None)
    return getattr(inner, "median", None) if inner is not None else None


def run(benchmark, fn, device, bytes_moved=None, flops=None, tokens=None, rounds=None, l2_flush=True):
    """Time fn and fill benchmark.extra_info; returns fn's last result.

    bytes_moved / flops / tokens: per call of fn (bytes read + written, floating-point operations,
    tokens processed); each gives a rate at the median. l2_flush: flush the L2 before each CUDA round.
    """
    info = benchmark.extra_info
    info.update(device=device_name(device), **versions())
    if getattr(benchmark, "disabled", False):  # --benchmark-disable: one untimed call
        return benchmark.pedantic(fn, rounds=1, iterations=1)
    cuda = device == "cuda"
    setup = None
    gpu_ms = []
    flush_bytes = 0
    if cuda:
        def timed():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize()
            gpu_ms.append(start.elapsed_time(end))
            return out

        if l2_flush:
            flush_bytes = _l2_flush_buffer().numel()

            def setup():
                flush_l2()
                torch.cuda.synchronize()

        for _ in range(CUDA_WARMUP_CALLS):
            timed()
        gpu_ms.clear()
        torch.cuda.reset_peak_memory_stats()
    else:
        timed = fn
    result = benchmark.pedantic(timed, setup=setup, rounds=rounds or default_rounds(device), iterations=1,
                                warmup_rounds=1)
    if cuda:
        # the flush buffer is allocated before the reset, so it counts once in the peak: leave it out
        info["peak_mem_mb"] = (torch.cuda.max_memory_allocated() - flush_bytes) / 2**20
        timed_ms = sorted(gpu_ms[1:])  # the first entry is the warm-up round
        if timed_ms:
            info["gpu_median_ms"] = timed_ms[len(timed_ms) // 2]
    median = _median_seconds(benchmark)
    peak_bw, peak_flops = roofline(device)
    if median:
        fracs = []
        for amount, peak, rate, unit, frac_key, peak_key in (
                (bytes_moved, peak_bw, "gbps", 1e9, "roofline_frac_bw", "copy_gbps"),
                (flops, peak_flops, "tflops", 1e12, "roofline_frac_flops", "matmul_tflops")):
            if amount:
                info[rate] = amount / median / unit
                if peak:
                    info[frac_key] = info[rate] / peak
                    info[peak_key] = peak
                    fracs.append(info[frac_key])
        if fracs:  # the binding resource: the larger of the two fractions
            info["roofline_frac"] = max(fracs)
        if tokens:
            info["tokens_per_s"] = tokens / median
    return result


def devices():
    """Devices to benchmark on: CUDA when present, else CPU."""
    return ["cuda"] if torch.cuda.is_available() else ["cpu"]


def training_step(loss_fn, opt, autocast=None):
    """step(*args) for the training benchmarks: loss_fn(*args) under torch.autocast(**autocast) (when
    given), backward, the optimizer step, gradients zeroed (set to None); returns the loss."""

    def step(*args):
        with torch.autocast(**autocast) if autocast else contextlib.nullcontext():
            loss = loss_fn(*args)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def row_op_setup():
    """(device, rows, dtype) of the row-wise op benchmarks (LayerNorm, bias+GELU): 16384 bf16 rows
    on CUDA, 256 fp32 rows on the CPU."""
    cuda = torch.cuda.is_available()
    return ("cuda", 16384, torch.bfloat16) if cuda else ("cpu", 256, torch.float32)


_COMPILED = {}


def provider_fn(provider, fused, eager):
    """What a row-op benchmark times for provider: fastbert's op (fused), the eager PyTorch form, or
    torch.compile of the eager form ("compile", compiled once per eager function)."""
    if provider == "fastbert":
        return fused
    if provider == "eager":
        return eager
    if eager not in _COMPILED:
        _COMPILED[eager] = torch.compile(eager)
    return _COMPILED[eager]


def op_step(fn, args, backward, leaves=(), dy=None):
    """The call to time: fn(*args) under no_grad (forward), or the gradients of its output for leaves
    with upstream gradient dy (forward+backward)."""
    if not backward:
        def forward():
            with torch.no_grad():
                return fn(*args)

        return forward

    def step():
        return torch.autograd.grad(fn(*args), leaves, dy)

    return step


def time_step(benchmark, step, device, bytes_moved, tokens):
    """run()'s synchronised rounds of step, then on CUDA its device time (kernel_time)."""
    run(benchmark, step, device, bytes_moved=bytes_moved, tokens=tokens)
    kernel_time(benchmark, step, bytes_moved)


def kernel_time(benchmark, fn, bytes_moved):
    """CUDA only: device time per call from triton.testing.do_bench (back-to-back launches, L2
    flushed between them), which hides the host-side launch overhead that the synchronised rounds
    of run() include. Recorded as gpu_us, gpu_gbps and gpu_roofline_frac in extra_info."""
    if not torch.cuda.is_available():
        return
    import triton

    us = triton.testing.do_bench(fn, warmup=5, rep=40) * 1e3
    info = benchmark.extra_info
    info["gpu_us"] = us
    info["gpu_gbps"] = bytes_moved / us / 1e3
    copy_gbps = roofline("cuda")[0]
    if copy_gbps:
        info["gpu_roofline_frac"] = info["gpu_gbps"] / copy_gbps


def skip_interpreted(provider, op):
    """Skip fastbert's Triton provider without CUDA: the interpreter would run it, never timed."""
    if provider == "fastbert" and not torch.cuda.is_available():
        import pytest

        pytest.skip(f"fastbert's {op} is a Triton kernel; without CUDA it would run in the "
                    "interpreter, which is never timed")


def band_pairs(seq, window):
    """(i, j) pairs with |i - j| <= window in a sequence of seq positions (all of them once the band
    holds the whole sequence)."""
    if window >= seq - 1:
        return seq * seq
    return seq * (2 * window + 1) - window * (window + 1)


def modernbert_flops(lengths, layers, hidden, ffn, local_attention, global_every, train):
    """Useful FLOPs of a ModernBERT encoder on sequences of these lengths: 2 x (Wqkv, Wo, Wi of 2 x ffn,
    Wo2) per token and layer, attention 4 x hidden per attended pair (every pair in the global layers,
    the band |i - j| <= local_attention // 2 in the others); times 3 for a training step."""
    dense = layers * (4 * hidden * hidden + 3 * hidden * ffn)
    total = 0
    for n in lengths.tolist():
        band = band_pairs(n, local_attention // 2)
        pairs = sum(n * n if i % global_every == 0 else band for i in range(layers))
        total += 2 * dense * n + 4 * hidden * pairs
    return total * (3 if train else 1)
