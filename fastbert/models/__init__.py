from .bert import BERT, BERTLM, Encoder
from .hf import config_from_hf, fastbert_to_hf_state_dict, from_hf, hf_to_fastbert_state_dict, to_hf
from .modernbert import ModernEncoder


def build_encoder(cfg, unpad="auto"):
    """fastbert's encoder of a BertConfig: ModernEncoder for preset "modernbert", Encoder otherwise."""
    return (ModernEncoder if cfg.preset == "modernbert" else Encoder)(cfg, unpad=unpad)


__all__ = ["BERT", "BERTLM", "Encoder", "ModernEncoder", "build_encoder", "config_from_hf",
           "fastbert_to_hf_state_dict", "from_hf", "hf_to_fastbert_state_dict", "to_hf"]
