"""ModernBERT in place: fused subclasses of transformers' ModernBERT modules (the __class__ swap of
fastbert.hf.modules; roles so patch_hf's flags switch each part).

transformers' ModernBERT (>= the release whose layers take `position_embeddings` and call the
attention interface; 5.0's model, which unpads itself for flash-attn only, is not patched) computes

    x = drop(norm(tok_embeddings(ids)))
    per layer:  h = x + Wo(attn(rope(Wqkv(attn_norm(x)))))        (layer 0: attn_norm is Identity)
                y = h + Wo2(drop(gelu(a) * g)),  a, g = Wi(mlp_norm(h)).chunk(2)
    out = final_norm(y)

bias-free LayerNorms (norm_bias=False), RoPE with its own theta for the global and the local layers, and
in the local layers a symmetric sliding window: query i attends key j iff |i - j| <= local_attention // 2
(the mask transformers builds for eager/sdpa; flash-attn is passed sliding_window = local_attention // 2
+ 1 and counts window_size=(sliding_window - 1, sliding_window - 1), the same band).

The parts:
  ModernBertEmbeddings    ("embeddings")  the LayerNorm through fastbert.ops.layer_norm
  ModernBertMLP           ("bias_gelu")   gelu(a) * g (and its dropout) as one fastbert.ops.geglu
  ModernBertEncoderLayer  ("layer_norm")  each residual add fused into the LayerNorm after it
                                          (fastbert.ops.layer_norm(..., residual=...))
  ModernBertModel         ("unpad")       the whole encoder: a right-padded batch is unpadded once
      after the embeddings (only the real tokens are embedded), every layer runs on the [T, hidden]
      real tokens: one Wqkv matmul, fastbert.ops.rotary on the packed [T, 3, H, D] projection (positions
      restart per sequence, as stock's arange positions are for right padding), fastbert.ops.attention
      variable-length with the layer's window; the residual adds fused into the next LayerNorm across
      layers (the last into final_norm); last_hidden_state is scattered back to [B, S, hidden] with zeros
      at padding positions. A batch without padding runs the same way (B sequences of length S); a
      packed [1, T] batch whose position_ids restart (DataCollatorWithFlattening) runs variable-length.
      The stock forward (with the fused parts above inside it, and attention "fastbert") runs where a
      head reads padding positions (some row starts with padding, per-token labels at padding positions,
      *ForQuestionAnswering: unpad is off for it), and for everything it does not take: given
      position_ids other than arange or a packing, 4D or dict masks, output_hidden_states /
      output_attentions, torch.compile / jit tracing, unknown keyword arguments, rope tables that are not
      the full head dim. Its class keeps the stock __name__ (save_pretrained's "architectures").
On the Triton path each plain layer runs as ONE autograd node (fastbert.ops.run_modern_block: the same
kernels, one hand-written backward), which cuts the host time per layer; elsewhere op by op as above.
A layer whose modules are not the plain ones (a hook, a wrapped Linear, gradient checkpointing) is
called as a module on the unpadded [1, T, hidden] tokens, with per-token rotary tables and the
variable-length keywords, so fastbert's attention function (fastbert.hf.attention, which takes
transformers' `sliding_window`) keeps it variable-length and windowed.
"""

import functools
import importlib
import inspect

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from fastbert import ops

from . import compat
from .attention import NAME, _collector, wants_attentions
from .layers import _capture_hook
from .modules import (
    _VARLEN,
    FAMILY_NAMES,
    FUSED,
    ROLE,
    _dropout_p,
    _plain,
    _real_positions,
    _scatter,
    gelu_form,
    padding_plan,
)

MODULE = "transformers.models.modernbert.modeling_modernbert"


def _hooked(m):
    """Hooks other than transformers' output-capture hooks (which record nothing while no capture runs)."""
    if m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks or "forward" in m.__dict__:
        return True
    return any(not _capture_hook(fn) for fn in m._forward_hooks.values())


