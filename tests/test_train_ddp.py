"""torchrun with 2 gloo processes on CPU matches one process with the same global batch.

One process runs --batch 4 --accum 2 (global batch 8 in 2 micro-batches); two processes run --batch 4
each (rank r takes micro-batch r of the same global batch, DDP averages the gradients, the loss is
normalised by the global counts). Dropout is off so both see the same computation. Step 1's loss
(before any update) must agree to float rounding (1e-5); later steps to 2e-3 relative and the final
weights to 2 x lr per step: the all-reduce sums gradients in another order, and Adam's
g / (sqrt(v) + eps) turns rounding differences of near-zero gradient entries into update
differences of up to 2 x lr (a flipped sign).
"""

import gzip
import json
import os
import subprocess
import sys

import pytest
import torch

from fastbert.train import pretrain
from fastbert.train.checkpoint import list_checkpoints, load_checkpoint

EMBEDDED = os.path.join(os.path.dirname(__file__), "..", "fastbert", "data", "corpus.txt.gz")
ARGS = ["--size", "tiny", "--layers", "1", "--hidden", "32", "--heads", "2", "--seq-len", "64",
        "--vocab-size", "500", "--dropout", "0", "--max-steps", "3", "--log-every", "1", "--save-every", "3",
        "--warmup", "1", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """A small corpus and the one-process run (batch 4 x accum 2) that both modes compare against."""
    root = tmp_path_factory.mktemp("ddp")
    with gzip.open(EMBEDDED, "rt", encoding="utf-8") as f:
        docs = f.read().split("\n\n")[:80]
    path = root / "corpus.txt"
    path.write_text("\n\n".join(docs) + "\n")
    common = ARGS + ["--corpus", str(path), "--cache-dir", str(root / "cache")]
    threads = torch.get_num_threads()
    assert pretrain.main(common + ["--out", str(root / "single"), "--batch", "4", "--accum", "2",
                                   "--log-json", str(root / "single.jsonl"), "--threads", "1"]) == 0
    torch.set_num_threads(threads)
    return common, root


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one(single, tmp_path, mode):
    common, root = single
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fastbert", "pretrain", *common, "--out", str(tmp_path / "multi"), "--batch", "4",
           "--log-json", str(tmp_path / "multi.jsonl"), "--threads", "1"]
    if mode == "fsdp":
        cmd.append("--fsdp")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, two = _records(root / "single.jsonl"), _records(tmp_path / "multi.jsonl")
    held_one, held_two = one.pop()["heldout"], two.pop()["heldout"]  # the held-out evaluation comes last
    assert held_one["examples"] == held_two["examples"] and held_one["masked"] == held_two["masked"]
    assert held_one["mlm_loss"] == pytest.approx(held_two["mlm_loss"], rel=1e-3)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two):
        rel = 1e-5 if a["step"] == 1 else 2e-3
        for k in ("loss", "mlm_loss", "nsp_loss"):
            assert a[k] == pytest.approx(b[k], rel=rel, abs=1e-6), (k, a, b)
    assert one[0]["mlm_acc"] == two[0]["mlm_acc"] and one[0]["nsp_acc"] == two[0]["nsp_acc"]
    sa = load_checkpoint(list_checkpoints(root / "single" / "checkpoints")[-1][1])["model"]
    sb = load_checkpoint(list_checkpoints(tmp_path / "multi" / "checkpoints")[-1][1])["model"]
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=6e-3, msg=k)  # 2 x lr (1e-3) x 3 steps


def test_modernbert_two_gloo_processes_match_one(single, tmp_path):
    """The same for --preset modernbert (MLM only, no NSP records): DDP over 2 processes gives the
    one-process run's losses and weights."""
    common = single[0] + ["--preset", "modernbert", "--layers", "3", "--local-window", "16"]
    assert pretrain.main(common + ["--out", str(tmp_path / "one"), "--batch", "4", "--accum", "2",
                                   "--log-json", str(tmp_path / "one.jsonl"), "--threads", "1"]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fastbert", "pretrain", *common, "--out", str(tmp_path / "multi"), "--batch", "4",
           "--log-json", str(tmp_path / "multi.jsonl"), "--threads", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, two = _records(tmp_path / "one.jsonl")[:-1], _records(tmp_path / "multi.jsonl")[:-1]
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two):
        assert "nsp_loss" not in a and "nsp_loss" not in b
        assert a["mlm_loss"] == pytest.approx(b["mlm_loss"], rel=1e-5 if a["step"] == 1 else 2e-3)
    sa = load_checkpoint(list_checkpoints(tmp_path / "one" / "checkpoints")[-1][1])["model"]
    sb = load_checkpoint(list_checkpoints(tmp_path / "multi" / "checkpoints")[-1][1])["model"]
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=6e-3, msg=k)
