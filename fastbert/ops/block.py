"""fused_block(block, x, key_padding_mask, cu_seqlens, max_seqlen): a whole transformer block (post-LN
"hf" preset or pre-LN "bert_pytorch" preset) as ONE autograd node in eager mode, or None where it
does not apply.

Why: at BERT sizes a GPU runs a block's kernels in well under a millisecond, so the host work around
them (module calls, one choose() and one autograd.Function per op, three Q/K/V linears, a dropout
seed per op, input checks per launch) decides the step time. The per-op path (each op through its
FusedOp) stays what torch.compile traces and what every other case runs; this path takes the block
when all of its ops would take their Triton kernels anyway. Post-LN (hf):

    qkv = x @ [Wq; Wk; Wv]^T + [bq; bk; bv]          one addmm on the three weights (cat per call)
    o   = attention(qkv views, varlen or dense)        the attention launcher, no copies of q, k, v
    h   = LN1(dropout(o @ Wo^T + bo) + x)              LayerNorm launcher with dropout + residual
    y   = LN2(dropout(w_2(bias_gelu(h @ W1^T, b1))) + h)

Pre-LN (bert_pytorch): y2, h = LN2(dropout(attention block(LN1(x))) + x) (the sum h kept), then
out = dropout(h + dropout(w_2(bias_gelu(y2 @ W1^T, b1, dropout)))), the last two dropouts torch's
own (torch.native_dropout, masks saved), as the per-op path's nn.Dropout calls.

A hand-written backward: the launchers' backward kernels and mm's (weight gradients by mm, bias
gradients by sum), dq/dk/dv written into one [T, 3N] buffer so that one mm gives dx and one dW for
the three Q/K/V weights (returned as views, one per parameter: the state dict keeps its keys). The
math is the per-op path's, launcher for launcher; tests/test_fused_block.py checks outputs and every
parameter gradient against the per-op path and the reference.

Saved for the backward (per real token, as the per-op path): the block input, qkv, the attention
output, the LayerNorm sums or inputs, the FFN input, pre-activation and activation, torch's dropout
masks (pre-LN), and per-row statistics; the concatenated weight is rebuilt in the backward, not
kept. Without autograd (no_grad, inference_mode: eval and serving) nothing is saved, so the
LayerNorms do not write their sums and their statistics and attention's lse go to one scratch buffer
per block (six allocations and two [T, N] writes fewer). The Q/K/V weights are
concatenated on every call there too: a cache across calls would need to know when a weight changed,
and a write through `param.data` (an EMA update, a manual load) bumps no version counter.
The block's dropout seeds (LayerNorms, attention's (seed, offset) pair, the FFN's) come from
ONE torch.randint per block on x's device, each kernel reading its own element, so
torch.manual_seed, activation checkpointing (which restores the generators) and CUDA graphs behave
as with the per-op draws.

Where it applies (otherwise the caller runs the per-op path): not while torch.compile traces; the
backend would pick Triton for x (FASTBERT_BACKEND, device, interpreter); no autocast; x contiguous
in fp32/fp16/bf16 with every block parameter of its dtype and device; varlen input ([T, N] with
cu_seqlens and an int max_seqlen) or dense padded input ([B, S, N], no key padding mask); hidden
<= 8192, head dim a multiple of 8 up to 128; FASTBERT_ATTN_CHECK unset. FASTBERT_FUSED_BLOCK=0
turns it off (the per-op path everywhere).
"""

import contextlib

import torch
import torch.nn.functional as F

from fastbert._env import getenv

from . import _dispatch
from ._dispatch import TRITON, triton_available
from ._fused import fast_apply

if triton_available():
    from fastbert.kernels import _common as _kc
    from fastbert.kernels import attention as _ka
    from fastbert.kernels import bias_gelu as _kg
    from fastbert.kernels import layer_norm as _kl
else:  # pragma: no cover - triton is a dependency
    _kc = _ka = _kg = _kl = None

_HIGH = 2**62  # as fastbert.ops._rng.dropout_seed
_dropout_bwd = torch.ops.aten.native_dropout_backward.default  # (grad, mask, scale)
_FLOAT = (torch.float32, torch.float16, torch.bfloat16)


