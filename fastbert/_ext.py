"""Loads the compiled extension fastbert._C once; keeps the reason when it cannot."""

import warnings

_C = None
load_error: str | None = None

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
