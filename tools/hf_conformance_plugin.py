"""pytest plugin: every transformers model a test builds is patched by fastbert.patch_hf at construction.

Used to run transformers' own model tests (../shared/transformers-tests) as fastbert's conformance
suite for the in-place path:

    python -m pytest -p hf_conformance_plugin tests/models/bert/test_modeling_bert.py   (tools/ on PYTHONPATH)

A model is patched when its outermost constructor ends (PreTrainedModel.post_init of the outermost
model: a head's inner base model is patched with it, once), and only when it holds modules fastbert
patches (other models a test builds stay stock). FASTBERT_CONFORMANCE_STOCK=1 turns the patching off,
for the stock run tools/hf_conformance.py compares against.
"""

import os
import threading

import transformers

_DEPTH = threading.local()
_PATCHED = {"models": 0}


def _patch_at_construction():
    import fastbert.hf

    original_init = transformers.PreTrainedModel.__init__
    original_post_init = transformers.PreTrainedModel.post_init

    def __init__(self, *args, **kwargs):
        _DEPTH.n = getattr(_DEPTH, "n", 0) + 1
        try:
            original_init(self, *args, **kwargs)
        except BaseException:
            _DEPTH.n -= 1
            raise

    def post_init(self):
        original_post_init(self)
        _DEPTH.n = max(getattr(_DEPTH, "n", 1) - 1, 0)
        if _DEPTH.n == 0:
            try:
                fastbert.hf.patch_hf(self)
            except ValueError:  # none of the modules fastbert patches: the model stays stock
                return
            _PATCHED["models"] += 1

    transformers.PreTrainedModel.__init__ = __init__
    transformers.PreTrainedModel.post_init = post_init


def pytest_configure(config):
    if os.environ.get("FASTBERT_CONFORMANCE_STOCK") != "1":
        _patch_at_construction()


def pytest_terminal_summary(terminalreporter):
    if os.environ.get("FASTBERT_CONFORMANCE_STOCK") != "1":
        terminalreporter.write_line(f"fastbert: {_PATCHED['models']} models patched at construction")