def enabled() -> bool:
    return getenv("FASTBERT_FUSED_BLOCK", "1") != "0"


def _leaves(block):
    """(q, k, v, output linear, norm1, norm2, w_1, w_2, dropout, feed_forward) modules of a block,
    looked up in the _modules dicts (nn.Module.__getattr__ costs about a microsecond per lookup)."""
    mods = block._modules
    att = mods["attention"]._modules
    ff = mods["feed_forward"]
    ffm = ff._modules
    q, k, v = att["linear_layers"]._modules.values()
    return (q, k, v, att["output_linear"], mods["input_sublayer"]._modules["norm"],
            mods["output_sublayer"]._modules["norm"], ffm["w_1"], ffm["w_2"], mods["dropout"], ff)


def _params(leaves):
    """The block's 16 parameters in _PostLN's order (leaves: _leaves(block))."""
    q, k, v, o, n1, n2, w1, w2 = leaves[:8]
    qp, kp, vp, op, n1p, n2p, w1p, w2p = (m._parameters for m in (q, k, v, o, n1, n2, w1, w2))
    return (qp["weight"], kp["weight"], vp["weight"], qp["bias"], kp["bias"], vp["bias"], op["weight"],
            op["bias"], n1p["a_2"], n1p["b_2"], w1p["weight"], w1p["bias"], w2p["weight"], w2p["bias"],
            n2p["a_2"], n2p["b_2"])


def fused_block(block, x, key_padding_mask=None, cu_seqlens=None, max_seqlen=None):
    """The block's output through the fused eager path, or None when the per-op path must run."""
    if key_padding_mask is not None or _kl is None or torch.compiler.is_compiling() or not enabled():
        return None
    cfg = block.cfg
    pre = cfg.preset == "bert_pytorch"  # pre-LN (bert_pytorch) or post-LN (hf)
    leaves = _leaves(block)
    _, _, _, _, norm1, norm2, _, _, drop, ff = leaves
    if pre and drop.training != block.training:
        return None  # the per-op path's trailing nn.Dropout follows its own flag
    if not isinstance(x, torch.Tensor) or x.shape[-1] != cfg.hidden:
        return None
    p = drop.p if block.training else 0.0
    pa = cfg.attn_dropout if block._modules["attention"].training else 0.0
    pf = ff._modules["dropout"].p if ff.training else 0.0
    return run_block(pre, x, _params(leaves), cfg.heads, 0.0 if pre else p, p, pa, pf, norm1.eps, norm2.eps,
                     norm1.variant == "bert_pytorch", norm2.variant == "bert_pytorch", cfg.gelu,
                     cu_seqlens, max_seqlen)


def block_plan(x, heads, cu_seqlens=None, max_seqlen=None):
    """What every fused block (this one and fastbert.ops.modern_block) checks first, or None where the
    per-op path must run: the Triton backend for x's device, not compiling, x contiguous fp32/fp16/bf16
    (fp32 under fp16/bf16 autocast), FASTBERT_ATTN_CHECK unset, a hidden size the LayerNorm takes and a
    head dim the attention takes, varlen [T, N] input with int32 cu_seqlens and an int max_seqlen or
    dense [B, S, N]. Returns (autocast dtype or None, attention mode, seqinfo, max_seqlen, head shape,
    head dim)."""
    if _kl is None or torch.compiler.is_compiling() or not isinstance(x, torch.Tensor):
        return None
    name = getenv("FASTBERT_BACKEND", "auto")
    if name not in _dispatch.BACKENDS:
        name = _dispatch.backend()
    if name == "reference" or not (_dispatch._TRITON if x.is_cuda else _dispatch._triton_device(x, name)):
        return None
    dtype = x.dtype
    if dtype not in _FLOAT or not x.is_contiguous():
        return None
    device = x.device
    cast = None  # under autocast: its dtype, for fp32 input and parameters (what pretraining runs)
    if torch.is_autocast_enabled(device.type):
        cast = torch.get_autocast_dtype(device.type)
        if dtype != torch.float32 or cast not in (torch.float16, torch.bfloat16):
            return None
    if getenv("FASTBERT_ATTN_CHECK") == "1":
        return None  # the per-op attention checks cu_seqlens' values
    n = x.shape[-1]
    if n > _kl.MAX_HIDDEN or n % heads:
        return None
    head_dim = n // heads
    if head_dim % 8 or head_dim > _ka.MAX_HEAD_DIM:
        return None
    if cu_seqlens is not None:
        if (x.dim() != 2 or max_seqlen is None or isinstance(max_seqlen, bool)
                or not isinstance(max_seqlen, int) or not isinstance(cu_seqlens, torch.Tensor)
                or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2
                or cu_seqlens.device != device):
            return None  # the per-op path names the problem
        seqinfo = cu_seqlens if cu_seqlens.is_contiguous() else cu_seqlens.contiguous()
        return cast, _ka.MODE_VARLEN, seqinfo, max_seqlen, (x.shape[0], heads, head_dim), head_dim
    if x.dim() != 3 or (max_seqlen is not None and max_seqlen != x.shape[1]):
        return None
    return cast, _ka.MODE_DENSE, None, x.shape[1], (x.shape[0], x.shape[1], heads, head_dim), head_dim


