"""fastbert.ops.rotary on its Triton kernel (kernels/rotary.py) against fp64 ground truth.

Where the kernels run (as tests/test_bias_gelu.py): compiled on CUDA when present; otherwise
tests/conftest.py has set TRITON_INTERPRET=1 and the interpreted kernel runs on "cpu" in-process
(test_interpreter_suite re-runs this file in a child with the interpreter on if neither holds).
The AOT compile (sm_80, sm_90) is tests/aot.py's "rotary" family (tests/test_aot.py).
Ground truth: fastbert.reference.ops.rotary in fp64, itself checked against transformers'
ModernBERT apply_rotary_pos_emb and against the pairwise rotation written out here.
Tolerances: fp32 max abs error <= 1e-5 * max(1, max |truth|); fp16/bf16 <= 2x the error of the
reference run in that dtype + one ulp. Outputs are NaN-poisoned (FASTBERT_POISON=1).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from fastbert.kernels import rotary as K
from harness import CUDA, DEVICES, INTERP, assert_compiles_as_eager, assert_within_tolerance, run_interpreted

import fastbert.ops as ops
from fastbert.reference import ops as ref

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _cu(lengths, device):
    return F.pad(torch.tensor(lengths, device=device).cumsum(0), (1, 0)).to(torch.int32)


def _forward_backward(fn, qkv, dy, dtype):
    x = qkv.detach().to(dtype).requires_grad_()
    y = fn(x)
    (y * dy.to(dtype)).sum().backward()
    return {"y": y, "dx": x.grad}


def _case(device, lengths, heads, dim, rot, dtype, theta=10000.0, varlen=True, gen=None):
    gen = gen or torch.Generator().manual_seed(hash((tuple(lengths), heads, dim, rot, str(dtype))) % 2**31)
    max_len = max(lengths) if lengths else 1
    cos, sin = ops.rotary_tables(rot, max_len + 3, theta, device=device)
    if varlen:
        shape = (sum(lengths), 3, heads, dim)
        cu = _cu(lengths, device)
    else:
        shape = (len(lengths), max_len, 3, heads, dim)
        cu = None
    qkv = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    dy = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    truth = _forward_backward(lambda x: ref.rotary(x, cos.double(), sin.double(), cu), qkv, dy, torch.float64)
    got = _forward_backward(lambda x: ops.rotary(x, cos, sin, cu), qkv, dy, dtype)
    for k, v in got.items():
        assert v.dtype == dtype and v.shape == truth[k].shape and torch.isfinite(v).all(), k
    lowp = None
    if dtype != torch.float32:
        lowp = _forward_backward(lambda x: ref.rotary(x, cos.to(dtype), sin.to(dtype), cu), qkv, dy, dtype)
    return assert_within_tolerance(got, truth, lowp, dtype), got, qkv, cu


pytestmark = pytest.mark.usefixtures("triton_poisoned")  # kernels with NaN-poisoned outputs

GRID = [  # (lengths, heads, head dim, rotary dim)
    ([17], 1, 64, 64), ([5, 0, 70, 33], 3, 64, 64), ([129, 1], 2, 32, 32), ([40, 9], 2, 80, 16),
    ([64, 65], 1, 128, 128), ([3, 100], 2, 16, 8),
]

if DEVICES:

    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("lengths,heads,dim,rot", GRID, ids=[f"L{len(g[0])}-H{g[1]}-D{g[2]}-R{g[3]}"
                                                                 for g in GRID])
    def test_varlen(device, dtype, lengths, heads, dim, rot):
        """[T, 3, H, D] with cu_seqlens: output and input gradient; positions restart per sequence
        (the first token of every sequence is unrotated, cos 0 = 1, sin 0 = 0)."""
        _, got, qkv, cu = _case(device, lengths, heads, dim, rot, dtype)
        for start, n in zip(cu[:-1].tolist(), lengths):
            if n:
                assert torch.equal(got["y"][start], qkv[start].to(dtype))
        assert torch.equal(got["y"][:, 2], qkv[:, 2]), "v must be copied unchanged"

    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
    @pytest.mark.parametrize("lengths,heads,dim,rot", GRID[1:4], ids=["L4", "L2", "partial"])
    def test_padded(device, dtype, lengths, heads, dim, rot):
        """[B, S, 3, H, D]: token s at position s."""
        _case(device, lengths, heads, dim, rot, dtype, varlen=False)

    @pytest.mark.parametrize("device", DEVICES)
    def test_fuzzed_shapes(device):
        g = torch.Generator().manual_seed(99)
        for _ in range(6):
            batch = int(torch.randint(1, 5, (1,), generator=g))
            lengths = torch.randint(0, 90, (batch,), generator=g).tolist()
            dim = 8 * int(torch.randint(1, 17, (1,), generator=g))
            rot = 2 * int(torch.randint(1, dim // 2 + 1, (1,), generator=g))
            heads = int(torch.randint(1, 4, (1,), generator=g))
            theta = (10000.0, 160000.0)[int(torch.randint(0, 2, (1,), generator=g))]
            varlen = bool(torch.randint(0, 2, (1,), generator=g)) or min(lengths) == 0
            if sum(lengths) == 0:
                lengths[0] = 1
            _case(device, lengths, heads, dim, rot, torch.float32, theta, varlen, g)

    @pytest.mark.parametrize("device", DEVICES)
    def test_strided_view_of_a_projection(device):
        """qkv as a view of a wider linear output (head stride > D): read without copies."""
        g = torch.Generator().manual_seed(4)
        lengths, heads, dim = [20, 7], 2, 32
        big = torch.randn(27, 3, heads, dim + 16, generator=g).to(device)
        qkv = big[..., :dim]
        assert not qkv.is_contiguous()
        cos, sin = ops.rotary_tables(dim, 32, device=device)
        cu = _cu(lengths, device)
        got = ops.rotary(qkv, cos, sin, cu)
        torch.testing.assert_close(got, ref.rotary(qkv, cos, sin, cu), rtol=1e-6, atol=1e-6)

    @pytest.mark.parametrize("device", DEVICES)
    def test_opcheck_and_compile(device):
        g = torch.Generator().manual_seed(5)
        qkv = torch.randn(11, 3, 2, 32, generator=g).to(device).requires_grad_()
        cos, sin = ops.rotary_tables(32, 16, device=device)
        cu = _cu([4, 7], device)
        torch.library.opcheck(torch.ops.fastbert.rotary_fwd.default, (qkv, cos, sin, cu, 7))

        def layer(x):
            y = ops.rotary(x, cos, sin, cu, 7)
            return y * 2.0

        dy = torch.randn(qkv.shape, generator=g).to(device)
        assert_compiles_as_eager(layer, qkv, dy, device, _forward_backward)

    @pytest.mark.parametrize("device", DEVICES)
    def test_bad_inputs(device):
        cos, sin = ops.rotary_tables(32, 8, device=device)
        qkv = torch.randn(10, 3, 2, 32, device=device)
        cu = _cu([4, 6], device)
        with pytest.raises(ValueError, match="tables have 8 rows"):
            ops.rotary(torch.randn(12, 3, 2, 32, device=device), cos, sin, _cu([12], device))
        with pytest.raises(ValueError, match=r"qkv must be \[T, 3, H, D\]"):
            ops.rotary(torch.randn(10, 2, 2, 32, device=device), cos, sin, cu)
        with pytest.raises(ValueError, match="rotary dim"):
            ops.rotary(torch.randn(10, 3, 2, 16, device=device), cos, sin, cu)
        with pytest.raises(ValueError, match="cu_seqlens must"):
            ops.rotary(qkv, cos, sin, cu.long())
        with pytest.raises(ValueError, match="run from 0 to T"):
            ops.rotary(qkv, cos, sin, _cu([4, 5], device))


def test_reference_matches_transformers_and_the_rotation():
    """The reference against transformers' ModernBERT apply_rotary_pos_emb (cos/sin as its
    rotary embedding builds them) and against the pairwise rotation (x1, x2) -> (x1 c - x2 s,
    x2 c + x1 s) at angle p * theta^(-2j/D)."""
    g = torch.Generator().manual_seed(1)
    batch, seq, heads, dim, theta = 2, 13, 3, 16, 160000.0
    qkv = torch.randn(batch, seq, 3, heads, dim, generator=g, dtype=torch.float64)
    cos, sin = ops.rotary_tables(dim, seq, theta)
    got = ref.rotary(qkv, cos.double(), sin.double())
    # the rotation, pair by pair
    inv = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    ang = torch.arange(seq, dtype=torch.float64)[:, None] * inv[None, :]  # [S, D/2]
    c, s = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
    for w in (0, 1):
        x1, x2 = qkv[:, :, w, :, : dim // 2], qkv[:, :, w, :, dim // 2:]
        torch.testing.assert_close(got[:, :, w], torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1),
                                   rtol=1e-6, atol=1e-6)  # fp32 tables
    assert torch.equal(got[:, :, 2], qkv[:, :, 2])
    try:
        from transformers.models.modernbert.modeling_modernbert import apply_rotary_pos_emb
    except ImportError:  # pragma: no cover
        pytest.skip("transformers' ModernBERT not importable")
    emb = torch.cat((ang, ang), -1)[None]  # [1, S, D] as ModernBertRotaryEmbedding returns
    q, k = (qkv[:, :, w].transpose(1, 2) for w in (0, 1))  # [B, H, S, D]
    qe, ke = apply_rotary_pos_emb(q, k, emb.cos(), emb.sin())
    torch.testing.assert_close(got[:, :, 0], qe.transpose(1, 2), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[:, :, 1], ke.transpose(1, 2), rtol=1e-6, atol=1e-6)


def test_reference_path_on_cpu(monkeypatch):
    """FASTBERT_BACKEND=auto on CPU tensors runs the reference (no torch fused form); gradients flow."""
    monkeypatch.setenv("FASTBERT_BACKEND", "auto")
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(9, 3, 2, 8, generator=g).requires_grad_()
    cos, sin = ops.rotary_tables(8, 9)
    cu = _cu([4, 5], "cpu")
    y = ops.rotary(qkv, cos, sin, cu)
    y.sum().backward()
    assert torch.isfinite(qkv.grad).all()
    # the backward is the rotation back: <R x, dy> = <x, R^T dy>
    dy = torch.randn(qkv.shape, generator=g)
    back = ref.rotary(dy, cos, -sin, cu)
    lhs = (ref.rotary(qkv.detach(), cos, sin, cu) * dy).sum()
    assert math.isclose(lhs.item(), (qkv.detach() * back).sum().item(), rel_tol=1e-5)


def test_launcher_rejects_bad_input():
    cos, sin = torch.zeros(8, 16), torch.zeros(8, 16)
    with pytest.raises(TypeError, match="qkv must be a tensor"):
        K.check_inputs(1.0, cos, sin)
    with pytest.raises(ValueError, match="dtype torch.float64"):
        K.check_inputs(torch.zeros(2, 4, 3, 2, 32, dtype=torch.float64), cos, sin)
    with pytest.raises(ValueError, match="one shape"):
        K.check_inputs(torch.zeros(2, 4, 3, 2, 32), cos, sin[:, :8])
    with pytest.raises(ValueError, match="head dim must be contiguous"):
        K.check_inputs(torch.zeros(2, 4, 3, 32, 2).transpose(-1, -2), cos, sin)
    with pytest.raises(ValueError, match="rotary_dim 7"):
        ops.rotary_tables(7, 4)


if not INTERP and not CUDA:

    def test_interpreter_suite():
        """Run this file's correctness tests under the Triton interpreter in a child pytest."""
        run_interpreted(__file__)
