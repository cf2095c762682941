"""Whole-model benchmarks: BERT training step and inference forward, fastbert against what people use.

Providers (same weights within each family):
  fastbert      fastbert.BERT loaded with bert_pytorch's weights (drop-in for bert_pytorch.model.BERT)
  bert_pytorch  bert_pytorch.model.BERT (the PyPI package bert-pytorch==0.0.1a4)
  fastbert-hf   fastbert.from_hf(BertModel): the HF architecture on fastbert's ops
  hf-eager      transformers.BertModel, attn_implementation="eager"
  hf-sdpa       transformers.BertModel, attn_implementation="sdpa" (transformers' default)
  hf-compile    torch.compile of the hf-sdpa model (CUDA only; compiling on CPU would eat the CPU budget)
extra_info["compare_with"] makes the report compare like for like: fastbert with bert_pytorch,
fastbert-hf with hf-eager, hf-sdpa and hf-compile.

Sizes. CUDA: BERT-base (vocab 30522, hidden 768, 12 layers, 12 heads, FFN 3072), bf16 weights and
activations, seq 128 (batch 64) and 512 (batch 16), so 8192 token slots per batch. CPU: hidden 128,
2 layers, 2 heads, vocab 1000, seq 32 and 64, batch 8, fp32 (the CPU path: fastbert's ops run their
PyTorch/C++ implementations; the Triton interpreter is never timed).
Padding: "full" (every row is seq long) or "varlen" (row lengths uniform in [2, seq], about 50%
padding, fixed seed). tokens/s counts non-padding tokens only, and TFLOP/s counts the useful work on
real tokens only (dense 2*P*L per sequence of length L plus attention 4*N*L^2 per layer, times 3 for a
training step), so a model that computes on padding shows it as a lower fraction of the roofline.
Training step = forward, loss mean(out^2) in fp32, backward, AdamW step (fused on CUDA), zero_grad;
dropout 0.1 as in pretraining. Inference = eval mode under torch.inference_mode().

test_modernbert: fastbert's ModernEncoder against transformers' ModernBertModel (sdpa), same weights;
see its comment.

test_train_peak_memory: peak training memory (weights, grads, AdamW state, activations) of BERT-base
at seq 512, batch 32, bf16 for fastbert-hf and hf-sdpa; extra_info records both peaks and their ratio
(CUDA only).
"""

import functools
import gc
import math

import pytest
import torch
from _util import devices, modernbert_flops, run

import fastbert

DEVICE = devices()[0]
CUDA = DEVICE == "cuda"

if CUDA:
    VOCAB, HIDDEN, LAYERS, HEADS, FFN = 30522, 768, 12, 12, 3072
    SEQS = (128, 512)
    TOKEN_SLOTS = 8192  # batch = TOKEN_SLOTS // seq
    DTYPE = torch.bfloat16
else:
    VOCAB, HIDDEN, LAYERS, HEADS, FFN = 1000, 128, 2, 2, 512
    SEQS = (32, 64)
    TOKEN_SLOTS = 8 * 64
    DTYPE = torch.float32
CPU_BATCH = 8
DROPOUT = 0.1
MEMORY_SEQ, MEMORY_BATCH = 512, 32

BP_FAMILY = ("fastbert", "bert_pytorch")
HF_FAMILY = ("fastbert-hf", "hf-eager", "hf-sdpa", "hf-compile")
PROVIDERS = BP_FAMILY + HF_FAMILY
GPU_ONLY = {"hf-compile": "torch.compile baseline runs on CUDA only (compiling BERT on the CPU would "
                          "take minutes of the CPU budget)"}
COMPARE_WITH = {"fastbert": ["bert_pytorch"], "fastbert-hf": ["hf-eager", "hf-sdpa", "hf-compile"]}
COMPILE_NEEDS_S = 60  # a cold torch.compile of BERT-base (forward, or forward+backward) on an H100
RECOMPILE_NEEDS_S = 20  # the same graph again (other padding): inductor's caches are warm
_COMPILED = set()  # (mode, seq) already compiled in this session