def run_block(pre, x, params, heads, p1, p2, pa, pf, eps1, eps2, unbiased1, unbiased2, gelu,
              cu_seqlens=None, max_seqlen=None):
    """One block from its 16 parameters (in _PostLN's order: Wq, Wk, Wv, bq, bk, bv, Wo, bo, LN1 weight,
    LN1 bias, W1, b1, W2, b2, LN2 weight, LN2 bias), or None where the per-op path must run.

    pre         pre-LN (bert_pytorch) or post-LN (transformers' BERT family)
    p1, p2      hidden dropout in LN1 / LN2 (post-LN; 0.0 where the model has none); pre-LN uses p2
    pa, pf      attention-probability dropout, dropout after the FFN activation
    eps*, unbiased*   the LayerNorms' eps and variant (bert_pytorch's unbiased std)
    gelu        "none" (erf) or "tanh"
    The callers pass the dropout rates of their modules' training state (0.0 in eval)."""
    if params[0].shape[-1] != (x.shape[-1] if isinstance(x, torch.Tensor) else -1):
        return None
    plan = block_plan(x, heads, cu_seqlens, max_seqlen)
    if plan is None:
        return None
    cast, mode, seqinfo, max_seqlen, hshape, head_dim = plan
    cuda, dtype, device = x.is_cuda, x.dtype, x.device
    if cuda:  # every parameter of x's dtype on x's device (is_cpu/is_cuda: no device objects)
        index = x.get_device()
        for t in params:
            if t.dtype is not dtype or not t.is_cuda or t.get_device() != index:
                return None
    else:
        for t in params:
            if t.dtype is not dtype or not t.is_cpu:
                return None
    if not (0.0 <= p1 < 1.0 and 0.0 <= p2 < 1.0 and 0.0 <= pa < 1.0 and 0.0 <= pf < 1.0):
        return None
    # what ran, for fastbert.ops.last_choices() (pretrain logs it after the first step)
    last = _dispatch._last
    dev = device.type
    last["attention", dev] = last["layer_norm", dev] = last["bias_gelu", dev] = TRITON
    seeds = (_draw_seeds(device, 0.0 if pre else p1, p2, pa, pf) if (p1 or p2 or pa or pf)
             else _NO_SEEDS)
    meta = (hshape, mode, max_seqlen, head_dim ** -0.5, float(p2), float(pa), float(pf), float(eps1),
            float(eps2), bool(unbiased1), bool(unbiased2), gelu, float(p1), cast)
    if torch.is_grad_enabled():
        return (_apply_pre if pre else _apply_post)(_UNWRAP, meta, x, seqinfo, *seeds, *params)
    # no autograd: nothing is saved, so the LayerNorms' sums are not written and their statistics and
    # attention's lse go to one scratch buffer (fp32, H x tokens: lse's shape, at least a row each)
    lse_shape = (heads, hshape[0]) if mode == _ka.MODE_VARLEN else (hshape[0], heads, hshape[1])
    scratch = _kc.allocator()(lse_shape, torch.float32, device)
    if cast is None:
        return (_forward_pre if pre else _forward_post)(meta, x, seqinfo, seeds, params, scratch)[0]
    with torch.autocast(device.type, enabled=False):
        return (_forward_pre if pre else _forward_post)(meta, x, seqinfo, seeds, params, scratch)[0]


