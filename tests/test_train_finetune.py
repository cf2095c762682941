"""`fastbert finetune`: sequence and token classification from a pretraining checkpoint."""

import numpy as np
import pytest
import torch
from train_helpers import restore_threads, world_corpus  # noqa: F401 (autouse fixture)

from fastbert.train import finetune, pretrain
from fastbert.train.data import CorpusError


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    argv = ["--corpus", str(world_corpus(root / "corpus.txt", 150)),
            "--size", "tiny", "--layers", "1", "--hidden", "32", "--heads", "2", "--seq-len", "64",
            "--vocab-size", "1000", "--batch", "8", "--max-steps", "2", "--no-progress", "--out",
            str(root / "run"), "--threads", "1"]
    n = torch.get_num_threads()
    assert pretrain.main(argv) == 0
    torch.set_num_threads(n)
    return str(root / "run")


def test_scores_against_hand_computation():
    s = finetune.scores([0, 1, 1, 2, 2, 2], [0, 1, 2, 2, 2, 1], 3, outside=0)
    assert s["accuracy"] == pytest.approx(4 / 6)
    # per class F1: 0 -> 1, 1 -> 1/2, 2 -> 2/3
    assert s["macro_f1"] == pytest.approx((1 + 0.5 + 2 / 3) / 3)
    # non-O micro F1: tp 3 (one 1, two 2), predicted 5, gold 5
    assert s["f1"] == pytest.approx(2 * 3 / 10)


@pytest.mark.parametrize("task", ["sequence", "token"])
def test_finetune_runs_and_reports(checkpoint, task, tmp_path, capsys):
    args = finetune.build_parser().parse_args(["--checkpoint", checkpoint, "--task", task, "--epochs", "1",
                                               "--max-steps", "4", "--batch", "8", "--seq-len", "64",
                                               "--threads", "1", "--out", str(tmp_path / "ft")])
    res = finetune.run(args)
    last = res["history"][-1]
    assert 0.0 <= last["accuracy"] <= 1.0 and 0.0 <= last["macro_f1"] <= 1.0
    assert np.isfinite(last["train_loss"])
    if task == "sequence":
        assert res["labels"] == ["animal", "food", "instrument", "plant", "tool", "vehicle"]
    else:
        assert res["labels"] == ["ANIMAL", "FOOD", "INSTRUMENT", "O", "PLANT", "TOOL", "VEHICLE"]
        assert "f1" in last
    out = capsys.readouterr().out
    assert "held-out accuracy" in out and (tmp_path / "ft" / "model.pt").exists()


