"""`fastbert finetune`: sequence or token classification on a pretrained fastbert checkpoint.

Inputs
  --task sequence  CSV or TSV (by extension; .tsv = tab) with rows `text,label` or `text_a,text_b,label`;
                   a first row whose last field is "label" is a header. Default: the demo's
                   fastbert/data/world/classify_train.tsv, held out: classify_test.tsv (sentence ->
                   the kind of the noun it names, 6 classes; tools/build_world.py).
  --task token     CoNLL-style: `word TAG` per line (first and last column), a blank line between
                   sentences; each word's first WordPiece carries its tag, the other pieces are ignored.
                   Default: fastbert/data/world/tags_train.txt, held out: tags_test.txt (each noun
                   tagged with its kind, other words O).
The model is the checkpoint's encoder (--checkpoint FILE, or a run directory: its latest checkpoint)
with a dropout + linear classifier on [CLS] (sequence) or on every token (token). Without --eval a
seeded --eval-fraction of the rows is held out (the default data has its own held-out file). After
each epoch it prints the held-out accuracy and macro-F1 (token task: also the micro-F1 of the non-O
tags).

Run folder (--out; default <pretraining run>/finetune-<task>, or the next free -N): model.pt (the
fine-tuned state with its label list; one subfolder per run when there are several), metrics.jsonl (a
JSON line per epoch of each run, with its held-out scores), config.json (options, versions), and with
--export-hf DIR a transformers BertForSequenceClassification / BertForTokenClassification with its
label names. Ctrl-C (SIGINT) or SIGTERM stops after the current step, saves the model trained so far
(model.pt, written atomically), says where, and exits with 128 + the signal's number (130, 143), as
pretraining does, with no traceback; bad input exits with status 2 and one message.
"""

import argparse
import csv
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastbert.models import build_encoder
from fastbert.reference.model import BertConfig

from .checkpoint import CheckpointError, export_hf_classifier, find_checkpoint, load_checkpoint, run_folder_of
from .data import CorpusError, check_text_file
from .interrupt import StopSignals, exit_status
from .optim import param_groups, warmup_linear
from .options import cpu_threads, nonnegative_float, positive_float, positive_int, probability, resolve_device
from .runlog import RunLog, write_config
from .vocab import Vocab, VocabError

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
WORLD = os.path.join(DATA_DIR, "world")
DEFAULT_DATA = {  # task -> (training file, held-out file): the demo's (tools/build_world.py)
    "sequence": (os.path.join(WORLD, "classify_train.tsv"), os.path.join(WORLD, "classify_test.tsv")),
    "token": (os.path.join(WORLD, "tags_train.txt"), os.path.join(WORLD, "tags_test.txt")),
}
# BERT's usual 3 epochs, stretched for small sets: the demo's 576 training rows are 18 steps an
# epoch, and 54 steps left the fine-tuning half done (train/SWEEP.md)
DEFAULT_EPOCHS, MIN_STEPS = 3, 200


class FinetuneError(ValueError):
    pass


class Stopped(Exception):
    """A stop signal ended fine-tuning after a step; the model trained so far is attached."""

    def __init__(self, model, step):
        super().__init__(f"stopped at step {step}")
        self.model, self.step = model, step


def read_sequence_file(path):
    """[(text_a, text_b or None, label)] from a CSV/TSV file."""
    check_text_file(path, "data file")
    delim = "\t" if path.endswith((".tsv", ".tab")) else ","
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        for lineno, row in enumerate(csv.reader(f, delimiter=delim, quoting=csv.QUOTE_MINIMAL
                                                if delim == "," else csv.QUOTE_NONE), 1):
            if not row or not any(x.strip() for x in row):
                continue
            if lineno == 1 and row[-1].strip().lower() == "label":
                continue
            if len(row) not in (2, 3):
                raise CorpusError(f"{path}:{lineno}: expected `text{delim}label` or `text_a{delim}text_b"
                                  f"{delim}label`, got {len(row)} field(s)")
            rows.append((row[0], row[1] if len(row) == 3 else None, row[-1].strip()))
    if not rows:
        raise CorpusError(f"data file {path!r} has no rows")
    return rows