def batch_size(seq):
    return TOKEN_SLOTS // seq if CUDA else CPU_BATCH


def make_batch(batch, seq, padding, seed=0):
    """Token ids with right padding (id 0), bert_pytorch segments and HF masks, on DEVICE.

    full: every row has seq real tokens; varlen: row lengths uniform in [2, seq] (about 50% padding).
    """
    if padding not in ("full", "varlen"):
        raise ValueError(f"padding={padding!r}; expected 'full' or 'varlen'")
    g = torch.Generator().manual_seed(seed)
    if padding == "full":
        lengths = torch.full((batch,), seq, dtype=torch.long)
    else:
        lengths = torch.randint(2, seq + 1, (batch,), generator=g)
    pos = torch.arange(seq)
    real = pos[None, :] < lengths[:, None]  # [B, S]
    ids = torch.randint(1, VOCAB, (batch, seq), generator=g) * real  # 0 at padding
    second = pos[None, :] >= (lengths[:, None] + 1) // 2  # second "sentence" of each row
    seg = (1 + second.long()) * real  # bert_pytorch segments: 1, 2; 0 at padding
    return {
        "ids": ids.to(DEVICE),
        "seg": seg.to(DEVICE),
        "token_type": second.long().mul(real).to(DEVICE),  # HF token types: 0, 1
        "mask": real.long().to(DEVICE),
        "lengths": lengths,
        "tokens": int(lengths.sum()),
        "pad_frac": 1.0 - float(lengths.sum()) / (batch * seq),
    }


def useful_flops(lengths, train):
    """FLOPs on real tokens: 2 * dense params per token + 4 * N * L^2 attention per layer."""
    dense = LAYERS * (4 * HIDDEN * HIDDEN + 2 * HIDDEN * FFN)
    total = 0
    for n in lengths.tolist():
        total += 2 * dense * n + LAYERS * 4 * HIDDEN * n * n
    return total * (3 if train else 1)


def hf_config():
    import transformers

    return transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, hidden_dropout_prob=DROPOUT, attention_probs_dropout_prob=DROPOUT,
        max_position_embeddings=512, pad_token_id=0,
    )


def build(provider):
    """(model, forward(batch) -> [B, S, N]) for a provider, on DEVICE in DTYPE, same seed per family."""
    torch.manual_seed(0)
    with torch.device(DEVICE):
        if provider in BP_FAMILY:
            bp = pytest.importorskip("bert_pytorch.model", reason="bert_pytorch is not installed")
            theirs = bp.BERT(VOCAB, HIDDEN, LAYERS, HEADS, dropout=DROPOUT)
            if provider == "fastbert":
                model = fastbert.BERT(VOCAB, HIDDEN, LAYERS, HEADS, dropout=DROPOUT)
                model.load_state_dict(theirs.state_dict(), strict=True)
                del theirs
            else:
                model = theirs
            model = model.to(DTYPE)
            return model, lambda b: model(b["ids"], b["seg"])
        transformers = pytest.importorskip("transformers")
        attn = "eager" if provider == "hf-eager" else "sdpa"
        hf = transformers.BertModel._from_config(hf_config(), attn_implementation=attn,
                                                 add_pooling_layer=False)
        if provider == "fastbert-hf":
            model = fastbert.from_hf(hf).to(DTYPE)
            del hf
            return model, lambda b: model(b["ids"], b["token_type"], b["mask"])
        model = hf.to(DTYPE)
        fwd = model
        if provider == "hf-compile":
            _raise_recompile_limit()
            fwd = torch.compile(model, dynamic=False)
        return model, lambda b: fwd(input_ids=b["ids"], token_type_ids=b["token_type"],
                                    attention_mask=b["mask"]).last_hidden_state


