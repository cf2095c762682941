"""Loads the compiled extension fastbert._C once; keeps the reason when it cannot.

available()      the extension loaded
has_op(name)     torch.ops.fastbert.<name> is registered
has_cuda()       the extension was built with its CUDA kernels
load_error       why it did not load (None when it did)
warn_once(key, msg)      one RuntimeWarning per key per process
philox_seed_offset(gen)  the (seed, offset) pair keying the Philox streams of the C++/CUDA ops
"""

import warnings

_C = None
load_error: str | None = None
_warned: set = set()

try:
    import torch  # noqa: F401  (the extension links against torch)

    from fastbert import _C  # type: ignore[attr-defined,no-redef]
except Exception as exc:  # noqa: BLE001
    _C = None
    load_error = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        f"fastbert._C did not load ({load_error}); C++ ops fall back to the PyTorch reference. "
        "Build it with `pip install --no-build-isolation .`",
        RuntimeWarning,
        stacklevel=2,
    )


def available() -> bool:
    return _C is not None


def has_op(name: str) -> bool:
    """True when torch.ops.fastbert.<name> is registered by the loaded extension."""
    if _C is None:
        return False
    import torch

    return hasattr(torch.ops.fastbert, name)


def has_cuda() -> bool:
    """True when the extension was built with its CUDA kernels."""
    return _C is not None and bool(getattr(_C, "with_cuda", lambda: False)())


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def philox_seed_offset(generator=None) -> tuple[int, int]:
    """Draw a 64-bit seed and a 64-bit offset from a torch.Generator (the default CPU generator when
    None). The ops' random words are a function of (seed, offset, position) only, so one generator
    state gives the same result on CPU and CUDA, and each call advances the generator."""
    import torch

    g = torch.default_generator if generator is None else generator
    if not isinstance(g, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    pair = torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64, generator=g, device=g.device)
    seed, offset = pair.tolist()
    return seed, offset
