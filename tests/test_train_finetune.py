"""`fastbert finetune`: sequence and token classification from a pretraining checkpoint."""

import gzip

import numpy as np
import pytest
import torch

from fastbert.train import finetune, pretrain
from fastbert.train.data import CorpusError


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    with gzip.open(pretrain.DEFAULT_CORPUS, "rt", encoding="utf-8") as f:
        docs = f.read().split("\n\n")[:150]
    (root / "corpus.txt").write_text("\n\n".join(docs) + "\n")
    argv = ["--corpus", str(root / "corpus.txt"),
            "--size", "tiny", "--layers", "1", "--hidden", "32", "--heads", "2", "--seq-len", "64",
            "--vocab-size", "1000", "--batch", "8", "--max-steps", "2", "--no-progress", "--out",
            str(root / "run"), "--threads", "1"]
    n = torch.get_num_threads()
    assert pretrain.main(argv) == 0
    torch.set_num_threads(n)
    return str(root / "run")


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


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
        assert res["labels"] == ["concurrency", "data", "files", "net", "numbers", "text"]
    else:
        assert res["labels"] == ["NAME", "O"] and "f1" in last
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
