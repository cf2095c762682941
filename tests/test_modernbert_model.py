"""fastbert's own ModernBERT encoder (preset "modernbert") against independent references.

transformers' ModernBertModel (attn_implementation "sdpa" and "eager") through fastbert.from_hf / to_hf,
and fastbert.reference.modernbert.ModernEncoder for the fast encoder. Eval mode (dropout 0), fresh random
ids (never zeros at real tokens), weights with random LayerNorm scales / shifts and biases (the init's
unit norms and zero biases would hide a misplaced one). fp64 for exactness (1e-9), fp32 at 1e-5; outputs
compared at real tokens. transformers' fp64 is not all fp64: apply_rotary_pos_emb rounds q and k to fp32
(q.float()) and eager attention's softmax runs in fp32, so fp64 agreement with it is ~1e-11 on outputs
(sdpa) and ~1e-9 relative on gradients; fast vs reference encoder is checked to 1e-12.
The tiny config (4 layers, window 4: |i - j| <= 2) is exceeded by 13-token sequences, so the window
changes the numbers (checked). Then gradients, conversions both ways, the packed and unpadded paths, the
Triton kernels (interpreter on CPU, or CUDA) and the errors of bad input.
"""

import pytest
import torch
import transformers
from harness import DEVICES

import fastbert
from fastbert.models import hf_modernbert as hm
from fastbert.reference.model import BertConfig
from fastbert.reference.model import Encoder as ReferenceEncoder
from fastbert.reference.modernbert import ModernEncoder as ReferenceModernEncoder

VOCAB, HIDDEN, SEQ = 64, 32, 13
SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)


def mb_config(attn="sdpa", **kw):
    args = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=4,
                num_attention_heads=2, global_attn_every_n_layers=2, local_attention=4,
                max_position_embeddings=64, attention_dropout=0.0, mlp_dropout=0.0, embedding_dropout=0.0,
                **SPECIAL)
    args.update(kw)
    cfg = transformers.ModernBertConfig(**args)
    cfg._attn_implementation = attn
    return cfg


