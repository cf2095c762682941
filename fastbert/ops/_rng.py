"""Where every fused op's randomness comes from: one helper per kind of kernel.

dropout_seed(device, generator=None) -> int64 tensor [2] (seed, offset) ON `device`, drawn with
    torch.randint from the device's generator (or `generator`). The Triton kernels read it through a
    pointer, so nothing is copied to the host: inside a captured CUDA graph the draw is a kernel that
    torch's CUDA generator advances at every replay (new masks each replay), and
    torch.utils.checkpoint, which saves and restores the CPU and CUDA generators, reproduces the
    mask when it recomputes a forward. LayerNorm and bias+GELU use seed only; attention also the
    offset (its Philox counter word).
philox_seed_offset(generator=None) -> (seed, offset) Python ints for the C++/CUDA ops of fastbert._C
    (embed, mlm_mask), drawn from a CPU generator (the default one when None), so one generator
    state gives the same random words on CPU and CUDA. They are arguments of the op call, so a CUDA
    graph would replay the same values: these two ops are not graph-safe yet.
"""

import torch

_HIGH = 2**62  # seeds and offsets are non-negative int64


def dropout_seed(device, generator=None) -> torch.Tensor:
    return torch.randint(0, _HIGH, (2,), dtype=torch.int64, device=device, generator=generator)


def philox_seed_offset(generator=None) -> tuple[int, int]:
    g = torch.default_generator if generator is None else generator
    if not isinstance(g, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    pair = torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64, generator=g, device=g.device)
    seed, offset = pair.tolist()
    return seed, offset
