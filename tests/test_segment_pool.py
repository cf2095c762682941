"""fastbert.ops.segment_pool on its Triton kernel (kernels/segment_pool.py) against fp64 ground truth.

Where the kernels run (as tests/test_rotary.py): compiled on CUDA when present, else in the Triton
interpreter on "cpu" (tests/conftest.py). The AOT compile (sm_80, sm_90) is tests/aot.py's
"segment_pool" family. Ground truth: a padded masked mean / max written out here in fp64 (each
sequence on its own), which the reference (fastbert.reference.ops.segment_pool) also matches, and
sentence-transformers' own flattened pooling where installed. Tied maxima share the gradient (as
torch's amax). Tolerances: fp32 <= 1e-5 * max(1,
max |truth|); fp16/bf16 <= 2x the error of the reference run in that dtype + one ulp. Outputs are
NaN-poisoned (FASTBERT_POISON=1); an empty sequence pools to 0 (mean, cls) or -inf (max).
"""

import pytest
import torch
import torch.nn.functional as F
from harness import DEVICES, assert_compiles_as_eager, assert_within_tolerance

import fastbert.ops as ops
from fastbert.reference import ops as ref

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MODES = ("mean", "max", "cls")


def _cu(lengths, device):
    return F.pad(torch.tensor(lengths, device=device).cumsum(0), (1, 0)).to(torch.int32)


def truth(x, lengths, mode):
    """Each sequence on its own, in fp64."""
    out, start = [], 0
    for n in lengths:
        rows = x[start:start + n].double()
        start += n
        if n == 0:
            empty = float("-inf") if mode == "max" else 0.0
            out.append(torch.full((x.shape[1],), empty, dtype=torch.float64))
        else:
            out.append({"mean": rows.mean(0), "max": rows.amax(0), "cls": rows[0]}[mode])
    return torch.stack(out) if out else x.new_zeros((0, x.shape[1]), dtype=torch.float64)


def finite(t):
    return t.masked_fill(torch.isinf(t), 0.0)


def _forward_backward(fn, x, dy, dtype):
    x = x.detach().to(dtype).requires_grad_()
    y = fn(x)
    (finite(y) * dy.to(dtype)).sum().backward()
    return {"y": finite(y), "dx": x.grad}


def _case(device, lengths, hidden, mode, dtype, gen=None):
    gen = gen or torch.Generator().manual_seed(hash((tuple(lengths), hidden, mode, str(dtype))) % 2**31)
    x = torch.randn(sum(lengths), hidden, generator=gen).to(device=device, dtype=dtype)
    dy = torch.randn(len(lengths), hidden, generator=gen).to(device=device, dtype=dtype)
    cu = _cu(lengths, device)
    want = _forward_backward(lambda t: truth(t, lengths, mode), x, dy, torch.float64)
    got = _forward_backward(lambda t: ops.segment_pool(t, cu, mode), x, dy, dtype)
    for k, v in got.items():
        assert v.dtype == dtype and v.shape == want[k].shape and torch.isfinite(v).all(), k
    empty = torch.tensor([n == 0 for n in lengths], device=device)
    if mode == "max" and empty.any():
        assert torch.isinf(ops.segment_pool(x, cu, mode)[empty]).all()
    lowp = None
    if dtype != torch.float32:
        lowp = _forward_backward(lambda t: ref.segment_pool(t, cu, mode), x, dy, dtype)
    return assert_within_tolerance(got, want, lowp, dtype)


GRID = [[17], [5, 0, 70, 33], [129, 1, 64], [1], [200, 3, 0]]