def perturb(model, seed=0):
    """Random LayerNorm scales and shifts and random biases (in place)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return model


def hf_model(cfg, cls=transformers.ModernBertModel, seed=0):
    torch.manual_seed(seed)
    return perturb(cls(cfg), seed).eval()


def pair(dtype=torch.float64, attn="sdpa", unpad="auto", **kw):
    """(transformers ModernBertModel, fastbert.from_hf of it), both in dtype (converted after from_hf, which
    builds fp32: the weights are fp32-exact in both)."""
    hf = hf_model(mb_config(attn, **kw))
    fb = fastbert.from_hf(hf, unpad=unpad).eval()
    return hf.to(dtype), fb.to(dtype)


def batch(rows=3, seq=SEQ, lengths=None, side="right", vocab=VOCAB):
    """(ids [rows, seq] in [3, vocab) at real tokens, 0 at padding; mask [rows, seq] 1 at real tokens)."""
    lengths = lengths or [seq] + [int(n) for n in torch.randint(1, seq, (rows - 1,))]
    ids = torch.randint(3, vocab, (rows, seq))
    mask = torch.zeros(rows, seq, dtype=torch.long)
    for b, n in enumerate(lengths):
        if side == "right":
            mask[b, :n] = 1
        else:
            mask[b, seq - n:] = 1
    ids[mask == 0] = 0
    return ids, mask


def max_err(a, b, mask=None):
    if mask is not None:
        a, b = a[mask.bool()], b[mask.bool()]
    return (a - b).abs().max().item()


def tol_for(dtype):
    return 1e-9 if dtype == torch.float64 else 1e-5


def packed(ids, mask):
    """(ids [T], cu_seqlens int32 [R+1], max_seqlen) of the real tokens of a batch, row by row."""
    lengths = mask.sum(1)
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return ids[mask.bool()], cu, int(lengths.max())


# --- 1. against transformers' ModernBertModel -------------------------------------------------------

CASES = [  # (hidden_activation, norm_bias, bias, global_attn_every_n_layers, local_attention, dtype, attn)
    ("gelu", False, False, 2, 4, torch.float64, "sdpa"),
    ("gelu_pytorch_tanh", False, False, 2, 4, torch.float64, "sdpa"),
    ("gelu", True, True, 2, 4, torch.float64, "eager"),
    ("gelu_pytorch_tanh", True, True, 3, 4, torch.float64, "sdpa"),
    ("gelu", True, False, 1, 4, torch.float64, "eager"),
    ("gelu", False, True, 3, 5, torch.float64, "sdpa"),
    ("gelu_pytorch_tanh", False, False, 2, 2, torch.float64, "eager"),
    ("gelu", False, False, 2, 4, torch.float32, "sdpa"),
    ("gelu_pytorch_tanh", True, True, 3, 6, torch.float32, "eager"),
]


@pytest.mark.parametrize("act,norm_bias,bias,every,window,dtype,attn", CASES,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_from_hf_matches_transformers(act, norm_bias, bias, every, window, dtype, attn):
    hf, fb = pair(dtype, attn, hidden_activation=act, norm_bias=norm_bias, attention_bias=bias, mlp_bias=bias,
                  global_attn_every_n_layers=every, local_attention=window)
    cfg = fb.config
    assert (cfg.norm_bias, cfg.bias, cfg.global_every, cfg.local_window) == (norm_bias, bias, every, window)
    assert cfg.gelu == {"gelu": "none", "gelu_pytorch_tanh": "tanh"}[act]
    assert [cfg.is_local(i) for i in range(4)] == [t == "sliding_attention" for t in hf.config.layer_types]
    if attn == "eager" and dtype == torch.float64:
        # transformers' eager softmax runs in fp32, where the fp64 mask's finfo.min is -inf: a padding query
        # whose window holds no real key gets NaN, which its value row then carries into real tokens
        # (0 * NaN) in the next layer. Rows padded by at most half a window keep a real key in every window.
        ids, mask = batch(lengths=[SEQ, SEQ - window // 2, SEQ - window // 2])
    else:
        ids, mask = batch(lengths=[SEQ, 9, 1])
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = fb(ids, attention_mask=mask)
    assert ours.dtype == theirs.dtype == dtype
    # eager's softmax runs in fp32 (cast back to fp64): fp64 eager agrees to fp32 rounding of probabilities
    tol = 1e-7 if attn == "eager" and dtype == torch.float64 else tol_for(dtype)
    assert max_err(ours, theirs, mask) <= tol


@pytest.mark.parametrize("unpad", [False, True])
@pytest.mark.parametrize("side", ["left", "none"])
def test_left_padding_and_no_mask_match_transformers(side, unpad):
    """Left padding: transformers' rotary positions are the columns (offset in padded rows), the unpadded
    encoder's restart at each row's first token; scores depend on i - j only, so the real tokens agree up
    to the fp32 rotary tables' rounding at other positions (1e-5); to 1e-9 where both use the columns."""
    hf, fb = pair(norm_bias=True, attention_bias=True, mlp_bias=True, unpad=unpad)
    if side == "left":
        ids, mask = batch(rows=4, lengths=[SEQ, 10, 6, 2], side="left")
        kw, fkw = {"attention_mask": mask}, {"attention_mask": mask}
    else:
        ids, mask = batch(rows=2, lengths=[SEQ, SEQ])
        kw, fkw = {}, {}
    with torch.no_grad():
        theirs = hf(input_ids=ids, **kw).last_hidden_state
        ours = fb(ids, **fkw)
    tol = 1e-5 if side == "left" and unpad else 1e-9
    assert max_err(ours, theirs, mask) <= tol


def test_the_window_is_live():
    """Same weights, a window wider than the sequence: transformers' output changes, and fastbert's wide
    encoder matches transformers' wide model (so the narrow match above is the window's)."""
    hf, fb = pair()
    wide_hf = transformers.ModernBertModel(mb_config(local_attention=64)).double().eval()
    wide_hf.load_state_dict(hf.state_dict())
    wide_fb = fastbert.ModernEncoder(fb.config.with_(local_window=64)).double().eval()
    wide_fb.load_state_dict(fb.state_dict())
    ids, mask = batch(lengths=[SEQ, SEQ, 11])
    with torch.no_grad():
        narrow, wide = hf(input_ids=ids, attention_mask=mask).last_hidden_state, wide_hf(
            input_ids=ids, attention_mask=mask).last_hidden_state
        ours_narrow, ours_wide = fb(ids, attention_mask=mask), wide_fb(ids, attention_mask=mask)
    assert max_err(narrow, wide, mask) > 1e-3
    assert max_err(ours_wide, wide, mask) <= 1e-9
    assert max_err(ours_narrow, narrow, mask) <= 1e-9


