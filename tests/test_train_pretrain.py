"""`fastbert pretrain`: training learns, resume is bit-identical, bad input fails cleanly, exports load."""

import math
import os
import shutil

import pytest
import torch
from train_helpers import restore_threads  # noqa: F401 (autouse fixture)

from fastbert import cli
from fastbert.train import pretrain
from fastbert.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from fastbert.train.vocab import SPECIALS

# a model small enough for CPU CI: 1 layer, hidden 32; on CPU (bit-identical resume is a CPU promise),
# test_pretrain_on_cuda covers the device
# the stdlib prose (a 2000-token vocabulary); test_heldout_mlm_loss_falls trains on the demo's default
TINY = ["--corpus", pretrain.STDLIB_CORPUS,
        "--size", "tiny", "--layers", "1", "--hidden", "32", "--heads", "2", "--seq-len", "64",
        "--vocab-size", "2000", "--batch", "8", "--no-progress", "--log-every", "1", "--device", "cpu",
        "--threads", "1"]  # one thread: these models are too small to gain from more, and a busy CI
# machine makes intra-op threads wait on each other


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Vocab (2000 WordPieces) and shard of the embedded corpus, built once for this module."""
    root = tmp_path_factory.mktemp("pretrain")
    out = str(root / "warm")
    args = pretrain.build_parser().parse_args(TINY + ["--out", out, "--cache-dir", str(root / "cache"),
                                                      "--max-steps", "2", "--save-every", "1", "--keep", "2"])
    pretrain.run(args)
    return str(root / "cache"), out


def _run(argv, cache_dir, out):
    args = pretrain.build_parser().parse_args(TINY + ["--cache-dir", cache_dir, "--out", str(out)] + argv)
    return pretrain.run(args)


def test_loss_falls_on_embedded_corpus(cache, tmp_path):
    # Stated bound: at initialisation the loss is about ln(2000) + ln(2) = 8.29 (uniform MLM and NSP);
    # a 2-layer, hidden-64 model (batch 16) must bring the mean loss of steps 26-30 below 7.5 on the
    # embedded corpus (it reaches about 7.25 on CPU).
    res = _run(["--layers", "2", "--hidden", "64", "--batch", "16", "--lr", "3e-3", "--warmup", "5",
                "--max-steps", "30", "--dropout", "0", "--save-every", "1000"], cache[0], tmp_path / "run")
    losses = [r["loss"] for r in res["history"]]
    assert len(losses) == 30
    assert losses[0] > 7.9
    assert sum(losses[-5:]) / 5 < 7.5, losses
    assert all(r["tokens_per_s"] > 0 for r in res["history"])


def test_heldout_mlm_loss_falls(cache, tmp_path):
    """On the demo's default corpus, the held-out documents (5%, never trained on) score better
    after a short run than at initialisation (same seed, so the same initial weights; the same
    masks): MLM loss down by 0.5 nats from about ln(vocabulary) (the corpus's WordPiece vocabulary
    has about 1400 tokens: 7.2; the run reaches about 4.9), and the masked-token accuracy up."""
    common = ["--layers", "2", "--hidden", "64", "--batch", "16", "--lr", "3e-3", "--warmup", "5",
              "--dropout", "0", "--save-every", "1000",
              "--corpus", pretrain.DEFAULT_CORPUS, "--cache-dir", str(tmp_path / "cache")]
    start = _run(common + ["--max-steps", "0"], cache[0], tmp_path / "start")["heldout"]
    run = _run(common + ["--max-steps", "30"], cache[0], tmp_path / "end")
    end = run["heldout"]
    assert start["examples"] == end["examples"] > 100 and start["masked"] == end["masked"] > 900
    assert start["mlm_loss"] > math.log(len(run["vocab"])) - 0.3
    assert end["mlm_loss"] < start["mlm_loss"] - 0.5, (start, end)
    assert end["mlm_acc"] > start["mlm_acc"] + 0.02
    assert 0.0 <= end["nsp_acc"] <= 1.0


def test_resume_is_bit_identical(cache, tmp_path):
    common = ["--max-steps", "6", "--save-every", "3", "--dropout", "0.1", "--warmup", "2"]
    full = _run(common, cache[0], tmp_path / "full")
    _run(common + ["--halt-at", "3"], cache[0], tmp_path / "split")
    assert [s for s, _ in list_checkpoints(tmp_path / "split" / "checkpoints")] == [3]
    resumed = _run(common + ["--resume"], cache[0], tmp_path / "split")
    assert resumed["step"] == full["step"] == 6
    a, b = full["model"].state_dict(), resumed["model"].state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    def losses(h):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in h]
    assert losses(full["history"][3:]) == losses(resumed["history"])
    ca = load_checkpoint(list_checkpoints(tmp_path / "full" / "checkpoints")[-1][1])
    cb = load_checkpoint(list_checkpoints(tmp_path / "split" / "checkpoints")[-1][1])
    for k, v in ca["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg_sq"], cb["optimizer"]["state"][k]["exp_avg_sq"])


def test_checkpoints_atomic_and_pruned(tmp_path):
    for step in range(1, 6):
        state = {"model": {}, "optimizer": {}, "config": {}, "vocab": {}}
        save_checkpoint(str(tmp_path), step, state, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]
    assert sorted(os.listdir(tmp_path)) == ["ckpt-00000004.pt", "ckpt-00000005.pt"]  # no temp files left


def _snapshot(d):
    return {p: open(os.path.join(d, p), "rb").read() for p in sorted(os.listdir(d))}


def _bad_vocab(tmp_path):
    p = tmp_path / "vocab.txt"
    p.write_text("\n".join([t for t in SPECIALS if t != "[SEP]"] + ["the", "a"]))
    return ["--vocab", str(p)]


def _no_tab(tmp_path):
    p = tmp_path / "plain.txt"
    p.write_text("first sentence\tsecond sentence\nthis line has no tab\n")
    return ["--corpus", str(p), "--format", "tab"]


def _empty(tmp_path):
    p = tmp_path / "empty.txt"
    p.write_text("")
    return ["--corpus", str(p)]


@pytest.mark.parametrize("case,make,message", [
    ("missing corpus", lambda t: ["--corpus", str(t / "nope.txt")], "does not exist"),
    ("empty corpus", _empty, "is empty"),
    ("tab line without tab", _no_tab, "no tab"),
    ("vocab lacks a special token", _bad_vocab, r"lacks the special token"),
    ("seq_len above the model's max", lambda t: ["--seq-len", "600"], "maximum position"),
])
def test_bad_input_exits_cleanly(case, make, message, tmp_path, capsys, cache):
    argv = TINY + ["--out", str(tmp_path / "out"), "--cache-dir", cache[0], "--max-steps", "1"]
    argv += make(tmp_path)
    assert pretrain.main(argv) == 2, case
    err = capsys.readouterr().err
    assert "fastbert pretrain: error:" in err and __import__("re").search(message, err), err
    assert not list_checkpoints(tmp_path / "out" / "checkpoints")


@pytest.mark.parametrize("case", ["corrupt", "mismatched", "no --resume"])
def test_bad_checkpoint_never_loses_existing(case, cache, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(cache[1], out, ignore=shutil.ignore_patterns("cache"))
    ckdir = out / "checkpoints"
    assert [s for s, _ in list_checkpoints(ckdir)] == [1, 2]
    argv = TINY + ["--out", str(out), "--cache-dir", cache[0], "--max-steps", "4", "--save-every", "1"]
    if case == "corrupt":
        latest = list_checkpoints(ckdir)[-1][1]
        with open(latest, "r+b") as f:
            f.seek(100)
            f.write(b"\x00garbage" * 64)
        argv += ["--resume"]
        message = "corrupt"
    elif case == "mismatched":
        argv += ["--resume", "--hidden", "64"]
        message = "does not match"
    else:
        message = "already holds checkpoints"
    before = _snapshot(ckdir)
    assert pretrain.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert _snapshot(ckdir) == before


def test_export_hf_matches_transformers(cache, tmp_path):
    transformers = pytest.importorskip("transformers")
    res = _run(["--max-steps", "2", "--export-hf", str(tmp_path / "hf")], cache[0], tmp_path / "run")
    hf = transformers.BertModel.from_pretrained(str(tmp_path / "hf"), add_pooling_layer=False).eval()
    enc = res["model"].bert.eval()
    ids = torch.randint(5, 2000, (2, 13))
    ids[1, 9:] = 0
    mask = (ids != 0).long()
    with torch.no_grad():
        ours = enc(ids, torch.zeros_like(ids), attention_mask=mask)
        theirs = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], rtol=1e-4, atol=1e-4)
    assert os.path.isfile(tmp_path / "hf" / "config.json") and os.path.isfile(tmp_path / "hf" / "vocab.txt")


def test_export_hf_is_a_complete_bert_for_pretraining(cache, tmp_path, capfd):
    """--export-hf: AutoModel, AutoModelForMaskedLM and BertForPreTraining load it with no missing key,
    its MLM and NSP logits are fastbert's (NSP classes in transformers' order: 0 = B follows A), the
    tokenizer encodes as fastbert's vocabulary does, and fill-mask runs; --no-progress silences
    transformers' "Writing model shards" bar."""
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    res = _run(["--max-steps", "2", "--export-hf", str(out)], cache[0], tmp_path / "run")
    assert "Writing model shards" not in capfd.readouterr().err
    for cls in (transformers.AutoModel, transformers.AutoModelForMaskedLM, transformers.BertForPreTraining):
        _, info = cls.from_pretrained(str(out), output_loading_info=True)
        assert not info["missing_keys"] and not info["mismatched_keys"], (cls.__name__, info)
    hf = transformers.BertForPreTraining.from_pretrained(str(out)).eval()
    ours = res["model"].eval()
    ids = torch.randint(5, 2000, (2, 13))
    ids[:, 0] = res["vocab"].cls_id
    seg = torch.zeros_like(ids)
    seg[:, 7:] = 1
    with torch.no_grad():
        theirs = hf(input_ids=ids, token_type_ids=seg)
        h = ours.bert(ids, seg, attention_mask=torch.ones_like(ids))
        mlm = ours.mask_lm.linear(ours.mlm_rows(h.reshape(-1, h.shape[-1]))).view(2, 13, -1)
        nsp = ours.nsp_log_probs(h)
    torch.testing.assert_close(theirs.prediction_logits, mlm, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.log_softmax(theirs.seq_relationship_logits, -1), nsp[:, [1, 0]],
                               rtol=1e-4, atol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "the cat sat on the mat ."
    v = res["vocab"]
    assert tok(text)["input_ids"] == [v.cls_id, *v.encode_batch([text])[0], v.sep_id]
    fill = transformers.pipeline("fill-mask", model=str(out), tokenizer=str(out), device="cpu")
    preds = fill("the cat sat on the [MASK] .")
    assert len(preds) == 5 and all(isinstance(p["token_str"], str) for p in preds)


def test_export_bert_pytorch_loads_into_bertlm(cache, tmp_path):
    bp = pytest.importorskip("bert_pytorch.model")
    path = tmp_path / "bertlm.pt"
    res = _run(["--preset", "bert_pytorch", "--max-steps", "2", "--export-bert-pytorch", str(path),
                "--whole-word"],
               cache[0], tmp_path / "run")
    lm = bp.BERTLM(bp.BERT(2000, hidden=32, n_layers=1, attn_heads=2), 2000)
    lm.load_state_dict(torch.load(path), strict=True)
    lm.eval()
    ours = res["model"].eval()
    ids = torch.randint(5, 2000, (2, 11))
    seg = torch.ones_like(ids)
    with torch.no_grad():
        nsp, mlm = lm(ids, seg)
        h = ours.bert(ids, seg)
    torch.testing.assert_close(ours.nsp_log_probs(h), nsp, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.log_softmax(ours.mask_lm.linear(h), -1), mlm, rtol=1e-4, atol=1e-4)


def test_export_needs_matching_preset(cache, tmp_path, capsys):
    argv = TINY + ["--out", str(tmp_path / "r"), "--cache-dir", cache[0], "--max-steps", "1",
                   "--preset", "bert_pytorch", "--export-hf", str(tmp_path / "hf")]
    assert pretrain.main(argv) == 2
    assert "preset 'hf'" in capsys.readouterr().err


def test_cli_vocab_and_help(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("Hello world, this is fastbert.\nIt trains BERT models.\n\nA second document.\n"
                      "With another sentence.\n")
    out = tmp_path / "vocab.txt"
    assert cli.main(["vocab", "--corpus", str(corpus), "--vocab-size", "120", "--min-frequency", "1",
                     "--out", str(out)]) == 0
    assert out.read_text().splitlines()[:5] == list(SPECIALS)
    assert cli.main(["vocab", "--from", str(out), "--out", str(tmp_path / "v2.txt")]) == 0
    assert cli.main(["nope"]) == 2
    assert cli.main([]) == 0
    assert "pretrain" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("preset", ["hf", "bert_pytorch"])
def test_pretrain_on_cuda(cache, tmp_path, preset):
    """bf16 autocast on the fused ops, sparse head, fused AdamW; TFLOP/s and MFU are logged."""
    argv = [a for a in TINY if a not in ("--device", "cpu")]
    args = pretrain.build_parser().parse_args(argv + [
        "--device", "cuda", "--cache-dir", cache[0], "--out", str(tmp_path / "run"), "--preset", preset,
        "--layers", "2", "--hidden", "128", "--batch", "32", "--max-steps", "20", "--lr", "2e-3"])
    res = pretrain.run(args)
    hist = res["history"]
    assert len(hist) == 20 and all(torch.isfinite(torch.tensor(r["loss"])) for r in hist)
    assert sum(r["loss"] for r in hist[-5:]) / 5 < hist[0]["loss"] - 0.3
    assert all(r["tflops"] > 0 for r in hist)
    assert next(res["model"].parameters()).device.type == "cuda"
    assert all(impl in ("triton", "C++ (fastbert._C)") for impl in res["ops"].values()), res["ops"]


def test_bert_pytorch_corpus_and_vocab(cache, tmp_path):
    """bert_pytorch's own inputs: a `A \\t B` corpus and a WordVocab pickle, preset bert_pytorch."""
    wv = pytest.importorskip("bert_pytorch.dataset.vocab")
    import gzip

    with gzip.open(pretrain.DEFAULT_CORPUS, "rt", encoding="utf-8") as f:
        docs = [d.splitlines() for d in f.read().split("\n\n")[:40]]
    tab = tmp_path / "corpus.tsv"
    tab.write_text("".join(f"{a}\t{b}\n" for d in docs for a, b in zip(d, d[1:])))
    with open(tab) as f:
        vocab = wv.WordVocab(f, max_size=3000, min_freq=1)
    vocab.save_vocab(str(tmp_path / "vocab.pkl"))
    args = pretrain.build_parser().parse_args(TINY + [
        "--corpus", str(tab), "--vocab", str(tmp_path / "vocab.pkl"), "--preset", "bert_pytorch",
        "--out", str(tmp_path / "run"), "--max-steps", "3", "--whole-word"])
    res = pretrain.run(args)
    assert res["step"] == 3 and res["vocab"].kind == "word" and len(res["vocab"]) == len(vocab)
    assert res["config"].vocab_size == len(vocab)


def test_activation_checkpointing_same_training(cache, tmp_path):
    """Recomputing the blocks in backward (RNG state restored, so dropout too) changes no number."""
    common = ["--max-steps", "3", "--layers", "2", "--dropout", "0.1", "--save-every", "100"]
    plain = _run(common, cache[0], tmp_path / "plain")
    ckpt = _run(common + ["--checkpoint-activations"], cache[0], tmp_path / "ckpt")
    for a, b in zip(plain["history"], ckpt["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    for (k, p), q in zip(plain["model"].state_dict().items(), ckpt["model"].state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=k)
