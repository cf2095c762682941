"""Which implementation an op uses: the one place that looks at the device.

FASTBERT_BACKEND=reference|triton|auto (default auto), read at every call:
  auto       Triton kernels for CUDA tensors when Triton imports; otherwise (CPU tensors, or a size
             a kernel does not take) the op's "native" form: torch's own fused ops where one
             computes the same function (F.layer_norm, F.gelu, F.scaled_dot_product_attention),
             the reference where none does.
  triton     Triton kernels on any device: on CPU tensors this needs TRITON_INTERPRET=1 set before
             fastbert is imported (the interpreter runs the kernels on the CPU).
  reference  the pure-PyTorch reference everywhere (fastbert.reference.ops, the tests' ground truth).
"""

import os

import torch

BACKENDS = ("reference", "triton", "auto")


def backend() -> str:
    name = os.environ.get("FASTBERT_BACKEND", "auto").strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"FASTBERT_BACKEND={name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def _probe_triton() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


_TRITON = _probe_triton()  # a constant, so torch.compile traces use_triton without warnings


def triton_available() -> bool:
    return _TRITON


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(x: torch.Tensor) -> bool:
    """True when the op should run its Triton kernel on tensor x."""
    name = backend()
    if name == "reference" or not triton_available():
        return False
    if x.is_cuda:
        return True
    if name == "triton":
        if not interpreting():
            raise RuntimeError(
                "FASTBERT_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1 set before import"
            )
        return x.device.type == "cpu"
    return False


def use_reference() -> bool:
    """True when FASTBERT_BACKEND=reference: ops off the Triton path run the reference itself."""
    return backend() == "reference"