# --- 2. gradients -----------------------------------------------------------------------------------

@pytest.mark.parametrize("unpad,bias", [(False, True), (True, False)])
def test_every_parameter_gradient_matches_transformers(unpad, bias):
    hf, fb = pair(norm_bias=bias, attention_bias=bias, mlp_bias=bias, unpad=unpad)
    ids, mask = batch(lengths=[SEQ, 8, 3])
    assert not ids.requires_grad and not mask.requires_grad
    weight = torch.randn(*ids.shape, HIDDEN, dtype=torch.float64) * mask[..., None]
    (hf(input_ids=ids, attention_mask=mask).last_hidden_state * weight).sum().backward()
    (fb(ids, attention_mask=mask) * weight).sum().backward()
    theirs = {n: p.grad for n, p in hf.named_parameters()}
    ours = hm.fastbert_to_hf_state_dict({n: p.grad for n, p in fb.named_parameters()})
    assert set(ours) == set(theirs)
    for name, g in theirs.items():
        assert g is not None and ours[name] is not None, name
        assert g.abs().max() > 0, name
        assert max_err(ours[name], g) <= 1e-8 * g.abs().max().item(), name  # HF's fp32 q, k: ~1e-9


# --- 3. conversions ---------------------------------------------------------------------------------

def test_to_hf_of_from_hf_is_the_same_model():
    hf = hf_model(mb_config(norm_bias=True, attention_bias=True, mlp_bias=True))
    back = fastbert.to_hf(fastbert.from_hf(hf)).eval()
    assert isinstance(back, transformers.ModernBertModel)
    a, b = hf.state_dict(), back.state_dict()
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert back.config.layer_types == hf.config.layer_types
    assert back.config.local_attention == hf.config.local_attention
    assert back.config.rope_parameters == hf.config.rope_parameters
    ids, mask = batch()
    with torch.no_grad():
        assert torch.equal(hf(input_ids=ids, attention_mask=mask).last_hidden_state,
                           back(input_ids=ids, attention_mask=mask).last_hidden_state)


def test_from_hf_of_a_masked_lm_takes_its_encoder():
    mlm = hf_model(mb_config(), transformers.ModernBertForMaskedLM)
    fb = fastbert.from_hf(mlm).eval()
    assert isinstance(fb, fastbert.ModernEncoder)
    expected = hm.hf_to_fastbert_state_dict(mlm.model.state_dict())
    got = fb.state_dict()
    assert list(got) == list(expected)
    assert all(torch.equal(got[k], expected[k]) for k in got)
    ids, mask = batch()
    with torch.no_grad():
        assert max_err(fb(ids, attention_mask=mask), mlm.model(input_ids=ids, attention_mask=mask)
                       .last_hidden_state, mask) <= 1e-5


def test_fresh_fastbert_encoder_to_hf_matches():
    cfg = BertConfig.modernbert(VOCAB, HIDDEN, 3, 2, 40, max_position=64, local_window=6, global_every=2,
                                norm_bias=True, bias=True, gelu="tanh", rope_theta=5000.0,
                                local_rope_theta=300.0, layer_norm_eps=1e-6)
    torch.manual_seed(3)
    fb = perturb(fastbert.ModernEncoder(cfg), 3).eval()
    hf = fastbert.to_hf(fb).eval()
    assert hm.config_from_hf(hf.config) == cfg
    assert hf.config.layer_types == ["full_attention", "sliding_attention", "full_attention"]
    hf, fb = hf.double(), fb.double()
    ids, mask = batch(lengths=[SEQ, 7, 12])
    with torch.no_grad():
        assert max_err(fb(ids, attention_mask=mask),
                       hf(input_ids=ids, attention_mask=mask).last_hidden_state, mask) <= 1e-9


# --- 4. packed, unpadded, fast vs reference (CPU path) -----------------------------------------------