def _norm_ok(ln):
    return (_plain(ln, nn.LayerNorm) and ln.weight is not None and len(ln.normalized_shape) == 1)


def _norm(ln, x, residual=None):
    """fastbert.ops.layer_norm of x (+ residual): y, or (y, x + residual)."""
    return ops.layer_norm(x.contiguous(), ln.weight, ln.bias, ln.eps,
                          residual=None if residual is None else residual.contiguous())


class _EmbeddingsMixin:
    """forward(input_ids, inputs_embeds) = drop(norm(inputs_embeds or tok_embeddings(input_ids))), the
    norm fused."""

    def forward(self, *args, **kwargs):
        a = compat.bind(self._fastbert_stock.forward, args, kwargs)
        if a is None or not a.keys() <= {"input_ids", "inputs_embeds"} or not _norm_ok(self.norm):
            return super().forward(*args, **kwargs)
        x = a.get("inputs_embeds")
        if x is None:
            if a.get("input_ids") is None or not _plain(self.tok_embeddings, nn.Embedding):
                return super().forward(*args, **kwargs)
            x = self.tok_embeddings(a["input_ids"])
        return self.drop(_norm(self.norm, x))


class _GegluMixin:
    """forward(h) = Wo(drop(act(a) * g)), a, g = Wi(h).chunk(2): the GELU, the product and the dropout as
    one fastbert.ops.geglu."""

    def forward(self, hidden_states):
        inner = self._fastbert_inner(hidden_states)
        if inner is None:
            return super().forward(hidden_states)
        return self.Wo(inner)

    def _fastbert_inner(self, x):
        form, wi, p = gelu_form(self.act), self.Wi, _dropout_p(self, self.drop)
        if form is None or p is None or not _plain(wi, nn.Linear) or wi.out_features % 2:
            return None
        return ops.geglu(F.linear(x, wi.weight), wi.bias, form, dropout_p=p)


_LAYER_OWN = ("hidden_states", "attention_mask", "position_embeddings")


class _LayerMixin:
    """forward(hidden_states, attention_mask, position_embeddings, **kwargs) with each residual add fused
    into the LayerNorm after it (the attention through the attention module, as stock)."""

    def forward(self, *args, **kwargs):
        a = compat.bind(self._fastbert_stock.forward, args, kwargs)
        if a is None or not self._fastbert_norms():
            return super().forward(*args, **kwargs)
        rest = {k: v for k, v in a.items() if k not in _LAYER_OWN}
        rest.update(rest.pop("kwargs", None) or {})

        def attend(attn, x):
            return attn(x, position_embeddings=a.get("position_embeddings"),
                        attention_mask=a.get("attention_mask"), **rest)[0]

        delta, h = self._fastbert_step(None, a["hidden_states"], attend)
        return h + delta

    def _fastbert_norms(self):
        return ((type(self.attn_norm) is nn.Identity or _norm_ok(self.attn_norm)) and _norm_ok(self.mlp_norm)
                and not _hooked(self.attn_norm) and not _hooked(self.mlp_norm))

    def _fastbert_step(self, delta, res, attend):
        """The layer on hidden = res + delta (delta None: hidden = res); returns (delta', res'), the
        output being res' + delta' (the caller fuses that add into the next LayerNorm)."""
        if type(self.attn_norm) is nn.Identity:
            x = res if delta is None else res + delta
            a_in = x
        elif delta is None:
            x, a_in = res, _norm(self.attn_norm, res)
        else:
            a_in, x = _norm(self.attn_norm, delta, res)
        m_in, h = _norm(self.mlp_norm, attend(self.attn, a_in), x)
        mlp = self.mlp
        inner = None
        if isinstance(mlp, _GegluMixin) and not _hooked(mlp) and _plain(mlp.Wo, nn.Linear):
            inner = mlp._fastbert_inner(m_in)
        return (mlp(m_in) if inner is None else mlp.Wo(inner)), h


# the model's arguments the fused forward takes; anything else goes to the stock forward
_MODEL_ARGS = frozenset({"input_ids", "attention_mask", "position_ids", "inputs_embeds", "return_dict",
                         "output_hidden_states", "output_attentions", "num_items_in_batch"})


