from .bert import BERT, BERTLM, Encoder
from .hf import config_from_hf, fastbert_to_hf_state_dict, from_hf, hf_to_fastbert_state_dict, to_hf

__all__ = ["BERT", "BERTLM", "Encoder", "config_from_hf", "fastbert_to_hf_state_dict", "from_hf",
           "hf_to_fastbert_state_dict", "to_hf"]