_NO_SEEDS = (None, None, None, None)


def _draw_seeds(device, p1, p2, pa, pf):
    """(LN1 seed, LN2 seed, attention (seed, offset), FFN seed): views of ONE torch.randint on the
    device (None where that dropout is off: LN1 has none in the pre-LN block), elements [LN1, LN2,
    attention seed, offset, FFN] of the ones that are on, in this order."""
    on1, on2, ona, onf = p1 > 0.0, p2 > 0.0, pa > 0.0, pf > 0.0
    sizes = ((1,) if on1 else ()) + ((1,) if on2 else ()) + ((2,) if ona else ()) + ((1,) if onf else ())
    if not sizes:
        return None, None, None, None
    parts = iter(torch.randint(0, _HIGH, (sum(sizes),), dtype=torch.int64, device=device)
                 .split_with_sizes(sizes))
    return (next(parts) if on1 else None, next(parts) if on2 else None, next(parts) if ona else None,
            next(parts) if onf else None)


def _qkv_views(qkv, hshape):
    """q, k, v views [.., H, D] of the [M, 3N] projection (the attention kernels take the strides)."""
    return qkv.view(*hshape[:-2], 3, *hshape[-2:]).unbind(-3)


def _to(t, dtype):
    """t in dtype (None: t as it is): autocast's casts, made explicit."""
    return t if dtype is None else t.to(dtype)


# the two sublayers both blocks share, forward and backward: xin [M, N] is the sublayer's input in
# the compute dtype c (None: the parameters' dtype), pd the dtype of the parameters' gradients
def _attention_sublayer(xin, params, meta, seqinfo, sa_seed, scratch=None):
    """a = attention(xin @ [Wq; Wk; Wv]^T + [bq; bk; bv]) @ Wo^T + bo; returns a and what the
    backward keeps (q, k, v, o, o2, lse). scratch: lse's buffer when no backward follows."""
    wq, wk, wv, bq, bk, bv, wo, bo = params[:8]
    hshape, mode, max_seqlen, scale, pa, c = meta[0], meta[1], meta[2], meta[3], meta[5], meta[-1]
    qkv = F.linear(xin, _to(torch.cat((wq, wk, wv)), c), _to(torch.cat((bq, bk, bv)), c))  # [M, 3N]
    q, k, v = _qkv_views(qkv, hshape)
    o, lse = _ka.attention_fwd(q, k, v, seqinfo, None, sa_seed, mode, pa, scale, max_seqlen, lse=scratch)
    o2 = o.view(xin.shape)
    return F.linear(o2, _to(wo, c), _to(bo, c)), (q, k, v, o, o2, lse)


def _attention_sublayer_bwd(da, xin, kept, wq, wk, wv, wo, meta, seqinfo, sa_seed, pd):
    """(dqkv [M, 3N] in q's dtype, (dwq, dwk, dwv, dbq, dbk, dbv, dwo, dbo)): dq, dk, dv are written
    by the attention backward as views of one buffer, so one mm gives the three weights' gradients."""
    q, k, v, o, o2, lse = kept
    hshape, mode, max_seqlen, scale, pa, c = meta[0], meta[1], meta[2], meta[3], meta[5], meta[-1]
    dwo = _to(da.t().mm(o2), pd)
    dbo = _to(da.sum(0), pd)
    do = da.mm(_to(wo, c)).view(hshape)
    dqkv = _kc.allocator()((xin.shape[0], 3 * xin.shape[1]), q.dtype, q.device)
    _ka.attention_bwd(do, q, k, v, o, lse, seqinfo, None, sa_seed, mode, pa, scale, max_seqlen,
                      grads=_qkv_views(dqkv, hshape))
    dwq, dwk, dwv = _to(dqkv.t().mm(xin), pd).chunk(3)
    dbq, dbk, dbv = _to(dqkv.sum(0), pd).chunk(3)
    return dqkv, (dwq, dwk, dwv, dbq, dbk, dbv, dwo, dbo)


