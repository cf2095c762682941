"""Pretraining heads with a sparse masked-LM head and a chunked, fused linear + cross-entropy.

The dense MLM head of bert_pytorch projects every position onto the vocabulary: [B*S, V] logits,
of which only the ~15% masked rows enter the loss. The sparse head gathers the M masked rows of the
encoder output first (h[positions], [M, N]), runs the prediction transform (preset "hf") on them,
and computes the projection and the cross-entropy chunk by chunk in `linear_cross_entropy`, which
never holds more than [chunk, V] logits: the gradient of each chunk is computed in the forward pass.

Math of linear_cross_entropy for rows h_i, labels y_i, logits z_i = W h_i + b:
  loss = sum_i (logsumexp(z_i) - z_i[y_i])
  dloss/dz_i = softmax(z_i) - onehot(y_i) =: g_i
  dloss/dh_i = W^T g_i ; dloss/dW = sum_i g_i h_i^T ; dloss/db = sum_i g_i
Backward multiplies these saved gradients by the incoming scalar gradient.

PretrainModel(cfg) holds `bert` (fastbert.Encoder), `next_sentence` and `mask_lm` with bert_pytorch's
BERTLM names (its state dict loads into bert_pytorch.model.BERTLM for preset "bert_pytorch"); preset
"hf" adds HF's pooler (dense + tanh on [CLS]) and prediction transform (dense, erf GELU, LayerNorm)
and ties the decoder weight to the token embedding, as BertForPreTraining does. Preset "modernbert" is
MLM only, as ModernBERT trains: `bert` is a fastbert.ModernEncoder, there is no NSP head (forward's nsp
is None), and the MLM head is ModernBertForMaskedLM's (dense without bias, GELU, bias-free LayerNorm,
decoder tied to the token embedding with its own bias), applied to the masked rows only.
"""

import torch
import torch.nn.functional as F
from torch import nn

from fastbert.models import build_encoder
from fastbert.models.bert import MaskedLanguageModel, NextSentencePrediction


def has_nsp(cfg):
    """Whether a model of this config trains next sentence prediction (not ModernBERT: MLM only)."""
    return cfg.preset != "modernbert"


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, labels, chunk):
        # h [M, N], weight [V, N], bias [V] or None, labels [M] int64 -> (loss sum fp32 [], correct [])
        dev = h.device.type
        if torch.is_autocast_enabled(dev):
            cdt = torch.get_autocast_dtype(dev)
        else:
            cdt = h.dtype
        need = ctx.needs_input_grad
        with torch.autocast(dev, enabled=False):
            w = weight.to(cdt)
            hc_all = h.to(cdt)
            loss = torch.zeros((), device=h.device, dtype=torch.float32)
            correct = torch.zeros((), device=h.device, dtype=torch.int64)
            grad_h = torch.empty_like(h) if need[0] else None
            grad_w = torch.zeros(weight.shape, device=h.device, dtype=torch.float32) if need[1] else None
            grad_b = (torch.zeros(bias.shape, device=h.device, dtype=torch.float32)
                      if bias is not None and need[2] else None)
            for s in range(0, h.shape[0], chunk):
                hc, y = hc_all[s:s + chunk], labels[s:s + chunk]
                z = hc @ w.t()
                if bias is not None:
                    z = z + bias.to(cdt)
                z = z.float()  # [c, V]
                lse = torch.logsumexp(z, dim=1)
                zy = z.gather(1, y[:, None]).squeeze(1)
                loss += (lse - zy).sum()
                correct += (z.argmax(1) == y).sum()
                if any(need[:3]):
                    g = torch.exp(z - lse[:, None])
                    g.scatter_add_(1, y[:, None], torch.full_like(zy[:, None], -1.0))
                    if grad_b is not None:
                        grad_b += g.sum(0)
                    g = g.to(cdt)
                    if grad_h is not None:
                        grad_h[s:s + chunk] = (g @ w).to(h.dtype)
                    if grad_w is not None:
                        grad_w += (g.t() @ hc).float()  # as autocast would: cdt matmul, fp32 sum
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.mark_non_differentiable(correct)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, grad_correct):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        gh = None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype)
        gw = None if grad_w is None else (grad_w * grad_loss).to(ctx.dtypes[0])
        gb = None if grad_b is None else (grad_b * grad_loss).to(ctx.dtypes[1])
        return gh, gw, gb, None, None


def linear_cross_entropy(h, weight, bias, labels, chunk=4096):
    """sum_i CE(h_i @ weight^T + bias, labels_i) and the count of argmax hits, without [M, V] logits.

    h [M, N], weight [V, N], bias [V] or None, labels [M] int64 in [0, V). Returns (loss_sum fp32
    scalar, correct int64 scalar).
    """
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"h {tuple(h.shape)} and weight {tuple(weight.shape)} do not match ([M, N], [V, N])")
    if labels.shape != h.shape[:1]:
        raise ValueError(f"labels {tuple(labels.shape)} must be [M] = [{h.shape[0]}]")
    if h.shape[0] == 0:
        zero = (h.sum() + weight.sum() * 0).float()
        return zero, torch.zeros((), dtype=torch.int64, device=h.device)
    return _LinearCrossEntropy.apply(h, weight, bias, labels.long(), int(chunk))