@pytest.mark.parametrize("cls", [ReferenceModernEncoder, fastbert.ModernEncoder])
def test_forward_packed_equals_padded_forward(cls):
    hf = hf_model(mb_config(norm_bias=True, attention_bias=True, mlp_bias=True))
    model = cls(hm.config_from_hf(hf.config)).double().eval()
    model.load_state_dict(hm.hf_to_fastbert_state_dict(hf.state_dict()))
    ids, mask = batch(rows=4, lengths=[SEQ, 5, 1, 9])
    flat, cu, longest = packed(ids, mask)
    cu = torch.cat([cu, cu[-1:]])  # a trailing zero-length sequence
    pos = torch.cat([torch.arange(n) for n in mask.sum(1).tolist()])
    with torch.no_grad():
        dense = model(ids, attention_mask=mask)
        out = model.forward_packed(flat, None, None, cu, longest)
        with_pos = model.forward_packed(flat, None, pos, cu, SEQ)
    assert out.shape == (flat.numel(), HIDDEN)
    assert (out - dense[mask.bool()]).abs().max() <= 1e-9
    assert torch.equal(out, with_pos)


@pytest.mark.parametrize("side", ["right", "left"])
def test_unpadded_equals_padded_with_zeros_at_padding(side):
    hf, padded = pair(norm_bias=True, attention_bias=True, mlp_bias=True, unpad=False)
    unpadded = fastbert.ModernEncoder(padded.config, unpad=True).double().eval()
    unpadded.load_state_dict(padded.state_dict())
    ids, mask = batch(rows=4, lengths=[SEQ, 4, 11, 1], side=side)
    with torch.no_grad():
        a, b = padded(ids, attention_mask=mask), unpadded(ids, attention_mask=mask)
        full = torch.ones_like(mask)
        c, d = unpadded(ids, attention_mask=full), unpadded(ids)
    assert max_err(a, b, mask) <= (1e-9 if side == "right" else 1e-5)
    assert torch.equal(b[mask == 0], torch.zeros_like(b[mask == 0]))
    assert a[mask == 0].abs().sum() > 0  # the padded layout computes values there
    assert max_err(c, d) <= 1e-12


def test_fast_encoder_equals_reference_on_cpu():
    cfg = BertConfig.modernbert(VOCAB, HIDDEN, 3, 2, 48, max_position=64, local_window=4, global_every=2,
                                norm_bias=True, bias=True)
    torch.manual_seed(5)
    ref = perturb(ReferenceModernEncoder(cfg), 5).double().eval()
    for unpad in (False, True):
        fast = fastbert.ModernEncoder(cfg, unpad=unpad).double().eval()
        fast.load_state_dict(ref.state_dict())
        ids, mask = batch(lengths=[SEQ, 6, 10])
        with torch.no_grad():
            assert max_err(fast(ids, attention_mask=mask), ref(ids, attention_mask=mask), mask) <= 1e-12


# --- 5. the Triton kernels (interpreter on CPU, or CUDA) ---------------------------------------------

def triton_pair(device, seed=7, **kw):
    """(reference ModernEncoder in fp64, the fast one in fp32 with the same weights) on device."""
    args = dict(max_position=64, local_window=8, global_every=2, norm_bias=True, bias=True)
    args.update(kw)
    cfg = BertConfig.modernbert(VOCAB, 32, 3, 2, 48, **args)
    torch.manual_seed(seed)
    ref = perturb(ReferenceModernEncoder(cfg), seed).eval()
    fast = fastbert.ModernEncoder(cfg).eval()
    fast.load_state_dict(ref.state_dict())
    return ref.double().to(device), fast.to(device)


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def assert_grads_close(fast, ref, tol=1e-4):
    grads = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        g = grads[name].grad
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert g.abs().max() > 0, name
        assert rel_err(p.grad, g) <= tol, (name, rel_err(p.grad, g))


needs_triton = pytest.mark.skipif(not DEVICES, reason="the Triton kernels need CUDA or TRITON_INTERPRET=1")


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("side,kw", [
    ("right", {}), ("left", dict(norm_bias=False, bias=False, gelu="tanh", global_every=3))],
    ids=["right-biases", "left-no-biases"])
