"""embed (token + position + segment, optional LayerNorm) forward and forward+backward: fastbert's
C++/CUDA op against eager PyTorch.

Providers:
  fastbert   fastbert.ops.embed (torch.ops.fastbert.embedding_gather; one pass, deterministic
             sort-based table gradients)
  eager      F.embedding(ids, tok, padding_idx=0) + pos[:S] + F.embedding(seg_ids, seg) (+ F.layer_norm):
             what nn.Embedding sums in bert_pytorch / HF BERT do
Variants: "bert_pytorch" (no LayerNorm, segment table padding_idx 0) and "hf" (LayerNorm).
Sizes: CUDA [256, 512] tokens, hidden 768, bf16; CPU [8, 128] tokens, hidden 256, fp32.
bytes_moved (forward): the gathered token rows read and the output written, T*N*2 elements, plus
the int64 token and segment ids (position and segment rows are a few KiB and stay in L2), so
roofline_frac compares with a device-to-device copy of the output.
"""

import pytest
import torch
import torch.nn.functional as F
from _util import devices, run

import fastbert.ops as ops

DEVICE = devices()[0]
CUDA = DEVICE == "cuda"
B, S, N = (256, 512, 768) if CUDA else (8, 128, 256)
DTYPE = torch.bfloat16 if CUDA else torch.float32
VOCAB, POS, SEG = 30522, 512, 3


def _inputs(variant, grad):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (B, S), generator=g)
    ids[:, -S // 4:] = 0  # padding
    seg_ids = torch.randint(1, SEG, (B, S), generator=g)

    def table(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE, DTYPE).requires_grad_(grad)

    kw = dict(token_weight=table(VOCAB, N), position_weight=table(POS, N).detach(),
              segment_ids=seg_ids.to(DEVICE), segment_weight=table(SEG, N))
    if variant == "hf":
        kw["ln_weight"] = table(N)
        kw["ln_bias"] = table(N)
    return ids.to(DEVICE), kw


def _eager(input_ids, token_weight, position_weight, segment_ids, segment_weight, ln_weight=None,
           ln_bias=None, padding_idx=0, segment_padding_idx=None):
    x = (F.embedding(input_ids, token_weight, padding_idx) + position_weight[: input_ids.shape[1]]
         + F.embedding(segment_ids, segment_weight, segment_padding_idx))
    if ln_weight is not None:
        x = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, 1e-12)
    return x


def _fn(provider, variant, backward):
    ids, kw = _inputs(variant, backward)
    seg_pad = 0 if variant == "bert_pytorch" else None
    if provider == "fastbert":
        def forward():
            return ops.embed(ids, **kw, padding_idx=0, segment_padding_idx=seg_pad)
    else:
        def forward():
            return _eager(ids, **kw, segment_padding_idx=seg_pad)
    if not backward:
        return forward
    leaves = [v for v in kw.values() if v.is_floating_point() and v.requires_grad]
    grad_out = torch.randn(B, S, N, device=DEVICE, dtype=DTYPE)

    def step():
        return torch.autograd.grad(forward(), leaves, grad_out)

    return step


@pytest.mark.parametrize("variant", ["bert_pytorch", "hf"])
@pytest.mark.parametrize("provider", ["fastbert", "eager"])
def test_embed_forward(benchmark, provider, variant):
    benchmark.group = f"embed forward {variant} [{B}, {S}] x {N} {str(DTYPE)[6:]} {DEVICE}"
    es = torch.finfo(DTYPE).bits // 8
    with torch.no_grad():
        run(benchmark, _fn(provider, variant, False), DEVICE, bytes_moved=2 * B * S * N * es + 16 * B * S,
            tokens=B * S)


@pytest.mark.parametrize("variant", ["bert_pytorch", "hf"])
@pytest.mark.parametrize("provider", ["fastbert", "eager"])
def test_embed_forward_backward(benchmark, provider, variant):
    benchmark.group = f"embed forward+backward {variant} [{B}, {S}] x {N} {str(DTYPE)[6:]} {DEVICE}"
    run(benchmark, _fn(provider, variant, True), DEVICE, tokens=B * S)
