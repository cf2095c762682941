"""Training checkpoints: atomic writes, keep-last-K, validated loads, and encoder exports.

A checkpoint is one file <out>/checkpoints/ckpt-<step:08d>.pt written by torch.save to a temporary
file in the same directory, flushed to disk, then renamed over the final name (os.replace is atomic
on POSIX), so a crash never leaves a half-written checkpoint under a final name, and older ones are
deleted only after the new one is in place. Loading uses torch.load(weights_only=True) (plain
tensors, numbers, strings) and checks the format tag, the model configuration and the vocabulary
against the run's, raising CheckpointError with the differing fields.
"""

import contextlib
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


def find_checkpoint(path, option="--resume"):
    """The checkpoint a path names: a file itself, or the latest of a run folder (its checkpoints/
    subfolder, or the folder itself when it holds ckpt-*.pt files)."""
    if os.path.isdir(path):
        found = list_checkpoints(os.path.join(path, "checkpoints")) or list_checkpoints(path)
        if not found:
            raise CheckpointError(f"{option} {path}: no checkpoint in this folder (looked for "
                                  f"{os.path.join(path, 'checkpoints', 'ckpt-*.pt')} and {path}/ckpt-*.pt)")
        return found[-1][1]
    if not os.path.exists(path):
        raise CheckpointError(f"{option} {path}: no such checkpoint file or run folder")
    return path


def run_folder_of(checkpoint):
    """The run folder a checkpoint file belongs to (<run>/checkpoints/ckpt-*.pt), or None."""
    parent = os.path.dirname(os.path.abspath(checkpoint))
    return os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else None


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
    """Raise CheckpointError when the checkpoint's model config or vocabulary differs from the run's
    (a field the checkpoint's config predates counts as its default)."""
    import dataclasses

    from fastbert.reference.model import BertConfig

    defaults = {f.name: f.default for f in dataclasses.fields(BertConfig)}
    old = {**{k: defaults.get(k) for k in config}, **state["config"]}
    if not state["config"].get("ffn"):  # before the field: every model had BERT's GELU FFN
        old["ffn"] = "gelu"
    diff = {k: (old.get(k), v) for k, v in config.items() if old.get(k) != v}
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


@contextlib.contextmanager
def _transformers_progress(enabled):
    """transformers' own bars ("Writing model shards") on or off for the duration."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not enabled and was:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not enabled and was:
            hf_logging.enable_progress_bar()


def _hf_config(encoder, architecture, vocab=None, **extra):
    """The transformers BertConfig of a fastbert encoder of preset "hf" (to_hf's), or the ModernBertConfig
    of a ModernEncoder (with the vocabulary's special token ids)."""
    from fastbert.models.hf import to_hf

    if encoder.config.preset == "modernbert":
        from fastbert.models.hf_modernbert import hf_config

        cfg = encoder.config
        ids = {} if vocab is None else dict(bos_token_id=vocab.cls_id, cls_token_id=vocab.cls_id,
                                            eos_token_id=vocab.sep_id, sep_token_id=vocab.sep_id)
        return hf_config(cfg, architectures=[architecture], classifier_bias=cfg.bias, **ids, **extra)
    if encoder.config.preset != "hf":
        raise CheckpointError("HF export needs a model of preset 'hf' (bert_pytorch's pre-LN, sinusoidal "
                              "model has no BertModel equivalent); use --export-bert-pytorch instead")
    hf = to_hf(encoder)  # checks that every encoder weight has a BertModel name
    cfg = hf.config
    cfg.architectures = [architecture]
    for k, v in extra.items():
        setattr(cfg, k, v)
    return cfg


def _encoder_state(encoder, prefix="bert."):
    if encoder.config.preset == "modernbert":
        from fastbert.models.hf_modernbert import fastbert_to_hf_state_dict
    else:
        from fastbert.models.hf import fastbert_to_hf_state_dict

    sd = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
    return {prefix + k: v for k, v in fastbert_to_hf_state_dict(sd).items()}


def _linear(prefix, module):
    """The weight and bias (where the module has one) of a Linear or LayerNorm under `prefix`."""
    out = {f"{prefix}.weight": module.weight.detach().cpu()}
    if module.bias is not None:
        out[f"{prefix}.bias"] = module.bias.detach().cpu()
    return out


def _write_tokenizer(vocab, folder, serialized=False):
    """vocab.txt and the tokenizer files AutoTokenizer reads as a BertTokenizer; serialized: also
    tokenizer.json (AutoTokenizer of a model type other than BERT's, ModernBERT's, reads only that)."""
    if vocab.kind != "wordpiece":
        return
    vocab.save(os.path.join(folder, "vocab.txt"))
    specials = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                "mask_token": "[MASK]"}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "BertTokenizer", "do_lower_case": vocab.lowercase, **specials}, f,
                  indent=1)
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump(specials, f, indent=1)
    if serialized:
        import transformers

        transformers.BertTokenizer.from_pretrained(folder).save_pretrained(folder)