def _ffn_sublayer(xin, w1, b1, w2, b2, meta, sf_seed):
    """u = bias_gelu(xin @ W1^T, b1) @ W2^T + b2 (the FFN's dropout inside bias_gelu); returns u, f, g."""
    pf, approx, c = meta[6], meta[11], meta[-1]
    f = F.linear(xin, _to(w1, c))
    g = _kg.bias_gelu_fwd(f, b1, approx, validate=False, dropout_p=pf, seed=sf_seed)
    return F.linear(g, _to(w2, c), _to(b2, c)), f, g


def _ffn_sublayer_bwd(du, xin, f, g, w1, b1, w2, meta, sf_seed, pd):
    """(df, dw1, db1, dw2, db2); the input's gradient is df @ W1 (left to the caller, which adds it to
    its residual gradient)."""
    pf, approx, c = meta[6], meta[11], meta[-1]
    dw2 = _to(du.t().mm(g), pd)
    db2 = _to(du.sum(0), pd)
    df, db1 = _kg.bias_gelu_bwd(du.mm(_to(w2, c)), f, b1, approx, dropout_p=pf, seed=sf_seed)
    return df, _to(df.t().mm(xin), pd), db1, dw2, db2


def _forward_post(meta, x, seqinfo, seeds, params, scratch=None):
    """The post-LN block's (output, saved tensors). scratch: None under autograd; without it, the
    fp32 buffer that takes lse and the LayerNorms' statistics (not kept), the LayerNorms' sums unwritten."""
    hshape, mode, max_seqlen, scale, p, pa, pf, eps1, eps2, unb1, unb2, approx, p1, c = meta
    wq, wk, wv, bq, bk, bv, wo, bo, g1, c1, w1, b1, w2, b2, g2, c2 = params
    s1_seed, s2_seed, sa_seed, sf_seed = seeds
    x2 = x if x.dim() == 2 else x.view(-1, x.shape[-1])
    # under autocast (c: its dtype) the linears run in c on cast inputs and weights, as autocast's
    # F.linear; the LayerNorms take c and fp32 and give fp32 (the residual stream), as the per-op path
    xc = _to(x2, c)
    a, (q, k, v, o, o2, lse) = _attention_sublayer(xc, params, meta, seqinfo, sa_seed, scratch)
    keep, stats = (None, None) if scratch is None else (False, (scratch, scratch))
    h, s1, mean1, rstd1 = _kl.layer_norm_fwd(a, g1, c1, eps1, x2, unb1, p1, s1_seed, validate=False,
                                             store_sum=keep, stats=stats)
    hc = _to(h, c)
    u, f, g = _ffn_sublayer(hc, w1, b1, w2, b2, meta, sf_seed)
    y, s2, mean2, rstd2 = _kl.layer_norm_fwd(u, g2, c2, eps2, h, unb2, p, s2_seed, validate=False,
                                             store_sum=keep, stats=stats)
    saved = (xc, q, k, v, o, o2, lse, s1, mean1, rstd1, hc, f, g, s2, mean2, rstd2)
    return (y if x.dim() == 2 else y.view(x.shape)), saved


