"""Fused forwards for transformers' BERT-family modules, as subclasses of the stock classes.

patch_hf swaps a module's __class__ to the subclass here (FastBertSelfOutput for BertSelfOutput, ...),
so the module stays an instance of the stock class (transformers' output capture matches with
isinstance), keeps its parameters and state_dict keys, and pickles by reference to this module
(torch.save/load, copy.deepcopy). unpatch_hf swaps the stock class back.

Each fused forward checks its submodules at call time and takes the stock forward (super().forward)
when one is not a plain nn.Linear / nn.LayerNorm / nn.Embedding / nn.Dropout (a PEFT/LoRA wrapper, a
quantized layer), so their effect is never lost:
  *SelfOutput, *Output   LayerNorm(dropout(dense(h)) + input) -> fastbert.ops.layer_norm(dense(h), ...,
                         residual=input, dropout_p=p): dropout, residual add and LayerNorm in one op
  *Intermediate          act(dense(h)) -> fastbert.ops.bias_gelu(h @ W^T, b) for the GELU forms gelu,
                         gelu_python (erf), gelu_new, gelu_fast, gelu_pytorch_tanh (tanh)
  *Embeddings            word + position + token type, LayerNorm, dropout -> fastbert.ops.embed
                         (inputs_embeds, or a cache offset with RoBERTa, take the stock path)
  *Encoder               unpads once: a padded batch runs every layer on the [1, T, hidden] real tokens
                         with varlen attention and is scattered back to [B, S, hidden] (zeros at padding)
"""

import importlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import activations
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPastAndCrossAttentions

from fastbert import ops

from . import compat
from .attention import NAME, _collector, packed_cu_seqlens, wants_attentions
from .layers import BERT_LAYOUT, DISTILBERT_LAYOUT, Layout, fused_layer
from .layers import register as register_layer


def _plain(module, kind):
    return type(module) is kind and not module._forward_hooks and not module._forward_pre_hooks


def _dropout_p(module, dropout):
    if not module.training:
        return 0.0
    return float(dropout.p) if type(dropout) is nn.Dropout else None


def _gelu_forms():
    forms = {}
    for name, form in (("GELUActivation", "none"), ("NewGELUActivation", "tanh"),
                       ("FastGELUActivation", "tanh"), ("GELUTanh", "tanh"), ("PytorchGELUTanh", "tanh")):
        cls = getattr(activations, name, None)
        if isinstance(cls, type):
            forms[cls] = form
    return forms


_GELU = _gelu_forms()


def gelu_form(act):
    """"none" / "tanh" when act is one of transformers' GELU modules fastbert.ops.bias_gelu computes."""
    return _GELU.get(type(act))


class _AddNormMixin:
    """forward(hidden_states, input_tensor) = LayerNorm(dropout(dense(hidden_states)) + input_tensor)."""

    def forward(self, hidden_states, input_tensor):
        ln, p = self.LayerNorm, _dropout_p(self, self.dropout)
        if (p is None or not _plain(self.dense, nn.Linear) or not _plain(ln, nn.LayerNorm)
                or ln.weight is None or ln.bias is None or len(ln.normalized_shape) != 1):
            return super().forward(hidden_states, input_tensor)
        x = self.dense(hidden_states)
        y, _ = ops.layer_norm(x.contiguous(), ln.weight, ln.bias, ln.eps, residual=input_tensor.contiguous(),
                              dropout_p=p)
        return y


class _BiasGeluMixin:
    """forward(hidden_states) = gelu(dense(hidden_states)): matmul without bias, then bias + GELU fused."""

    def forward(self, hidden_states):
        form = gelu_form(self.intermediate_act_fn)
        dense = self.dense
        if form is None or not _plain(dense, nn.Linear) or dense.bias is None:
            return super().forward(hidden_states)
        return ops.bias_gelu(F.linear(hidden_states, dense.weight), dense.bias, form)


class _FFNMixin:
    """forward(input) = dropout(lin2(act(lin1(input)))) (DistilBERT's FFN): bias + GELU fused as above."""

    def forward(self, input):
        inner = self._fastbert_inner(input)
        if inner is None:
            return super().forward(input)
        return self.dropout(self.lin2(inner))

    def _fastbert_inner(self, x):
        """gelu(lin1(x)) through fastbert.ops.bias_gelu, or None where that is not the module's math."""
        form, lin1 = gelu_form(self.activation), self.lin1
        if self.chunk_size_feed_forward or form is None or not _plain(lin1, nn.Linear) or lin1.bias is None:
            return None
        return ops.bias_gelu(F.linear(x, lin1.weight), lin1.bias, form)


