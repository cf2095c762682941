"""fastbert: fused Triton and C++/CUDA kernels for BERT, with a drop-in encoder.

    import fastbert
    bert = fastbert.BERT(vocab_size)            # drop-in for bert_pytorch.model.BERT
    lm = fastbert.BERTLM(bert, vocab_size)      # drop-in for bert_pytorch.model.BERTLM
    enc = fastbert.from_hf(transformers_bert)   # same outputs as BertModel(...).last_hidden_state
    enc = fastbert.ModernEncoder(fastbert.BertConfig.modernbert(vocab_size))   # ModernBERT's encoder
    model = fastbert.patch_hf(transformers_model)   # fused ops inside a transformers BERT-family model
"""

__version__ = "0.1.0"

from . import ops, reference  # noqa: E402
from .models import BERT, BERTLM, Encoder, ModernEncoder, build_encoder, from_hf, to_hf  # noqa: E402
from .reference.model import BertConfig  # noqa: E402

__all__ = ["BERT", "BERTLM", "BertConfig", "Encoder", "ModernEncoder", "build_encoder", "from_hf",
           "is_patched", "ops", "patch_hf", "reference", "to_hf", "unpatch_hf"]

_LAZY = {"patch_hf", "unpatch_hf", "is_patched", "hf"}  # these import transformers: only when first used


def __getattr__(name):
    if name in _LAZY:
        import importlib

        hf = importlib.import_module(".hf", __name__)
        return hf if name == "hf" else getattr(hf, name)
    raise AttributeError(f"module 'fastbert' has no attribute {name!r}")
