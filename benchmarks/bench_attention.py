"""Fused attention forward and forward+backward: fastbert's Triton kernel against PyTorch SDPA.

Providers:
  fastbert_padded  kernels.attention on q, k, v [B, S, H, D] (strided views of one projection) with
                   the key-padding mask (none in the "full" case); padding query rows are computed
  fastbert_varlen  kernels.attention on the packed valid tokens [T, H, D] with cu_seqlens
  sdpa_flash       F.scaled_dot_product_attention, flash backend, on the padded batch without a mask
                   (flash takes no mask: it computes every padding row and column too)
  sdpa_masked      F.scaled_dot_product_attention with the boolean key-padding mask (the backend
                   PyTorch picks for a mask; the math backend on CPU); only in the "pad50" case
Cases: "full" (every sequence of length S) and "pad50" (lengths drawn in [S/4, 3S/4], about 50%
padding, the varlen >= 1.7x SDPA target).
Sizes: CUDA bf16, B * S = 16384 tokens, H 12, D 64, S in 128, 512, 2048 (pad50: 128, 512). CPU: tiny
fp32 shapes; the Triton providers are skipped there (compiled Triton needs CUDA; the interpreter is
never timed).
FLOPs count only useful (non-padding) work for every provider: forward 4 * H * D * sum_b(len_b^2)
(QK^T and PV), forward+backward 3.5x that (the backward's five matmuls count 2.5x the forward), so
TFLOP/s compare providers on the same work and roofline_frac is the fraction of the measured bf16
matmul peak.

Sliding window (test_attention_window): window 128 (|i - j| <= 128) against global attention at
S = 512, 2048, 8192 (full sequences, B * S = 16384 tokens on CUDA), forward and forward+backward:
  fastbert_window  fastbert's kernel with window=128 (key blocks outside the band skipped: the time
                   should grow about linearly with S, as B * S * (2w + 1) pairs)
  fastbert_global  the same kernel without a window (B * S^2 pairs)
  sdpa_band        F.scaled_dot_product_attention with the dense boolean band mask [S, S] (the
                   backend PyTorch picks for a mask: every pair is computed, the band only masks)
FLOPs count the pairs inside the band for the windowed providers (4 * H * D * B * (S (2w + 1) -
w (w + 1)) forward), all pairs for global. CPU: S = 64 and 256 with window 8, sdpa_band only (the
fastbert rows skip: the interpreter is never timed).
"""

import pytest
import torch
import torch.nn.functional as F
from _util import band_pairs, devices, run

DEVICE = devices()[0]
CUDA = DEVICE == "cuda"
if CUDA:
    TOKENS, H, D, DTYPE = 16384, 12, 64, torch.bfloat16
    CASES = [("full", 128), ("full", 512), ("full", 2048), ("pad50", 128), ("pad50", 512)]
else:
    TOKENS, H, D, DTYPE = 256, 2, 32, torch.float32
    CASES = [("full", 64), ("pad50", 64)]
PROVIDERS = ["fastbert_padded", "fastbert_varlen", "sdpa_flash", "sdpa_masked"]


