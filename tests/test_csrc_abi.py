"""fastbert._C as built: loaded whenever it was built, on the LibTorch stable ABI, thread-count invariant.

* A compiled _C next to the fastbert under test must load (no silent fallback to the reference);
  FASTBERT_REQUIRE_EXTENSION=1 (CI) also fails when none was built.
* The module imports no C++ symbol of c10, ATen or torch (`nm -D --undefined-only`), only libtorch's C
  shim: that is what lets one build load under every torch >= its ABI target (tools/abi_check.sh
  builds once and runs the csrc tests under a second torch).
* The CPU ops split work over torch's intra-op threads (torch.set_num_threads); every reduction runs in
  a fixed order, so 1, 2, 3 or 5 threads give the same bits.
"""

import glob
import os
import re
import shutil
import subprocess

import pytest
import torch

import fastbert
from fastbert import _ext

PKG = os.path.dirname(os.path.abspath(fastbert.__file__))
BUILT = sorted(glob.glob(os.path.join(PKG, "_C*.so")) + glob.glob(os.path.join(PKG, "_C*.pyd")))
BUILT_CUDA = [p for p in BUILT if os.path.basename(p).startswith("_C_cuda")]
REQUIRE = os.environ.get("FASTBERT_REQUIRE_EXTENSION", "0") == "1"

needs_ext = pytest.mark.skipif(not _ext.available(), reason=f"fastbert._C not loaded: {_ext.load_error}")


def test_extension_loads_when_built():
    if not BUILT:
        if REQUIRE:
            pytest.fail(f"FASTBERT_REQUIRE_EXTENSION=1 but no fastbert/_C was built in {PKG}")
        pytest.skip(f"no compiled fastbert._C in {PKG} (source tree without a build)")
    assert _ext.available(), f"{BUILT[0]} exists but did not load: {_ext.load_error}"
    for op in ("embedding_gather", "embedding_gather_backward", "mlm_mask"):
        assert _ext.has_op(op), op
    if BUILT_CUDA and torch.version.cuda is not None:  # the CUDA kernels load under any CUDA torch
        assert _ext.has_cuda(), f"{BUILT_CUDA[0]} exists but did not load: {_ext.cuda_load_error}"


@needs_ext
def test_abi_target_and_build_torch():
    from fastbert import _C

    assert _C.abi_target() == "2.10"
    built = tuple(int(x) for x in _C.built_with_torch().split(".")[:2])
    assert built >= (2, 10), _C.built_with_torch()


@needs_ext
@pytest.mark.skipif(shutil.which("nm") is None, reason="needs nm (binutils)")
def test_no_unstable_cxx_symbols():
    modules = [p for p in BUILT if p.endswith(".so")]
    if not modules:
        pytest.skip("not an ELF build")
    for so in modules:  # _C and, in CUDA builds, _C_cuda
        out = subprocess.run(["nm", "-D", "--undefined-only", "-C", so], capture_output=True, text=True,
                             check=True, timeout=60).stdout
        undefined = [line.split(None, 1)[1] for line in out.splitlines() if len(line.split(None, 1)) == 2]
        unstable = [s for s in undefined if re.match(r"(c10|at|torch|caffe2|pybind11)::", s)]
        assert not unstable, f"{so}: {len(unstable)} unstable C++ symbols imported, e.g. {unstable[:5]}"
        # and it does use the C shim (a build on the regular ABI would not)
        assert "torch_library_impl" in out, so
        if so not in BUILT_CUDA:  # the CPU ops thread through the shim's parallel_for
            assert "torch_parallel_for" in out, so


def _embed_case(seed):
    g = torch.Generator().manual_seed(seed)
    batch, seq, hidden, vocab = 6, 160, 96, 257  # 960 tokens: several parallel chunks at any thread count
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    tables = [torch.randn(rows, hidden, generator=g) for rows in (vocab, seq, 3)]
    sids = torch.randint(0, 3, (batch, seq), generator=g)
    ln_w, ln_b = torch.randn(hidden, generator=g), torch.randn(hidden, generator=g)
    grad = torch.randn(batch, seq, hidden, generator=g)
    return ids, tables, sids, ln_w, ln_b, grad