def _restarts(position_ids):
    """cu_seqlens (int32) and max length of a [1, T] row of positions 0, 1, ..., 0, 1, ... (each sequence
    counted from 0), or None when the row is not that. One host sync."""
    pos = position_ids.reshape(-1)
    total = pos.numel()
    if total == 0:
        return None
    prev = torch.cat([pos.new_full((1,), -1), pos[:-1]])
    ok = ((pos == 0) | (pos == prev + 1)).all() & (pos[0] == 0)
    starts = (pos == 0).nonzero().squeeze(1)
    if not bool(ok):
        return None
    cu = torch.cat([starts, starts.new_tensor([total])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


class _ModelMixin:
    """ModernBertModel.forward(input_ids, attention_mask, position_ids, inputs_embeds, **kwargs) on the
    real tokens only (see the module docstring), else the stock forward."""

    def forward(self, *args, **kwargs):
        if torch.compiler.is_compiling() or torch.jit.is_tracing():  # the stock forward (padded layout)
            return super().forward(*args, **kwargs)  # before the __dict__ pop (dynamo < 2.13)
        labels_at_padding = self.__dict__.pop("_fastbert_labels_at_padding", None)
        a = compat.bind(self._fastbert_stock.forward, args, kwargs)
        if a is not None:
            a.update(a.pop("kwargs", None) or {})
        flash = {k: a.pop(k) for k in _VARLEN if a is not None and k in a}  # DataCollatorWithFlattening's
        if a is None or not self._fastbert_applies(a):
            return super().forward(*args, **kwargs)
        mask, position_ids = a.get("attention_mask"), a.get("position_ids")
        embeds = a.get("inputs_embeds")
        tokens = a["input_ids"] if embeds is None else embeds  # [B, S] ids or [B, S, N] embeddings
        batch, seq = tokens.shape[:2]
        ids = tokens.reshape(batch * seq, *tokens.shape[2:])  # [B*S] or [B*S, N]
        run = functools.partial(self._fastbert_run, embeds=embeds is not None)
        if flash and (batch != 1 or mask is not None or position_ids is None):
            return super().forward(*args, **kwargs)
        if position_ids is not None:
            if batch == 1 and mask is None:
                packed = _restarts(position_ids)
                if packed is None or any(flash.get(k) is not None and not torch.equal(
                        flash[k].to(packed[0].device, torch.int32), packed[0]) for k in _VARLEN[:2]):
                    return super().forward(*args, **kwargs)  # boundaries other than the positions'
                out = run(ids, *packed, packed[1], position_ids.reshape(-1))
                return self._fastbert_output(out.unsqueeze(0), a)
            if position_ids.shape[-1] != seq or not torch.equal(
                    position_ids, torch.arange(seq, device=position_ids.device).expand_as(position_ids)):
                return super().forward(*args, **kwargs)
        if mask is None:
            cu = torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32, device=ids.device)
            out = run(ids, cu, seq, seq, None)
            return self._fastbert_output(out.view(batch, seq, -1), a)
        mask = mask.bool()
        cu, total, max_len, keep_padded = padding_plan(mask, labels_at_padding)
        if keep_padded:
            return super().forward(*args, **kwargs)  # a head reads padding positions: keep them
        if total == batch * seq:
            out = run(ids, cu, seq, seq, None)
            return self._fastbert_output(out.view(batch, seq, -1), a)
        index = _real_positions(mask.reshape(-1), total)
        out = run(ids.index_select(0, index), cu, max_len, seq, index % seq)
        return self._fastbert_output(_scatter(out, index, batch, seq), a)

    def _fastbert_applies(self, a):
        cfg = self.config
        ids, embeds, mask = a.get("input_ids"), a.get("inputs_embeds"), a.get("attention_mask")
        if (ids is None) == (embeds is None):
            return False  # the stock forward raises its error
        tokens = ids if embeds is None else embeds
        return (cfg._attn_implementation == NAME and a.keys() <= _MODEL_ARGS
                and isinstance(tokens, torch.Tensor) and tokens.dim() == (2 if embeds is None else 3)
                and (mask is None or (isinstance(mask, torch.Tensor) and mask.shape == tokens.shape[:2]
                                      and not mask.is_floating_point()))
                and not a.get("output_hidden_states", cfg.output_hidden_states)
                and not a.get("output_attentions", cfg.output_attentions)
                and not wants_attentions(cfg, a) and not _collector()
                and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
                and not _hooked(self.rotary_emb) and len(self.layers) > 0)

    def _fastbert_output(self, h, a):
        out = BaseModelOutput(last_hidden_state=h)
        as_tuple = a.get("return_dict", getattr(self.config, "return_dict", True)) is False
        return out.to_tuple() if as_tuple else out

    def _fastbert_tables(self, h, positions):
        """{layer type: (cos, sin)} rotary tables [P, head_dim / 2] from the model's own rotary module for
        positions 0 .. positions - 1 (stock's call, so scaled RoPE types keep their numbers), or None
        when they do not cover the head dim."""
        pos = torch.arange(positions, device=h.device)[None]
        tables = {}
        dim = self.config.hidden_size // self.config.num_attention_heads
        for layer_type in sorted({layer.attention_type for layer in self.layers}):
            cos, sin = self.rotary_emb(h, pos, layer_type)
            if cos.shape[-1] != dim:
                return None
            tables[layer_type] = (cos[0], sin[0])  # [P, D]: cat(freqs, freqs) -> the first half
        return tables

    def _fastbert_run(self, ids, cu, max_len, positions, token_pos, embeds=False):
        """ids [T] real tokens (embeds: [T, N] input embeddings) of sequences cu (int32 [B+1], the
        longest max_len; token t at position token_pos[t], or t - cu[b] when None) ->
        final_norm(encoder(embeddings(ids))) [T, hidden]."""
        h = self.embeddings(**{"inputs_embeds" if embeds else "input_ids": ids[None]})[0]  # [T, N]
        full = self._fastbert_tables(h, max(positions, max_len))
        if full is None:  # cannot happen for stock ModernBERT: a loud error beats a wrong number
            raise RuntimeError("fastbert: ModernBERT rotary tables do not cover the head dim")
        half = full[next(iter(full))][0].shape[1] // 2
        halves = {k: (c[:, :half].float().contiguous(), s[:, :half].float().contiguous())
                  for k, (c, s) in full.items()}
        per_token = {}

        def token_tables(layer_type):
            if layer_type not in per_token:
                pos = token_pos
                if pos is None:
                    seg = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device),
                                                  (cu[1:] - cu[:-1]).long(), output_size=ids.shape[0])
                    pos = torch.arange(ids.shape[0], device=cu.device) - cu[:-1].long()[seg]
                c, s = full[layer_type]
                per_token[layer_type] = (c[pos][None], s[pos][None])
            return per_token[layer_type]

        varlen = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max_len, "max_length_k": max_len}
        delta, res = None, h
        for layer in self.layers:
            layer_type = layer.attention_type
            if self._fastbert_fusable(layer):
                cos, sin = halves[layer_type]
                fused = _fused_layer(layer, res, delta, cos, sin, cu, max_len)
                if fused is not None:  # the layer as one autograd node (fastbert.ops.modern_block)
                    res, delta = fused
                    continue

                def attend(attn, x, cos=cos, sin=sin):
                    return _attend(attn, x, cos, sin, cu, max_len)

                delta, res = layer._fastbert_step(delta, res, attend)
            else:
                x = res if delta is None else res + delta
                tables = token_tables(layer_type)
                res = layer(x[None], attention_mask=None, position_embeddings=tables, **varlen)[0]
                delta = None
        ln = self.final_norm
        if _norm_ok(ln) and not _hooked(ln):
            return _norm(ln, res) if delta is None else _norm(ln, delta, res)[0]
        return ln(res if delta is None else res + delta)

    def _fastbert_fusable(self, layer):
        # the modules through their _modules dicts: nn.Module.__getattr__ costs about a microsecond a lookup
        if not isinstance(layer, _LayerMixin) or _hooked(layer) or not layer._fastbert_norms():
            return False
        if layer.__dict__.get("gradient_checkpointing", False) and layer.training:
            return False
        attn = layer._modules.get("attn")
        if type(attn) is not _ATTENTION or _hooked(attn):
            return False
        am = attn._modules
        wqkv, wo, drop = am["Wqkv"], am["Wo"], am["out_drop"]
        return (_plain(wqkv, nn.Linear) and _plain(wo, nn.Linear) and type(drop) in (nn.Identity, nn.Dropout)
                and not _hooked(drop) and wqkv.out_features == 3 * wo.in_features
                and wo.in_features % attn.head_dim == 0)


