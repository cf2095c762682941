"""Statistics of every fused dropout mask across seeds, rows and columns.

LayerNorm and bias+GELU key their masks as pcg(idx ^ pcg(seed)) (kernels/_common.py), so the masks of
two seeds are the same hash sequence read at XOR-permuted indices; attention and the C++ embed use
Philox. For each kernel, masks of several seeds over a [rows, cols] grid must show: a keep rate
within binomial bounds (5 sigma) in every row and every column, near-zero correlation between the
masks of two seeds and between neighbouring rows of one mask, and no row repeated across seeds.
"""

import math

import pytest
import torch
from harness import DEVICES

from fastbert import ops
from fastbert.ops._rng import dropout_seed

ROWS, COLS, P, SEEDS = 64, 256, 0.3, 6


def _ln_mask(seed, device):
    from fastbert.kernels import layer_norm as K

    x = torch.ones(ROWS, COLS, device=device)
    w, b = torch.ones(COLS, device=device), torch.zeros(COLS, device=device)
    _, s, _, _ = K.layer_norm_fwd(x, w, b, 1e-5, None, False, P, seed)
    return s != 0


def _gelu_mask(seed, device):
    from fastbert.kernels import bias_gelu as K

    x = torch.full((ROWS, COLS), 3.0, device=device)  # gelu(3) > 0: zero only where dropped
    return K.bias_gelu_fwd(x, torch.zeros(COLS, device=device), dropout_p=P, seed=seed) != 0


def _attention_mask(seed, device):
    from fastbert.kernels import attention as A

    keep = A.dropout_keep_mask(seed, P, 1, 1, COLS)  # [1, 1, S, S]: query rows x key columns
    return keep[0, 0, :ROWS]


def _embed_mask(seed, device):
    g = torch.Generator().manual_seed(int(seed[0]) % 2**31)
    ids = torch.randint(1, 50, (ROWS, 8), generator=g, device=device)
    tok, pos = torch.randn(50, COLS, device=device), torch.randn(8, COLS, device=device)
    ln_w, ln_b = torch.full((COLS,), 1e-3, device=device), torch.full((COLS,), 10.0, device=device)
    out = ops.embed(ids, tok, pos, ln_weight=ln_w, ln_bias=ln_b, dropout_p=P, generator=g)
    return (out != 0).reshape(-1, COLS)[:ROWS]  # LN output is ~10 everywhere: zero only where dropped


KERNELS = {"layer_norm": _ln_mask, "bias_gelu": _gelu_mask, "attention": _attention_mask,
           "embed": _embed_mask}


def _corr(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_dropout_mask_statistics(kernel, triton_poisoned):
    device = DEVICES[0] if DEVICES and kernel != "embed" else "cpu"
    if kernel != "embed" and not DEVICES:
        pytest.skip("no Triton device and no interpreter")
    gen = torch.Generator(device).manual_seed(2024)
    masks = [KERNELS[kernel](dropout_seed(device, gen), device).cpu() for _ in range(SEEDS)]
    keep = 1 - P
    for m in masks:
        assert m.shape == (ROWS, COLS)
        row_sigma, col_sigma = math.sqrt(P * keep / COLS), math.sqrt(P * keep / ROWS)
        rows, cols = m.double().mean(1), m.double().mean(0)
        assert float((rows - keep).abs().max()) < 5 * row_sigma, f"{kernel}: a row's keep rate is off"
        assert float((cols - keep).abs().max()) < 5 * col_sigma, f"{kernel}: a column's keep rate is off"
        n = m[:-1].numel()
        assert abs(_corr(m[:-1], m[1:])) < 5 / math.sqrt(n), f"{kernel}: neighbouring rows correlate"
    bound = 5 / math.sqrt(ROWS * COLS)
    for i in range(SEEDS):
        for j in range(i + 1, SEEDS):
            assert abs(_corr(masks[i], masks[j])) < bound, f"{kernel}: seeds {i} and {j} correlate"
    # no row repeats, within a mask or across seeds (rows as 256-bit patterns)
    weights = 2 ** torch.arange(63, dtype=torch.int64)
    packed = {tuple(int((row[k:k + 63].long() * weights[:len(row[k:k + 63])]).sum())
                    for k in range(0, COLS, 63)) for m in masks for row in m}
    assert len(packed) == SEEDS * ROWS, f"{kernel}: a dropout row repeats across seeds"