def _run_ops(case):
    ids, (tok, pos, seg), sids, ln_w, ln_b, grad = case
    f = torch.ops.fastbert
    out, mean, rstd = f.embedding_gather(ids, tok, pos, sids, seg, None, ln_w, ln_b, 1e-12, 0.1, 7, 3, 0, -1,
                                         True)
    grads = f.embedding_gather_backward(grad, ids, tok, pos, sids, seg, None, ln_w, ln_b, mean, rstd, 0.1, 7,
                                        3, 0, -1, True, True, True, True)
    special = torch.tensor([0, 1, 2], dtype=torch.int64)
    starts = torch.rand(ids.shape, generator=torch.Generator().manual_seed(5)) < 0.7
    masks = [f.mlm_mask(ids, special, ws, 257, 1, -100, 11, 4, 2**31, 2**32 * 8 // 10, 2**32 // 10, cap)
             for ws, cap in ((None, -1), (starts, 20))]
    return [out, mean, rstd, *grads, *(t for m in masks for t in m)]


@needs_ext
def test_same_bits_for_any_thread_count():
    case = _embed_case(0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        expected = _run_ops(case)
        for threads in (2, 3, 5):
            torch.set_num_threads(threads)
            got = _run_ops(case)
            for i, (a, b) in enumerate(zip(expected, got)):
                assert torch.equal(a, b), f"output {i} differs between 1 and {threads} threads"
    finally:
        torch.set_num_threads(before)


def test_build_lines_warn_when_a_cuda_device_lacks_kernels(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_ext, "has_cuda", lambda: False)
    lines = _ext.build_lines()
    warning = [line for line in lines if line.startswith("WARNING")]
    assert len(warning) == 1 and "pip install" in warning[0] and "nvcc" in warning[0], lines
    if _ext.available():
        assert any("loads under torch >= 2.10" in line for line in lines), lines
    monkeypatch.setattr(_ext, "has_cuda", lambda: True)
    assert not any(line.startswith("WARNING") for line in _ext.build_lines())


@needs_ext
def test_dtype_errors_are_marked_for_python():
    ids = torch.zeros(2, 3)  # float ids: a type error the stable ABI can only raise as ValueError
    special = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="^TypeError: input_ids must be int64 or int32") as info:
        torch.ops.fastbert.mlm_mask(ids, special, None, 10, 1, -100, 0, 0, 0, 0, 0, -1)
    with pytest.raises(TypeError, match="^input_ids must be int64 or int32"):
        _ext.reraise_typed(info.value)
    with pytest.raises(ValueError, match="input_ids must be"):  # a plain ValueError passes through
        _ext.reraise_typed(ValueError("input_ids must be [batch, seq]"))


def _cuda_include():
    nvcc = shutil.which("nvcc")
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    if nvcc:
        homes.insert(1, os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    return next((os.path.join(h, "include") for h in homes
                 if h and os.path.exists(os.path.join(h, "include", "cuda_runtime.h"))), None)


@pytest.mark.skipif(shutil.which("c++") is None or _cuda_include() is None,
                    reason="needs a C++ compiler and the CUDA toolkit's headers")
def test_cuda_glue_compiles_against_the_stable_headers():
    """csrc/cuda/glue.cpp (built only with a CUDA torch) against this torch's stable-ABI headers,
    compile only: the CUDA glue is checked on machines without a CUDA torch too."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    glue = os.path.join(root, "csrc", "cuda", "glue.cpp")
    if not os.path.exists(glue):
        pytest.skip("no csrc/ here")
    cmd = ["c++", "-std=c++17", "-fsyntax-only", "-fvisibility=hidden", "-DUSE_CUDA", "-DFASTBERT_WITH_CUDA",
           "-DTORCH_TARGET_VERSION=0x020a000000000000", *(f"-I{p}" for p in include_paths()),
           f"-I{sysconfig.get_paths()['include']}", f"-I{os.path.join(root, 'csrc')}",
           f"-I{_cuda_include()}", glue]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