def _plain_norm(ln):
    return (_plain(ln, nn.LayerNorm) and ln.weight is not None and ln.bias is not None
            and len(ln.normalized_shape) == 1)


class _BlockNormsMixin:
    """DistilBERT's TransformerBlock, forward(hidden_states, attention_mask, **kwargs):
        h = sa_layer_norm(attention(x) + x);  y = output_layer_norm(ffn(h) + h)
    each residual add + LayerNorm as one fastbert.ops.layer_norm, the FFN's closing dropout folded into
    the second when the FFN is the fused one above."""

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        ln1, ln2, ffn = self.sa_layer_norm, self.output_layer_norm, self.ffn
        if not (_plain_norm(ln1) and _plain_norm(ln2)) or "forward" in self.__dict__:
            return super().forward(hidden_states, attention_mask, **kwargs)
        attn, _ = self.attention(hidden_states, attention_mask=attention_mask, **kwargs)
        h, _ = ops.layer_norm(attn.contiguous(), ln1.weight, ln1.bias, ln1.eps,
                              residual=hidden_states.contiguous())
        inner = p = None
        if isinstance(ffn, _FFNMixin) and not ffn._forward_hooks and not ffn._forward_pre_hooks:
            p = _dropout_p(ffn, ffn.dropout)
            if p is not None and _plain(ffn.lin2, nn.Linear):
                inner = ffn._fastbert_inner(h)
        if inner is None:
            x, p = ffn(h), 0.0
        else:
            x = ffn.lin2(inner)
        y, _ = ops.layer_norm(x.contiguous(), ln2.weight, ln2.bias, ln2.eps, residual=h, dropout_p=p)
        return y


class _ZeroRowGrad(torch.autograd.Function):
    """Identity on a table whose row `row` gets no gradient (nn.Embedding(padding_idx=row))."""

    @staticmethod
    def forward(ctx, weight, row):
        ctx.row = row
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        grad[ctx.row] = 0
        return grad, None


class _EmbedMixin:
    """forward(input_ids, token_type_ids, position_ids, inputs_embeds, <cache length>) in fastbert.ops.embed
    (the cache length's name is the release's: compat.CACHE_LENGTH)."""

    _roberta_positions = False

    def forward(self, *args, **kwargs):
        a = compat.bind(self._fastbert_stock.forward, args, kwargs)
        if a is None or not a.keys() <= _EMBED_ARGS:
            return super().forward(*args, **kwargs)
        input_ids, token_type_ids = a.get("input_ids"), a.get("token_type_ids")
        position_ids = a.get("position_ids")
        cache_length = compat.first(a, compat.CACHE_LENGTH, 0)
        p = _dropout_p(self, self.dropout)
        word, pos_table, ln = self.word_embeddings, self.position_embeddings, self.LayerNorm
        tt = self._modules.get("token_type_embeddings")  # DistilBERT has none
        tables = (word, pos_table) if tt is None else (word, pos_table, tt)
        if (p is None or a.get("inputs_embeds") is not None or a.get("input_embeds") is not None
                or input_ids is None or input_ids.dim() != 2 or not isinstance(cache_length, int)
                or not all(_plain(m, nn.Embedding) for m in tables)
                or not _plain(ln, nn.LayerNorm) or ln.weight is None or ln.bias is None
                or any(m.weight.dtype != ln.weight.dtype for m in tables)):
            return super().forward(*args, **kwargs)
        batch, seq = input_ids.shape
        if position_ids is None:
            if self._roberta_positions:
                position_ids = self.create_position_ids_from_input_ids(input_ids, self.padding_idx,
                                                                       cache_length)
            else:
                position_ids = self.position_ids[:, cache_length: seq + cache_length]
        if tt is None:
            pass
        elif token_type_ids is None:
            if hasattr(self, "token_type_ids"):
                buffered = self.token_type_ids.to(position_ids.device).expand(position_ids.shape[0], -1)
                token_type_ids = torch.gather(buffered, 1, position_ids).expand(batch, seq)
            else:
                token_type_ids = torch.zeros_like(input_ids)
        if position_ids.dim() == 2 and position_ids.shape[0] == 1:
            position_ids = position_ids[0]  # [S], shared by every row
        pos_weight = pos_table.weight
        if pos_table.padding_idx is not None and pos_weight.requires_grad:
            pos_weight = _ZeroRowGrad.apply(pos_weight, pos_table.padding_idx)
        segments = None if tt is None else token_type_ids.expand(batch, seq)
        return ops.embed(input_ids, word.weight, pos_weight, segments, None if tt is None else tt.weight,
                         position_ids=position_ids, ln_weight=ln.weight, ln_bias=ln.bias, eps=ln.eps,
                         dropout_p=p, padding_idx=word.padding_idx,
                         segment_padding_idx=None if tt is None else tt.padding_idx)


