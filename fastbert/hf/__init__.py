"""fastbert inside transformers models.

Importing this package registers the attention implementation "fastbert" with transformers'
AttentionInterface and AttentionMaskInterface (idempotent), so

    AutoModel.from_pretrained(path, attn_implementation="fastbert")
    BertModel._from_config(config, attn_implementation="fastbert")
    model.set_attn_implementation("fastbert")

run fastbert.ops.attention (see fastbert.hf.attention), and patch_hf/unpatch_hf fuse the rest of a
BERT-family model in place (see fastbert.hf.patch; the families: fastbert.hf.modules.FAMILIES).
"""

from . import compat

compat.check_version()  # before the modules below read transformers' classes

from .attention import NAME, fastbert_attention, fastbert_mask, register  # noqa: E402
from .patch import is_patched, patch_hf, unpatch_hf  # noqa: E402

register()

__all__ = ["NAME", "fastbert_attention", "fastbert_mask", "is_patched", "patch_hf", "register", "unpatch_hf"]
