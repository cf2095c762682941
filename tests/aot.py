"""Ahead-of-time compilation of Triton kernels for GPUs this machine does not have.

compile_for(kernel, signature, constexprs, arch, num_warps, num_stages) compiles with
triton.compile(ASTSource, GPUTarget("cuda", arch, 32)) and returns a Report with registers, spills
and shared memory, read from ptxas -v on the generated PTX (the bundled ptxas). Works with no GPU.
"""

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

ARCHS = (80, 90)


@dataclass
class Report:
    name: str
    arch: int
    registers: int
    spill_stores: int
    spill_loads: int
    shared: int

    def row(self):
        return (f"{self.name:<48} sm_{self.arch}  regs {self.registers:4d}  spill st/ld "
                f"{self.spill_stores}/{self.spill_loads}  smem {self.shared}")


def _ptxas(arch):
    """The ptxas Triton itself compiles with (its PTX version may be newer than the system's)."""
    from triton.backends.nvidia import compiler as nv

    try:
        return nv.get_ptxas(arch).path  # triton >= 3.5
    except TypeError:
        return nv.get_ptxas().path


def _ptx_target(ptx):
    return re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)


def compile_for(kernel, signature, constexprs, arch, num_warps=4, num_stages=3, name="", divisible=None):
    """divisible: None compiles without specialisation; an iterable of integer argument names
    compiles as a launch does when every pointer and those integers are multiples of 16 (the
    specialisation that vectorises loads; pass () for pointers only)."""
    fn = kernel
    while not isinstance(fn, triton.runtime.JITFunction):  # unwrap @triton.autotune / heuristics
        fn = fn.fn
    sig = dict(signature)
    for key in constexprs:
        sig[key] = "constexpr"
    attrs = None
    if divisible is not None:
        attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(fn.arg_names)
                 if arg in signature and (signature[arg].startswith("*") or arg in divisible)}
    src = ASTSource(fn=fn, signature=sig, constexprs=dict(constexprs), attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = k.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([_ptxas(arch), "-v", f"--gpu-name={_ptx_target(ptx)}",
                              path, "-o", os.path.join(d, "k.o")],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    st = re.search(r"(\d+) bytes spill stores", out)
    ld = re.search(r"(\d+) bytes spill loads", out)
    return Report(name or fn.__name__, arch, regs, int(st.group(1)) if st else 0,
                  int(ld.group(1)) if ld else 0, int(k.metadata.shared))
