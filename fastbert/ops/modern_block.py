"""modern_block(block, res, delta, tables, key_padding_mask, cu_seqlens, max_seqlen): one ModernBERT
layer (fastbert.reference.modernbert.ModernBlock) as ONE autograd node in eager mode, or None where it
does not apply. run_modern_block takes the layer's parameters themselves (the in-place path passes
transformers' ModernBertEncoderLayer's).

Why: as for BERT's blocks (fastbert.ops.block), host work decides a small layer's step time on a GPU:
nine op calls and autograd nodes per layer (two LayerNorms, four linears, rotary, attention, GeGLU)
become one. The layer on the residual stream (res, delta), its input x = res + delta:

    a_in, x = LN_a(delta + res)                            (delta None: x = res; layer 0: no LN_a, a_in = x)
    r       = rotary(a_in @ Wqkv^T + bqkv)                 [M, 3, H, D]: q, k rotated, v copied
    o       = attention(r's q, k, v, window)               varlen or dense, the layer's window
    m_in, h = LN_m(dropout(o @ Wo^T + bo) + x)             transformers' out_drop inside the LayerNorm
    u       = geglu(m_in @ Wi^T, bi, dropout) @ Wo2^T + bo2
returns (h, u): the next layer's (res, delta). Biases and LayerNorm shifts may be None (ModernBERT has
none). The backward is written out: the launchers' backward kernels (LayerNorm with the sum's
gradient, GeGLU, attention into one [M, 3, H, D] buffer, rotary rotating back) and mm's for the weight
gradients, so one mm gives dx and one dWqkv. The math is the per-op path's, launcher for launcher;
tests/test_modern_block.py checks outputs and every gradient against the per-op path and the
reference.

Saved (per real token): x, LN_a's input statistics, the rotated qkv, o, lse, h, LN_m's statistics,
m_in, the GeGLU's input and output. Without autograd nothing is saved and the statistics and lse go to
one scratch buffer. Dropout seeds (LN_m's, attention's (seed, offset) pair, GeGLU's) come from one
torch.randint on the device, as in fastbert.ops.block.

Where it applies (otherwise the caller runs the per-op path): what fastbert.ops.block.block_plan asks
(the Triton backend for x's device, not compiling, x contiguous fp32/fp16/bf16 with every parameter of
its dtype and device, or fp32 under fp16/bf16 autocast; hidden <= the LayerNorm limit, head dim a
multiple of 8 up to 128; varlen [T, N] with an int max_seqlen or dense [B, S, N] without a key padding
mask; FASTBERT_ATTN_CHECK unset, FASTBERT_FUSED_BLOCK not 0), plus: fp32 contiguous rotary tables
covering the whole head dim and every position, and no res + delta without LN_a (which the encoders
never make).
"""

import torch
import torch.nn.functional as F

from . import _dispatch
from ._dispatch import TRITON, triton_available
from ._fused import fast_apply
from .block import _draw_seeds, _no_autocast, block_plan, enabled

if triton_available():
    from fastbert.kernels import _common as _kc
    from fastbert.kernels import attention as _ka
    from fastbert.kernels import geglu as _kgl
    from fastbert.kernels import layer_norm as _kl
    from fastbert.kernels import rotary as _kr
else:  # pragma: no cover - triton is a dependency
    _kc = _ka = _kgl = _kl = _kr = None

_FLOAT = (torch.float32, torch.float16, torch.bfloat16)
_NO_SEEDS = (None, None, None)