def _setup(case, seq, backward):
    batch = TOKENS // seq
    g = torch.Generator().manual_seed(0)
    if case == "full":
        lengths = torch.full((batch,), seq, dtype=torch.int32)
    else:
        lengths = torch.randint(seq // 4, 3 * seq // 4 + 1, (batch,), generator=g, dtype=torch.int32)
    qkv = torch.randn(batch, seq, 3, H, D, generator=g).to(DEVICE, DTYPE)
    pad = (torch.arange(seq)[None, :] >= lengths[:, None]).to(DEVICE)  # True = padding
    return batch, lengths, qkv.requires_grad_(backward), pad


def _flops(lengths, backward):
    fwd = 4.0 * H * D * float((lengths.double() ** 2).sum())
    return fwd * (3.5 if backward else 1.0)


def _fn(provider, case, seq, backward):
    batch, lengths, qkv, pad = _setup(case, seq, backward)
    has_pad = case != "full"
    if provider.startswith("fastbert"):
        from fastbert.ops.attention import fused_attention as attention

        if provider == "fastbert_padded":
            def forward():
                q, k, v = qkv.unbind(2)  # [B, S, H, D] strided views
                return attention(q, k, v, key_padding_mask=pad if has_pad else None)
        else:
            index = (~pad).reshape(-1).nonzero().squeeze(1)
            packed = qkv.detach().reshape(batch * seq, 3, H, D)[index]  # [T, 3, H, D]
            packed.requires_grad_(backward)
            cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0)).to(DEVICE)
            max_len = int(lengths.max())

            def forward():
                q, k, v = packed.unbind(1)  # [T, H, D] strided views
                return attention(q, k, v, cu_seqlens=cu, max_seqlen=max_len)
            qkv = packed
    else:
        mask = (~pad)[:, None, None, :] if provider == "sdpa_masked" else None

        def sdpa():
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # [B, H, S, D] views
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)

        if provider == "sdpa_flash" and CUDA:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            def forward():
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return sdpa()
        else:
            forward = sdpa
    if not backward:
        def step():
            with torch.no_grad():
                return forward()
        return step, lengths
    grad = torch.randn(forward().shape, device=DEVICE, dtype=DTYPE)

    def step():
        qkv.grad = None
        out = forward()
        out.backward(grad)
        return out
    return step, lengths


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
@pytest.mark.parametrize("case,seq", CASES, ids=[f"{c}-S{s}" for c, s in CASES])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_attention(benchmark, provider, case, seq, backward):
    if provider.startswith("fastbert") and not CUDA:
        pytest.skip("compiled Triton kernels need CUDA (the interpreter is never timed)")
    if provider == "sdpa_masked" and case == "full":
        pytest.skip("no padding in the full case: sdpa_masked equals sdpa without a mask")
    benchmark.group = f"attention {case} S={seq} {'fwd+bwd' if backward else 'fwd'}"
    fn, lengths = _fn(provider, case, seq, backward)
    benchmark.extra_info.update(provider=provider, case=case, seq=seq, heads=H, head_dim=D,
                                dtype=str(DTYPE), tokens_valid=int(lengths.sum()),
                                flops_counted="useful (non-padding) work only")
    run(benchmark, fn, DEVICE, flops=_flops(lengths, backward), tokens=int(lengths.sum()))


# ----------------------------------------------------------------------------------------------
# sliding window
# ----------------------------------------------------------------------------------------------
if CUDA:
    WINDOW, WINDOW_SEQS = 128, (512, 2048, 8192)
else:
    WINDOW, WINDOW_SEQS = 8, (64, 256)
WINDOW_PROVIDERS = ["fastbert_window", "fastbert_global", "sdpa_band"]


def _window_fn(provider, seq, backward):
    batch = max(1, TOKENS // seq)
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(batch, seq, 3, H, D, generator=g).to(DEVICE, DTYPE).requires_grad_(backward)
    window = None if provider == "fastbert_global" else WINDOW
    if provider.startswith("fastbert"):
        from fastbert.ops.attention import fused_attention

        def forward():
            q, k, v = qkv.unbind(2)  # [B, S, H, D] strided views
            return fused_attention(q, k, v, window=window)
    else:
        pos = torch.arange(seq, device=DEVICE)
        band = (pos[:, None] - pos[None, :]).abs() <= WINDOW  # [S, S] True = attend

        def forward():
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # [B, H, S, D] views
            return F.scaled_dot_product_attention(q, k, v, attn_mask=band).transpose(1, 2)
    pairs = batch * (seq * seq if window is None else band_pairs(seq, window))
    if not backward:
        def step():
            with torch.no_grad():
                return forward()
        return step, batch, pairs
    grad = torch.randn(qkv.shape[:2] + qkv.shape[3:], device=DEVICE, dtype=DTYPE)

    def step():
        qkv.grad = None
        out = forward()
        out.backward(grad)
        return out
    return step, batch, pairs


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
@pytest.mark.parametrize("seq", WINDOW_SEQS, ids=[f"S{s}" for s in WINDOW_SEQS])
@pytest.mark.parametrize("provider", WINDOW_PROVIDERS)
def test_attention_window(benchmark, provider, seq, backward):
    if provider.startswith("fastbert") and not CUDA:
        pytest.skip("compiled Triton kernels need CUDA (the interpreter is never timed)")
    benchmark.group = f"attention window={WINDOW} S={seq} {'fwd+bwd' if backward else 'fwd'}"
    fn, batch, pairs = _window_fn(provider, seq, backward)
    flops = 4.0 * H * D * pairs * (3.5 if backward else 1.0)
    benchmark.extra_info.update(provider=provider, seq=seq, batch=batch, window=WINDOW, heads=H,
                                head_dim=D, dtype=str(DTYPE), pairs=pairs,
                                flops_counted="pairs inside the band (all pairs for global)")
    run(benchmark, fn, DEVICE, flops=flops, tokens=batch * seq)