class _PostLN(torch.autograd.Function):
    """One post-LN block: inputs (meta, x, seqinfo, 4 seed views (_draw_seeds), 16 parameters in
    _params' order)."""

    @staticmethod
    def forward(ctx, meta, x, seqinfo, s1_seed, s2_seed, sa_seed, sf_seed, *params):
        with _no_autocast(x, meta[-1]):
            y, saved = _forward_post(meta, x, seqinfo, (s1_seed, s2_seed, sa_seed, sf_seed), params)
        wq, wk, wv, _, _, _, wo, _, g1, _, w1, b1, w2, _, g2, _ = params
        ctx.save_for_backward(*saved, seqinfo, s1_seed, s2_seed, sa_seed, sf_seed,
                              wq, wk, wv, wo, g1, w1, b1, w2, g2)
        ctx.meta = meta
        ctx.x_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        (xc, q, k, v, o, o2, lse, s1, mean1, rstd1, hc, f, g, s2, mean2, rstd2, seqinfo, s1_seed, s2_seed,
         sa_seed, sf_seed, wq, wk, wv, wo, g1, w1, b1, w2, g2) = ctx.saved_tensors
        hshape, mode, max_seqlen, scale, p, pa, pf, eps1, eps2, unb1, unb2, approx, p1, c = ctx.meta
        pd = None if c is None else wq.dtype  # the parameters' gradients: cast back from c
        m, n = xc.shape
        # LN2: y = LN(dropout(u) + h)
        dsum2, dx2, dg2, dc2 = _kl.layer_norm_bwd(dy if dy.dim() == 2 else dy.reshape(m, n), None, s2, g2,
                                                  mean2, rstd2, unb2, p, s2_seed)
        du = _to(dx2 if p > 0.0 else dsum2, c)
        df, dw1, db1, dw2, db2 = _ffn_sublayer_bwd(du, hc, f, g, w1, b1, w2, ctx.meta, sf_seed, pd)
        if c is None:
            dh = torch.addmm(dsum2, df, w1)  # the residual's gradient (LN2's sum) + the FFN's
        else:
            dh = dsum2 + df.mm(_to(w1, c)).to(dsum2.dtype)
        # LN1: h = LN(dropout(a) + x)
        dsum1, dx1, dg1, dc1 = _kl.layer_norm_bwd(dh, None, s1, g1, mean1, rstd1, unb1, p1, s1_seed)
        da = _to(dx1 if p1 > 0.0 else dsum1, c)
        dqkv, dattn = _attention_sublayer_bwd(da, xc, (q, k, v, o, o2, lse), wq, wk, wv, wo, ctx.meta,
                                              seqinfo, sa_seed, pd)
        wcat = torch.cat((wq, wk, wv))
        if c is None:
            dx = torch.addmm(dsum1, dqkv, wcat)  # residual + the three projections
        else:
            dx = dsum1 + dqkv.mm(wcat.to(c)).to(dsum1.dtype)
        if len(ctx.x_shape) != 2:
            dx = dx.view(ctx.x_shape)
        return (None, dx, None, None, None, None, None, *dattn, dg1, dc1, dw1, db1, dw2, db2, dg2, dc2)


def _forward_pre(meta, x, seqinfo, seeds, params, scratch=None):
    """bert_pytorch's block: h = x + drop(attn(LN1(x))); out = drop(h + drop(ffn(LN2(h)))), where
    LN2 takes the first dropout and the residual add (as the per-op path), the FFN's dropout runs
    in bias_gelu, and the last two dropouts are torch's own (native_dropout: masks kept). scratch
    as in _forward_post (LN2's sum h is the residual stream: always written)."""
    hshape, mode, max_seqlen, scale, p, pa, pf, eps1, eps2, unb1, unb2, approx, p1, c = meta
    wq, wk, wv, bq, bk, bv, wo, bo, g1, c1, w1, b1, w2, b2, g2, c2 = params
    _, s2_seed, sa_seed, sf_seed = seeds
    x2 = x if x.dim() == 2 else x.view(-1, x.shape[-1])
    keep, stats = (None, None) if scratch is None else (False, (scratch, scratch))
    y1, _, mean1, rstd1 = _kl.layer_norm_fwd(x2, g1, c1, eps1, None, unb1, 0.0, None, validate=False,
                                             store_sum=keep, stats=stats)
    y1c = _to(y1, c)
    a, (q, k, v, o, o2, lse) = _attention_sublayer(y1c, params, meta, seqinfo, sa_seed, scratch)
    y2, h, mean2, rstd2 = _kl.layer_norm_fwd(a, g2, c2, eps2, x2, unb2, p, s2_seed, validate=False,
                                             stats=stats)
    y2c = _to(y2, c)
    u, f, g = _ffn_sublayer(y2c, w1, b1, w2, b2, meta, sf_seed)
    if p > 0.0:
        u, mask1 = torch.native_dropout(u, p, True)
        out, mask2 = torch.native_dropout(h + u, p, True)
    else:
        mask1 = mask2 = None
        out = h + u
    saved = (x2, y1c, mean1, rstd1, q, k, v, o, o2, lse, h, mean2, rstd2, y2c, f, g, mask1, mask2)
    return (out if x.dim() == 2 else out.view(x.shape)), saved