def modern_block(block, res, delta, tables, key_padding_mask=None, cu_seqlens=None, max_seqlen=None):
    """The layer's (res', delta') through the fused path, or None when the per-op path must run."""
    if key_padding_mask is not None or _kl is None or torch.compiler.is_compiling() or not enabled():
        return None
    mods = block._modules
    att, ff, norm_a, norm_m = mods["attention"], mods["feed_forward"], mods.get("attn_norm"), mods["mlp_norm"]
    cfg = att.cfg
    am, fm = att._modules, ff._modules
    qkv, out = am["qkv"]._parameters, am["output_linear"]._parameters
    w1, w2 = fm["w_1"]._parameters, fm["w_2"]._parameters
    na = {} if norm_a is None else norm_a._parameters
    nm = norm_m._parameters  # a LayerNorm's shift b_2 is absent where it has none
    params = (na.get("a_2"), na.get("b_2"), qkv["weight"], qkv.get("bias"), out["weight"], out.get("bias"),
              nm["a_2"], nm.get("b_2"), w1["weight"], w1.get("bias"), w2["weight"], w2.get("bias"))
    cos, sin = tables[att.local]
    pa = cfg.attn_dropout if att.training else 0.0
    pf = cfg.dropout if ff.training else 0.0
    eps_a = cfg.layer_norm_eps if norm_a is None else norm_a.eps
    return run_modern_block(res, delta, params, cfg.heads, cos, sin, att.window, pa, pf, eps_a, norm_m.eps,
                            cfg.gelu, cu_seqlens, max_seqlen)


def run_modern_block(res, delta, params, heads, cos, sin, window, pa, pf, eps_a, eps_m, gelu,
                     cu_seqlens=None, max_seqlen=None):
    """One layer from its 12 parameters (LN_a weight, LN_a bias, Wqkv, bqkv, Wo, bo, LN_m weight, LN_m
    bias, Wi, bi, Wo2, bo2; LN_a's None for layer 0, any bias or shift None), or None where the
    per-op path must run.

    res, delta  the residual stream ([T, N] varlen or [B, S, N] dense; delta None: x = res)
    cos, sin    fp32 rotary tables [P, D / 2] of the layer's theta; window None (global) or w
    pa, pf      the attention dropout (probabilities and, as transformers' out_drop, after Wo) and
                the GeGLU's; eps_a, eps_m the LayerNorms'; gelu "none" (erf) or "tanh"."""
    plan = block_plan(res, heads, cu_seqlens, max_seqlen)
    if plan is None:
        return None
    cast, mode, seqinfo, max_seqlen, hshape, head_dim = plan
    dtype, device, n = res.dtype, res.device, res.shape[-1]
    has_norm = params[0] is not None
    if delta is not None and not (has_norm and isinstance(delta, torch.Tensor) and delta.shape == res.shape
                                  and delta.is_contiguous() and delta.device == device
                                  and delta.dtype in _FLOAT):
        return None  # (res + delta without LN_a: the encoders never make it)
    if any(not isinstance(params[i], torch.Tensor) for i in (2, 4, 6, 8, 10)):
        return None  # the weights (LN_m's, the four linears') are not optional
    if params[2].shape != (3 * n, n):
        return None
    if not (isinstance(cos, torch.Tensor) and isinstance(sin, torch.Tensor) and cos.dtype == sin.dtype
            == torch.float32 and cos.shape == sin.shape and cos.dim() == 2 and cos.shape[1] * 2 == head_dim
            and cos.shape[0] >= max_seqlen and cos.is_contiguous() and sin.is_contiguous()
            and cos.device == device and sin.device == device):
        return None  # the rotary kernel takes fp32 tables of the whole head dim and every position
    pdtype = torch.float32 if cast is not None else dtype
    for t in params:
        if t is not None and (t.dtype is not pdtype or t.device != device):
            return None
    if not (0.0 <= pa < 1.0 and 0.0 <= pf < 1.0):
        return None
    last = _dispatch._last
    dev = device.type
    last["attention", dev] = last["layer_norm", dev] = last["rotary", dev] = last["geglu", dev] = TRITON
    seeds = _draw_seeds(device, 0.0, pa, pa, pf)[1:] if (pa or pf) else _NO_SEEDS
    window = None if window is None else _ka.check_window(window)
    meta = (hshape, mode, max_seqlen, head_dim ** -0.5, float(pa), float(pf), float(eps_a), float(eps_m),
            gelu, window, has_norm, cast)
    if torch.is_grad_enabled():
        return _apply(_UNWRAP, meta, res, delta, seqinfo, cos, sin, *seeds, *params)
    lse_shape = (heads, hshape[0]) if mode == _ka.MODE_VARLEN else (hshape[0], heads, hshape[1])
    scratch = _kc.allocator()(lse_shape, torch.float32, device)
    with _no_autocast(res, cast):
        h, u, _ = _forward(meta, res, delta, seqinfo, cos, sin, seeds, params, scratch)
    return h, u