def read_token_file(path):
    """[(words, tags)] from a CoNLL-style file."""
    check_text_file(path, "data file")
    out, words, tags = [], [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                if words:
                    out.append((words, tags))
                words, tags = [], []
                continue
            if len(parts) < 2:
                raise CorpusError(f"{path}:{lineno}: expected `word TAG`, got {line.strip()!r}")
            words.append(parts[0])
            tags.append(parts[-1])
    if words:
        out.append((words, tags))
    if not out:
        raise CorpusError(f"data file {path!r} has no sentences")
    return out


def encode_sequences(vocab, rows, labels, seq_len, segments):
    a = vocab.encode_batch([r[0] for r in rows])
    b = vocab.encode_batch([r[1] or "" for r in rows])
    out = []
    for (_, rb, lab), ia, ib in zip(rows, a, b):
        if rb is None:
            ia = ia[: seq_len - 2]
            ids = [vocab.cls_id, *ia, vocab.sep_id]
            seg = [segments[0]] * len(ids)
        else:
            room = seq_len - 3
            la = min(len(ia), max(room // 2, room - len(ib)))
            lb = min(len(ib), room - la)
            ids = [vocab.cls_id, *ia[:la], vocab.sep_id, *ib[:lb], vocab.sep_id]
            seg = [segments[0]] * (la + 2) + [segments[1]] * (lb + 1)
        out.append((ids, seg, labels[lab]))
    return out


def encode_tokens(vocab, sents, labels, seq_len, segments):
    out = []
    for words, tags in sents:
        pieces = vocab.encode_words(words)
        ids, tgt = [vocab.cls_id], [-100]
        for p, t in zip(pieces, tags):
            if len(ids) + len(p) > seq_len - 1:
                break
            ids += p
            tgt += [labels[t]] + [-100] * (len(p) - 1)
        ids.append(vocab.sep_id)
        tgt.append(-100)
        out.append((ids, [segments[0]] * len(ids), tgt))
    return out


def collate(items, device, pad_id=0):
    width = max(len(x[0]) for x in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    seg = torch.zeros_like(ids)
    token = isinstance(items[0][2], list)
    y = torch.full((len(items), width), -100, dtype=torch.long) if token else torch.zeros(len(items),
                                                                                         dtype=torch.long)
    for i, (a, s, t) in enumerate(items):
        ids[i, : len(a)] = torch.tensor(a)
        seg[i, : len(s)] = torch.tensor(s)
        if token:
            y[i, : len(t)] = torch.tensor(t)
        else:
            y[i] = t
    return ids.to(device), seg.to(device), y.to(device)


class ModernHead(nn.Module):
    """ModernBERT's prediction head before a classifier: norm(gelu(dense(x))), bias-free by default
    (transformers' ModernBertPredictionHead; fresh weights, as its classification models start)."""

    def __init__(self, cfg):
        super().__init__()
        self.gelu = cfg.gelu
        self.dense = nn.Linear(cfg.hidden, cfg.hidden, bias=cfg.bias)
        self.norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps, bias=cfg.norm_bias)
        std = cfg.hidden ** -0.5  # transformers' "final_out" std for ModernBERT's classifier-side layers
        nn.init.trunc_normal_(self.dense.weight, std=std, a=-2 * std, b=2 * std)
        if self.dense.bias is not None:
            nn.init.zeros_(self.dense.bias)

    def forward(self, x):
        return self.norm(F.gelu(self.dense(x), approximate=self.gelu))


class Classifier(nn.Module):
    """Encoder + dropout + linear classifier: on every token (token), or on [CLS] (sequence), through
    BERT's pooler (dense + tanh, the pretraining's) for preset "hf", as
    transformers' BertForSequenceClassification computes; for preset "modernbert" through
    ModernBERT's head (dense, GELU, LayerNorm) on [CLS] or every token, as
    ModernBertForSequenceClassification / ModernBertForTokenClassification compute (cls pooling)."""

    def __init__(self, cfg, n_labels, token=False, dropout=0.1):
        super().__init__()
        self.bert = build_encoder(cfg)
        self.pad_id = cfg.pad_id
        self.token = token
        self.modern = cfg.preset == "modernbert"
        self.pooler = None
        self.head = ModernHead(cfg) if self.modern else None
        if not token and cfg.preset == "hf":
            self.pooler = nn.Linear(cfg.hidden, cfg.hidden)
            nn.init.normal_(self.pooler.weight, std=0.02)
            nn.init.zeros_(self.pooler.bias)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(cfg.hidden, n_labels)
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, ids, seg):
        mask = (ids != self.pad_id).long()
        h = self.bert(ids, None if self.modern else seg, attention_mask=mask)  # ModernBERT: no segments
        if not self.token:
            h = h[:, 0] if self.pooler is None else torch.tanh(self.pooler(h[:, 0]))
        if self.head is not None:
            h = self.head(h)
        return self.classifier(self.dropout(h))


def scores(pred, gold, n_labels, outside=None):
    """accuracy, macro-F1 and (with `outside`) micro-F1 of the labels other than `outside`."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    cm = np.zeros((n_labels, n_labels), dtype=np.int64)
    np.add.at(cm, (gold, pred), 1)
    tp = np.diag(cm).astype(float)
    prec = tp / np.maximum(cm.sum(0), 1)
    rec = tp / np.maximum(cm.sum(1), 1)
    f1 = np.where(prec + rec > 0, 2 * prec * rec / np.maximum(prec + rec, 1e-12), 0.0)
    present = cm.sum(1) > 0
    out = {"accuracy": float(tp.sum() / max(1, cm.sum())), "macro_f1": float(f1[present].mean())}
    if outside is not None:
        keep = np.arange(n_labels) != outside
        t, p_, g_ = tp[keep].sum(), cm.sum(0)[keep].sum(), cm.sum(1)[keep].sum()
        out["f1"] = float(2 * t / max(1, p_ + g_))
    return out


def default_lr(cfg):
    """The fine-tuning learning rate for a model of cfg's size: 5e-5 at BERT-base width (768), rising
    as hidden^-1.5 for smaller models (7.3e-4 at hidden 128, 2.6e-4 at 256), capped at 1e-3.
    Smaller models take larger rates, as Google's BERT miniatures did (rates searched up to 3e-4 there,
    with longer runs); the tiny-model value is the best of the sweep in fastbert/train/SWEEP.md."""
    return min(1e-3, 5e-5 * (768 / cfg.hidden) ** 1.5)


def _lr_arg(text):
    if text in ("auto", "search"):
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, 'auto' or 'search', got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def build_parser(p=None):
    p = p or argparse.ArgumentParser(prog="fastbert finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="pretraining checkpoint file or run folder")
    p.add_argument("--task", choices=["sequence", "token"], default="sequence")
    p.add_argument("--train", help="training file, UTF-8 (default: the embedded set of the task)")
    p.add_argument("--eval", help="held-out file (default: --eval-fraction of --train)")
    p.add_argument("--eval-fraction", type=positive_float, default=0.1)
    p.add_argument("--epochs", type=positive_float,
                   help=f"passes over the training rows (default: {DEFAULT_EPOCHS:g}, or more for small "
                   f"sets so that training takes at least {MIN_STEPS} steps)")
    p.add_argument("--max-steps", type=positive_int)
    p.add_argument("--batch", type=positive_int, default=32)
    p.add_argument("--lr", type=_lr_arg, default="auto",
                   help="learning rate; auto (default): scaled to the model's width, 5e-5 at hidden 768 "
                   "rising as hidden^-1.5 (7.3e-4 at hidden 128), at most 1e-3; search: try auto x "
                   "{1/3, 1, 3} on a tenth of the training rows and train with the best")
    p.add_argument("--warmup", type=probability, default=0.1, help="warmup as a fraction of the steps")
    p.add_argument("--weight-decay", type=nonnegative_float, default=0.01)
    p.add_argument("--seq-len", type=positive_int, default=128)
    p.add_argument("--dropout", type=probability, default=0.1)
    p.add_argument("--from-scratch", action="store_true",
                   help="the checkpoint's config and vocabulary with freshly initialised encoder weights "
                   "(same seed, same data order): the baseline that shows what pretraining bought")
    p.add_argument("--compare-scratch", action="store_true",
                   help="fine-tune from the checkpoint and from scratch, and print both side by side")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=positive_int, help="CPU threads (default: 1 for a model of hidden 128 "
                   "or less, else torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", help="run each of these seeds (overrides --seed)")
    p.add_argument("--out", help="run folder: model.pt (with several runs: one subfolder per run), "
                   "metrics.jsonl, config.json (default: <pretraining run>/finetune-<task>, or the next "
                   "free -N)")
    p.add_argument("--export-hf", help="write the fine-tuned model as a transformers "
                   "BertForSequenceClassification / BertForTokenClassification folder with its label "
                   "names (with several runs: one subfolder per run)")
    p.add_argument("--tensorboard", action="store_true", help="also write the metrics as TensorBoard "
                   "scalars to <out>/tensorboard (needs the tensorboard package)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (ours and transformers')")
    return p


def _resolve_checkpoint(path):
    if path is None:
        raise FinetuneError("--checkpoint is required: a pretraining checkpoint file or run folder "
                            "(for example runs/fastbert after `fastbert pretrain`)")
    return find_checkpoint(path, "--checkpoint")


def _run_folder(args, ckpt_path):
    """--out, or <pretraining run>/finetune-<task> (the next free -N when that holds a run)."""
    if args.out:
        return args.out
    base = os.path.join(run_folder_of(ckpt_path) or os.path.dirname(os.path.abspath(ckpt_path)),
                        f"finetune-{args.task}")
    out, n = base, 1
    while os.path.exists(os.path.join(out, "config.json")):
        n += 1
        out = f"{base}-{n}"
    return out


@dataclass
class Task:
    """What every fine-tuning run of one invocation shares: model config, vocabulary, encoded data."""

    cfg: BertConfig
    vocab: Vocab
    encoder_state: dict  # the checkpoint's encoder weights (keys of fastbert.Encoder)
    pooler_state: dict | None  # its pooler's (nn.Linear keys), preset "hf"
    ckpt_path: str
    token: bool
    names: list
    rows: list  # encoded (ids, segments, target) of --train
    eval_rows: list | None  # encoded --eval, or None: split --eval-fraction off rows per seed
    device: torch.device
    amp: dict
    dtype: str

    @property
    def outside(self):
        return self.names.index("O") if self.token and "O" in self.names else None

    @property
    def metric(self):
        """The figure a run is judged by: non-O F1 for token tagging, accuracy for sequences."""
        return "f1" if self.outside is not None else "accuracy"


def prepare(args):
    """Load the checkpoint and the data, check the options; returns a Task."""
    device = resolve_device(args.device, FinetuneError)
    for name in ("batch", "epochs", "seq_len", "max_steps"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise FinetuneError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if isinstance(args.lr, float) and not args.lr > 0:
        raise FinetuneError(f"--lr must be positive, got {args.lr}")
    if not 0 < args.eval_fraction < 1:
        raise FinetuneError(f"--eval-fraction must be in (0, 1), got {args.eval_fraction}")
    if not 0 <= args.warmup < 1:
        raise FinetuneError(f"--warmup is a fraction of the steps in [0, 1), got {args.warmup}")
    if args.compare_scratch and args.from_scratch:
        raise FinetuneError("--compare-scratch already runs --from-scratch (next to the pretrained run); "
                            "give one of them")
    ckpt_path = _resolve_checkpoint(args.checkpoint)
    state = load_checkpoint(ckpt_path)
    cfg = BertConfig(**state["config"])
    cpu_threads(args.threads, device, cfg.hidden)
    vocab = Vocab.from_dict(state["vocab"])
    if args.seq_len > cfg.max_position:
        raise FinetuneError(f"--seq-len {args.seq_len} is larger than the model's maximum position "
                            f"{cfg.max_position}")
    cfg = cfg.with_(dropout=args.dropout, attn_dropout=args.dropout, emb_dropout=args.dropout)
    encoder_state = {k[5:]: v for k, v in state["model"].items() if k.startswith("bert.")}
    pooler_state = {k[7:]: v for k, v in state["model"].items() if k.startswith("pooler.")} or None
    del state
    token = args.task == "token"
    default_train, default_eval = DEFAULT_DATA[args.task]
    read = read_token_file if token else read_sequence_file
    train_rows = read(args.train or default_train)
    eval_path = args.eval or (default_eval if args.train is None else None)
    eval_rows = read(eval_path) if eval_path else None
    both = train_rows + (eval_rows or [])
    if token:
        names = sorted({t for _, tags in both for t in tags})
    else:
        names = sorted({r[2] for r in both})
    labels = {n: i for i, n in enumerate(names)}
    segs = (1, 2) if cfg.preset == "bert_pytorch" else (0, 1)
    enc = encode_tokens if token else encode_sequences
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    amp = dict(device_type=device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype),
               enabled=dtype != "fp32")
    return Task(cfg, vocab, encoder_state, pooler_state, ckpt_path, token, names,
                enc(vocab, train_rows, labels, args.seq_len, segs),
                None if eval_rows is None else enc(vocab, eval_rows, labels, args.seq_len, segs),
                device, amp, dtype)


def split(task, args, seed):
    """(train, held-out, rng) of one seed: the rng that drew the split then draws the epoch orders."""
    rng = np.random.default_rng(seed)
    if task.eval_rows is not None:
        return task.rows, task.eval_rows, rng
    perm = rng.permutation(len(task.rows))
    n_eval = max(1, int(round(args.eval_fraction * len(task.rows))))
    if n_eval >= len(task.rows):
        raise FinetuneError(f"{len(task.rows)} rows leave none to train on after holding out "
                            f"--eval-fraction {args.eval_fraction}")
    return [task.rows[i] for i in perm[n_eval:]], [task.rows[i] for i in perm[:n_eval]], rng


def evaluate(model, task, held):
    model.eval()
    pred, gold = [], []
    with torch.no_grad(), torch.autocast(**task.amp):
        for i in range(0, len(held), 64):
            ids, seg, y = collate(held[i:i + 64], task.device, task.cfg.pad_id)
            logits = model(ids, seg).float()
            if task.token:
                keep = y != -100
                pred += logits.argmax(-1)[keep].tolist()
                gold += y[keep].tolist()
            else:
                pred += logits.argmax(-1).tolist()
                gold += y.tolist()
    model.train()
    return scores(pred, gold, len(task.names), task.outside)


def build_classifier(task, seed, from_scratch, dropout=0.1):
    """The classifier to fine-tune: the checkpoint's encoder, or (from_scratch) the same config with
    fresh weights. Built under torch.manual_seed(seed) either way, so a pretrained run and its
    --from-scratch twin get the same classifier head (and, in train_once, the same batches)."""
    torch.manual_seed(seed)
    model = Classifier(task.cfg, len(task.names), task.token, dropout)
    if not from_scratch:
        try:
            model.bert.load_state_dict(task.encoder_state, strict=True)
            if model.pooler is not None and task.pooler_state is not None:
                model.pooler.load_state_dict(task.pooler_state, strict=True)
        except RuntimeError as e:
            first = str(e).splitlines()[0]
            raise CheckpointError(f"checkpoint {task.ckpt_path} encoder does not load: {first}") from e
    return model.to(task.device)


def _steps(args, n_train):
    """(steps per epoch, total steps) of one run."""
    steps_per_epoch = max(1, n_train // args.batch)
    if args.epochs is not None:
        total = max(1, int(args.epochs * steps_per_epoch))
    else:
        total = max(DEFAULT_EPOCHS * steps_per_epoch, MIN_STEPS)
    if args.max_steps:
        total = min(total, args.max_steps)
    return steps_per_epoch, total


def train_once(task, args, train, held, rng, seed, lr, from_scratch, say=print, desc=None, signals=None,
               record=None):
    """Fine-tune one classifier; returns (model, history of per-epoch held-out scores).

    desc: show a progress bar of that name (unless --no-progress; say() then prints through it);
    signals: a StopSignals whose signal ends the run after the current step (raises Stopped);
    record(scores): called with each epoch's scores."""
    from tqdm import tqdm

    model = build_classifier(task, seed, from_scratch, args.dropout)
    steps_per_epoch, total = _steps(args, len(train))
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=lr,
                            fused=task.device.type == "cuda" or None)
    warm = max(1, int(args.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_linear(warm, total))
    scaler = torch.amp.GradScaler("cuda", enabled=task.dtype == "fp16")
    n_labels = len(task.names)
    bar = tqdm(total=total, unit="step", desc=desc, dynamic_ncols=True, leave=False,
               disable=True if desc is None or args.no_progress else None)  # None: on a terminal only
    if not bar.disable:
        say = bar.write
    step, epoch, t0, history = 0, 0, time.perf_counter(), []
    model.train()
    try:
        while step < total:
            order = rng.permutation(len(train))
            run_loss, n = 0.0, 0
            for i in range(0, steps_per_epoch * args.batch, args.batch):
                if step >= total:
                    break
                batch = collate([train[j] for j in order[i:i + args.batch]], task.device, task.cfg.pad_id)
                run_loss += _step(model, task, opt, sched, scaler, batch, n_labels)
                n += 1
                step += 1
                bar.update(1)
                if signals is not None and signals.signum:
                    raise Stopped(model, step)
            epoch += 1
            sc = evaluate(model, task, held)
            sc.update(epoch=epoch, step=step, train_loss=run_loss / max(1, n),
                      seconds=time.perf_counter() - t0)
            history.append(sc)
            if record is not None:
                record(sc)
            extra = f" | non-O F1 {sc['f1']:.3f}" if "f1" in sc else ""
            say(f"epoch {epoch} step {step} | train loss {sc['train_loss']:.4f} | held-out accuracy "
                f"{sc['accuracy']:.3f} | macro-F1 {sc['macro_f1']:.3f}{extra} | {sc['seconds']:.0f}s")
    finally:
        bar.close()
    return model, history


def _step(model, task, opt, sched, scaler, batch, n_labels):
    """One optimizer step on a collated batch; returns its loss."""
    ids, seg, y = batch
    with torch.autocast(**task.amp):
        logits = model(ids, seg)
    loss = F.cross_entropy(logits.float().reshape(-1, n_labels), y.reshape(-1), ignore_index=-100)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    scaler.step(opt)
    scaler.update()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def search_lr(task, args, train, seed, from_scratch, say=print):
    """The best of default_lr x {1/3, 1, 3} by the task's metric on a tenth of `train` (the held-out
    rows are not looked at)."""
    rng = np.random.default_rng([seed, 1])
    perm = rng.permutation(len(train))
    n_val = max(1, len(train) // 10)
    sub_train, sub_val = [train[i] for i in perm[n_val:]], [train[i] for i in perm[:n_val]]
    base = default_lr(task.cfg)
    best = None
    for lr in (base / 3, base, base * 3):
        _, hist = train_once(task, args, sub_train, sub_val, np.random.default_rng([seed, 2]), seed, lr,
                             from_scratch, say=lambda m: None)
        score = hist[-1][task.metric]
        say(f"lr search: lr {lr:.2e} -> validation {task.metric} {score:.3f}")
        if best is None or score > best[1]:
            best = (lr, score)
    return best[0]


def _save(model, task, args, out):
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "model.pt")
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save({"model": model.state_dict(), "labels": task.names, "task": args.task,
                "config": dict(task.cfg.__dict__), "vocab": task.vocab.to_dict()}, tmp)
    os.replace(tmp, path)
    return path


def _export(model, task, args, sub):
    if not args.export_hf:
        return None
    if task.cfg.preset == "bert_pytorch":
        raise FinetuneError("--export-hf needs a checkpoint of preset 'hf' or 'modernbert' (bert_pytorch's "
                            "model has no transformers equivalent)")
    folder = os.path.join(args.export_hf, sub) if sub else args.export_hf
    return export_hf_classifier(model, task.vocab, task.names, folder, progress=not args.no_progress)


def _describe(task, args):
    cfg = task.cfg
    n_train = len(task.rows) if task.eval_rows is not None else len(task.rows) - max(
        1, int(round(args.eval_fraction * len(task.rows))))
    n_held = len(task.eval_rows) if task.eval_rows is not None else len(task.rows) - n_train
    if args.lr == "auto":
        lr_desc = f"{default_lr(cfg):.2e} (auto)"
    else:
        lr_desc = "searched" if args.lr == "search" else f"{args.lr:.2e}"
    return (f"fastbert finetune: {args.task} classification, {len(task.names)} labels {task.names[:8]}"
            f"{'...' if len(task.names) > 8 else ''}, {n_train} train / {n_held} held-out examples, "
            f"encoder {'from ' + task.ckpt_path if not args.from_scratch else 'freshly initialised'} "
            f"({cfg.preset}, layers {cfg.n_layers}, hidden {cfg.hidden}), lr {lr_desc}, on {task.device}")


def run(args):
    """Fine-tune as `args` says; returns {"history", "labels", "model", "runs", "out", "exit_code"}
    (exit_code 128 + a signal's number when one stopped it)."""
    with StopSignals() as signals:
        return _run(args, signals)


def _run(args, signals):
    task = prepare(args)
    seeds = args.seeds or [args.seed]
    inits = (("pretrained", False), ("scratch", True)) if args.compare_scratch else (
        (("scratch", True),) if args.from_scratch else (("pretrained", False),))
    out = _run_folder(args, task.ckpt_path)
    write_config(out, "finetune", vars(args), model=dict(task.cfg.__dict__), device=task.device)
    try:
        log = RunLog(out, tensorboard=args.tensorboard)
    except ImportError as e:
        raise FinetuneError(str(e)) from e
    print(_describe(task, args), flush=True)
    print(f"run folder: {out}", flush=True)
    results, several = [], len(seeds) > 1 or len(inits) > 1
    signals.arm()
    try:
        for seed in seeds:
            for name, scratch in inits:
                sub = f"{name}-seed{seed}" if several else ""
                res = _one_run(task, args, seed, name, scratch, signals, log, out, sub)
                if isinstance(res, int):  # stopped by a signal
                    return {"history": [], "labels": task.names, "model": None, "runs": results, "out": out,
                            "exit_code": res}
                model = res.pop("model")
                results.append(res)
    finally:
        log.close()
    if args.compare_scratch:
        _print_comparison(results, task)
    return {"history": results[-1]["history"], "labels": task.names, "model": model, "runs": results,
            "out": out, "exit_code": 0}


def _one_run(task, args, seed, name, scratch, signals, log, out, sub):
    """One fine-tuning (seed, init): trains, saves model.pt (and the HF export); the result dict, or
    the exit code when a signal stopped it (after saving what it had)."""
    train, held, rng = split(task, args, seed)
    if sub:
        print(f"-- seed {seed}, {name}", flush=True)
    lr = args.lr
    if lr == "auto":
        lr = default_lr(task.cfg)
    elif lr == "search":
        lr = search_lr(task, args, train, seed, scratch)

    def record(sc):
        log.write({"seed": seed, "init": name, "lr": lr, **sc})

    folder = os.path.join(out, sub) if sub else out
    try:
        model, history = train_once(task, args, train, held, rng, seed, lr, scratch,
                                    say=lambda m: print(m, flush=True), signals=signals, record=record,
                                    desc=f"finetune {name} seed {seed}")
    except Stopped as stop:
        path = _save(stop.model, task, args, folder)
        log.write({"event": "interrupted", "seed": seed, "init": name, "step": stop.step,
                   "signal": signals.name, "model": path})
        print(f"fastbert finetune: {signals.name} at step {stop.step} of seed {seed} ({name}): the model "
              f"trained so far is in {path}", file=sys.stderr, flush=True)
        return signals.exit_code
    signals.armed = False  # saving: a signal now stops at once (the writes are atomic)
    path = _save(model, task, args, folder)
    exported = _export(model, task, args, sub)
    signals.armed = True
    print(f"saved {path}" + (f"; transformers export in {exported}" if exported else ""), flush=True)
    if signals.signum:  # it came after the last step (the last evaluation): this run is complete
        log.write({"event": "interrupted", "seed": seed, "init": name, "step": history[-1]["step"],
                   "signal": signals.name, "model": path})
        print(f"fastbert finetune: {signals.name} after the last step of seed {seed} ({name}): the model "
              f"is in {path}", file=sys.stderr, flush=True)
        return signals.exit_code
    return {"seed": seed, "init": name, "lr": lr, "history": history, "model": model, **history[-1]}


def _print_comparison(results, task):
    metric = task.metric
    label = "non-O F1" if metric == "f1" else "accuracy"
    by_seed = {}
    for r in results:
        by_seed.setdefault(r["seed"], {})[r["init"]] = r
    print(f"\nheld-out {label} after {results[0]['epoch']} epochs: pretrained vs from scratch")
    print(f"{'seed':>6} | {'pretrained':>10} | {'scratch':>10} | {'gain':>7}")
    gains = []
    for seed, pair in by_seed.items():
        a, b = pair["pretrained"][metric], pair["scratch"][metric]
        gains.append(a - b)
        print(f"{seed:>6} | {a:>10.3f} | {b:>10.3f} | {a - b:>+7.3f}")
    if len(by_seed) > 1:
        pa = np.mean([p["pretrained"][metric] for p in by_seed.values()])
        sb = np.mean([p["scratch"][metric] for p in by_seed.values()])
        print(f"{'mean':>6} | {pa:>10.3f} | {sb:>10.3f} | {pa - sb:>+7.3f}")
    print(flush=True)


def main(argv=None):
    args = build_parser().parse_args(argv)
    return exit_status("finetune", run, args, (CorpusError, VocabError, CheckpointError, FinetuneError))


if __name__ == "__main__":
    sys.exit(main())