_EMBED_ARGS = frozenset({"input_ids", "token_type_ids", "position_ids", "inputs_embeds", "input_embeds",
                         *compat.CACHE_LENGTH})


def _real_positions(valid, total):
    """Flat indices of the True entries of valid [B*S]; total (their count, known) spares nonzero's sync."""
    if hasattr(torch, "nonzero_static"):
        try:
            return torch.nonzero_static(valid, size=total).squeeze(1)
        except (NotImplementedError, RuntimeError):  # a device without it
            pass
    return valid.nonzero().squeeze(1)


def padding_plan(mask, labels_at_padding=None):
    """(cu_seqlens int32 [B+1], real tokens, longest row, keep_padded) of a right-padded bool mask
    [B, S] in one host sync; keep_padded: some row starts with padding (left padding: heads read
    position 0) or labels_at_padding (a device flag) is set, so the padded layout must be kept."""
    lengths = mask.sum(1, dtype=torch.int32)
    cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    checks = [cu[-1], lengths.max(), mask[:, 0].all().to(torch.int32)]
    if labels_at_padding is not None:
        checks.append(labels_at_padding.to(torch.int32))
    total, max_len, first_real, *labels = torch.stack(checks).tolist()  # the one host sync
    return cu, total, max_len, not first_real or any(labels)


def _scatter(h, index, batch, seq):
    """[1, T, N] or [T, N] real tokens -> [B, S, N] with zeros at padding."""
    h = h.reshape(-1, h.shape[-1])
    return h.new_zeros(batch * seq, h.shape[-1]).index_copy(0, index, h).view(batch, seq, -1)


# the encoder arguments the fused forward reads itself; every other keyword goes on to the layers
_ENCODER_OWN = frozenset({"hidden_states", "attention_mask", "encoder_hidden_states",
                          "encoder_attention_mask", "use_cache", "cache_position", "output_attentions",
                          "output_hidden_states", "return_dict", "position_ids", *compat.CACHE})
_VARLEN = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


