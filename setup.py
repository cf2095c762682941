"""Build fastbert and its compiled extension fastbert._C (metadata and dependencies: pyproject.toml).

fastbert._C is built on the LibTorch stable ABI (torch/csrc/stable, TORCH_TARGET_VERSION 2.10): it calls
libtorch only through its C shim, so the torch that builds it and the torch that runs it may differ
(any torch >= 2.10), and `pip install .` with build isolation is safe. It is also a Py_LIMITED_API
(abi3) module: one build serves every CPython >= 3.10.

CPU sources (csrc/*.cpp) are always built, as fastbert._C. The CUDA sources (csrc/cuda/*.cu and their
glue) are built, as fastbert._C_cuda, when the building torch is a CUDA build and nvcc is found (on PATH
or in $CUDA_HOME), for the architectures in TORCH_CUDA_ARCH_LIST (default "8.0;9.0");
FASTBERT_NO_CUDA=1 builds the CPU ops only.
The Triton kernels in kernels/ are installed as the subpackage fastbert.kernels.
"""

import glob
import os
import shutil

from setuptools import find_packages, setup

DATA_PACKAGES = ["fastbert.data", "fastbert.data.world"]  # folders of data files, no __init__.py
ABI_TARGET = (2, 10)  # oldest torch the extension loads under: TORCH_TARGET_VERSION
PY_LIMITED_API = (3, 10)  # abi3 floor, = requires-python


def _links_libstdcxx_dynamically(cxx):
    """True when `cxx` links a shared library against the shared libstdc++ (readelf NEEDED)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        src, lib = os.path.join(tmp, "t.cpp"), os.path.join(tmp, "t.so")
        with open(src, "w") as f:
            f.write("#include <string>\nstd::string f(int x) { if (x) throw x; return \"a\"; }\n")
        subprocess.run([*cxx.split(), "-shared", "-fPIC", src, "-o", lib], check=True, capture_output=True,
                       timeout=60)
        out = subprocess.run(["readelf", "-d", lib], check=True, capture_output=True, text=True,
                             timeout=60).stdout
    return "libstdc++" in out


def _pick_cxx():
    """Keep C++ exceptions working across the torch boundary: an extension that links libstdc++
    statically (seen with a wrapper g++ whose own lib dir has only libstdc++.a) segfaults whenever an
    op raises (TORCH_CHECK). If $CXX does that and the system g++ does not, build with the system g++."""
    if os.name == "nt" or os.environ.get("FASTBERT_KEEP_CXX") == "1":
        return
    cxx = os.environ.get("CXX", "c++")
    try:
        if _links_libstdcxx_dynamically(cxx):
            return
        for alt in ("/usr/bin/g++", "/usr/bin/c++"):
            if os.path.exists(alt) and _links_libstdcxx_dynamically(alt):
                print(f"fastbert setup: {cxx} links libstdc++ statically; building with {alt}")
                os.environ["CXX"] = alt
                os.environ["CC"] = alt.replace("g++", "gcc").replace("c++", "cc")
                return
    except Exception as exc:  # noqa: BLE001  (no readelf, no compiler: leave the choice to torch)
        print(f"fastbert setup: compiler check skipped ({type(exc).__name__}: {exc})")


def _nvcc():
    """nvcc in $CUDA_HOME (or $CUDA_PATH), else on PATH, else in /usr/local/cuda; None when absent."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [os.path.join(home, "bin", "nvcc")] if home else []
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    return next((c for c in candidates if c and os.path.exists(c)), None)


def _set_cuda_home(nvcc):
    """torch.utils.cpp_extension takes CUDA_HOME from the environment, else two folders above the nvcc on
    PATH, which is wrong for a wrapper script (seen: /usr/local/bin/nvcc exec-ing the toolkit's). Set it,
    before cpp_extension is imported, to the folder whose include/ has cuda_runtime.h."""
    if os.environ.get("CUDA_HOME") or nvcc is None:
        return
    for home in (os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"):
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = home
            return


def _extensions():
    """fastbert._C from csrc/*.cpp always; with a CUDA torch and nvcc also fastbert._C_cuda, the
    torch-free kernels csrc/cuda/*.cu and their stable-ABI glue csrc/cuda/*.cpp (FASTBERT_WITH_CUDA)."""
    nvcc = _nvcc()
    _set_cuda_home(nvcc)
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # metadata-only builds
        return [], {}
    here = os.path.dirname(os.path.abspath(__file__))
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    glue = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    if not cpp:
        return [], {}
    if tuple(int(x) for x in torch.__version__.split(".")[:2]) < ABI_TARGET:
        raise RuntimeError(f"fastbert._C needs torch >= {ABI_TARGET[0]}.{ABI_TARGET[1]} to build (the "
                           f"LibTorch stable ABI), found torch {torch.__version__}")
    _pick_cxx()
    target = f"0x{ABI_TARGET[0]:02x}{ABI_TARGET[1]:02x}000000000000"
    macros = [("TORCH_TARGET_VERSION", target), ("FASTBERT_ABI_TARGET", f'"{ABI_TARGET[0]}.{ABI_TARGET[1]}"')]
    cxx = ["-O3", "-std=c++17"]
    if os.name != "nt":
        # hidden: the module exports PyInit__C alone, none of the header-only templates it instantiates
        cxx += ["-fvisibility=hidden", "-fvisibility-inlines-hidden"]
    include_dirs = [os.path.join(here, "csrc")]
    with_cuda = (
        torch.version.cuda is not None
        and bool(cu)
        and nvcc is not None
        and os.environ.get("FASTBERT_NO_CUDA", "0") != "1"
    )
    if torch.version.cuda is not None and not with_cuda and os.environ.get("FASTBERT_NO_CUDA", "0") != "1":
        print("fastbert setup: torch is a CUDA build but nvcc was not found (PATH, CUDA_HOME): "
              "building the CPU ops only")
    # abi3: one module for every CPython >= 3.10 (torch's BuildExtension adds -DPy_LIMITED_API for it)
    exts = [CppExtension("fastbert._C", cpp, include_dirs=include_dirs, define_macros=macros,
                         extra_compile_args=cxx, py_limited_api=True)]
    if with_cuda:
        # the CUDA kernels as a module of their own: it links libtorch_cuda and the CUDA runtime, so
        # under a CPU torch (pip's isolated build may use a CUDA torch for a CPU-torch environment) only
        # it fails to load and fastbert._C keeps the CPU ops
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        exts.append(CUDAExtension(
            "fastbert._C_cuda",
            glue + cu,
            include_dirs=include_dirs,
            define_macros=macros + [("FASTBERT_WITH_CUDA", "1"), ("USE_CUDA", "1")],
            # no --use_fast_math: LayerNorm's sqrt/division stay IEEE-rounded like the CPU op
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17"]},
            py_limited_api=True,
        ))
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=bool(shutil.which("ninja")))}


ext_modules, cmdclass = _extensions()

setup(
    # every package under fastbert/ (a new subpackage is installed without listing it here),
    # kernels/ as fastbert.kernels, and the data folders as data-only packages (declared, so that
    # setuptools installs them without its "Package would be ignored" warning)
    packages=[*find_packages(include=["fastbert", "fastbert.*"]), "fastbert.kernels", *DATA_PACKAGES],
    package_dir={"fastbert.kernels": "kernels"},
    package_data={p: ["*.*"] for p in DATA_PACKAGES},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # the wheel is tagged cp310-abi3 when the extension is (a metadata-only build has no extension)
    options={"bdist_wheel": {"py_limited_api": "cp{}{}".format(*PY_LIMITED_API)}} if ext_modules else {},
)