def test_finetune_bad_input(checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nonly one field\n")
    with pytest.raises(CorpusError, match=r"bad.csv:2"):
        finetune.read_sequence_file(str(bad))
    assert finetune.main(["--checkpoint", checkpoint, "--train", str(bad)]) == 2
    assert finetune.main(["--checkpoint", str(tmp_path / "nothing")]) == 2
    assert finetune.main([]) == 2
    err = capsys.readouterr().err
    assert err.count("fastbert finetune: error:") == 3


def test_from_scratch_reinitialises(checkpoint):
    """--from-scratch: the checkpoint's config and vocabulary, fresh encoder weights (what a new
    Encoder draws under the run's seed), the same classifier head as the pretrained run."""
    args = finetune.build_parser().parse_args(["--checkpoint", checkpoint, "--seq-len", "64"])
    task = finetune.prepare(args)
    pre = finetune.build_classifier(task, 0, from_scratch=False)
    fresh = finetune.build_classifier(task, 0, from_scratch=True)
    assert pre.bert.config == fresh.bert.config == task.cfg
    state = task.encoder_state
    a, b = pre.bert.state_dict(), fresh.bert.state_dict()
    assert a.keys() == b.keys() == state.keys()
    for k in state:
        assert torch.equal(a[k], state[k]), k
    differ = [k for k in state if state[k].dim() == 2 and not torch.equal(b[k], state[k])]
    matrices = [k for k in state if state[k].dim() == 2]
    assert differ == matrices  # every weight matrix re-drawn
    torch.manual_seed(0)
    again = finetune.Classifier(task.cfg, len(task.names))
    for k, v in again.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    assert torch.equal(pre.classifier.weight, fresh.classifier.weight)


def test_compare_scratch_prints_both(checkpoint, capsys):
    assert finetune.main(["--checkpoint", checkpoint, "--compare-scratch", "--seeds", "0", "1",
                          "--max-steps", "2", "--batch", "8", "--seq-len", "64", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "pretrained vs from scratch" in out
    rows = [line.split("|") for line in out.splitlines() if line.strip().startswith(("0 |", "1 |", "mean"))]
    assert [r[0].strip() for r in rows] == ["0", "1", "mean"]
    for r in rows:
        a, b, gain = (float(x) for x in r[1:])
        assert gain == pytest.approx(a - b, abs=2e-3)


def test_finetune_lr_options(checkpoint, capsys):
    cfg = finetune.prepare(finetune.build_parser().parse_args(["--checkpoint", checkpoint])).cfg
    assert finetune.default_lr(cfg.with_(hidden=768)) == pytest.approx(5e-5)
    assert finetune.default_lr(cfg.with_(hidden=128)) > finetune.default_lr(cfg.with_(hidden=256))
    assert finetune.main(["--checkpoint", checkpoint, "--lr", "0"]) == 2
    assert finetune.main(["--checkpoint", checkpoint, "--from-scratch", "--compare-scratch"]) == 2
    err = capsys.readouterr().err
    assert "must be positive" in err and "--compare-scratch already runs --from-scratch" in err
    args = finetune.build_parser().parse_args(["--checkpoint", checkpoint, "--lr", "search", "--max-steps",
                                               "2", "--batch", "8", "--seq-len", "64", "--threads", "1"])
    res = finetune.run(args)
    tried = [line for line in capsys.readouterr().out.splitlines() if line.startswith("lr search:")]
    base = finetune.default_lr(cfg)
    assert len(tried) == 3
    assert any(res["runs"][0]["lr"] == pytest.approx(x) for x in (base / 3, base, base * 3))


@pytest.mark.parametrize("task,rows", [("sequence", 576), ("token", 600)])
def test_default_data_is_the_demo_pair_and_small_sets_get_200_steps(checkpoint, task, rows):
    """Without --train: the demo's training file, held out on its own test file (not a split of the
    training rows); without --epochs: 3 epochs or 200 steps, whichever is more."""
    args = finetune.build_parser().parse_args(["--checkpoint", checkpoint, "--task", task, "--batch", "32",
                                               "--seq-len", "64", "--threads", "1", "--dropout", "0"])
    prep = finetune.prepare(args)
    assert len(prep.rows) == rows and len(prep.eval_rows) == rows
    train, held, rng = finetune.split(prep, args, 0)
    assert held is prep.eval_rows
    _, hist = finetune.train_once(prep, args, train, held, rng, 0, 1e-3, False, say=lambda m: None)
    assert hist[-1]["step"] == finetune.MIN_STEPS > 3 * (rows // 32)


@pytest.mark.parametrize("task", ["sequence", "token"])
def test_finetune_export_hf_loads_with_label_names(checkpoint, task, tmp_path, capfd):
    """finetune --export-hf: transformers' BertForSequenceClassification / BertForTokenClassification
    load it with no missing key, name the labels, and give the fine-tuned model's logits."""
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    args = finetune.build_parser().parse_args(["--checkpoint", checkpoint, "--task", task, "--max-steps", "3",
                                               "--batch", "8", "--seq-len", "64", "--threads", "1",
                                               "--out", str(tmp_path / "ft"), "--export-hf", str(out),
                                               "--no-progress"])
    res = finetune.run(args)
    assert "Writing model shards" not in capfd.readouterr().err
    cls = transformers.BertForTokenClassification if task == "token" else \
        transformers.BertForSequenceClassification
    hf, info = cls.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    auto = transformers.AutoModelForTokenClassification if task == "token" else \
        transformers.AutoModelForSequenceClassification
    assert type(auto.from_pretrained(str(out))) is cls
    assert [hf.config.id2label[i] for i in range(len(res["labels"]))] == res["labels"]
    model = res["model"].eval()
    ids = torch.randint(5, 500, (2, 11))
    ids[:, 0] = 2
    with torch.no_grad():
        ours = model(ids, torch.zeros_like(ids))
        theirs = hf.eval()(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_finetune_run_folder_records(checkpoint, tmp_path):
    """Without --out the run folder is <pretraining run>/finetune-<task> (then -2, ...): model.pt,
    config.json and a metrics line per epoch of each run."""
    import json
    import os
    import shutil

    run = str(tmp_path / "pre")  # a run folder of its own: other tests fine-tune the module's
    shutil.copytree(os.path.join(checkpoint, "checkpoints"), os.path.join(run, "checkpoints"))
    argv = ["--checkpoint", run, "--compare-scratch", "--max-steps", "2", "--batch", "8", "--seq-len",
            "64", "--threads", "1", "--epochs", "2", "--no-progress"]
    first = finetune.run(finetune.build_parser().parse_args(argv))
    second = finetune.run(finetune.build_parser().parse_args(argv))
    assert first["out"] == os.path.join(run, "finetune-sequence")
    assert second["out"] == first["out"] + "-2"
    with open(os.path.join(first["out"], "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    assert [(r["init"], r["epoch"]) for r in recs] == [("pretrained", 1), ("scratch", 1)]
    assert all("accuracy" in r and r["seed"] == 0 for r in recs)
    for init in ("pretrained", "scratch"):
        assert os.path.isfile(os.path.join(first["out"], f"{init}-seed0", "model.pt"))
    config = json.load(open(os.path.join(first["out"], "config.json")))
    assert config["command"] == "finetune" and config["options"]["compare_scratch"] is True