def _save_hf(model_class, config, state, vocab, out_dir, progress):
    """Build model_class(config), load `state` with no key missing or left over, save it with the
    tokenizer into out_dir (written to a temporary folder, then renamed)."""
    model = model_class(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    missing = [k for k in missing if k not in tied and not k.endswith(("position_ids", "token_type_ids"))
               and k != "cls.predictions.decoder.weight" and k != "cls.predictions.decoder.bias"]
    if missing or unexpected:
        raise CheckpointError(f"HF export into {model_class.__name__}: missing {missing}, unexpected "
                              f"{unexpected}")
    tmp = _atomic_dir(out_dir)
    with _transformers_progress(progress):
        model.save_pretrained(tmp)
    _write_tokenizer(vocab, tmp, serialized=config.model_type != "bert")
    _publish_dir(tmp, out_dir)
    return out_dir


def export_hf(model, vocab, out_dir, progress=True):
    """Save a pretraining model (fastbert.train.heads.PretrainModel, preset "hf") as a transformers
    BertForPreTraining folder: encoder, pooler, MLM head (transform, decoder tied to the word
    embeddings, bias) and NSP head, with config.json and the tokenizer files.

    NSP classes: fastbert's is_next = 1 means B follows A (bert_pytorch's convention); transformers'
    next_sentence_label 0 does, so the NSP rows are swapped."""
    import transformers

    if model.config.preset == "modernbert":
        return _export_modernbert_mlm(model, vocab, out_dir, progress)
    cfg = _hf_config(model.bert, "BertForPreTraining")
    state = _encoder_state(model.bert)
    state.update(_linear("bert.pooler.dense", model.pooler))
    state.update(_linear("cls.predictions.transform.dense", model.transform))
    state["cls.predictions.transform.LayerNorm.weight"] = model.transform_norm.weight.detach().cpu()
    state["cls.predictions.transform.LayerNorm.bias"] = model.transform_norm.bias.detach().cpu()
    state["cls.predictions.bias"] = model.mask_lm.linear.bias.detach().cpu()
    nsp = model.next_sentence.linear
    state["cls.seq_relationship.weight"] = nsp.weight.detach().cpu()[[1, 0]]
    state["cls.seq_relationship.bias"] = nsp.bias.detach().cpu()[[1, 0]]
    return _save_hf(transformers.BertForPreTraining, cfg, state, vocab, out_dir, progress)


def _export_modernbert_mlm(model, vocab, out_dir, progress):
    """A ModernBERT pretraining model as transformers' ModernBertForMaskedLM: encoder, head (dense, norm),
    decoder (tied to the token embedding) and its bias."""
    import transformers

    cfg = _hf_config(model.bert, "ModernBertForMaskedLM", vocab, decoder_bias=True)
    state = _encoder_state(model.bert, "model.")
    state.update(_linear("head.dense", model.transform))
    state.update(_linear("head.norm", model.transform_norm))
    state["decoder.bias"] = model.mask_lm.linear.bias.detach().cpu()
    return _save_hf(transformers.ModernBertForMaskedLM, cfg, state, vocab, out_dir, progress)


def export_hf_classifier(classifier, vocab, labels, out_dir, progress=True):
    """Save a fine-tuned fastbert.train.finetune.Classifier as transformers'
    BertForSequenceClassification (its pooler is the classifier's) or BertForTokenClassification,
    with id2label / label2id from `labels` and the tokenizer files."""
    import transformers

    token = classifier.token
    names = {"id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)},
             "num_labels": len(labels), "classifier_dropout": classifier.dropout.p}
    modern = classifier.bert.config.preset == "modernbert"
    family = "ModernBert" if modern else "Bert"
    arch = f"{family}ForTokenClassification" if token else f"{family}ForSequenceClassification"
    if modern:
        cfg = _hf_config(classifier.bert, arch, vocab, classifier_pooling="cls", **names)
        state = _encoder_state(classifier.bert, "model.")
        state.update(_linear("head.dense", classifier.head.dense))
        state.update(_linear("head.norm", classifier.head.norm))
    else:
        cfg = _hf_config(classifier.bert, arch, **names)
        state = _encoder_state(classifier.bert)
    state.update(_linear("classifier", classifier.classifier))
    if not token and not modern:
        state.update(_linear("bert.pooler.dense", classifier.pooler))
    model_class = getattr(transformers, arch)
    return _save_hf(model_class, cfg, state, vocab, out_dir, progress)


def export_bert_pytorch(model, path):
    """Save a state dict that bert_pytorch.model.BERTLM(BERT(...), vocab).load_state_dict accepts."""
    if model.config.preset != "bert_pytorch":
        raise CheckpointError("bert_pytorch export needs a model of preset 'bert_pytorch'; use --export-hf")
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(sd, tmp)
    os.replace(tmp, path)
    return path
