"""embed: the BERT input embedding in one op (torch.ops.fastbert.embedding_gather).

    out = dropout(LN(token_weight[input_ids] + position_weight[pos] + segment_weight[segment_ids]))

Shapes: input_ids [B, S] int64/int32; token_weight [V, N]; position_weight [P, N] (rows 0..S-1 unless
position_ids [S] or [B, S] is given); segment_ids [B, S] int with segment_weight [G, N]; ln_weight,
ln_bias [N] (LayerNorm with biased variance and eps, as torch.nn.LayerNorm; omitted in the
bert_pytorch preset); all tables of one dtype (fp32, fp16, bf16, fp64). Returns [B, S, N] in the
table dtype; sums and LayerNorm are computed in fp32 (fp64 for fp64 tables).

Keyword-only options:
  padding_idx, segment_padding_idx  rows that get no gradient, as nn.Embedding(padding_idx=...);
                                    None (default) gives every row its gradient, as plain indexing.
  deterministic (default True)      the token-table gradient is a sort by id then a segmented sum
                                    (bitwise reproducible); False uses atomics on CUDA. CPU is always
                                    deterministic, and position/segment gradients always are.
  generator                         source of the dropout seed (see fastbert.ops._rng.philox_seed_offset):
                                    the keep-mask is Philox(seed, offset, element), identical on CPU
                                    and CUDA and regenerated in the backward (fastbert.ops._rng).
                                    While a CUDA graph is being captured the dropout runs as
                                    F.dropout after the op instead (new masks at every replay).

The C++ op runs on CPU (parallel over tokens) and on CUDA (when fastbert._C has its CUDA kernels).
FASTBERT_BACKEND=reference, or a fastbert._C that did not load, selects the eager reference.
Ids outside their table raise ValueError on every device.
"""

import torch

from fastbert import _ext
from fastbert.reference import ops as ref

from ._dispatch import CPP, choose
from ._fused import fast_apply
from ._rng import philox_seed_offset

_OP = "embedding_gather"


def _reference(input_ids, token_weight, position_weight, segment_ids, segment_weight, position_ids,
               ln_weight, ln_bias, eps, dropout_p, padding_idx, segment_padding_idx):
    return ref.embed(input_ids, token_weight, position_weight, segment_ids, segment_weight,
                     position_ids=position_ids, ln_weight=ln_weight, ln_bias=ln_bias, eps=eps,
                     dropout_p=dropout_p, padding_idx=padding_idx,
                     segment_padding_idx=segment_padding_idx)


def _norm_padding(idx, rows, name):
    if idx is None:
        return -1
    if not isinstance(idx, int):
        raise TypeError(f"{name} must be an int or None, got {type(idx).__name__}")
    if not -rows <= idx < rows:
        raise ValueError(f"{name}={idx} is outside the table of {rows} rows")
    return idx % rows