class PretrainModel(nn.Module):
    """Encoder + NSP head + MLM head; forward returns the summed losses and hit counts of a batch."""

    def __init__(self, cfg, sparse=True, chunk=4096):
        super().__init__()
        self.config, self.sparse, self.chunk = cfg, sparse, chunk
        self.bert = build_encoder(cfg)
        n = cfg.hidden
        self.hf = cfg.preset == "hf"
        self.modern = cfg.preset == "modernbert"
        self.nsp = has_nsp(cfg)
        if self.hf:
            self.pooler = nn.Linear(n, n)
        if self.hf or self.modern:  # the MLM prediction transform: dense, GELU, LayerNorm
            self.transform = nn.Linear(n, n, bias=cfg.bias)
            self.transform_norm = nn.LayerNorm(n, eps=cfg.layer_norm_eps, bias=cfg.norm_bias)
        if self.nsp:
            self.next_sentence = NextSentencePrediction(n)
        self.mask_lm = MaskedLanguageModel(n, cfg.vocab_size)
        if self.hf:
            for m in (self.pooler, self.transform, self.next_sentence.linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        if self.modern:  # ModernBERT's init of the head's dense layer (std 0.02 / sqrt(2 n_layers))
            std = 0.02 / (2.0 * cfg.n_layers) ** 0.5
            nn.init.trunc_normal_(self.transform.weight, std=std, a=-2 * std, b=2 * std)
        if self.hf or self.modern:
            nn.init.zeros_(self.mask_lm.linear.bias)
            self.mask_lm.linear.weight = self.bert.embedding.token.weight  # tied, as in HF

    def nsp_log_probs(self, h):
        if not self.nsp:
            return None
        cls = h[:, 0]
        if self.hf:
            cls = torch.tanh(self.pooler(cls))
        return F.log_softmax(self.next_sentence.linear(cls).float(), dim=-1)

    def mlm_rows(self, rows):
        if self.hf or self.modern:
            rows = self.transform_norm(F.gelu(self.transform(rows), approximate=self.config.gelu))
        return rows

    def forward(self, input_ids, segment_ids, positions, labels):
        """input_ids, segment_ids [B, S]; positions [M] flat indices of masked tokens; labels [M].

        Returns (mlm_loss_sum, mlm_correct, nsp_log_probs [B, 2], or None without an NSP head).
        segment_ids are not read by a ModernBERT model (it has no token types).
        """
        # padding (id pad_id) is masked out of attention in every preset (bert_pytorch's finds it itself)
        mask = None if self.config.preset == "bert_pytorch" else (input_ids != self.config.pad_id).long()
        h = self.bert(input_ids, None if self.modern else segment_ids, attention_mask=mask)  # [B, S, N]
        nsp = self.nsp_log_probs(h)
        flat = h.reshape(-1, h.shape[-1])
        lin = self.mask_lm.linear
        if self.sparse:
            rows = self.mlm_rows(flat.index_select(0, positions))  # [M, N]
            loss, correct = linear_cross_entropy(rows, lin.weight, lin.bias, labels, self.chunk)
        else:  # the dense head: log-probs of every position, then the masked rows
            logp = F.log_softmax(lin(self.mlm_rows(flat)).float(), dim=-1)  # [B*S, V]
            picked = logp.index_select(0, positions)
            loss = F.nll_loss(picked, labels, reduction="sum")
            correct = (picked.argmax(1) == labels).sum()
        return loss, correct, nsp


def flops_per_step(cfg, tokens, sum_len2, masked, sparse=True):
    """Model FLOPs (forward + backward = 3 x forward) of one step: matmuls of the encoder on the
    non-padding tokens, attention scores and values (4 L^2 N per layer and sequence), MLM head.
    ModernBERT: the GeGLU's input projection is twice as wide, and a local layer counts at most
    local_window + 1 keys per token (min(sum L^2, tokens * (local_window + 1)), an upper bound)."""
    n, i = cfg.hidden, cfg.intermediate
    glu = cfg.ffn == "geglu"
    per_token = 2 * cfg.n_layers * (4 * n * n + (3 if glu else 2) * n * i)
    local = sum(cfg.is_local(j) for j in range(cfg.n_layers))
    pairs = (cfg.n_layers - local) * sum_len2 + local * min(sum_len2, tokens * (cfg.local_window + 1))
    attn = 4 * n * pairs
    head_rows = masked if sparse else tokens
    head = 2 * head_rows * (n * cfg.vocab_size + (n * n if cfg.preset != "bert_pytorch" else 0))
    return 3 * (per_token * tokens + attn + head)
