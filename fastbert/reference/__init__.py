"""Pure-PyTorch reference of fastbert: imports nothing else from fastbert.

fastbert.reference.ops holds every op; fastbert.reference.model the reference encoder.
"""

from .model import BertConfig, Encoder
from .ops import attention, bias_gelu, embed, gelu, layer_norm, mlm_mask

__all__ = ["BertConfig", "Encoder", "attention", "bias_gelu", "embed", "gelu", "layer_norm", "mlm_mask"]
