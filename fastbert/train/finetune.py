"""`fastbert finetune`: sequence or token classification on a pretrained fastbert checkpoint.

Inputs
  --task sequence  CSV or TSV (by extension; .tsv = tab) with rows `text,label` or `text_a,text_b,label`;
                   a first row whose last field is "label" is a header. Default: the embedded
                   fastbert/data/classify.tsv (stdlib sentence -> module family, 6 classes).
  --task token     CoNLL-style: `word TAG` per line (first and last column), a blank line between
                   sentences; each word's first WordPiece carries its tag, the other pieces are ignored.
                   Default: the embedded fastbert/data/tokens.txt (NAME vs O).
The model is the checkpoint's encoder (--checkpoint FILE, or a run directory: its latest checkpoint)
with a dropout + linear classifier on [CLS] (sequence) or on every token (token). Without --eval a
seeded --eval-fraction of the rows is held out. After each epoch it prints the held-out accuracy and
macro-F1 (token task: also the micro-F1 of the non-O tags), and saves the fine-tuned state with its
label list under --out when given.
"""

import argparse
import csv
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastbert.models.bert import Encoder
from fastbert.reference.model import BertConfig

from .checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from .data import CorpusError
from .vocab import Vocab, VocabError

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")


class FinetuneError(ValueError):
    pass


def read_sequence_file(path):
    """[(text_a, text_b or None, label)] from a CSV/TSV file."""
    if not os.path.isfile(path):
        raise CorpusError(f"data file {path!r} does not exist")
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
    if not os.path.isfile(path):
        raise CorpusError(f"data file {path!r} does not exist")
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


def collate(items, device):
    width = max(len(x[0]) for x in items)
    ids = torch.zeros(len(items), width, dtype=torch.long)
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


class Classifier(nn.Module):
    def __init__(self, cfg, n_labels, token=False, dropout=0.1):
        super().__init__()
        self.bert = Encoder(cfg)
        self.token = token
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(cfg.hidden, n_labels)
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, ids, seg):
        mask = (ids != 0).long()
        h = self.bert(ids, seg, attention_mask=mask)
        h = h if self.token else h[:, 0]
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


def build_parser(p=None):
    p = p or argparse.ArgumentParser(prog="fastbert finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="pretraining checkpoint file or run directory")
    p.add_argument("--task", choices=["sequence", "token"], default="sequence")
    p.add_argument("--train", help="training file (default: the embedded set of the task)")
    p.add_argument("--eval", help="held-out file (default: --eval-fraction of --train)")
    p.add_argument("--eval-fraction", type=float, default=0.1)
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="directory for the fine-tuned model")
    p.add_argument("--no-progress", action="store_true")
    return p


def _resolve_checkpoint(path):
    if path is None:
        raise FinetuneError("--checkpoint is required: a pretraining checkpoint file or run directory "
                            "(for example runs/fastbert after `fastbert pretrain`)")
    if os.path.isdir(path):
        found = list_checkpoints(os.path.join(path, "checkpoints")) or list_checkpoints(path)
        if not found:
            raise CheckpointError(f"no checkpoint in {path!r} (looked in {path}/checkpoints)")
        return found[-1][1]
    return path


