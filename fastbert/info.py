"""`python -m fastbert.info`: versions, the compiled extension's state, and each op's implementation.

An ops module may define implementation(device: str) -> str to describe itself; otherwise the Triton
ops report "triton" where fastbert.ops._backend would choose it (elsewhere their native torch form,
or "reference" under FASTBERT_BACKEND=reference) and the C++ ops "C++ (fastbert._C)" when the
extension registered them.
"""

import importlib
import os
import platform

import torch

from fastbert import _ext
from fastbert.ops import _backend

TRITON_OPS = ("layer_norm", "bias_gelu", "attention")
NATIVE = {  # what a Triton op runs off the Triton path under FASTBERT_BACKEND=auto
    "layer_norm": "torch (F.layer_norm)",
    "bias_gelu": "torch (F.gelu)",
    "attention": "torch (SDPA; varlen: ref)",
}
CPP_OPS = {"embed": "embedding_gather", "mlm_mask": "mlm_mask"}


class _Probe:
    """Stands in for a tensor of a device that may not exist here."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"


def implementation(op, device):
    module = importlib.import_module(f"fastbert.ops.{op}")
    if hasattr(module, "implementation"):
        return module.implementation(device)
    if device == "cuda" and not torch.cuda.is_available():
        note = " (no CUDA device here)"
    else:
        note = ""
    if op in TRITON_OPS:
        try:
            if _backend.use_triton(_Probe(device)):
                chosen = "triton"
            else:
                chosen = "reference" if _backend.use_reference() else NATIVE[op]
        except RuntimeError as exc:
            return f"error: {exc}"
        return chosen + note
    if _backend.backend() != "reference" and _ext.has_op(CPP_OPS[op]):
        if device == "cpu" or _ext.has_cuda():
            return "C++ (fastbert._C)" + note
    return "reference" + note


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
        f"backend     FASTBERT_BACKEND={_backend.backend()}  TRITON_INTERPRET="
        f"{os.environ.get('TRITON_INTERPRET', '0')}",
        f"fastbert._C {'loaded' if _ext.available() else 'NOT loaded: ' + str(_ext.load_error)}"
        + (f" (CUDA kernels: {'yes' if _ext.has_cuda() else 'no'})" if _ext.available() else ""),
        "",
        f"{'op':<12} {'cpu':<30} cuda",
    ]
    for op in (*TRITON_OPS, *CPP_OPS):
        lines.append(f"{op:<12} {implementation(op, 'cpu'):<30} {implementation(op, 'cuda')}")
    return "\n".join(lines)


def main():
    print(report())


if __name__ == "__main__":
    main()
