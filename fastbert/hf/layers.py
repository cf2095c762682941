"""A transformers encoder layer run as one fastbert.ops block (fastbert.ops.block.run_block), or None.

A BERT-family layer computes, post-LN (transformers' BertLayer and the families that copy it):

    h = LN1(dropout(attention(x Wq, x Wk, x Wv) Wo + bo) + x)
    y = LN2(dropout(gelu(h W1 + b1) W2 + b2) + h)

run_block does that in one autograd node with one Q/K/V matmul (the host work of the ~20 module calls
and ~40 ops it replaces is what makes a patched model faster than stock on a GPU). A layer is taken
only when every module on the way is the plain one whose math that is: the stock layer and attention
classes of a family in LAYOUTS, plain nn.Linear (with bias) / nn.LayerNorm / nn.Dropout, a GELU form
bias_gelu computes, the fused subclasses of fastbert.hf.modules where patch_hf put them (so the
patch_hf flags still switch parts off), no hooks other than transformers' own output-capture hooks
while nothing is being captured, no forward replaced on an instance, no chunked feed-forward. Anything
else returns None and the caller calls the layer module (the per-op path), so every effect is kept.

LAYOUTS maps a layer class (the stock one; DistilBERT's fused TransformerBlock) to where its parts
live, attribute paths from the layer; a family whose layer has this math under other names is one more
row (the families: fastbert.hf.modules.FAMILIES).
"""

from typing import NamedTuple

import torch.nn.modules.module as _torch_module
from torch import nn

from fastbert.ops.block import run_block


class Layout(NamedTuple):
    attention: tuple  # the attention module (dropout, scaling, head count); its class must be stock
    q: tuple
    k: tuple
    v: tuple
    o: tuple
    ln1: tuple
    drop1: tuple  # dropout before LN1's residual add (None: none)
    w1: tuple
    act: tuple
    w2: tuple
    ln2: tuple
    drop2: tuple
    stock: tuple  # attribute paths whose module class must be one of the family's stock classes


BERT_LAYOUT = Layout(
    attention=("attention", "self"), q=("attention", "self", "query"), k=("attention", "self", "key"),
    v=("attention", "self", "value"), o=("attention", "output", "dense"),
    ln1=("attention", "output", "LayerNorm"), drop1=("attention", "output", "dropout"),
    w1=("intermediate", "dense"), act=("intermediate", "intermediate_act_fn"), w2=("output", "dense"),
    ln2=("output", "LayerNorm"), drop2=("output", "dropout"),
    stock=(("attention",), ("attention", "self")))

# DistilBERT's TransformerBlock: no dropout before the first residual add, the FFN's after lin2
DISTILBERT_LAYOUT = Layout(
    attention=("attention",), q=("attention", "q_lin"), k=("attention", "k_lin"), v=("attention", "v_lin"),
    o=("attention", "out_lin"), ln1=("sa_layer_norm",), drop1=None, w1=("ffn", "lin1"),
    act=("ffn", "activation"), w2=("ffn", "lin2"), ln2=("output_layer_norm",), drop2=("ffn", "dropout"),
    stock=(("attention",),))

LAYOUTS = {}  # stock layer class -> (Layout, allowed classes per `stock` path, fused classes needed)


def register(layer_cls, layout, stock_classes, fused_classes):
    """stock_classes: one set of allowed classes per layout.stock path; fused_classes: the classes the
    modules at ln1's, w1's and ln2's owners must have (patch_hf's fused subclasses)."""
    LAYOUTS[layer_cls] = (layout, tuple(stock_classes), frozenset(fused_classes))


def _capture_hook(fn):
    return getattr(fn, "__name__", "") == "output_capturing_hook"  # transformers >= 5.x's recorder


def _hooked(m):
    if m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
        return True
    return any(not _capture_hook(fn) for fn in m._forward_hooks.values())


def _plain_linear(m):
    return type(m) is nn.Linear and m.bias is not None and not _hooked(m)


def _plain_norm(m):
    return (type(m) is nn.LayerNorm and m.weight is not None and m.bias is not None
            and len(m.normalized_shape) == 1 and not _hooked(m))