class _UnpadEncoderMixin:
    """forward(hidden_states, attention_mask, ...) with every layer as one fused block where it can
    (fastbert.hf.layers), on the real tokens only (varlen) when the batch is padded.

    The layout a batch runs in:
      - packed [1, T] input (DataCollatorWithFlattening): varlen from its cu_seq_lens_q/max_length_q
        (no host sync) or from position_ids that restart (one sync to find the boundaries);
      - no padding: the dense [B, S] layout as it is;
      - right padding: unpadded once to [T, hidden], scattered back after the last layer (zeros at
        padding positions); one host sync reads the token count and the longest row;
      - the padded layout (stock layers, fastbert attention with a key padding mask) when a head would
        read a padding position: some row starts with padding (left padding: the pooler and the
        classification heads read position 0), or per-token labels other than -100 sit at padding
        positions (the top model's pre-forward hook, fastbert.hf.patch, hands them over). Both are
        part of the same one sync.
    """

    def forward(self, *args, **kwargs):
        if torch.compiler.is_compiling():  # the padded layout (below); dynamo < 2.13 traces no __dict__.pop
            return super().forward(*args, **kwargs)
        labels_at_padding = self.__dict__.pop("_fastbert_labels_at_padding", None)
        a = compat.bind(self._fastbert_stock.forward, args, kwargs)
        if a is None or not self._fastbert_applies(a):
            return super().forward(*args, **kwargs)
        hidden_states, attention_mask = a["hidden_states"], a.get("attention_mask")
        layer_kwargs = {k: v for k, v in a.items() if k not in _ENCODER_OWN}
        if layer_kwargs.get("kwargs"):  # a release whose forward names **kwargs differently
            return super().forward(*args, **kwargs)
        batch, seq, hidden = hidden_states.shape
        if attention_mask is None:
            if batch == 1 and layer_kwargs.get("cu_seq_lens_q") is not None:
                cu, max_len = layer_kwargs["cu_seq_lens_q"], layer_kwargs.get("max_length_q")
                k = layer_kwargs.get("cu_seq_lens_k")
                if max_len is None or (k is not None and k is not cu and not torch.equal(k, cu)):
                    return super().forward(*args, **kwargs)
                out = self._fastbert_layers(hidden_states[0], layer_kwargs, cu.to(torch.int32), int(max_len))
                return self._fastbert_output(out.unsqueeze(0))
            packed = None
            if batch == 1 and a.get("position_ids") is not None:
                packed = packed_cu_seqlens(a["position_ids"])
            if packed is not None:
                out = self._fastbert_layers(hidden_states[0], layer_kwargs, *packed)
                return self._fastbert_output(out.unsqueeze(0))
            return self._fastbert_output(self._fastbert_layers(hidden_states, layer_kwargs, None, None))
        if attention_mask.dim() != 2 or attention_mask.dtype != torch.bool:
            return super().forward(*args, **kwargs)
        cu, total, max_len, keep_padded = padding_plan(attention_mask, labels_at_padding)
        if keep_padded:
            return super().forward(*args, **kwargs)  # a head reads padding positions: keep them
        if total == batch * seq:  # no padding: the dense layout as it is
            return self._fastbert_output(self._fastbert_layers(hidden_states, layer_kwargs, None, None))
        index = _real_positions(attention_mask.reshape(-1), total)
        packed = hidden_states.reshape(batch * seq, hidden).index_select(0, index)  # [T, N]
        collected = _collector()
        captured = collected.get("hidden_states") if collected is not None else None
        first = len(captured) if captured is not None else 0
        out = self._fastbert_layers(packed, layer_kwargs, cu, max_len)
        if captured is not None:  # hidden states the capture hooks took on the packed layout
            for i in range(first, len(captured)):
                if captured[i] is not None:
                    captured[i] = hidden_states if i == 0 else _scatter(captured[i], index, batch, seq)
        return self._fastbert_output(_scatter(out, index, batch, seq))

    def _fastbert_applies(self, a):
        cfg = _config_of(self)
        h = a.get("hidden_states")
        return (cfg is not None and cfg._attn_implementation == NAME and not getattr(cfg, "is_decoder", False)
                and a.get("encoder_hidden_states") is None and compat.first(a, compat.CACHE) is None
                and not a.get("use_cache") and isinstance(h, torch.Tensor) and h.dim() == 3
                and not a.get("output_hidden_states") and not a.get("output_attentions")
                and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
                and not wants_attentions(cfg, a)
                # transformers 5.0 records hidden states by replacing the layers' forward per call
                and not any("forward" in layer.__dict__ for layer in self.layer))

    def _fastbert_layers(self, h, layer_kwargs, cu, max_len):
        """h: [T, N] (varlen, cu/max_len given) or [B, S, N] (dense, no padding) through every layer:
        one fused block each where fastbert.hf.layers takes it, else the layer module."""
        collected = _collector()
        capturing = collected is not None and "hidden_states" in collected
        if cu is not None:
            layer_kwargs = dict(layer_kwargs, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_len,
                                max_length_k=max_len)
        else:
            layer_kwargs = {k: v for k, v in layer_kwargs.items() if k not in _VARLEN}
        for layer in self.layer:
            out = None if capturing else fused_layer(layer, h, gelu_form, cu, max_len)
            if out is None:  # the module: [1, T, N] for the varlen attention function
                out = layer(h.unsqueeze(0) if cu is not None else h, None, **layer_kwargs)
                out = out[0] if cu is not None else out
            h = out
        return h


    def _fastbert_output(self, h):
        return self._fastbert_output_class(last_hidden_state=h)


def _config_of(encoder):
    """The model config an encoder reads: its own, or (DistilBERT's Transformer has none) its first
    layer's attention's."""
    cfg = encoder.__dict__.get("config")
    if cfg is None:
        for m in encoder.layer[0].modules() if len(encoder.layer) else ():
            cfg = m.__dict__.get("config")
            if cfg is not None:
                break
    return cfg