def test_triton_unpadded_matches_reference_with_gradients(triton_poisoned, device, side, kw):
    """Windows of 9 keys in 24-token rows (key blocks outside a window skipped); left padding: the kernels'
    positions restart at each row's first token, the reference's are the columns (equal up to the fp32
    tables' rounding)."""
    ref, fast = triton_pair(device, **kw)
    ids, mask = (t.to(device) for t in batch(rows=2, seq=24, lengths=[24, 15], side=side))
    weight = torch.randn(*ids.shape, 32, dtype=torch.float64, device=device) * mask[..., None]
    fastbert.ops._dispatch._last.clear()
    ours = fast(ids, attention_mask=mask)
    chosen = fastbert.ops.last_choices()
    for op in ("rotary", "attention", "geglu", "layer_norm"):
        assert chosen[op, torch.device(device).type] == fastbert.ops._dispatch.TRITON, (op, chosen)
    theirs = ref(ids, attention_mask=mask)
    assert ours.dtype == torch.float32
    assert rel_err(ours[mask.bool()], theirs[mask.bool()]) <= 1e-4
    assert torch.equal(ours[mask == 0], torch.zeros_like(ours[mask == 0]))
    (ours * weight.float()).sum().backward()
    (theirs * weight).sum().backward()
    assert_grads_close(fast, ref)


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_triton_forward_packed_matches_reference(triton_poisoned, device):
    ref, fast = triton_pair(device, 8)
    flat = torch.randint(3, VOCAB, (50,), device=device)
    cu = torch.tensor([0, 24, 33, 50, 50], dtype=torch.int32, device=device)  # 24, 9, 17 and an empty one
    ours = fast.forward_packed(flat, None, None, cu, 24)
    theirs = ref.forward_packed(flat, None, None, cu, 24)
    assert torch.isfinite(ours).all()
    assert rel_err(ours, theirs) <= 1e-4
    weight = torch.randn(50, 32, dtype=torch.float64, device=device)
    (ours * weight.float()).sum().backward()
    (theirs * weight).sum().backward()
    assert_grads_close(fast, ref)


# --- 6. errors ---------------------------------------------------------------------------------------

def tiny_cfg(**kw):
    return BertConfig.modernbert(VOCAB, HIDDEN, 2, 2, 48, max_position=64, **kw)


@pytest.mark.parametrize("name,match", [("segment_ids", "no token types"),
                                        ("token_type_ids", "no token types"),
                                        ("position_ids", "position_ids is not taken")])
def test_bert_only_inputs_are_refused(name, match):
    ids, mask = batch(rows=2)
    for cls in (ReferenceModernEncoder, fastbert.ModernEncoder):  # the fast one has its own forward
        model = cls(tiny_cfg()).eval()
        with pytest.raises(ValueError, match=match):
            model(ids, attention_mask=mask, **{name: torch.zeros_like(ids)})
        flat, cu, longest = packed(ids, mask)
        with pytest.raises(ValueError, match="no token types"):
            model.forward_packed(flat, torch.zeros_like(flat), None, cu, longest)


def test_configs_and_encoders_refuse_each_other():
    for enc in (ReferenceEncoder, fastbert.Encoder):
        with pytest.raises(ValueError, match="built by ModernEncoder"):
            enc(tiny_cfg())
    for enc in (ReferenceModernEncoder, fastbert.ModernEncoder):
        with pytest.raises(ValueError, match="preset 'modernbert', got 'hf'"):
            enc(BertConfig.hf(VOCAB, HIDDEN, 1, 2, 64))
    with pytest.raises(ValueError, match="even head dim, got 15"):
        BertConfig.modernbert(VOCAB, 30, 1, 2, 48)
    with pytest.raises(ValueError, match="ffn='gelu' with preset 'modernbert'"):
        tiny_cfg(ffn="gelu")
    with pytest.raises(ValueError, match="ffn='geglu' with preset 'hf'"):
        BertConfig.hf(VOCAB, HIDDEN, 1, 2, 64, ffn="geglu")
    for kw in ({"norm_bias": False}, {"bias": False}):
        with pytest.raises(ValueError, match="norm_bias / bias False is for preset 'modernbert'"):
            BertConfig.hf(VOCAB, HIDDEN, 1, 2, 64, **kw)
    with pytest.raises(ValueError, match="unpad="):
        fastbert.ModernEncoder(tiny_cfg(), unpad="yes")


def test_ids_out_of_range():
    model = fastbert.ModernEncoder(tiny_cfg()).eval()
    for bad in (VOCAB, -1):
        ids, mask = batch(rows=2)
        ids[0, 3] = bad
        with pytest.raises(ValueError, match="token id out of range"):
            model(ids, attention_mask=mask)
    with pytest.raises(ValueError, match="exceeds the position table"):
        model(torch.randint(3, VOCAB, (1, 65)))


