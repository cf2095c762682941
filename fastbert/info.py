"""`python -m fastbert.info`: versions, the compiled extension's state, and each op's implementation.

The implementation column comes from fastbert.ops._dispatch.choose, the function every op calls, asked
about a nominal input on each device (a CPU tensor; a stand-in for a CUDA one when there is no GPU).
Input that a kernel does not take falls back per call; fastbert.ops.last_choices() shows what the
latest calls ran (fastbert pretrain logs it after its first step).
"""

import os
import platform

import torch

from fastbert import _ext
from fastbert.ops import _dispatch

OPS = (*_dispatch.TRITON_OPS, *_dispatch.CPP_OPS)
NATIVE = {  # what a Triton op's native form runs
    "layer_norm": "torch (F.layer_norm)",
    "bias_gelu": "torch (F.gelu)",
    "attention": "torch (SDPA)",
    "geglu": "torch (F.gelu(a) * g)",
    "rotary": "reference (plain torch: no fused form)",
    "segment_pool": "reference (index_add / scatter_reduce)",
}
NAMES = {_dispatch.TRITON: "triton", _dispatch.CPP: "C++ (fastbert._C)", _dispatch.REFERENCE: "reference"}
FALLBACK = "off-kernel input falls back to the native form"


class _Probe:
    """Stands in for a tensor of a device that may not exist here."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"


def describe(op, impl):
    return NATIVE[op] if impl == _dispatch.NATIVE else NAMES[impl]


def implementation(op, device):
    """What `op` runs for a nominal input on `device` ("cpu" or "cuda"), as chosen by the ops."""
    try:
        impl = _dispatch.choose(op, _Probe(device), native=True)
    except RuntimeError as exc:
        return f"error: {exc}"
    note = " (no CUDA device here)" if device == "cuda" and not torch.cuda.is_available() else ""
    return describe(op, impl) + note


def last_used(device=None):
    """{op: implementation} of the latest call of each op on `device` ("cpu", "cuda"), e.g. after a
    training step; {"op [device]": implementation} over every device when device is None."""
    choices = _dispatch.last_choices().items()
    if device is not None:
        return {op: describe(op, impl) for (op, dev), impl in choices if dev == device}
    return {f"{op} [{dev}]": describe(op, impl) for (op, dev), impl in choices}


def report():
    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:  # noqa: BLE001
        triton_version = f"not importable ({exc})"
    lines = [
        f"python      {platform.python_version()} ({platform.machine()})",
        f"torch       {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
        f"triton      {triton_version}",
        f"CUDA device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}",
        f"backend     FASTBERT_BACKEND={_dispatch.backend()}  TRITON_INTERPRET="
        f"{os.environ.get('TRITON_INTERPRET', '0')}",
        f"fastbert._C {'loaded' if _ext.available() else 'NOT loaded: ' + str(_ext.load_error)}"
        + (f" (CUDA kernels: {'yes' if _ext.has_cuda() else 'no'})" if _ext.available() else ""),
        *_ext.build_lines(),  # ABI target and build torch; a WARNING with the fix when CUDA lacks kernels
        "",
        f"{'op':<12} {'cpu':<30} cuda",
    ]
    for op in OPS:
        lines.append(f"{op:<12} {implementation(op, 'cpu'):<30} {implementation(op, 'cuda')}")
    if _dispatch.backend() == "auto":
        lines.append(f"(triton ops: {FALLBACK}, per call)")
    return "\n".join(lines)


def main():
    print(report())


if __name__ == "__main__":
    main()