def _fused_layer(layer, res, delta, cos, sin, cu, max_len):
    """The layer through fastbert.ops.run_modern_block: (res', delta'), or None where it does not apply
    (its modules not the plain ones it computes, or the inputs it does not take). The caller has checked
    _fastbert_fusable (the attention's and the norms' modules)."""
    lm = layer._modules
    attn, mlp, norm_a, norm_m = lm["attn"], lm["mlp"], lm["attn_norm"], lm["mlp_norm"]
    if not isinstance(mlp, _GegluMixin) or _hooked(mlp):
        return None
    mm, am = mlp._modules, attn._modules
    wi, wo2, drop = mm.get("Wi"), mm.get("Wo"), am["out_drop"]
    if not (_plain(wi, nn.Linear) and _plain(wo2, nn.Linear) and wi.out_features == 2 * wo2.in_features):
        return None
    form, pf = gelu_form(mm.get("act")), _dropout_p(mlp, mm.get("drop"))
    pa = float(attn.attention_dropout) if attn.training else 0.0
    # transformers' out_drop: Dropout(attention_dropout), or Identity when that is 0
    if form is None or pf is None or (type(drop) is nn.Dropout and (drop.p != attn.attention_dropout
                                                                      or drop.training != attn.training)):
        return None
    if type(drop) is nn.Identity and pa > 0.0:
        return None
    wqkv, wo = am["Wqkv"]._parameters, am["Wo"]._parameters
    na = None if type(norm_a) is nn.Identity else norm_a._parameters  # layer 0: Identity
    nm, wip, wop = norm_m._parameters, wi._parameters, wo2._parameters
    params = (None if na is None else na["weight"], None if na is None else na["bias"], wqkv["weight"],
              wqkv["bias"], wo["weight"], wo["bias"], nm["weight"], nm["bias"], wip["weight"], wip["bias"],
              wop["weight"], wop["bias"])
    window = attn.sliding_window - 1 if attn.sliding_window is not None else None
    heads = am["Wo"].in_features // attn.head_dim
    return ops.run_modern_block(res, delta, params, heads, cos, sin, window, pa, pf,
                                norm_m.eps if na is None else norm_a.eps, norm_m.eps, form, cu, max_len)


