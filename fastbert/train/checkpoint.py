"""Training checkpoints: atomic writes, keep-last-K, validated loads, and encoder exports.

A checkpoint is one file <out>/checkpoints/ckpt-<step:08d>.pt written by torch.save to a temporary
file in the same directory, flushed to disk, then renamed over the final name (os.replace is atomic
on POSIX), so a crash never leaves a half-written checkpoint under a final name, and older ones are
deleted only after the new one is in place. Loading uses torch.load(weights_only=True) (plain
tensors, numbers, strings) and checks the format tag, the model configuration and the vocabulary
against the run's, raising CheckpointError with the differing fields.
"""

import json
import os
import re
import shutil

import torch

FORMAT = "fastbert-pretrain-v1"
_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")


class CheckpointError(ValueError):
    pass


def list_checkpoints(directory):
    """[(step, path)] sorted by step, of the complete checkpoints in directory."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        m = _NAME.match(name)
        if m:
            found.append((int(m.group(1)), os.path.join(directory, name)))
    return sorted(found)


def save_checkpoint(directory, step, state, keep=3):
    """Write state to directory/ckpt-<step>.pt atomically, then keep only the newest `keep` files."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"ckpt-{step:08d}.pt")
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, "step": step, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if keep and keep > 0:
        for _, old in list_checkpoints(directory)[:-keep]:
            os.remove(old)
    return path


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch raises many kinds for a damaged file)
        raise CheckpointError(f"checkpoint {path!r} is corrupt or not a fastbert checkpoint "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path!r} is not a {FORMAT} checkpoint")
    for key in ("model", "optimizer", "config", "vocab", "step"):
        if key not in state:
            raise CheckpointError(f"checkpoint {path!r} lacks {key!r}")
    return state


def check_compatible(state, config: dict, vocab_fingerprint: str, path=""):
    """Raise CheckpointError when the checkpoint's model config or vocabulary differs from the run's."""
    diff = {k: (state["config"].get(k), v) for k, v in config.items() if state["config"].get(k) != v}
    if diff:
        pretty = ", ".join(f"{k}: checkpoint {a!r} vs run {b!r}" for k, (a, b) in sorted(diff.items()))
        raise CheckpointError(f"checkpoint {path} does not match this run's model ({pretty}); resume with "
                              f"the same model options or use another --out")
    if state.get("vocab_fingerprint") != vocab_fingerprint:
        raise CheckpointError(f"checkpoint {path} was trained with another vocabulary "
                              f"({state.get('vocab_fingerprint')} vs {vocab_fingerprint})")


def _atomic_dir(target):
    tmp = target.rstrip("/") + f".tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def _publish_dir(tmp, target):
    if os.path.isdir(target):
        old = target.rstrip("/") + f".old{os.getpid()}"
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def export_hf(encoder, vocab, out_dir):
    """Save the encoder as a transformers BertModel directory (config.json + weights + vocab.txt)."""
    from fastbert.models.hf import to_hf

    if encoder.config.preset != "hf":
        raise CheckpointError("HF export needs a model of preset 'hf' (bert_pytorch's pre-LN, sinusoidal "
                              "model has no BertModel equivalent); use --export-bert-pytorch instead")
    hf = to_hf(encoder)  # copies the weights into a new CPU BertModel
    tmp = _atomic_dir(out_dir)
    hf.save_pretrained(tmp)
    if vocab.kind == "wordpiece":
        vocab.save(os.path.join(tmp, "vocab.txt"))
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "BertTokenizer", "do_lower_case": vocab.lowercase}, f)
    _publish_dir(tmp, out_dir)
    return out_dir


def export_bert_pytorch(model, path):
    """Save a state dict that bert_pytorch.model.BERTLM(BERT(...), vocab).load_state_dict accepts."""
    if model.config.preset != "bert_pytorch":
        raise CheckpointError("bert_pytorch export needs a model of preset 'bert_pytorch'; use --export-hf")
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(sd, tmp)
    os.replace(tmp, path)
    return path
