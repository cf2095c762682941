"""Nothing lost: a signal during `fastbert pretrain` / `fastbert finetune` writes a checkpoint and says
where, `--resume` takes the run folder, the metrics file continues with a marker and no repeated
step; --time-limit ends on a decayed schedule and says how far it got."""

import importlib.util
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from train_helpers import restore_threads, world_corpus  # noqa: F401 (autouse fixture)

from fastbert.train import pretrain
from fastbert.train.checkpoint import list_checkpoints
from fastbert.train.optim import TimeBudget, warmup_linear

SMALL = ["--layers", "1", "--hidden", "32", "--heads", "2", "--seq-len", "64", "--vocab-size", "600",
         "--batch", "8", "--no-progress", "--device", "cpu", "--threads", "1", "--log-every", "1",
         "--log-seconds", "0"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupt")
    path = world_corpus(root / "corpus.txt", 120)
    cache = root / "cache"
    assert pretrain.main(SMALL + ["--corpus", str(path), "--cache-dir", str(cache), "--max-steps", "1",
                                  "--out", str(root / "warm")]) == 0  # vocabulary and shard, once
    return str(path), str(cache)


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _start(argv, wait_for):
    """Start `python -m fastbert ARGV` and read its stdout until a line starts with wait_for."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "fastbert", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(wait_for):
            return proc, seen
    proc.wait(timeout=60)
    raise AssertionError(f"no {wait_for!r} line; rc {proc.returncode}\n{''.join(seen)}{proc.stderr.read()}")


def _finish(proc, sig):
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def test_sigint_saves_and_resume_takes_the_run_folder(corpus, tmp_path):
    text, cache = corpus
    run = tmp_path / "run"
    argv = ["pretrain", *SMALL, "--corpus", text, "--cache-dir", cache, "--out", str(run),
            "--max-steps", "100000", "--save-every", "100000"]
    proc, _ = _start(argv, "step      3 ")
    rc, out, err = _finish(proc, signal.SIGINT)
    assert rc == 130, out[-2000:] + err[-2000:]
    saved = list_checkpoints(run / "checkpoints")
    assert len(saved) == 1 and "Traceback" not in err
    step, path = saved[0]
    assert f"SIGINT at step {step}: checkpoint written to {path}" in err, err
    assert not [p for p in os.listdir(run / "checkpoints") if ".tmp" in p]
    recs = _records(run / "metrics.jsonl")
    assert recs[-1] == {"event": "interrupted", "step": step, "signal": "SIGINT", "checkpoint": path}
    assert [r["step"] for r in recs[:-1]] == list(range(1, step + 1))

    # the run folder as --resume's value (no --out): continues there
    res = pretrain.run(pretrain.build_parser().parse_args(
        SMALL + ["--corpus", text, "--cache-dir", cache, "--resume", str(run), "--max-steps", str(step + 2)]))
    assert res["step"] == step + 2 and res["out"] == str(run)
    recs = _records(run / "metrics.jsonl")
    steps = [r["step"] for r in recs if "loss" in r]
    assert steps == list(range(1, step + 3))  # no step twice
    marker = [r for r in recs if r.get("event") == "resume"]
    assert len(marker) == 1 and marker[0]["step"] == step and marker[0]["checkpoint"] == path
    config = json.load(open(run / "config.json"))
    assert config["command"] == "pretrain" and "torch" in config["versions"]
    assert config["model"]["hidden"] == 32 and config["resumes"][0]["step"] == step


def test_resume_drops_records_past_the_checkpoint(corpus, tmp_path):
    """A run killed without its final checkpoint logged steps it trains again: they are dropped."""
    text, cache = corpus
    run = tmp_path / "run"
    common = SMALL + ["--corpus", text, "--cache-dir", cache, "--out", str(run)]
    pretrain.run(pretrain.build_parser().parse_args(common + ["--max-steps", "6", "--save-every", "3",
                                                              "--halt-at", "5"]))
    os.remove(list_checkpoints(run / "checkpoints")[-1][1])  # as if killed before the step-5 save
    ckpt = list_checkpoints(run / "checkpoints")[-1][1]
    pretrain.run(pretrain.build_parser().parse_args(common + ["--max-steps", "6", "--resume", ckpt]))
    recs = _records(run / "metrics.jsonl")
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4, 5, 6]
    marker = next(r for r in recs if r.get("event") == "resume")
    assert marker["step"] == 3 and marker["dropped_records"] == 3  # steps 4, 5 and their held-out line


@pytest.fixture(scope="module")
def pretrained(corpus, tmp_path_factory):
    """A 2-step pretraining run folder to fine-tune from."""
    text, cache = corpus
    run = tmp_path_factory.mktemp("pre") / "run"
    assert pretrain.main(SMALL + ["--corpus", text, "--cache-dir", cache, "--out", str(run),
                                  "--max-steps", "2"]) == 0
    return run


@pytest.mark.parametrize("sig,rc", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_in_finetune_saves_the_model(pretrained, tmp_path, sig, rc):
    """Ctrl-C (SIGINT) or SIGTERM during fine-tuning: the model trained so far written atomically,
    where it is said on stderr, no traceback, exit status 128 + the signal (as pretraining)."""
    folder = tmp_path / "ft"
    argv = ["finetune", "--checkpoint", str(pretrained), "--batch", "8", "--seq-len", "64",
            "--epochs", "1000", "--threads", "1", "--no-progress", "--out", str(folder)]
    proc, _ = _start(argv, "epoch 1 ")
    got, out, err = _finish(proc, sig)
    assert got == rc, out[-2000:] + err[-2000:]
    name = signal.Signals(sig).name
    assert f"{name} at step" in err and str(folder / "model.pt") in err and "Traceback" not in err, err
    assert not [p for p in os.listdir(folder) if ".tmp" in p]
    state = torch.load(folder / "model.pt", weights_only=True)
    assert state["labels"][0] == "animal"
    recs = _records(folder / "metrics.jsonl")
    assert recs[0]["epoch"] == 1 and recs[-1]["event"] == "interrupted" and recs[-1]["signal"] == name


def test_ctrl_c_while_loading_gives_no_traceback(monkeypatch, capsys):
    """A KeyboardInterrupt outside training's handlers (the command still importing torch): one line,
    exit status 130, no traceback."""
    import fastbert.train.finetune as finetune

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune, "main", interrupted)
    from fastbert import cli

    assert cli.main(["finetune", "--checkpoint", "x"]) == 130
    err = capsys.readouterr().err
    assert "fastbert finetune: SIGINT outside training" in err and "Traceback" not in err


def test_time_limit_ends_on_a_decayed_schedule(corpus, tmp_path, capsys):
    text, cache = corpus
    res = pretrain.run(pretrain.build_parser().parse_args(
        SMALL + ["--corpus", text, "--cache-dir", cache, "--out", str(tmp_path / "run"),
                 "--max-steps", "1000000", "--warmup", "2", "--time-limit", "2"]))
    assert res["stopped"] == "time" and 2 < res["step"] < 1000000
    out = capsys.readouterr().out
    assert f"--time-limit 2s ended the run at step {res['step']} of 1000000" in out
    lrs = [r["lr"] for r in res["history"]]
    assert lrs[-1] < 0.5 * max(lrs)  # decayed over the time, not over the million steps
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    recs = _records(tmp_path / "run" / "metrics.jsonl")
    assert any(r.get("event") == "time_limit" and r["step"] == res["step"] for r in recs)


def test_schedule_follows_the_time_left():
    left = [1.0]
    f = warmup_linear(2, 100, remaining=lambda: left[0])
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(10) == pytest.approx(90 / 98)
    left[0] = 0.25
    assert f(10) == 0.25 and f(99) == pytest.approx(1 / 98)
    left[0] = -0.1
    assert f(10) == 0.0
    budget = TimeBudget(limit=100.0, spent=40.0)
    assert budget.remaining() == pytest.approx(1.0) and not budget.over()  # warmup ended at 40 s
    budget.spent = 70.0
    assert budget.remaining() == pytest.approx(0.5)
    budget.spent = 100.0
    assert budget.over()


def test_no_default_time_cap():
    o = pretrain._resolve_options(pretrain.build_parser().parse_args([]), cuda=False)
    assert o.time_limit is None and o.max_steps == 3000
    assert "CPU_DEFAULTS" not in pretrain.build_parser().format_help()


def test_tensorboard_is_optional(corpus, tmp_path, capsys):
    """--tensorboard writes event files when the tensorboard package is there, else exits 2 saying so."""
    text, cache = corpus
    argv = SMALL + ["--corpus", text, "--cache-dir", cache, "--out", str(tmp_path / "run"),
                    "--max-steps", "2", "--tensorboard"]
    if importlib.util.find_spec("tensorboard") is None:
        assert pretrain.main(argv) == 2
        assert "pip install tensorboard" in capsys.readouterr().err
        return
    assert pretrain.main(argv) == 0
    events = os.listdir(tmp_path / "run" / "tensorboard")
    assert any(name.startswith("events.out.tfevents") for name in events), events