def _attend(attn, x, cos, sin, cu, max_len):
    """ModernBertAttention on x [T, hidden] (varlen cu, max_len): Wqkv, rotary on the packed
    projection, windowed attention, Wo, out_drop."""
    total = x.shape[0]
    heads = attn.Wo.in_features // attn.head_dim
    qkv = ops.rotary(attn.Wqkv(x).view(total, 3, heads, attn.head_dim), cos, sin, cu, max_len)
    q, k, v = qkv.unbind(1)
    window = attn.sliding_window - 1 if attn.sliding_window is not None else None
    p = float(attn.attention_dropout) if attn.training else 0.0
    o = ops.attention(q, k, v, dropout_p=p, scale=attn.head_dim ** -0.5, cu_seqlens=cu, max_seqlen=max_len,
                      window=window)
    return attn.out_drop(attn.Wo(o.reshape(total, -1)))


_PARTS = {"ModernBertEmbeddings": (_EmbeddingsMixin, "embeddings"),
          "ModernBertMLP": (_GegluMixin, "bias_gelu"),
          "ModernBertEncoderLayer": (_LayerMixin, "layer_norm"),
          "ModernBertModel": (_ModelMixin, "unpad")}
_ATTENTION = None  # the stock ModernBertAttention


def _structure_known(modeling):
    """The ModernBERT layout this file computes (transformers >= 5.x where the layers take
    position_embeddings and the attention calls the attention interface with sliding_window)."""
    names = ("ModernBertAttention", "ModernBertEncoderLayer", "ModernBertModel")
    attn, layer, model = (getattr(modeling, n, None) for n in names)
    if attn is None or layer is None or model is None or not hasattr(modeling, "ALL_ATTENTION_FUNCTIONS"):
        return False
    try:
        layer_args = list(inspect.signature(layer.forward).parameters)
        attn_args = list(inspect.signature(attn.forward).parameters)
        model_args = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover
        return False
    return (layer_args[:4] == ["self", "hidden_states", "attention_mask", "position_embeddings"]
            and attn_args[:4] == ["self", "hidden_states", "position_embeddings", "attention_mask"]
            and model_args[:5] == ["self", "input_ids", "attention_mask", "position_ids", "inputs_embeds"]
            and "sliding_window" in inspect.getsource(attn.__init__))


