"""Loads the compiled extension once: fastbert._C (schemas, CPU kernels) and, under a CUDA torch,
fastbert._C_cuda (the CUDA kernels, a module of its own: it links libtorch_cuda and the CUDA runtime,
so a build made with a CUDA torch still gives a CPU torch its CPU ops). Keeps the reason when one
cannot load.

available()      fastbert._C loaded
has_op(name)     torch.ops.fastbert.<name> is registered
has_cuda()       the CUDA kernels loaded (fastbert._C_cuda)
load_error       why fastbert._C did not load (None when it did)
cuda_load_error  why fastbert._C_cuda did not load (None when it did, or when torch is a CPU build)
build_lines()    lines for `python -m fastbert.info`: ABI target, build torch, and a warning with the fix
                 when a CUDA device is present but the CUDA kernels were not built
reraise_typed(e) a ValueError from a C++ op re-raised as the TypeError it stands for (see below)
warn_once(key, msg)      one RuntimeWarning per key per process
"""

import importlib.util
import warnings

_C = None
_C_cuda = None
load_error: str | None = None
cuda_load_error: str | None = None
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

if _C is not None:
    import torch

    if torch.version.cuda is not None:
        try:
            from fastbert import _C_cuda  # type: ignore[attr-defined,no-redef]
        except Exception as exc:  # noqa: BLE001  (not built: the build saw no CUDA torch or no nvcc)
            _C_cuda = None
            built = importlib.util.find_spec("fastbert._C_cuda") is not None
            cuda_load_error = (f"{type(exc).__name__}: {exc}" if built else
                               "not built (the build saw no CUDA torch or no nvcc)")


def available() -> bool:
    return _C is not None


def has_op(name: str) -> bool:
    """True when torch.ops.fastbert.<name> is registered by the loaded extension."""
    if _C is None:
        return False
    import torch

    return hasattr(torch.ops.fastbert, name)


def has_cuda() -> bool:
    """True when the CUDA kernels loaded (fastbert._C_cuda)."""
    return _C is not None and _C_cuda is not None


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
        if torch.version.cuda is None and importlib.util.find_spec("fastbert._C_cuda") is not None:
            lines.append("fastbert._C_cuda (the CUDA kernels) was built but is unused: torch is a CPU build")
    if torch.cuda.is_available() and not has_cuda():
        why = ("fastbert._C did not load" if _C is None else
               f"fastbert's CUDA kernels did not load ({cuda_load_error or 'not built'})")
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
