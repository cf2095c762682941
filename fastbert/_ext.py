"""Loads the compiled extension fastbert._C once; keeps the reason when it cannot.

available()      the extension loaded
has_op(name)     torch.ops.fastbert.<name> is registered
has_cuda()       the extension was built with its CUDA kernels
load_error       why it did not load (None when it did)
build_lines()    lines for `python -m fastbert.info`: ABI target, build torch, and a warning with the fix
                 when a CUDA device is present but the CUDA kernels were not built
reraise_typed(e) a ValueError from a C++ op re-raised as the TypeError it stands for (see below)
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
        "Build it with `pip install .` (or `pip install --no-build-isolation -e .` in a checkout)",
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


# The command that rebuilds the extension with its CUDA kernels, from a checkout.
CUDA_FIX = ("pip install --no-build-isolation --force-reinstall --no-deps .  "
            "(with nvcc on PATH or CUDA_HOME set; TORCH_CUDA_ARCH_LIST=\"8.0;9.0\" by default)")


def build_lines() -> list[str]:
    """What `python -m fastbert.info` reports about the build: the LibTorch stable ABI target (the
    oldest torch this build loads under), the torch that built it, and a WARNING line with the fixing
    command when this machine has a CUDA device but the extension has no CUDA kernels (the C++ ops
    would run their PyTorch reference on CUDA tensors)."""
    import torch

    lines = []
    if _C is not None:
        target = getattr(_C, "abi_target", lambda: "none (built on the regular ATen ABI)")()
        built = getattr(_C, "built_with_torch", lambda: "unknown")()
        lines.append(f"fastbert._C ABI: LibTorch stable ABI, loads under torch >= {target} "
                     f"(built with torch {built}, running torch {torch.__version__})")
    if torch.cuda.is_available() and not has_cuda():
        why = "fastbert._C did not load" if _C is None else "fastbert._C was built without its CUDA kernels"
        lines.append(f"WARNING: a CUDA device is present but {why}: embed and mlm_mask run their PyTorch "
                     f"reference on it. Fix: {CUDA_FIX}")
    return lines


_TYPE_PREFIX = "TypeError: "


def reraise_typed(exc: ValueError):
    """C++ ops on the LibTorch stable ABI can only raise ValueError (std::invalid_argument) for bad
    arguments; the ones that are really type errors (a wrong dtype) carry the prefix "TypeError: ".
    Use around a torch.ops.fastbert call:

        try:
            out = torch.ops.fastbert.embedding_gather(...)
        except ValueError as exc:
            _ext.reraise_typed(exc)
    """
    msg = str(exc)
    if msg.startswith(_TYPE_PREFIX):
        raise TypeError(msg[len(_TYPE_PREFIX):]) from None
    raise exc


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