def _model_attrs(stock):
    """What the fused model class takes from the stock one so that transformers treats it as the stock
    class: the forward's signature (models are inspected for inputs_embeds, output_attentions, ...) and
    the class-level checks that read the class's module (is_custom_code: a class outside transformers.*
    counts as remote code and gets another weight initialisation; the attention-interface heuristics)."""

    def forward(self, *args, **kwargs):
        return _ModelMixin.forward(self, *args, **kwargs)

    forward.__signature__ = inspect.signature(stock.forward)
    forward.__doc__ = stock.forward.__doc__
    attrs = {"forward": forward}
    for name in ("is_custom_code", "_can_set_attn_implementation", "_can_set_experts_implementation"):
        if callable(getattr(stock, name, None)):
            attrs[name] = classmethod(lambda cls, _name=name: getattr(cls._fastbert_stock, _name)())
    return attrs


def _share_capture_registry(stock, cls):
    """transformers' output capture (output_hidden_states / output_attentions on the stock forward) reads
    what a model records from a registry keyed on str(model.__class__), filled at construction: give the
    fused class the stock class's entry."""
    try:
        from transformers.utils import output_capturing
    except ImportError:  # pragma: no cover - a transformers without capture hooks
        return
    registry = getattr(output_capturing, "_CAN_RECORD_REGISTRY", None)
    record = getattr(stock, "_can_record_outputs", None)
    if isinstance(registry, dict) and (record is None or isinstance(record, dict)):
        dict.__setitem__(registry, str(cls), record)


def _register():
    global _ATTENTION
    try:
        modeling = importlib.import_module(MODULE)
    except ImportError:  # pragma: no cover - a transformers without ModernBERT
        return
    if not _structure_known(modeling):
        return  # transformers 5.0: the older ModernBERT (its own unpadding), left stock
    _ATTENTION = modeling.ModernBertAttention
    for stock_name, (mixin, role) in _PARTS.items():
        stock = getattr(modeling, stock_name)
        name = "Fast" + stock_name
        attrs = {"__module__": __name__, "__qualname__": name, "_fastbert_stock": stock}
        if stock_name == "ModernBertModel":
            attrs.update(_model_attrs(stock))
        # the model keeps the stock __name__: save_pretrained writes it as the checkpoint's architecture
        cls = type(stock_name if stock_name == "ModernBertModel" else name, (mixin, stock), attrs)
        globals()[name] = cls
        if stock_name == "ModernBertModel":
            _share_capture_registry(stock, cls)
        FUSED[stock] = cls
        ROLE[cls] = role
    FAMILY_NAMES.append("ModernBERT")


_register()