if DEVICES:
    pytestmark = pytest.mark.usefixtures("triton_poisoned")

    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("lengths", GRID, ids=[f"L{len(g)}-{sum(g)}" for g in GRID])
    def test_against_truth(device, dtype, mode, lengths):
        hidden = 48 if len(lengths) % 2 else 160  # below one column block, and across two
        _case(device, lengths, hidden, mode, dtype)

    @pytest.mark.parametrize("device", DEVICES)
    def test_fuzzed_shapes(device):
        g = torch.Generator().manual_seed(7)
        for _ in range(8):
            batch = int(torch.randint(1, 6, (1,), generator=g))
            lengths = torch.randint(0, 150, (batch,), generator=g).tolist()
            hidden = int(torch.randint(1, 300, (1,), generator=g))
            mode = MODES[int(torch.randint(0, 3, (1,), generator=g))]
            _case(device, lengths, hidden, mode, torch.float32, g)

    @pytest.mark.parametrize("device", DEVICES)
    def test_strided_rows_and_ties(device):
        """x as a row-strided view (a slice of a wider tensor) is read in place; tied maxima share the
        gradient evenly."""
        wide = torch.randn(30, 64, device=device)
        x = wide[:, :40]
        cu = _cu([10, 20], device)
        for mode in ("mean", "max"):
            torch.testing.assert_close(ops.segment_pool(x, cu, mode), ref.segment_pool(x, cu, mode))
        base = torch.randn(6, 8, device=device)
        base[1] = base[3] = base.amax(0) + 1.0  # rows 1 and 3 tie for the maximum of every column
        tied = base.clone().requires_grad_()
        ops.segment_pool(tied, _cu([6], device), "max").sum().backward()
        half = torch.full((8,), 0.5, device=device)
        assert torch.equal(tied.grad[1], half) and torch.equal(tied.grad[3], half)
        assert not tied.grad[[0, 2, 4, 5]].any()
        ref_x = base.clone().requires_grad_()
        ref.segment_pool(ref_x, _cu([6], device), "max").sum().backward()
        assert torch.equal(tied.grad, ref_x.grad)  # as torch's amax: tied maxima share the gradient

    @pytest.mark.parametrize("device", DEVICES)
    def test_opcheck_and_compile(device):
        g = torch.Generator().manual_seed(5)
        x = torch.randn(11, 32, generator=g).to(device).requires_grad_()
        cu = _cu([4, 7], device)
        for mode in ("mean", "max"):
            torch.library.opcheck(torch.ops.fastbert.segment_pool_fwd.default, (x, cu, mode))

            def pool(t, mode=mode):
                return ops.segment_pool(t, cu, mode) * 2.0

            assert_compiles_as_eager(pool, x, torch.randn(2, 32, generator=g).to(device), device,
                                     _forward_backward)

    @pytest.mark.parametrize("device", DEVICES)
    def test_bad_inputs(device):
        x = torch.randn(10, 8, device=device)
        cu = _cu([4, 6], device)
        with pytest.raises(ValueError, match=r"x must be \[T, N\]"):
            ops.segment_pool(x[None], cu)
        with pytest.raises(ValueError, match="cu_seqlens must be int32"):
            ops.segment_pool(x, cu.long())
        with pytest.raises(ValueError, match="mode 'sum'"):
            ops.segment_pool(x, cu, "sum")
        with pytest.raises(TypeError, match="fp32/fp16/bf16"):
            ops.segment_pool(x.double(), cu)


@pytest.mark.parametrize("mode", MODES)
def test_reference_against_truth_and_sentence_transformers(mode):
    """The reference (the CPU path) against the per-sequence truth, and against sentence-transformers'
    own pooling of the flattened batch where it is installed."""
    g = torch.Generator().manual_seed(3)
    lengths = [7, 1, 12, 30]
    x = torch.randn(sum(lengths), 16, generator=g)
    cu = _cu(lengths, "cpu")
    torch.testing.assert_close(ref.segment_pool(x, cu, mode), truth(x, lengths, mode).float())
    try:
        from sentence_transformers.sentence_transformer.modules import Pooling
    except ImportError:
        pytest.skip("sentence-transformers not installed")
    pool = Pooling(16, pooling_mode=mode)
    st_out = pool({"token_embeddings": x[None], "cu_seq_lens_q": cu})["sentence_embedding"]
    torch.testing.assert_close(ref.segment_pool(x, cu, mode), st_out, rtol=1e-6, atol=1e-6)
