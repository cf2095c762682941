"""Build fastbert and its compiled extension fastbert._C.

CPU sources (csrc/*.cpp) are always built. CUDA sources (csrc/cuda/*.cu) are added only when torch
is a CUDA build and nvcc is found; with no visible GPU, set TORCH_CUDA_ARCH_LIST (default "8.0;9.0").
Install with `pip install --no-build-isolation .` so the extension is built against the torch you have.
The Triton kernels in kernels/ are installed as the subpackage fastbert.kernels.
"""

import glob
import os
import shutil

from setuptools import setup


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


def _extensions():
    """fastbert._C: csrc/*.cpp always; with a CUDA torch and nvcc also the torch-free kernels
    csrc/cuda/*.cu and their torch glue csrc/cuda/*.cpp (FASTBERT_WITH_CUDA). FASTBERT_NO_CUDA=1
    builds the CPU ops only."""
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
    _pick_cxx()
    cxx = ["-O3", "-std=c++17"]
    if os.name != "nt":
        cxx.append("-fopenmp")
    include_dirs = [os.path.join(here, "csrc")]
    with_cuda = (
        torch.version.cuda is not None
        and bool(cu)
        and (shutil.which("nvcc") or os.environ.get("CUDA_HOME"))
        and os.environ.get("FASTBERT_NO_CUDA", "0") != "1"
    )
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = CUDAExtension(
            "fastbert._C",
            cpp + glue + cu,
            include_dirs=include_dirs,
            define_macros=[("FASTBERT_WITH_CUDA", "1")],
            # no --use_fast_math: LayerNorm's sqrt/division stay IEEE-rounded like the CPU op
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17"]},
            extra_link_args=["-fopenmp"] if os.name != "nt" else [],
        )
    else:
        ext = CppExtension(
            "fastbert._C",
            cpp,
            include_dirs=include_dirs,
            extra_compile_args=cxx,
            extra_link_args=["-fopenmp"] if os.name != "nt" else [],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=bool(shutil.which("ninja")))}


ext_modules, cmdclass = _extensions()

setup(
    name="fastbert",
    version="0.1.0",
    description="Fused Triton and C++/CUDA kernels for BERT pretraining and fine-tuning",
    python_requires=">=3.10",
    packages=[
        "fastbert",
        "fastbert.reference",
        "fastbert.ops",
        "fastbert.modules",
        "fastbert.models",
        "fastbert.train",
        "fastbert.bench",
        "fastbert.kernels",
    ],
    package_dir={"fastbert.kernels": "kernels"},
    package_data={"fastbert": ["data/*"]},
    install_requires=["torch>=2.4", "triton>=3.0", "tokenizers>=0.15", "tqdm", "numpy"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "transformers>=4.40", "bert-pytorch==0.0.1a4", "ruff"],
        "bench": ["pytest-benchmark", "matplotlib"],
    },
    entry_points={"console_scripts": ["fastbert=fastbert.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