def _raise_recompile_limit(limit=64):
    """Each test compiles a fresh model: past dynamo's default limit (8) it would silently run eager."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(limit, getattr(torch._dynamo.config, name)))


def make_step(model, forward, train):
    """The timed function: a training step or an inference forward on a fixed batch."""
    if not train:
        model.eval()

        def infer(b):
            with torch.inference_mode():
                return forward(b)

        return infer
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True if CUDA else None)

    def step(b):
        loss = forward(b).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _free():
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def _skip_unavailable(provider, bench_budget, mode, seq):
    if provider in GPU_ONLY and not CUDA:
        pytest.skip(GPU_ONLY[provider])
    if "compile" in provider:
        warm = (mode, seq) in _COMPILED
        bench_budget.require(RECOMPILE_NEEDS_S if warm else COMPILE_NEEDS_S,
                             f"{provider} ({'warm' if warm else 'cold'} torch.compile)")
        _COMPILED.add((mode, seq))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("padding", ["full", "varlen"])
@pytest.mark.parametrize("seq", SEQS)
@pytest.mark.parametrize("mode", ["train", "infer"])
def test_model(benchmark, bench_budget, mode, seq, padding, provider):
    _skip_unavailable(provider, bench_budget, mode, seq)
    _free()
    train = mode == "train"
    benchmark.group = f"model-{mode}-seq{seq}-{padding}"
    batch = make_batch(batch_size(seq), seq, padding)
    model, forward = build(provider)
    step = make_step(model, forward, train)
    info = benchmark.extra_info
    info.update(provider=provider, mode=mode, seq=seq, batch=batch_size(seq), padding=padding,
                pad_frac=round(batch["pad_frac"], 4), dtype=str(DTYPE).replace("torch.", ""),
                model=f"L{LAYERS} H{HIDDEN} A{HEADS} FFN{FFN} V{VOCAB}", real_tokens=batch["tokens"])
    if provider in COMPARE_WITH:
        info["compare_with"] = COMPARE_WITH[provider]
    out = run(benchmark, functools.partial(step, batch), DEVICE, flops=useful_flops(batch["lengths"], train),
              tokens=batch["tokens"], rounds=10 if CUDA and train else None)
    if not train:
        assert out.shape == (batch_size(seq), seq, HIDDEN)
        assert torch.isfinite(out[batch["mask"].bool()]).all(), "non-finite outputs on real tokens"
    del model, forward, step, out
    _free()


def peak_train_memory_mb(provider, batch, steps=2):
    """Peak bytes allocated (MiB) while building the model and running `steps` training steps."""
    _free()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model, forward = build(provider)
    step = make_step(model, forward, train=True)
    for _ in range(steps):  # the first step allocates AdamW's state
        step(batch)
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    del model, forward, step
    _free()
    return peak


@pytest.mark.parametrize("padding", ["full", "varlen"])
def test_train_peak_memory(benchmark, padding):
    """Peak training memory, BERT-base seq 512 batch 32 bf16: fastbert-hf against hf-sdpa."""
    if not CUDA:
        pytest.skip("peak-memory benchmark needs CUDA (torch.cuda.max_memory_allocated); BERT-base at "
                    "seq 512 batch 32 is not a CPU size")
    benchmark.group = f"model-memory-seq{MEMORY_SEQ}-b{MEMORY_BATCH}"
    batch = make_batch(MEMORY_BATCH, MEMORY_SEQ, padding)
    hf_peak = peak_train_memory_mb("hf-sdpa", batch)
    ours_peak = peak_train_memory_mb("fastbert-hf", batch)
    info = benchmark.extra_info
    info.update(provider="fastbert-hf", padding=padding, seq=MEMORY_SEQ, batch=MEMORY_BATCH,
                dtype="bfloat16", pad_frac=round(batch["pad_frac"], 4),
                peak_mem_fastbert_mb=round(ours_peak, 1), peak_mem_hf_sdpa_mb=round(hf_peak, 1),
                mem_ratio=round(ours_peak / hf_peak, 4) if hf_peak > 0 else math.nan)
    model, forward = build("fastbert-hf")
    step = make_step(model, forward, train=True)
    run(benchmark, functools.partial(step, batch), DEVICE, flops=useful_flops(batch["lengths"], True),
        tokens=batch["tokens"], rounds=5)
    del model, forward, step
    _free()


# ModernBERT (issue 21): fastbert's own ModernEncoder (fastbert.from_hf of the same ModernBertModel: the
# same architecture and weights, each layer one fused node on CUDA) against transformers' ModernBertModel
# (sdpa: every layer on the padded batch with a dense or sliding-window mask). 12 layers at BERT-base
# width, GeGLU of width 1.5 x hidden (ModernBERT-base's 1152 for 768), a global layer every third, a
# 128-token window (64 each side) in the others; seq 512 on CUDA (the window matters), 64 on CPU.
MODERN_PROVIDERS = ("fastbert-modernbert", "hf-modernbert-sdpa")
MODERN_FFN = 3 * HIDDEN // 2
MODERN_WINDOW = 128 if CUDA else 16
MODERN_SEQS = (512,) if CUDA else (64,)


def modern_config():
    import transformers

    return transformers.ModernBertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=max(LAYERS, 3), num_attention_heads=HEADS,
        intermediate_size=MODERN_FFN, max_position_embeddings=max(MODERN_SEQS), local_attention=MODERN_WINDOW,
        global_attn_every_n_layers=3, pad_token_id=0, bos_token_id=None, eos_token_id=None, cls_token_id=None,
        sep_token_id=None, mlp_dropout=DROPOUT, attention_dropout=DROPOUT, embedding_dropout=DROPOUT)


def modern_flops(lengths, train):
    return modernbert_flops(lengths, max(LAYERS, 3), HIDDEN, MODERN_FFN, MODERN_WINDOW, 3, train)


def build_modern(transformers, provider):
    """(model, forward(batch) -> [B, S, N]) of a ModernBERT provider, on DEVICE in DTYPE, same weights."""
    torch.manual_seed(0)
    with torch.device(DEVICE):
        hf = transformers.ModernBertModel._from_config(modern_config(), attn_implementation="sdpa").to(DTYPE)
    if provider == "fastbert-modernbert":
        model = fastbert.from_hf(hf)
        return model, lambda b: model(b["ids"], attention_mask=b["mask"])
    return hf, lambda b: hf(input_ids=b["ids"], attention_mask=b["mask"]).last_hidden_state


@pytest.mark.parametrize("provider", MODERN_PROVIDERS)
@pytest.mark.parametrize("padding", ["full", "varlen"])
@pytest.mark.parametrize("seq", MODERN_SEQS)
@pytest.mark.parametrize("mode", ["train", "infer"])
def test_modernbert(benchmark, mode, seq, padding, provider):
    transformers = pytest.importorskip("transformers")
    _free()
    train = mode == "train"
    benchmark.group = f"modernbert-{mode}-seq{seq}-{padding}"
    batch = make_batch(batch_size(seq), seq, padding)
    model, forward = build_modern(transformers, provider)
    step = make_step(model, forward, train)
    info = benchmark.extra_info
    info.update(provider=provider, mode=mode, seq=seq, batch=batch_size(seq), padding=padding,
                pad_frac=round(batch["pad_frac"], 4), dtype=str(DTYPE).replace("torch.", ""),
                model=f"L{max(LAYERS, 3)} H{HIDDEN} A{HEADS} GeGLU{MODERN_FFN} W{MODERN_WINDOW} V{VOCAB}",
                real_tokens=batch["tokens"])
    if provider == "fastbert-modernbert":
        info["compare_with"] = ["hf-modernbert-sdpa"]
    out = run(benchmark, functools.partial(step, batch), DEVICE, flops=modern_flops(batch["lengths"], train),
              tokens=batch["tokens"], rounds=10 if CUDA and train else None)
    if not train:
        assert torch.isfinite(out[batch["mask"].bool()]).all(), "non-finite outputs on real tokens"
    del model, forward, step, out
    _free()
