"""Which implementation an op runs: the one decision point of fastbert.

    choose(op, x, check=None, args=(), native=True) -> "triton" | "C++" | "native" | "reference"

Every op calls choose() with its leading tensor x on every call; `python -m fastbert.info` calls it
with a stand-in for a device, and last_choices() reports what ran most recently per (op, device), which
is what `fastbert pretrain` logs after its first step.

FASTBERT_BACKEND=reference|triton|auto (default auto), read at every call:
  auto       Triton ops (TRITON_OPS below): the Triton kernel for CUDA
             tensors the kernel takes (its check(*args) passes); otherwise, for CPU tensors or input
             the kernel rejects (fp64, a strided layout it cannot address, a size above its limit),
             the op's native form: torch's own fused ops where they compute the same function (native=True;
             F.layer_norm, F.gelu, F.scaled_dot_product_attention), the reference where they do not.
             C++ ops (embed, mlm_mask): fastbert._C on CPU tensors, and on CUDA tensors when it was
             built with its CUDA kernels; the reference otherwise.
  triton     Triton kernels on any device, and the kernel's check raises its clear error for input
             it does not take. On CPU tensors this needs TRITON_INTERPRET=1 set before fastbert is
             imported (the interpreter runs the kernels on the CPU). C++ ops as under auto.
  reference  the pure-PyTorch reference everywhere (fastbert.reference.ops, the tests' ground truth).
"""

import torch

from fastbert import _ext
from fastbert._env import getenv

BACKENDS = ("reference", "triton", "auto")
TRITON, CPP, NATIVE, REFERENCE = "triton", "C++", "native", "reference"
TRITON_OPS = ("layer_norm", "bias_gelu", "attention", "geglu", "rotary", "segment_pool")
CPP_OPS = {"embed": "embedding_gather", "mlm_mask": "mlm_mask"}  # op -> torch.ops.fastbert name


def backend() -> str:
    raw = getenv("FASTBERT_BACKEND", "auto")
    if raw in BACKENDS:  # the common case: no normalising
        return raw
    name = raw.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"FASTBERT_BACKEND={name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def _probe_triton() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


_TRITON = _probe_triton()  # a constant, so torch.compile traces choose() without warnings


def triton_available() -> bool:
    return _TRITON


def interpreting() -> bool:
    return getenv("TRITON_INTERPRET", "0") == "1"


_last: dict = {}


def last_choices() -> dict:
    """{(op, device type): implementation} of the most recent call of each op on each device."""
    return dict(_last)


def _triton_device(x, name) -> bool:
    """The Triton kernels can run on x's device under backend `name`."""
    if x.is_cuda:
        return _TRITON
    if name != "triton":
        return False
    if not interpreting():
        raise RuntimeError("FASTBERT_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1 set before "
                           "import")
    return _TRITON and x.device.type == "cpu"


def choose(op, x, check=None, args=(), native=True) -> str:
    """The implementation op runs for this call. x: the op's leading tensor (or anything with .device
    and .is_cuda); check(*args): the kernel's input check, raising ValueError/TypeError naming what the
    kernel does not take (None: the input is taken); native: whether torch's own ops compute the op's
    function for this input (otherwise the fallback is the reference), or a callable that says so
    (evaluated only when a fallback is needed, since it may cost a host sync)."""
    # the common cases inline (this runs on every op call: a BERT step makes hundreds)
    name = getenv("FASTBERT_BACKEND", "auto")
    if name not in BACKENDS:
        name = backend()  # normalises, or raises naming the bad value
    tensor = x.__class__ is torch.Tensor or isinstance(x, torch.Tensor)  # not info's stand-ins
    if not tensor and not isinstance(getattr(x, "device", None), torch.device):
        return REFERENCE  # not a tensor: the reference raises the error that names it
    if op in CPP_OPS:
        impl = REFERENCE
        if name != "reference" and _ext.has_op(CPP_OPS[op]):
            if x.device.type == "cpu" or (x.is_cuda and _ext.has_cuda()):
                impl = CPP
            elif tensor:
                _ext.warn_once(f"{op}-{x.device.type}",
                               f"fastbert._C has no {x.device.type} kernels; {op} uses the reference")
    elif name == "reference":
        impl = REFERENCE
    elif (_TRITON if x.is_cuda else _triton_device(x, name)):
        impl = TRITON
        if check is not None:
            if name == "triton":
                check(*args)  # the kernel's own error for input it does not take
            else:
                try:
                    check(*args)
                except (ValueError, TypeError):
                    impl = None  # auto: input the kernel does not take falls back
    else:
        impl = None
    if impl is None:
        impl = NATIVE if (native() if callable(native) else native) else REFERENCE
    if tensor:
        _last[op, x.device.type] = impl
    return impl


def use_triton(x) -> bool:
    """True when the Triton kernels run on x's device (the encoder unpads then)."""
    name = backend()
    return name != "reference" and _triton_device(x, name)
