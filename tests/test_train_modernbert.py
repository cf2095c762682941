"""`fastbert pretrain --preset modernbert` and `fastbert finetune` on its checkpoints (issue 21).

MLM only, as ModernBERT: examples are whole chunks ([CLS] text [SEP], no B, no NSP head), the MLM head is
ModernBertForMaskedLM's on the masked rows only; packed batches give the padded step's losses and
gradients; --export-hf writes a ModernBertForMaskedLM (and fine-tuning a ModernBertFor*Classification)
whose outputs are the fastbert model's; resuming is bit-identical.
"""

import json

import numpy as np
import pytest
import torch
from train_helpers import restore_threads, world_corpus  # noqa: F401 (autouse fixture)

from fastbert.reference.model import BertConfig
from fastbert.train import finetune, pretrain
from fastbert.train.checkpoint import check_compatible, list_checkpoints
from fastbert.train.data import PretrainData, cached_shard
from fastbert.train.heads import PretrainModel
from fastbert.train.packing import PackedPretrain, pack_rows

TINY = ["--preset", "modernbert", "--layers", "2", "--hidden", "32", "--heads", "2", "--seq-len", "64",
        "--vocab-size", "2000", "--batch", "8", "--no-progress", "--log-every", "1", "--device", "cpu",
        "--threads", "1", "--local-window", "16"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("modern")
    corpus = world_corpus(root / "corpus.txt", 300)
    out = root / "warm"
    res = pretrain.run(pretrain.build_parser().parse_args(
        TINY + ["--corpus", str(corpus), "--out", str(out), "--cache-dir", str(root / "cache"), "--max-steps",
                "40", "--lr", "3e-3", "--warmup", "4", "--save-every", "1000"]))
    return {"corpus": str(corpus), "cache": str(root / "cache"), "run": res, "out": str(out)}


def _run(cache, argv, out):
    args = pretrain.build_parser().parse_args(
        TINY + ["--corpus", cache["corpus"], "--cache-dir", cache["cache"], "--out", str(out)] + argv)
    return pretrain.run(args)


def test_mlm_only_run_learns(cache):
    """The loss starts near ln(vocabulary) and falls; the records have no NSP fields; the model is a
    ModernEncoder without an NSP head, its local layers windowed."""
    res = cache["run"]
    h = res["history"]
    assert len(h) == 40 and all("nsp_loss" not in r and "nsp_acc" not in r for r in h)
    assert h[0]["loss"] == h[0]["mlm_loss"] > np.log(len(res["vocab"])) - 0.5
    assert np.mean([r["loss"] for r in h[-5:]]) < h[0]["loss"] - 1.0
    model = res["model"]
    assert type(model.bert).__name__ == "ModernEncoder" and not hasattr(model, "next_sentence")
    cfg = res["config"]
    assert cfg.preset == "modernbert" and cfg.local_window == 16 and cfg.ffn == "geglu" and not cfg.bias
    assert [b.attention.window for b in model.bert.transformer_blocks] == [None, 8]
    assert "nsp_acc" not in res["heldout"] and res["heldout"]["masked"] > 0
    records = [json.loads(line) for line in open(f"{cache['out']}/metrics.jsonl")]
    assert all("nsp_loss" not in r for r in records if "loss" in r)


def test_chunks_are_whole_documents_pieces(cache):
    """nsp=False examples: [CLS] chunk [SEP] with one [SEP], one segment, is_next 1, and the chunk is a
    contiguous run of a document's tokens; every chunk of the packed split is used (more examples than
    the NSP split, which drops one-sentence chunks)."""
    vocab = cache["run"]["vocab"]
    shard = cached_shard(cache["corpus"], vocab, cache["cache"], progress=False)
    data = PretrainData(shard, 64, 8, cls_id=vocab.cls_id, sep_id=vocab.sep_id, segments=(0, 1),
                        pairs="packed", nsp=False)
    pairs = PretrainData(shard, 64, 8, cls_id=vocab.cls_id, sep_id=vocab.sep_id, segments=(0, 1),
                         pairs="packed")
    assert data.n_examples >= pairs.n_examples
    tokens = np.asarray(shard.tokens)
    for mb in data.step_batches(0, 3):
        ids, seg = mb["input_ids"], mb["segment_ids"]
        assert (mb["is_next"] == 1).all() and (seg == 0).all()
        for row in ids:
            n = int((row != 0).sum())
            assert 3 <= n <= 64 and row[0] == vocab.cls_id and row[n - 1] == vocab.sep_id
            assert (row[1:n - 1] != vocab.sep_id).all()
            body = row[1:n - 1]
            starts = np.flatnonzero(tokens[: len(tokens) - len(body) + 1] == body[0])
            assert any((tokens[s:s + len(body)] == body).all() for s in starts)


def test_packed_equals_padded():
    """PackedPretrain of a ModernBERT model: the padded step's MLM loss, hits and every gradient; the NSP
    sums are zeros."""
    torch.manual_seed(0)
    cfg = BertConfig.modernbert(97, 32, 3, 2, 48, max_position=64, local_window=6)
    model = PretrainModel(cfg).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    lengths = rng.integers(5, 25, 6)
    ids = np.zeros((6, 24), dtype=np.int64)
    for r, n in enumerate(lengths):
        n = min(n, 24)
        lengths[r] = n
        ids[r, :n] = rng.integers(5, 97, n)
    labels = np.where((rng.random(ids.shape) < 0.25) & (ids > 0), ids, 0)
    t = torch.from_numpy
    pos = (t(labels).reshape(-1) != 0).nonzero().squeeze(1)
    mlm, hits, nsp = model(t(ids), t(np.zeros_like(ids)), pos, t(labels).reshape(-1)[pos])
    assert nsp is None
    mlm.backward()
    padded = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    pack = pack_rows(ids, np.zeros_like(ids), np.ones(6), tokens=int(lengths.sum()) + 30, max_seqs=12,
                     max_seqlen=24, max_predictions=len(pos) + 3, lengths=lengths, mlm_labels=labels)
    p_mlm, p_hits, p_nsp, p_nsp_hits = PackedPretrain(model)(*pack.inputs())
    assert float(p_nsp) == 0.0 and int(p_nsp_hits) == 0
    torch.testing.assert_close(p_mlm, mlm, rtol=1e-6, atol=1e-6)  # both heads sum the loss in fp32
    assert int(p_hits) == int(hits)
    p_mlm.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, padded[n], rtol=1e-5, atol=1e-6, msg=n)


