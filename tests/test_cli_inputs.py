"""Bad input to `fastbert pretrain`, `fastbert finetune` and `fastbert vocab`: one clear message on
stderr and exit status 2, never a traceback and never a run on silently replaced values."""

import gzip
import os

import pytest
import torch
from train_helpers import restore_threads, world_corpus  # noqa: F401 (autouse fixture)

from fastbert import cli
from fastbert.train import finetune, pretrain
from fastbert.train.checkpoint import list_checkpoints
from fastbert.train.data import CorpusError, check_text_file

SMALL = ["--layers", "1", "--hidden", "32", "--heads", "2", "--seq-len", "64", "--vocab-size", "600",
         "--batch", "8", "--max-steps", "1", "--no-progress", "--device", "cpu", "--threads", "1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return world_corpus(tmp_path_factory.mktemp("inputs") / "corpus.txt", 120)


@pytest.fixture(scope="module")
def checkpoint(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    assert pretrain.main(SMALL + ["--corpus", str(corpus), "--out", str(out)]) == 0
    return str(out)


def _exit_code(fn, argv):
    """The status fn(argv) exits with: its return value, or argparse's SystemExit code."""
    try:
        return fn(argv)
    except SystemExit as e:
        return e.code


POSITIVE_INT = "must be a positive whole number"
BAD_NUMBERS = [
    *[(opt, value, f"{POSITIVE_INT}, got {value}") for opt, value in (
        ("--seq-len", "0"), ("--batch", "0"), ("--batch", "-1"), ("--layers", "0"), ("--hidden", "-4"),
        ("--vocab-size", "0"), ("--accum", "0"))],
    *[("--lr", value, "must be a positive number") for value in ("-1", "0")],
    ("--lr", "nan", "expected a finite number"), ("--lr", "fast", "expected a number"),
    ("--max-steps", "-1", "must be 0 or more"), ("--time-limit", "0", "must be a positive number"),
    ("--dropout", "1.5", r"must be in \[0, 1\)"),
]


@pytest.mark.parametrize("option,value,message", BAD_NUMBERS)
def test_pretrain_refuses_bad_numbers(option, value, message, tmp_path, capsys):
    assert _exit_code(pretrain.main, ["--out", str(tmp_path / "r"), option, value]) == 2
    err = capsys.readouterr().err
    assert f"argument {option}:" in err and __import__("re").search(message, err), err
    assert "Traceback" not in err and not (tmp_path / "r").exists()


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "tpu"])
def test_unknown_device(device, corpus, tmp_path, capsys):
    argv = ["--corpus", str(corpus), "--out", str(tmp_path / "r"), "--device", device]
    assert pretrain.main(argv) == 2
    err = capsys.readouterr().err
    assert f"--device {device!r} is not a device; expected auto, cpu, cuda or cuda:N" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_without_a_gpu(corpus, tmp_path, capsys):
    assert pretrain.main(["--corpus", str(corpus), "--out", str(tmp_path / "r"), "--device", "cuda"]) == 2
    assert "no CUDA device is available" in capsys.readouterr().err


def _elf(path):
    path.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(range(256)) * 40)
    return "an ELF executable"


def _nul(path):
    path.write_bytes(b"some text\n" * 10 + b"\x00\x01\x02\x03" * 100)
    return "NUL byte at offset 100"


def _latin1(path):
    path.write_bytes("le café est noir .\nla crème est blanche .\n".encode("latin-1") * 20)
    return "is not UTF-8 text: byte 0xe9 at offset 6 (line 1)"


def _plain_named_gz(path):
    path.write_text("just text\nin a file named .gz\n")
    return "is named .gz but is not gzip-compressed"


def _gzip_named_txt(path):
    path.write_bytes(gzip.compress(b"compressed text\n" * 50))
    return "is gzip-compressed data but its name does not end in .gz"


def _damaged_gz(path):
    path.write_bytes(gzip.compress(os.urandom(1 << 17))[:5000])
    return "is a damaged gzip file"


@pytest.mark.parametrize("name,make", [("lib.so", _elf), ("blob.bin", _nul), ("latin1.txt", _latin1),
                                       ("plain.txt.gz", _plain_named_gz), ("packed.txt", _gzip_named_txt),
                                       ("cut.txt.gz", _damaged_gz)])
def test_pretrain_refuses_non_text_corpus(name, make, tmp_path, capsys):
    path = tmp_path / name
    found = make(path)
    argv = SMALL + ["--corpus", str(path), "--out", str(tmp_path / "r")]
    assert pretrain.main(argv) == 2
    err = capsys.readouterr().err
    assert f"fastbert pretrain: error: corpus file {str(path)!r}" in err or str(path) in err, err
    assert found in err, err
    assert "Traceback" not in err and not list_checkpoints(tmp_path / "r" / "checkpoints")


def test_bad_utf8_after_the_first_block_names_the_line(tmp_path):
    """A bad byte past what check_text_file samples is still a CorpusError (at its line) when read."""
    path = tmp_path / "late.txt"
    path.write_bytes(b"a fine sentence .\n" * 5000 + b"caf\xe9 .\n")
    check_text_file(str(path))  # the first 64 KiB are fine
    from fastbert.train.data import iter_lines

    with pytest.raises(CorpusError, match="is not UTF-8 text near line"):
        list(iter_lines(str(path)))


def test_vocab_file_not_text(tmp_path, capsys, corpus):
    bad = tmp_path / "vocab.txt"
    bad.write_bytes(b"[PAD]\n[UNK]\ncaf\xe9\n")
    argv = SMALL + ["--corpus", str(corpus), "--vocab", str(bad), "--out", str(tmp_path / "r")]
    assert pretrain.main(argv) == 2
    assert "neither a bert_pytorch pickle nor UTF-8 text" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--device", "gpu"], "is not a device"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--batch", "0"], "argument --batch: must be a positive whole number"),
    (["--seq-len", "-3"], "argument --seq-len: must be a positive whole number"),
    (["--max-steps", "0"], "argument --max-steps: must be a positive whole number"),
])
def test_finetune_refuses_bad_options(argv, message, checkpoint, capsys):
    assert _exit_code(finetune.main, ["--checkpoint", checkpoint, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


@pytest.mark.parametrize("name,make", [("rows.tsv", _latin1), ("rows.csv", _elf)])
def test_finetune_refuses_non_text_data(name, make, checkpoint, tmp_path, capsys):
    path = tmp_path / name
    found = make(path)
    assert finetune.main(["--checkpoint", checkpoint, "--train", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"data file {str(path)!r}" in err and found in err, err


def test_resume_names_what_is_missing(corpus, tmp_path, capsys):
    argv = SMALL + ["--corpus", str(corpus), "--out", str(tmp_path / "r"), "--resume", str(tmp_path / "none")]
    assert pretrain.main(argv) == 2
    assert "no such checkpoint file or run folder" in capsys.readouterr().err


def test_version(capsys):
    import fastbert

    assert cli.main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fastbert ") and fastbert.__version__ in out and "torch" in out


def test_help_names_no_internals():
    """--help speaks of options and defaults, not of the code's constants and functions."""
    import re

    for parser in (pretrain.build_parser(), finetune.build_parser()):
        text = parser.format_help()
        assert not re.search(r"CPU_DEFAULTS|CUDA_DEFAULTS|default_lr|fastbert\.train\.", text), text
    assert "default: no limit" in pretrain.build_parser().format_help()
