"""`fastbert pretrain --packed` (fixed-shape packs, device-side sums) and `--cuda-graphs` (its clear
refusal without CUDA); the packed step against the padded one is tested in tests/test_packing.py."""

import pytest
import torch
from train_helpers import restore_threads  # noqa: F401 (autouse fixture)

from fastbert.train import pretrain

TINY = ["--size", "tiny", "--layers", "2", "--hidden", "64", "--heads", "2", "--seq-len", "64",
        "--vocab-size", "2000", "--batch", "16", "--no-progress", "--log-every", "5", "--device", "cpu",
        "--threads", "1", "--dropout", "0", "--save-every", "1000"]


def _run(argv, tmp_path):
    args = pretrain.build_parser().parse_args(TINY + ["--cache-dir", str(tmp_path / "cache"),
                                                      "--out", str(tmp_path / "run")] + argv)
    return pretrain.run(args)


def test_packed_pretraining_learns(tmp_path):
    """30 packed steps lower the loss from about ln(2000) + ln(2) = 8.29 (uniform MLM and NSP); the log
    reads the device sums once per interval and counts real tokens only."""
    res = _run(["--packed", "--lr", "3e-3", "--warmup", "5", "--max-steps", "30"], tmp_path)
    hist = res["history"]
    assert [r["step"] for r in hist] == [5, 10, 15, 20, 25, 30]
    assert hist[0]["loss"] > 7.5 and hist[-1]["loss"] < hist[0]["loss"] - 0.3, [r["loss"] for r in hist]
    assert all(0 <= r["mlm_acc"] <= 1 and 0 <= r["nsp_acc"] <= 1 and r["tokens_per_s"] > 0 for r in hist)
    assert res["heldout"] is None or res["heldout"]["mlm_loss"] < 8.5


def test_cuda_graphs_without_cuda_says_so(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(pretrain.ConfigError, match="--cuda-graphs needs a CUDA device"):
        _run(["--cuda-graphs", "--max-steps", "2"], tmp_path)
