"""Shared by the tests of `fastbert pretrain` / `finetune`: thread count restored after each test (the
commands set torch's), and small corpora cut from the demo's."""

import gzip

import pytest
import torch

from fastbert.train import pretrain


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def world_corpus(path, n_docs):
    """Write the first n_docs documents of the demo's corpus to path (plain text); returns path."""
    with gzip.open(pretrain.DEFAULT_CORPUS, "rt", encoding="utf-8") as f:
        docs = f.read().split("\n\n")[:n_docs]
    path.write_text("\n\n".join(docs) + "\n")
    return path