# The families patch_hf knows, one row each: the modeling module, and for each stock class the part it
# plays (the fused subclass's mixin and the patch_hf flag that switches it). A family whose layer is
# BERT's (XLM-RoBERTa, CamemBERT, ELECTRA copy it under their own prefix) is `_bert_like(prefix)`;
# the layer class keeps its own class and runs as one fused block (fastbert.hf.layers) when its parts
# are the plain fused ones. DistilBERT has the same math under other names: its own parts and layout.
_PARTS = {  # part -> (mixin, role: the patch_hf flag)
    "add_norm": (_AddNormMixin, "layer_norm"), "bias_gelu": (_BiasGeluMixin, "bias_gelu"),
    "embeddings": (_EmbedMixin, "embeddings"), "unpad": (_UnpadEncoderMixin, "unpad"),
    "ffn": (_FFNMixin, "bias_gelu"), "block_norms": (_BlockNormsMixin, "layer_norm"),
}


class Family(NamedTuple):
    name: str  # as patch_hf's error names it
    module: str  # transformers.models.<module>.modeling_<module>
    prefix: str  # of its class names (fused classes: "Fast" + prefix + the rest)
    parts: dict  # stock class name -> part
    layer: str  # the layer class fastbert.hf.layers runs as one block (its fused subclass where it has one)
    layout: Layout
    stock: tuple  # per layout.stock path, the stock class name it must have
    output: type = BaseModelOutputWithPastAndCrossAttentions  # what the stock encoder returns


def _bert_like(name, module, prefix):
    parts = {prefix + "SelfOutput": "add_norm", prefix + "Output": "add_norm",
             prefix + "Intermediate": "bias_gelu", prefix + "Embeddings": "embeddings",
             prefix + "Encoder": "unpad"}
    return Family(name, module, prefix, parts, prefix + "Layer", BERT_LAYOUT,
                  (prefix + "Attention", prefix + "SelfAttention"))


FAMILIES = (
    _bert_like("BERT", "bert", "Bert"),
    _bert_like("RoBERTa", "roberta", "Roberta"),
    _bert_like("XLM-RoBERTa", "xlm_roberta", "XLMRoberta"),
    _bert_like("CamemBERT", "camembert", "Camembert"),
    _bert_like("ELECTRA", "electra", "Electra"),
    Family("DistilBERT", "distilbert", "DistilBert", {"Embeddings": "embeddings", "FFN": "ffn",
                                        "TransformerBlock": "block_norms", "Transformer": "unpad"},
           "TransformerBlock", DISTILBERT_LAYOUT, ("DistilBertSelfAttention",), BaseModelOutput),
)

FUSED = {}  # stock class -> fused subclass (module-level names, so pickle finds them)
ROLE = {}  # fused subclass -> "layer_norm" | "bias_gelu" | "embeddings" | "unpad"
FAMILY_NAMES = []  # the families this transformers release has


def _register(family):
    try:
        modeling = importlib.import_module(f"transformers.models.{family.module}.modeling_{family.module}")
    except ImportError:  # pragma: no cover - a transformers without this family
        return
    fused = {}
    for stock_name, part in family.parts.items():
        stock = getattr(modeling, stock_name)
        mixin, role = _PARTS[part]
        name = "Fast" + ("" if stock_name.startswith(family.prefix) else family.prefix) + stock_name
        attrs = {"__module__": __name__, "__qualname__": name, "_fastbert_stock": stock}
        if part == "embeddings":
            attrs["_roberta_positions"] = hasattr(stock, "create_position_ids_from_input_ids")
        if part == "unpad":
            attrs["_fastbert_output_class"] = family.output
        cls = type(name, (mixin, stock), attrs)
        globals()[name] = cls
        FUSED[stock] = fused[stock_name] = cls
        ROLE[cls] = role
    # the layer runs as one block when the parts on its way are the fused ones (so the patch_hf flags still
    # switch parts off) and the attention classes are stock
    layer = fused.get(family.layer) or getattr(modeling, family.layer)
    needed = {cls for n, cls in fused.items() if _PARTS[family.parts[n]][1] in ("layer_norm", "bias_gelu")}
    register_layer(layer, family.layout, [{getattr(modeling, n)} for n in family.stock], needed)
    FAMILY_NAMES.append(family.name)


for _family in FAMILIES:
    _register(_family)