def _to(t, dtype):
    return t if dtype is None or t is None else t.to(dtype)


def _forward(meta, res, delta, seqinfo, cos, sin, seeds, params, scratch=None):
    """(h, u, saved) of one layer; scratch as in fastbert.ops.block (None under autograd)."""
    hshape, mode, max_seqlen, scale, pa, pf, eps_a, eps_m, approx, window, has_norm, c = meta
    ga, ba, wqkv, bqkv, wo, bo, gm, bm, wi, bi, wo2, bo2 = params
    sm_seed, sa_seed, sf_seed = seeds
    shape = res.shape
    n = shape[-1]
    res2 = res.view(-1, n)
    stats = None if scratch is None else (scratch, scratch)
    mean_a = rstd_a = None
    if not has_norm:  # layer 0 (delta is None there)
        x = a_in = res2
    elif delta is None:
        keep = None if scratch is None else False  # no sum to write: no residual, no dropout
        a_in, _, mean_a, rstd_a = _kl.layer_norm_fwd(res2, ga, ba, eps_a, None, False, 0.0, None,
                                                     validate=False, store_sum=keep, stats=stats)
        x = res2
    else:  # x = delta + res, the residual stream: always written
        a_in, x, mean_a, rstd_a = _kl.layer_norm_fwd(delta.view(-1, n), ga, ba, eps_a, res2, False, 0.0, None,
                                                     validate=False, stats=stats)
    # under autocast (c: its dtype) the linears run in c on cast inputs and weights, as autocast's
    # F.linear; the LayerNorms take c and fp32 and give fp32 (the residual stream), as the per-op path
    ac = _to(a_in, c)
    qkv = F.linear(ac, _to(wqkv, c), _to(bqkv, c)).view(*hshape[:-2], 3, *hshape[-2:])
    r = _kr.rotary_fwd(qkv, cos, sin, seqinfo, max_seqlen)  # new, contiguous
    q, k, v = r.unbind(-3)
    o, lse = _ka.attention_fwd(q, k, v, seqinfo, None, sa_seed, mode, pa, scale, max_seqlen, window,
                               lse=scratch)
    o2 = o.view(-1, n)
    a = F.linear(o2, _to(wo, c), _to(bo, c))
    m_in, h, mean_m, rstd_m = _kl.layer_norm_fwd(a, gm, bm, eps_m, x, False, pa, sm_seed, validate=False,
                                                 stats=stats)
    mc = _to(m_in, c)
    f = F.linear(mc, _to(wi, c))
    g = _kgl.geglu_fwd(f, bi, approx, validate=False, dropout_p=pf, seed=sf_seed)  # bias uncast, as per op
    u = F.linear(g, _to(wo2, c), _to(bo2, c))
    saved = (x, ac, mean_a, rstd_a, r, o, o2, lse, h, mean_m, rstd_m, mc, f, g)
    return h.view(shape), u.view(shape), saved