@pytest.mark.parametrize("kw,match", [
    ({"hidden_activation": "relu"}, "hidden_activation 'relu' is not supported"),
    ({"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
     "rope_type 'linear' \\(full_attention\\) is not supported"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4},
                          "sliding_attention": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}},
     "rope_type 'dynamic' \\(sliding_attention\\) is not supported"),
    ({"layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]},
     "is not a global layer every n layers"),
    ({"attention_bias": True, "mlp_bias": False}, "attention_bias=True and mlp_bias=False differ"),
], ids=["relu", "rope-linear", "rope-dynamic", "layer-types", "biases"])
def test_config_from_hf_refuses_what_it_cannot_take(kw, match):
    cfg = mb_config(**kw)
    with pytest.raises(ValueError, match=match):
        hm.config_from_hf(cfg)
    with pytest.raises(ValueError, match=match):
        fastbert.from_hf(transformers.ModernBertModel(cfg))


def test_config_from_hf_takes_an_irregular_but_periodic_pattern():
    types = ["full_attention", "sliding_attention", "sliding_attention", "sliding_attention"]
    assert hm.config_from_hf(mb_config(layer_types=types)).global_every == 4
    assert hm.config_from_hf(mb_config(global_attn_every_n_layers=5)).global_every == 4  # one global layer


# --- 7. dispatch, state dict, rotary tables ----------------------------------------------------------

def test_build_encoder_dispatch():
    modern = fastbert.build_encoder(tiny_cfg(), unpad=True)
    assert type(modern) is fastbert.ModernEncoder and modern.unpad is True
    bert = fastbert.build_encoder(BertConfig.hf(VOCAB, HIDDEN, 1, 2, 64))
    assert type(bert) is fastbert.Encoder and not isinstance(bert, ReferenceModernEncoder)


def test_state_dict_holds_no_rotary_tables_and_double_keeps_them_fp32():
    model = fastbert.ModernEncoder(tiny_cfg(rope_theta=1000.0, local_rope_theta=50.0)).eval()
    assert list(model.state_dict()) == [n for n, _ in model.named_parameters()]
    assert not list(model.buffers())
    hf_names = hm.fastbert_to_hf_state_dict(model.state_dict())
    assert not any(k.startswith("layers.0.attn_norm") for k in hf_names)  # layer 0 has none
    model.double()
    assert all(p.dtype == torch.float64 for p in model.parameters())
    tables = model.rope_tables("cpu")
    d = HIDDEN // 2
    pos = torch.arange(64, dtype=torch.float64)[:, None]
    for local, theta in ((False, 1000.0), (True, 50.0)):
        cos, sin = tables[local]
        assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (64, d // 2)
        angle = pos * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        assert (cos.double() - angle.cos()).abs().max() <= 1e-4
        assert (sin.double() - angle.sin()).abs().max() <= 1e-4
    out = model(*batch(rows=2)[:1])
    assert out.dtype == torch.float64
    assert model.rope_tables("cpu")[False][0].dtype == torch.float32


@pytest.mark.parametrize("unpad", [False, True])
def test_ids_out_of_range_off_the_cpu_raise(monkeypatch, unpad):
    """Off the CPU (where check_inputs does not read the ids back) the fast encoder checks them itself
    before nn.Embedding would fault: a ValueError naming the table, in the unpadding's one read back;
    unpadded, a bad id at a padding position (never embedded) is let through. Simulated here on the
    CPU with the device check forced on and check_inputs' own CPU check off."""
    cfg = BertConfig.modernbert(50, 32, 2, 2, 48, max_position=64, local_window=4)
    model = fastbert.ModernEncoder(cfg, unpad=unpad).eval()
    monkeypatch.setattr(type(model), "_device_check", lambda self, ids: True)
    monkeypatch.setattr(type(model), "check_inputs", lambda self, ids, seg: None)
    ids = torch.randint(1, 50, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        model(ids, attention_mask=mask)
        bad = ids.clone()
        bad[0, 3] = 50
        with pytest.raises(ValueError, match=r"token id out of range.*\[0, 50\)"):
            model(bad, attention_mask=mask)
        at_padding = ids.clone()
        at_padding[1, 8] = 99
        if unpad:
            model(at_padding, attention_mask=mask)
        else:  # the padded layout embeds every position
            with pytest.raises(ValueError, match="token id out of range"):
                model(at_padding, attention_mask=mask)