def run(args):
    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FinetuneError("--device cuda but no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt_path = _resolve_checkpoint(args.checkpoint)
    state = load_checkpoint(ckpt_path)
    cfg = BertConfig(**state["config"])
    vocab = Vocab.from_dict(state["vocab"])
    if args.seq_len > cfg.max_position:
        raise FinetuneError(f"--seq-len {args.seq_len} is larger than the model's maximum position "
                            f"{cfg.max_position}")
    cfg = cfg.with_(dropout=args.dropout, attn_dropout=args.dropout, emb_dropout=args.dropout)
    token = args.task == "token"
    default = os.path.join(DATA_DIR, "tokens.txt" if token else "classify.tsv")
    read = read_token_file if token else read_sequence_file
    train_rows = read(args.train or default)
    rng = np.random.default_rng(args.seed)
    if args.eval:
        eval_rows = read(args.eval)
    else:
        perm = rng.permutation(len(train_rows))
        n_eval = max(1, int(round(args.eval_fraction * len(train_rows))))
        eval_rows = [train_rows[i] for i in perm[:n_eval]]
        train_rows = [train_rows[i] for i in perm[n_eval:]]
    if token:
        names = sorted({t for _, tags in train_rows + eval_rows for t in tags})
    else:
        names = sorted({r[2] for r in train_rows + eval_rows})
    labels = {n: i for i, n in enumerate(names)}
    segs = (1, 2) if cfg.preset == "bert_pytorch" else (0, 1)
    enc = encode_tokens if token else encode_sequences
    train = enc(vocab, train_rows, labels, args.seq_len, segs)
    held = enc(vocab, eval_rows, labels, args.seq_len, segs)

    torch.manual_seed(args.seed)
    model = Classifier(cfg, len(names), token, args.dropout)
    enc_sd = {k[5:]: v for k, v in state["model"].items() if k.startswith("bert.")}
    try:
        model.bert.load_state_dict(enc_sd, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise CheckpointError(f"checkpoint {ckpt_path} encoder does not load: {first}") from e
    del state
    model.to(device)
    steps_per_epoch = max(1, len(train) // args.batch)
    total = int(args.epochs * steps_per_epoch)
    if args.max_steps:
        total = min(total, args.max_steps)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01,
                            fused=device.type == "cuda" or None)
    warm = max(1, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm)))
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    amp = dict(device_type=device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype),
               enabled=dtype != "fp32")
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == "fp16")
    print(f"fastbert finetune: {args.task} classification, {len(names)} labels {names[:8]}"
          f"{'...' if len(names) > 8 else ''}, {len(train)} train / {len(held)} held-out examples, "
          f"encoder from {ckpt_path} ({cfg.preset}, layers {cfg.n_layers}, hidden {cfg.hidden}), "
          f"{total} steps on {device}", flush=True)
    outside = labels.get("O") if token else None

    def evaluate():
        model.eval()
        pred, gold = [], []
        with torch.no_grad(), torch.autocast(**amp):
            for i in range(0, len(held), 64):
                ids, seg, y = collate(held[i:i + 64], device)
                logits = model(ids, seg).float()
                if token:
                    keep = y != -100
                    pred += logits.argmax(-1)[keep].tolist()
                    gold += y[keep].tolist()
                else:
                    pred += logits.argmax(-1).tolist()
                    gold += y.tolist()
        model.train()
        return scores(pred, gold, len(names), outside)

    step, epoch, t0, history = 0, 0, time.perf_counter(), []
    model.train()
    while step < total:
        order = rng.permutation(len(train))
        run_loss, n = 0.0, 0
        for i in range(0, steps_per_epoch * args.batch, args.batch):
            if step >= total:
                break
            ids, seg, y = collate([train[j] for j in order[i:i + args.batch]], device)
            with torch.autocast(**amp):
                logits = model(ids, seg)
            loss = F.cross_entropy(logits.float().reshape(-1, len(names)), y.reshape(-1), ignore_index=-100)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
            sched.step()
            opt.zero_grad(set_to_none=True)
            run_loss += loss.item()
            n += 1
            step += 1
        epoch += 1
        sc = evaluate()
        sc.update(epoch=epoch, step=step, train_loss=run_loss / max(1, n))
        history.append(sc)
        extra = f" | non-O F1 {sc['f1']:.3f}" if "f1" in sc else ""
        print(f"epoch {epoch} step {step} | train loss {sc['train_loss']:.4f} | held-out accuracy "
              f"{sc['accuracy']:.3f} | macro-F1 {sc['macro_f1']:.3f}{extra} | "
              f"{time.perf_counter() - t0:.0f}s",
              flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        tmp = os.path.join(args.out, f"model.pt.tmp{os.getpid()}")
        torch.save({"model": model.state_dict(), "labels": names, "task": args.task,
                    "config": dict(cfg.__dict__), "vocab": vocab.to_dict()}, tmp)
        os.replace(tmp, os.path.join(args.out, "model.pt"))
        print(f"saved {os.path.join(args.out, 'model.pt')}")
    return {"history": history, "labels": names, "model": model}


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (CorpusError, VocabError, CheckpointError, FinetuneError) as e:
        print(f"fastbert finetune: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