class _PreLN(torch.autograd.Function):
    """One pre-LN block: the arguments of _PostLN."""

    @staticmethod
    def forward(ctx, meta, x, seqinfo, s1_seed, s2_seed, sa_seed, sf_seed, *params):
        with _no_autocast(x, meta[-1]):
            y, saved = _forward_pre(meta, x, seqinfo, (s1_seed, s2_seed, sa_seed, sf_seed), params)
        wq, wk, wv, _, _, _, wo, _, g1, _, w1, b1, w2, _, g2, _ = params
        ctx.save_for_backward(*saved, seqinfo, s2_seed, sa_seed, sf_seed, wq, wk, wv, wo, g1, w1, b1, w2, g2)
        ctx.meta = meta
        ctx.x_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, dout):
        (x2, y1c, mean1, rstd1, q, k, v, o, o2, lse, h, mean2, rstd2, y2c, f, g, mask1, mask2, seqinfo,
         s2_seed, sa_seed, sf_seed, wq, wk, wv, wo, g1, w1, b1, w2, g2) = ctx.saved_tensors
        hshape, mode, max_seqlen, scale, p, pa, pf, eps1, eps2, unb1, unb2, approx, p1, c = ctx.meta
        pd = None if c is None else wq.dtype  # the parameters' gradients: cast back from c
        m, n = x2.shape
        dh2 = dout if dout.dim() == 2 else dout.reshape(m, n)  # gradient of h + drop(u)
        if p > 0.0:
            dh2 = _dropout_bwd(dh2, mask2, 1.0 / (1.0 - p))
            du = _dropout_bwd(_to(dh2, c), mask1, 1.0 / (1.0 - p))
        else:
            du = _to(dh2, c)
        df, dw1, db1, dw2, db2 = _ffn_sublayer_bwd(du, y2c, f, g, w1, b1, w2, ctx.meta, sf_seed, pd)
        # LN2: y2 = LN(h), h = drop(a) + x; h's own gradient dh2 comes in as the sum's gradient
        dsum2, dx2, dg2, dc2 = _kl.layer_norm_bwd(_to(df.mm(_to(w1, c)), pd), dh2, h, g2, mean2, rstd2, unb2,
                                                  p, s2_seed)
        da = _to(dx2 if p > 0.0 else dsum2, c)
        dqkv, dattn = _attention_sublayer_bwd(da, y1c, (q, k, v, o, o2, lse), wq, wk, wv, wo, ctx.meta,
                                              seqinfo, sa_seed, pd)
        # LN1: y1 = LN(x); the residual's gradient (dsum2) comes in as the sum's gradient
        dy1 = _to(dqkv.mm(_to(torch.cat((wq, wk, wv)), c)), pd)
        dx, _, dg1, dc1 = _kl.layer_norm_bwd(dy1, dsum2, x2, g1, mean1, rstd1, unb1, 0.0, None)
        if len(ctx.x_shape) != 2:
            dx = dx.view(ctx.x_shape)
        return (None, dx, None, None, None, None, None, *dattn, dg1, dc1, dw1, db1, dw2, db2, dg2, dc2)


def _no_autocast(x, cast):
    """The forward's casts are explicit (_to): autocast off inside it when it is on."""
    return contextlib.nullcontext() if cast is None else torch.autocast(x.device.type, enabled=False)


_apply_post = fast_apply(_PostLN)
_apply_pre = fast_apply(_PreLN)
_UNWRAP = (1,)  # x: the one activation among the blocks' arguments