class _ModernLayer(torch.autograd.Function):
    """One ModernBERT layer: inputs (meta, res, delta, seqinfo, cos, sin, 3 seed views, 12 parameters
    in run_modern_block's order); outputs (h, u)."""

    @staticmethod
    def forward(ctx, meta, res, delta, seqinfo, cos, sin, sm_seed, sa_seed, sf_seed, *params):
        with _no_autocast(res, meta[-1]):
            h, u, saved = _forward(meta, res, delta, seqinfo, cos, sin, (sm_seed, sa_seed, sf_seed), params)
        ga, ba, wqkv, bqkv, wo, bo, gm, bm, wi, bi, wo2, bo2 = params
        ctx.save_for_backward(*saved, seqinfo, cos, sin, sm_seed, sa_seed, sf_seed, ga, wqkv, wo, gm, wi, bi,
                              wo2)
        ctx.meta = meta
        ctx.shapes = (res.shape, None if delta is None else delta.dtype)
        ctx.has_bias = tuple(t is not None for t in (ba, bqkv, bo, bm, bi, bo2))
        return h, u

    @staticmethod
    def backward(ctx, dh, du):
        (x, ac, mean_a, rstd_a, r, o, o2, lse, h, mean_m, rstd_m, mc, f, g, seqinfo, cos, sin, sm_seed,
         sa_seed, sf_seed, ga, wqkv, wo, gm, wi, bi, wo2) = ctx.saved_tensors
        hshape, mode, max_seqlen, scale, pa, pf, eps_a, eps_m, approx, window, has_norm, c = ctx.meta
        has_ba, has_bqkv, has_bo, has_bm, has_bi, has_bo2 = ctx.has_bias
        shape, delta_dtype = ctx.shapes
        pd = None if c is None else wqkv.dtype  # the parameters' gradients: cast back from c
        n = shape[-1]
        dh, du = dh.reshape(-1, n), du.reshape(-1, n)
        # u = geglu(m_in @ Wi^T, bi) @ Wo2^T + bo2
        duc = _to(du, c)
        dwo2 = _to(duc.t().mm(g), pd)
        dbo2 = _to(duc.sum(0), pd) if has_bo2 else None
        df, dbi = _kgl.geglu_bwd(duc.mm(_to(wo2, c)), f, bi, approx, dropout_p=pf, seed=sf_seed)
        dwi = _to(df.t().mm(mc), pd)
        dbi = _to(dbi, pd) if has_bi else None
        dm = _to(df.mm(_to(wi, c)), pd)
        # m_in, h = LN_m(dropout(a) + x): dh is the gradient of the sum h (the next layer's residual)
        dsum_m, dx_m, dgm, dbm = _kl.layer_norm_bwd(dm, dh, h, gm, mean_m, rstd_m, False, pa, sm_seed,
                                                    has_bias=has_bm)
        da = _to(dx_m if pa > 0.0 else dsum_m, c)
        dwo = _to(da.t().mm(o2), pd)
        dbo = _to(da.sum(0), pd) if has_bo else None
        do = da.mm(_to(wo, c)).view(hshape)
        dr = _kc.allocator()(r.shape, r.dtype, r.device)  # dq, dk, dv as views of one buffer
        q, k, v = r.unbind(-3)
        _ka.attention_bwd(do, q, k, v, o, lse, seqinfo, None, sa_seed, mode, pa, scale, max_seqlen,
                          grads=dr.unbind(-3), window=window)
        dqkv = _kr.rotary_bwd(dr, cos, sin, seqinfo, max_seqlen).view(-1, 3 * n)  # rotated back
        dwqkv = _to(dqkv.t().mm(ac), pd)
        dbqkv = _to(dqkv.sum(0), pd) if has_bqkv else None
        dac = dqkv.mm(_to(wqkv, c))
        ddelta = dga = dba = None
        if not has_norm:  # x = a_in = res
            dres = dsum_m + dac.to(dsum_m.dtype)
        else:  # a_in = LN_a(x): x's gradient dsum_m comes in as the sum's
            dres, _, dga, dba = _kl.layer_norm_bwd(_to(dac, pd), dsum_m, x, ga, mean_a, rstd_a, False, 0.0,
                                                   None, has_bias=has_ba)
            if delta_dtype is not None:
                ddelta = dres.to(delta_dtype).view(shape)
        return (None, dres.view(shape), ddelta, None, None, None, None, None, None, dga, dba, dwqkv, dbqkv,
                dwo, dbo, dgm, dbm, dwi, dbi, dwo2, dbo2)


_apply = fast_apply(_ModernLayer)
_UNWRAP = (1, 2)  # res, delta: the activations among the arguments