_INDEX = (torch.int64, torch.int32)
_FLOAT = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_dtypes(input_ids, token_weight, position_weight, segment_ids, segment_weight, position_ids,
                  ln_weight, ln_bias):
    """TypeError for a wrong dtype on every path (fastbert._C, on the LibTorch stable ABI, can only
    raise ValueError)."""
    for name, t in (("input_ids", input_ids), ("segment_ids", segment_ids), ("position_ids", position_ids)):
        if t is not None and t.dtype not in _INDEX:
            raise TypeError(f"{name} must be int64 or int32, got {t.dtype}")
    if token_weight.dtype not in _FLOAT:
        raise TypeError(f"token_weight must be float32, float16, bfloat16 or float64, "
                        f"got {token_weight.dtype}")
    for name, t in (("position_weight", position_weight), ("segment_weight", segment_weight),
                    ("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if t is not None and t.dtype != token_weight.dtype:
            raise TypeError(f"{name} dtype {t.dtype} != token_weight dtype {token_weight.dtype}")


def embed(input_ids, token_weight, position_weight, segment_ids=None, segment_weight=None,
          position_ids=None, ln_weight=None, ln_bias=None, eps=1e-12, dropout_p=0.0, *,
          padding_idx=None, segment_padding_idx=None, deterministic=True, generator=None):
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a tensor, got {type(input_ids).__name__}")
    if segment_ids is not None and segment_weight is None:
        raise ValueError("segment_ids given without segment_weight")
    _check_dtypes(input_ids, token_weight, position_weight, segment_ids, segment_weight, position_ids,
                  ln_weight, ln_bias)
    if choose("embed", input_ids) != CPP:
        return _reference(input_ids, token_weight, position_weight, segment_ids, segment_weight,
                          position_ids, ln_weight, ln_bias, eps, dropout_p, padding_idx,
                          segment_padding_idx)
    pad = _norm_padding(padding_idx, token_weight.shape[0], "padding_idx")
    seg_pad = -1 if segment_weight is None else _norm_padding(
        segment_padding_idx, segment_weight.shape[0], "segment_padding_idx")
    # Inside a CUDA graph capture the op's host-side Philox seed would be replayed unchanged: the
    # dropout then runs as torch's own (its CUDA generator advances at every replay) after the op.
    separate = dropout_p > 0.0 and input_ids.is_cuda and torch.cuda.is_current_stream_capturing()
    seed = offset = 0
    if dropout_p > 0.0 and not separate:
        seed, offset = philox_seed_offset(generator)
    args = (input_ids, token_weight, position_weight, segment_ids,
            segment_weight if segment_ids is not None else None, position_ids, ln_weight, ln_bias,
            float(eps), 0.0 if separate else float(dropout_p), seed, offset, pad, seg_pad,
            bool(deterministic))
    if torch.is_grad_enabled() and not torch.compiler.is_compiling() and any(
            t is not None and t.requires_grad for t in args[1:8]):
        out = _apply(_UNWRAP, *args)  # eager training: one autograd.Function, no torch.library glue
    else:
        out = torch.ops.fastbert.embedding_gather(*args)[0]
    return torch.nn.functional.dropout(out, dropout_p) if separate else out


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_forward(ids, tok, pos, sids, seg, pids, lnw, lnb, eps, p, seed, offset, pad, seg_pad, det):
    batch, seq = ids.shape
    stats = batch * seq if lnw is not None else 0
    return (tok.new_empty(batch, seq, tok.shape[1]), tok.new_empty(stats, dtype=_acc(tok.dtype)),
            tok.new_empty(stats, dtype=_acc(tok.dtype)))


def _fake_backward(grad, ids, tok, pos, sids, seg, pids, lnw, lnb, mean, rstd, p, seed, offset, pad,
                   seg_pad, need_tok, need_pos, need_seg, det):
    n = tok.shape[1]
    empty = tok.new_empty(0)
    return (tok.new_empty(tok.shape) if need_tok else empty,
            pos.new_empty(pos.shape) if need_pos else empty,
            seg.new_empty(seg.shape) if need_seg and seg is not None and sids is not None else empty,
            tok.new_empty(n) if lnw is not None else empty,
            tok.new_empty(n) if lnw is not None else empty)


def _setup_context(ctx, inputs, output):
    ids, tok, pos, sids, seg, pids, lnw, lnb, eps, p, seed, offset, pad, seg_pad, det = inputs
    _, mean, rstd = output
    ctx.save_for_backward(ids, tok, pos, sids, seg, pids, lnw, lnb, mean, rstd)
    ctx.args = (p, seed, offset, pad, seg_pad, det)


def _backward(ctx, grad, _grad_mean, _grad_rstd):
    ids, tok, pos, sids, seg, pids, lnw, lnb, mean, rstd = ctx.saved_tensors
    p, seed, offset, pad, seg_pad, det = ctx.args
    need = ctx.needs_input_grad
    gt, gp, gs, gw, gb = torch.ops.fastbert.embedding_gather_backward(
        grad.contiguous(), ids, tok, pos, sids, seg, pids, lnw, lnb, mean, rstd, p, seed, offset, pad,
        seg_pad, need[1], need[2], need[4] and sids is not None, det)
    return (None, gt if need[1] else None, gp if need[2] else None, None,
            gs if need[4] and sids is not None else None, None,
            gw if need[6] else None, gb if need[7] else None,
            None, None, None, None, None, None, None)


class _Eager(torch.autograd.Function):
    """The op's autograd for eager calls: the registered autograd (register_autograd below, which
    torch.compile traces) goes through torch.library's Python glue on every call, about 100 us of
    host time; this calls the op below the autograd key with the same save and backward."""

    @staticmethod
    def forward(ctx, *inputs):
        with torch._C._AutoDispatchBelowAutograd():
            out, mean, rstd = torch.ops.fastbert.embedding_gather.default(*inputs)
        _setup_context(ctx, inputs, (out, mean, rstd))
        return out

    @staticmethod
    def backward(ctx, grad):
        return _backward(ctx, grad, None, None)


_apply = fast_apply(_Eager)
_UNWRAP = (0, 3, 5)  # the id tensors (the others are parameters)


if _ext.has_op(_OP):
    torch.library.register_fake(f"fastbert::{_OP}")(_fake_forward)
    torch.library.register_fake(f"fastbert::{_OP}_backward")(_fake_backward)
    torch.library.register_autograd(f"fastbert::{_OP}", _backward, setup_context=_setup_context)