def _plan(layer, entry, gelu_form):
    """What fused_layer needs of a layer, after the full check, or None where the layer is not plain:
    (links, modules, static). links: (parent's _modules dict, name, module, class) for each module on
    the way, so a later call re-validates with one lookup and two identity tests per module."""
    layout, stock_classes, fused_classes = entry
    if "forward" in layer.__dict__ or _hooked(layer) or getattr(layer, "chunk_size_feed_forward", 0):
        return None
    if getattr(layer, "add_cross_attention", False) or getattr(layer, "is_decoder", False):
        return None
    links = {}  # id(module) -> (parent's _modules, name, module, class)

    def walk(path):
        m = layer
        for name in path:
            parent = m._modules
            m = parent.get(name)
            if m is None:
                return None
            links[id(m)] = (parent, name, m, type(m))
        return m

    for path, allowed in zip(layout.stock, stock_classes):
        m = walk(path)
        if m is None or type(m) not in allowed or "forward" in m.__dict__ or _hooked(m):
            return None
    for path in (layout.ln1[:-1], layout.w1[:-1], layout.ln2[:-1]):
        m = walk(path)
        if (m is None or type(m) not in fused_classes or "forward" in m.__dict__ or _hooked(m)
                or getattr(m, "chunk_size_feed_forward", 0)):
            return None
    attn = walk(layout.attention)
    q, k, v, o, w1, w2 = (walk(path) for path in (layout.q, layout.k, layout.v, layout.o, layout.w1,
                                                   layout.w2))
    if not all(_plain_linear(m) for m in (q, k, v, o, w1, w2)):
        return None
    ln1, ln2 = walk(layout.ln1), walk(layout.ln2)
    if not (_plain_norm(ln1) and _plain_norm(ln2)):
        return None
    act = walk(layout.act)
    form = gelu_form(act)
    if form is None or _hooked(act):
        return None
    drops = (walk(layout.drop1) if layout.drop1 else None, walk(layout.drop2),
             walk(layout.attention + ("dropout",)))
    if any(d is not None and (type(d) is not nn.Dropout or _hooked(d)) for d in drops):
        return None
    heads = getattr(attn, "num_attention_heads", None) or getattr(attn, "n_heads", None)
    if not heads or getattr(attn, "is_causal", False) or getattr(attn, "is_cross_attention", False):
        return None
    hidden = q.in_features
    scaling = getattr(attn, "scaling", None)
    if hidden % heads or (scaling is not None and abs(scaling - (hidden // heads) ** -0.5) > 1e-12):
        return None
    links[id(layer)] = (None, None, layer, type(layer))
    return (tuple(links.values()), (q, k, v, o, w1, w2, ln1, ln2) + drops, (heads, form))


def _valid(links):
    for parent, name, m, cls in links:
        if (type(m) is not cls or (parent is not None and parent.get(name) is not m) or m._forward_pre_hooks
                or m._backward_hooks or m._backward_pre_hooks or "forward" in m.__dict__):
            return False
        if m._forward_hooks and any(not _capture_hook(fn) for fn in m._forward_hooks.values()):
            return False
    return True


def fused_layer(layer, x, gelu_form, cu_seqlens=None, max_seqlen=None):
    """The layer's output for x ([T, N] varlen with cu_seqlens, or [B, S, N] unpadded dense) through
    run_block, or None when it does not apply (the caller then calls the layer)."""
    entry = LAYOUTS.get(type(layer))
    if entry is None or _torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks:
        return None
    plan = layer.__dict__.get("_fastbert_plan")
    if plan is None or not _valid(plan[0]):
        plan = _plan(layer, entry, gelu_form)
        if plan is None:
            layer.__dict__.pop("_fastbert_plan", None)
            return None
        layer.__dict__["_fastbert_plan"] = plan
    (q, k, v, o, w1, w2, ln1, ln2, d1, d2, da), (heads, form) = plan[1], plan[2]
    p1 = float(d1.p) if d1 is not None and d1.training else 0.0
    p2 = float(d2.p) if d2 is not None and d2.training else 0.0
    pa = float(da.p) if da is not None and da.training else 0.0
    qp, kp, vp, op, w1p, w2p, n1p, n2p = (m._parameters for m in (q, k, v, o, w1, w2, ln1, ln2))
    params = (qp["weight"], kp["weight"], vp["weight"], qp["bias"], kp["bias"], vp["bias"], op["weight"],
              op["bias"], n1p["weight"], n1p["bias"], w1p["weight"], w1p["bias"], w2p["weight"], w2p["bias"],
              n2p["weight"], n2p["bias"])
    if any(t is None for t in params):
        return None
    return run_block(False, x, params, heads, p1, p2, pa, 0.0, ln1.eps, ln2.eps, False, False, form,
                     cu_seqlens, max_seqlen)