def test_packed_run_and_resume_bit_identical(cache, tmp_path):
    """--packed trains MLM only too; a run halted and resumed ends with the uninterrupted run's weights."""
    common = ["--packed", "--max-steps", "4", "--save-every", "2", "--dropout", "0.1", "--warmup", "1"]
    full = _run(cache, common, tmp_path / "full")
    assert all("nsp_loss" not in r for r in full["history"])
    _run(cache, common + ["--halt-at", "2"], tmp_path / "split")
    assert [s for s, _ in list_checkpoints(tmp_path / "split" / "checkpoints")] == [2]
    resumed = _run(cache, common + ["--resume"], tmp_path / "split")
    a, b = full["model"].state_dict(), resumed["model"].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_hf_is_modernbert_for_masked_lm(cache, tmp_path):
    """--export-hf of a ModernBERT run loads with AutoModelForMaskedLM as ModernBertForMaskedLM whose
    logits are fastbert's (every real position); AutoTokenizer encodes as the vocabulary does and
    fill-mask runs."""
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    res = _run(cache, ["--max-steps", "3", "--export-hf", str(out)], tmp_path / "run")
    hf = transformers.AutoModelForMaskedLM.from_pretrained(str(out)).eval()
    assert type(hf).__name__ == "ModernBertForMaskedLM"
    ours = res["model"].eval()
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    ids = torch.randint(5, len(res["vocab"]), (3, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0
    mask[2, 7:] = 0
    ids = ids * mask
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits
        h = ours.bert(ids, attention_mask=mask)
        mine = ours.mask_lm.linear(ours.mlm_rows(h))
    real = mask.bool()
    torch.testing.assert_close(theirs[real], mine[real], rtol=1e-4, atol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "the cat sat on the mat ."
    v = res["vocab"]
    assert tok(text)["input_ids"] == [v.cls_id, *v.encode_batch([text])[0], v.sep_id]
    fill = transformers.pipeline("fill-mask", model=str(out), tokenizer=str(out), device="cpu")
    assert len(fill("the cat sat on the [MASK] .")) == 5


@pytest.mark.parametrize("task", ["sequence", "token"])
def test_finetune_modernbert_checkpoint_and_export(cache, tmp_path, task):
    """fastbert finetune on a ModernBERT checkpoint: the encoder loads, training runs, the scores are
    reported, and --export-hf writes ModernBertFor{Sequence,Token}Classification with the classifier's
    outputs."""
    transformers = pytest.importorskip("transformers")
    export = tmp_path / "hf"
    args = finetune.build_parser().parse_args(
        ["--checkpoint", cache["out"], "--task", task, "--max-steps", "6", "--batch", "16", "--no-progress",
         "--device", "cpu", "--out", str(tmp_path / "ft"), "--export-hf", str(export), "--threads", "1"])
    res = finetune.run(args)
    assert res["exit_code"] == 0 and res["history"]
    model = res["model"].eval()
    assert type(model.bert).__name__ == "ModernEncoder" and model.head is not None
    arch = "ModernBertForTokenClassification" if task == "token" else "ModernBertForSequenceClassification"
    hf = getattr(transformers, arch).from_pretrained(str(export)).eval()
    assert hf.config.id2label == dict(enumerate(res["labels"]))
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    ids = torch.randint(5, 200, (2, 12), generator=g)
    ids[1, 9:] = 0
    mask = (ids != 0).long()
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits
        mine = model(ids, torch.zeros_like(ids))
    if task == "token":
        theirs, mine = theirs[mask.bool()], mine[mask.bool()]
    torch.testing.assert_close(theirs, mine, rtol=1e-4, atol=1e-4)


def test_bad_options_exit_cleanly(cache, tmp_path, capsys):
    base = ["--corpus", cache["corpus"], "--cache-dir", cache["cache"], "--max-steps", "1"]
    argv = [a for a in TINY if a not in ("--preset", "modernbert")]
    assert pretrain.main(argv + base + ["--out", str(tmp_path / "a")]) == 2  # --local-window, not the preset
    assert "--preset modernbert" in capsys.readouterr().err
    path = tmp_path / "bp.pt"
    argv = TINY + base + ["--out", str(tmp_path / "b"), "--export-bert-pytorch", str(path)]
    assert pretrain.main(argv) == 2
    assert "--export-bert-pytorch needs --preset bert_pytorch" in capsys.readouterr().err
    assert not path.exists() and not (tmp_path / "b" / "checkpoints").exists()


def test_checkpoints_from_before_the_modernbert_fields_still_resume():
    """A checkpoint config without the new fields (written before them) matches its BERT run."""
    cfg = BertConfig.hf(100, 32, 1, 2)
    from dataclasses import asdict

    new = asdict(cfg)
    old = {k: v for k, v in new.items() if k not in ("ffn", "local_window", "global_every", "rope_theta",
                                                      "local_rope_theta", "norm_bias", "bias")}
    check_compatible({"config": old, "vocab_fingerprint": "x"}, new, "x")
    with pytest.raises(ValueError, match="does not match"):
        check_compatible({"config": old, "vocab_fingerprint": "x"}, asdict(cfg.with_(hidden=64)), "x")
