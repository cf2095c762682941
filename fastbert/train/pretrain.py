"""`fastbert pretrain`: BERT pretraining (masked LM + next sentence prediction) on fastbert's encoder.

--preset modernbert trains a ModernBERT-style encoder (fastbert.ModernEncoder: rotary positions, GeGLU,
bias-free pre-LN, sliding-window attention in all but every --global-every-th layer) with MLM only, as
ModernBERT: examples are whole chunks of a document ([CLS] text [SEP]), no NSP head, the MLM head on the
masked tokens only; --packed packs them without padding. --export-hf writes a ModernBertForMaskedLM.

With no arguments it trains a WordPiece vocabulary on the demo's embedded corpus
(fastbert/data/world/corpus.txt.gz, see fastbert/data/README.md; cached under <out>/cache), tokenizes
the corpus once into a memory-mapped shard, and pretrains a small model (on CPU: the demo's defaults,
3000 steps, chosen by the sweep in fastbert/train/SWEEP.md; on CUDA: base for 1000 steps), printing
loss, MLM/NSP accuracy and tokens/s (non-padding tokens) of the training batches. The schedule always
runs to its end unless --time-limit is given; then the learning rate also decays over the time
budget, so a run the limit stops ends on a decayed schedule, with a warning saying how far it got.
--heldout of the documents (5%, spread over the corpus, the same for every seed)
are kept out of training, and the held-out MLM loss and accuracy and NSP accuracy on them are
reported at the end. --device cuda runs the fused ops in bf16 autocast and also reports model
TFLOP/s and MFU.

Under torchrun each rank takes its own micro-batches of every global batch (DistributedDataParallel,
or FSDP2 fully_shard with --fsdp). Losses are normalised by the global count of masked tokens and
examples of the step, so a run on P processes with batch B matches one process with --accum P.

Run folder (--out): checkpoints/ (atomic, the last --keep), metrics.jsonl (a JSON line per log step,
the held-out evaluation, resume and stop events), config.json (options, model, versions), cache/
(vocabulary and token shard), tensorboard/ with --tensorboard.

Exit status: 0 on success, 2 on bad input (corpus, vocabulary, options, checkpoint) with one message
on stderr; an existing checkpoint is never overwritten or removed by a run that fails its checks.
Ctrl-C (SIGINT) or SIGTERM ends the current step, writes a checkpoint, says where, and exits with
128 + the signal's number (130, 143); `--resume` continues from it.
"""

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from fastbert.reference.model import BertConfig

from .checkpoint import (
    CheckpointError,
    check_compatible,
    export_bert_pytorch,
    export_hf,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    run_folder_of,
    save_checkpoint,
)
from .data import CorpusError, PretrainData, cached_shard, check_text_file, detect_format, heldout_documents
from .heads import PretrainModel, flops_per_step, has_nsp  # noqa: F401 (flops_per_step: benchmarks import it)
from .interrupt import StopSignals, exit_status
from .loop import PEAK_BF16_TFLOPS, Logger, Masker, Metrics, evaluate, train_step  # noqa: F401
from .loop import log_rank0 as _log
from .optim import TimeBudget, param_groups, warmup_linear
from .options import (
    cpu_threads,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    probability,
    resolve_device,
)
from .runlog import RunLog, write_config
from .vocab import Vocab, VocabError, read_vocab, train_vocab

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
DEFAULT_CORPUS = os.path.join(DATA_DIR, "world", "corpus.txt.gz")  # the demo's (tools/build_world.py)
STDLIB_CORPUS = os.path.join(DATA_DIR, "corpus.txt.gz")  # real prose (tools/build_corpus.py)
DEFAULT_OUT = os.path.join("runs", "fastbert")
SIZES = {  # name: (layers, hidden, heads); Google's BERT miniatures, base and large
    "tiny": (2, 128, 2), "mini": (4, 256, 4), "small": (4, 512, 8), "medium": (8, 512, 8),
    "base": (12, 768, 12), "large": (24, 1024, 16),
}
OPS = ("embed", "layer_norm", "bias_gelu", "attention", "mlm_mask")  # logged with their implementation
MODERN_OPS = ("layer_norm", "rotary", "attention", "geglu", "mlm_mask")  # preset modernbert's

# the CPU demo's defaults (no --size/--batch/--lr/--seq-len/budget given), chosen by the sweep in
# train/SWEEP.md: 3000 steps of 32 x 64 tokens (6M tokens), run to the end on any machine
CPU_DEFAULTS = {"size": "tiny", "batch": 32, "seq_len": 64, "lr": 1e-3, "max_steps": 3000}
CUDA_DEFAULTS = {"size": "base", "batch": 128, "seq_len": 128, "lr": 1e-3, "max_steps": 1000}


class ConfigError(ValueError):
    pass


def build_parser(p=None):
    p = p or argparse.ArgumentParser(prog="fastbert pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--corpus", default=DEFAULT_CORPUS, help="UTF-8 text corpus, .gz for gzip (default: the "
                   "demo's embedded one; real prose: fastbert/data/corpus.txt.gz)")
    d.add_argument("--format", default="auto", choices=["auto", "plain", "tab"],
                   help="plain: sentence per line, blank line between documents; tab: `A\\tB` per line")
    d.add_argument("--vocab", help="vocab.txt or bert_pytorch WordVocab pickle (default: train WordPiece)")
    d.add_argument("--vocab-size", type=positive_int, default=8000)
    d.add_argument("--out", help=f"run folder (default: {DEFAULT_OUT}; when that holds a previous run "
                   f"and --resume is not given, the next free {DEFAULT_OUT}-N)")
    d.add_argument("--cache-dir", help="vocab and shard cache (default: <out>/cache)")
    d.add_argument("--seq-len", type=positive_int, help="tokens per sequence (default: 64 on CPU, 128 on "
                   "CUDA)")
    d.add_argument("--pairs", default="auto", choices=["auto", "sentence", "packed"],
                   help="NSP examples: one sentence each (bert_pytorch) or chunks of sentences filling "
                   "seq_len (Google BERT); auto: sentence for the tab format, packed for plain text")
    d.add_argument("--heldout", type=probability, default=0.05, help="fraction of the documents held out "
                   "of training; held-out MLM and NSP accuracy on them are reported at the end (0: none)")
    d.add_argument("--mask-prob", type=positive_float, default=0.15)
    d.add_argument("--max-predictions", type=positive_int, help="cap on masked tokens per sequence")
    d.add_argument("--whole-word", action="store_true", help="mask whole words (wordpiece vocab)")
    m = p.add_argument_group("model")
    m.add_argument("--size", choices=sorted(SIZES), help="layers/hidden/heads preset (default: tiny on CPU, "
                   "base on CUDA)")
    m.add_argument("--preset", default="hf", choices=["hf", "bert_pytorch", "modernbert"],
                   help="hf: transformers' BertModel; bert_pytorch: the bert-pytorch package's BERT; "
                   "modernbert: ModernBERT's encoder, MLM only (default: hf)")
    m.add_argument("--layers", type=positive_int)
    m.add_argument("--hidden", type=positive_int)
    m.add_argument("--heads", type=positive_int)
    m.add_argument("--intermediate", type=positive_int, help="FFN width (default 4 x hidden; modernbert: "
                   "the GeGLU's 1.5 x hidden)")
    m.add_argument("--max-position", type=positive_int, default=512)
    m.add_argument("--dropout", type=probability, help="hidden, attention and embedding dropout (default: "
                   "0.1; modernbert: 0.0, as ModernBERT)")
    m.add_argument("--local-window", type=positive_int, help="modernbert: the sliding window of the local "
                   "layers, a token sees those within half of it on each side (default: 128)")
    m.add_argument("--global-every", type=positive_int, help="modernbert: every n-th layer attends globally "
                   "(default: 3)")
    m.add_argument("--dense-mlm", action="store_true", help="dense MLM head (logits at every position)")
    t = p.add_argument_group("training")
    t.add_argument("--batch", type=positive_int, help="micro-batch per process (default: 32 on CPU, 128 on "
                   "CUDA)")
    t.add_argument("--accum", type=positive_int, default=1, help="gradient accumulation micro-batches")
    t.add_argument("--lr", type=positive_float, help="peak learning rate (default: 1e-3)")
    t.add_argument("--warmup", type=nonnegative_int, help="warmup steps (default: 6%% of the steps when "
                   "they are known, else 20)")
    t.add_argument("--weight-decay", type=nonnegative_float, default=0.01)
    t.add_argument("--grad-clip", type=nonnegative_float, default=1.0, help="gradient norm clip (0: none)")
    t.add_argument("--max-steps", type=nonnegative_int, help="optimizer steps; the LR schedule decays to 0 "
                   "at the last (default when neither --epochs nor --time-limit is given: 3000 on CPU, "
                   "1000 on CUDA)")
    t.add_argument("--epochs", type=positive_float)
    t.add_argument("--halt-at", type=nonnegative_int, help="stop at this step as if interrupted (the "
                   "schedule still runs to --max-steps; for preemption drills and the resume test)")
    t.add_argument("--time-limit", type=positive_float, help="also stop after this many seconds of training "
                   "(counted over resumed sessions too); the learning rate then decays over the time "
                   "left as well as over the steps, so the run ends on a decayed schedule, and a warning "
                   "says how many of the steps ran (default: no limit)")
    t.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="autocast dtype (default: bf16 on "
                   "CUDA, fp32 on CPU)")
    t.add_argument("--packed", action="store_true", help="pack whole examples into fixed budgets of batch x "
                   "seq-len token slots per micro-batch (Krell et al. 2021): static shapes, no host sync in "
                   "the step")
    t.add_argument("--pack-seqs", type=positive_int, help="sequence slots per pack (default: batch x "
                   "seq-len / 16)")
    t.add_argument("--cuda-graphs", action="store_true", help="capture the whole packed step (forward, loss, "
                   "backward, clipping, capturable AdamW, LR schedule on the device) in one CUDA graph after "
                   "3 warm-up steps and replay it; implies --packed; needs CUDA and one process")
    t.add_argument("--compile", action="store_true", help="torch.compile the encoder (dynamic shapes)")
    t.add_argument("--checkpoint-activations", action="store_true", help="recompute blocks in backward")
    t.add_argument("--fsdp", action="store_true", help="FSDP2 fully_shard instead of DDP under torchrun")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    t.add_argument("--threads", type=positive_int, help="CPU threads (default: 1 for a model of hidden "
                   "128 or less, which a second thread barely speeds up and a busy machine slows down "
                   "much; else torch's default)")
    t.add_argument("--seed", type=int, default=0)
    c = p.add_argument_group("checkpoints and logs")
    c.add_argument("--save-every", type=positive_int, default=500, help="checkpoint every N steps (and at "
                   "the end, and on Ctrl-C or SIGTERM)")
    c.add_argument("--keep", type=nonnegative_int, default=3, help="checkpoints kept (0: all)")
    c.add_argument("--resume", nargs="?", const="latest", help="continue a run: without a value the latest "
                   "checkpoint in <out>/checkpoints; or a run folder (its latest checkpoint; it becomes "
                   "--out) or a checkpoint file")
    c.add_argument("--export-hf", help="write a transformers BertForPreTraining folder (encoder, pooler, MLM "
                   "and NSP heads, tokenizer): AutoModel, AutoModelForMaskedLM and pipeline('fill-mask') "
                   "load it")
    c.add_argument("--export-bert-pytorch", help="write a bert_pytorch BERTLM state dict file")
    c.add_argument("--log-every", type=positive_int, default=10, help="log every N steps")
    c.add_argument("--log-seconds", type=nonnegative_float, default=10.0, help="and at least every S "
                   "seconds (0: only every N steps)")
    c.add_argument("--log-json", help="also write the metrics records (<out>/metrics.jsonl) to this file")
    c.add_argument("--tensorboard", action="store_true", help="also write the metrics as TensorBoard scalars "
                   "to <out>/tensorboard (needs the tensorboard package)")
    c.add_argument("--peak-tflops", type=positive_float, help="device peak for MFU (default by device name)")
    c.add_argument("--no-progress", action="store_true", help="no progress bars (ours, tokenizers' and "
                   "transformers')")
    return p


def model_config(args, vocab_size):
    layers, hidden, heads = SIZES[args.size or "tiny"]
    layers, hidden, heads = args.layers or layers, args.hidden or hidden, args.heads or heads
    modern = args.preset == "modernbert"
    dropout = args.dropout if args.dropout is not None else (0.0 if modern else 0.1)
    # the FFN width: BERT's 4 x hidden; ModernBERT's GeGLU 1.5 x hidden (base: 1152 for 768)
    kw = dict(intermediate=args.intermediate or (3 * hidden // 2 if modern else 4 * hidden),
              max_position=args.max_position, dropout=dropout, attn_dropout=dropout, emb_dropout=dropout)
    if args.seq_len > args.max_position:
        raise ConfigError(f"--seq-len {args.seq_len} is larger than the model's maximum position "
                          f"{args.max_position} (--max-position)")
    if not modern and (args.local_window is not None or args.global_every is not None):
        raise ConfigError("--local-window and --global-every are options of --preset modernbert")
    try:
        if args.preset == "hf":
            return BertConfig.hf(vocab_size, hidden, layers, heads, **kw)
        if modern:
            for name in ("local_window", "global_every"):
                if getattr(args, name) is not None:
                    kw[name] = getattr(args, name)
            return BertConfig.modernbert(vocab_size, hidden, layers, heads, **kw)
        return BertConfig.bert_pytorch(vocab_size, hidden, layers, heads, **kw)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _enable_activation_checkpointing(encoder):
    from torch.utils.checkpoint import checkpoint

    for block in encoder.transformer_blocks:
        inner = block.forward

        def fwd(*a, _inner=inner):
            return checkpoint(_inner, *a, use_reentrant=False)
        block.forward = fwd


def _setup_distributed(device_opt):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_opt, ConfigError)
    if device.type == "cuda" and device.index is None and world > 1:
        device = torch.device(f"cuda:{local}")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, world, device


def _barrier(world):
    if world > 1:
        dist.barrier()


def _resolve_vocab(opts, cache, rank, world, ckpt):
    if ckpt is not None:
        v = Vocab.from_dict(ckpt["vocab"])
        if opts.vocab and read_vocab(opts.vocab).fingerprint() != v.fingerprint():
            raise CheckpointError(f"--vocab {opts.vocab} differs from the checkpoint's vocabulary")
        return v
    if opts.vocab:
        return read_vocab(opts.vocab)
    import hashlib

    st = os.stat(opts.corpus)
    src = f"{os.path.abspath(opts.corpus)}|{st.st_size}|{st.st_mtime_ns}|{opts.vocab_size}"
    key = hashlib.sha256(src.encode())
    path = os.path.join(cache, f"vocab-{key.hexdigest()[:12]}.txt")
    if rank == 0 and not os.path.isfile(path):
        os.makedirs(cache, exist_ok=True)
        t0 = time.perf_counter()
        v = train_vocab([opts.corpus], opts.vocab_size, progress=not opts.no_progress)
        v.save(path)
        _log(rank, f"vocab: trained {len(v)} WordPiece tokens on {opts.corpus} in "
                   f"{time.perf_counter() - t0:.1f}s -> {path}")
    _barrier(world)
    return read_vocab(path)


def _state_dicts(model, optimizer, fsdp):
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer,
                                                                                   options=opts)
    return model.state_dict(), optimizer.state_dict()


def _load_state_dicts(model, optimizer, msd, osd, fsdp):
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, msd, options=opts)
        set_optimizer_state_dict(model, optimizer, osd, options=opts)
        return
    try:
        model.load_state_dict(msd, strict=True)
        optimizer.load_state_dict(osd)
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint does not fit this model: {str(e).splitlines()[0][:300]}") from e


@dataclass
class Setup:
    """Everything a run decides before it builds the model: options with their defaults resolved
    (a copy: the caller's namespace is not changed), processes, device, checkpoint, vocabulary, data."""

    opts: argparse.Namespace
    rank: int
    world: int
    device: torch.device
    dtype: str
    ckpt_dir: str
    ckpt: dict | None
    ckpt_path: str | None
    vocab: Vocab
    cfg: BertConfig
    shard: object
    data: PretrainData
    heldout: PretrainData | None
    max_steps: int | None
    warmup: int

    @property
    def fsdp(self):
        return self.opts.fsdp and self.world > 1

    def data_args(self):
        """The data options a checkpoint records (a resumed run warns when they differ)."""
        return {"corpus": os.path.abspath(self.opts.corpus), "seq_len": self.opts.seq_len,
                "seed": self.opts.seed, "pairs": self.opts.pairs, "global_batch": self.data.global_batch,
                "heldout": self.opts.heldout}


def _resolve_options(args, cuda):
    """A copy of args with the device-dependent defaults filled in, after checking the numbers."""
    o = argparse.Namespace(**vars(args))
    defaults = CUDA_DEFAULTS if cuda else CPU_DEFAULTS
    for name in ("size", "batch", "seq_len", "lr"):  # `is None`: a 0 given is refused, not replaced
        if getattr(o, name) is None:
            setattr(o, name, defaults[name])
    for name in ("batch", "accum", "save_every", "log_every", "vocab_size", "seq_len", "layers", "hidden",
                 "heads", "intermediate", "max_position", "epochs", "time_limit", "lr", "threads"):
        value = getattr(o, name, None)
        if value is not None and not value > 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
    for name in ("max_steps", "warmup", "keep", "halt_at"):
        if getattr(o, name, None) is not None and getattr(o, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 0, got {getattr(o, name)}")
    if not 0 <= o.heldout < 1:
        raise ConfigError(f"--heldout is a fraction of the documents in [0, 1), got {o.heldout}")
    if not 0 < o.mask_prob < 1:
        raise ConfigError(f"--mask-prob must be in (0, 1), got {o.mask_prob}")
    if o.time_limit is None and o.max_steps is None and o.epochs is None:
        o.max_steps = defaults["max_steps"]
    if o.cuda_graphs and not cuda:
        raise ConfigError("--cuda-graphs needs a CUDA device (run with --device cuda on a machine with a "
                          "GPU); without one, leave it out (--packed runs the same step eagerly)")
    if o.cuda_graphs and o.time_limit is not None:
        raise ConfigError("--cuda-graphs fixes the LR schedule on the device when it captures the step, so "
                          "it cannot follow --time-limit; give --max-steps instead")
    o.packed = o.packed or o.cuda_graphs
    if o.pack_seqs is not None and o.pack_seqs <= 0:
        raise ConfigError(f"--pack-seqs must be positive, got {o.pack_seqs}")
    o.dtype = o.dtype or ("bf16" if cuda else "fp32")
    if o.dtype == "fp16" and not cuda:
        raise ConfigError("--dtype fp16 needs CUDA (use bf16 or fp32 on CPU)")
    if o.seq_len > o.max_position:
        raise ConfigError(f"--seq-len {o.seq_len} is larger than the model's maximum position "
                          f"{o.max_position} (--max-position)")
    if o.export_bert_pytorch and o.preset != "bert_pytorch":
        raise ConfigError(f"--export-bert-pytorch needs --preset bert_pytorch (this run's is {o.preset}); "
                          f"use --export-hf")
    return o


def _resume_folder(opts):
    """The run folder that --resume names when --out is not given (a folder, or the run folder of a
    checkpoint file under <run>/checkpoints), else None."""
    if opts.out is not None or opts.resume in (None, "latest"):
        return None
    if os.path.isdir(opts.resume):
        return opts.resume
    return run_folder_of(opts.resume) if os.path.isfile(opts.resume) else None


def _run_dir(opts, rank):
    """The run directory: --out, or the default one, never reusing a default that holds checkpoints."""
    if opts.out is not None:
        return opts.out
    out, n = DEFAULT_OUT, 1
    while not opts.resume and list_checkpoints(os.path.join(out, "checkpoints")):
        n += 1
        out = f"{DEFAULT_OUT}-{n}"
    if n > 1:
        _log(rank, f"{DEFAULT_OUT} holds a previous run (continue it with --resume); this run writes to "
                   f"{out}")
    return out


def _find_checkpoint(opts, ckpt_dir):
    existing = list_checkpoints(ckpt_dir)
    if opts.resume:
        if opts.resume == "latest":
            if not existing:
                raise CheckpointError(f"--resume: no checkpoint in {ckpt_dir}")
            path = existing[-1][1]
        else:
            path = find_checkpoint(opts.resume)
        return load_checkpoint(path), path
    if existing:
        raise CheckpointError(f"{ckpt_dir} already holds checkpoints (latest step {existing[-1][0]}); pass "
                              f"--resume to continue that run, or --out DIR for a new one")
    return None, None


def setup(args):
    """Check the options and the inputs, find or train the vocabulary, tokenize the corpus, split off
    the held-out documents and build the data; returns a Setup. Raises ConfigError, CorpusError,
    VocabError or CheckpointError naming the problem, before anything is written to the run's
    checkpoint directory."""
    rank, world, device = _setup_distributed(args.device)
    o = _resolve_options(args, device.type == "cuda")
    if not os.path.isfile(o.corpus):
        raise CorpusError(f"corpus file {o.corpus!r} does not exist")
    if os.path.getsize(o.corpus) == 0:
        raise CorpusError(f"corpus file {o.corpus!r} is empty")
    check_text_file(o.corpus)
    fmt = o.format if o.format != "auto" else detect_format(o.corpus)
    o.out = o.out or _resume_folder(o)
    cache = o.cache_dir or os.path.join(o.out or DEFAULT_OUT, "cache")
    o.out = _run_dir(o, rank)
    ckpt_dir = os.path.join(o.out, "checkpoints")
    ckpt, ckpt_path = _find_checkpoint(o, ckpt_dir)
    vocab = _resolve_vocab(o, cache, rank, world, ckpt)
    cfg = model_config(o, len(vocab))
    o.threads = cpu_threads(o.threads, device, cfg.hidden)
    if ckpt is not None:
        check_compatible(ckpt, asdict(cfg), vocab.fingerprint(), ckpt_path)
    if rank == 0:
        shard = cached_shard(o.corpus, vocab, cache, fmt, progress=not o.no_progress)
    _barrier(world)
    if rank != 0:
        shard = cached_shard(o.corpus, vocab, cache, fmt, progress=False)
    o.pairs = o.pairs if o.pairs != "auto" else ("sentence" if fmt == "tab" else "packed")
    segments = (1, 2) if cfg.preset == "bert_pytorch" else (0, 1)
    nsp = has_nsp(cfg)
    held_docs = heldout_documents(shard.n_documents, o.heldout)
    heldout = None
    if held_docs.any():
        try:
            heldout = PretrainData(shard, o.seq_len, 1, 1, 0, vocab.cls_id, vocab.sep_id, segments=segments,
                                   pairs=o.pairs, documents=held_docs, nsp=nsp)
        except CorpusError:  # the held-out documents make no pair: train on everything
            held_docs[:] = False
    data = PretrainData(shard, o.seq_len, o.batch, o.accum * world, o.seed, vocab.cls_id, vocab.sep_id,
                        segments=segments, pairs=o.pairs, documents=~held_docs, nsp=nsp)
    max_steps = o.max_steps
    if o.epochs is not None:
        by_epochs = max(1, int(o.epochs * data.steps_per_epoch))
        max_steps = by_epochs if max_steps is None else min(max_steps, by_epochs)
    warmup = o.warmup if o.warmup is not None else (max(1, int(0.06 * max_steps)) if max_steps else 20)
    return Setup(o, rank, world, device, o.dtype, ckpt_dir, ckpt, ckpt_path, vocab, cfg, shard, data, heldout,
                 max_steps, warmup)


@dataclass
class Trainer:
    model: PretrainModel  # the module itself (state dicts, exports, evaluation)
    forward: torch.nn.Module  # what the step calls: the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    step: int
    n_params: int
    budget: TimeBudget


def build(s):
    """Model, optimizer, LR schedule and loss scaler of a Setup; the checkpoint's states when resuming."""
    o = s.opts
    torch.manual_seed(o.seed)
    model = PretrainModel(s.cfg, sparse=not o.dense_mlm).to(s.device)
    n_params = sum(p.numel() for p in model.parameters())
    if o.checkpoint_activations:
        _enable_activation_checkpointing(model.bert)
    if s.fsdp:
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6
            from torch.distributed._composable.fsdp import fully_shard
        for block in model.bert.transformer_blocks:
            fully_shard(block)
        fully_shard(model)
        wrapped = model
    elif s.world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[s.device.index] if s.device.type == "cuda" else None)
    else:
        wrapped = model
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(0.9, 0.98), eps=1e-6,
                                  fused=s.device.type == "cuda" or None)
    ckpt = s.ckpt
    budget = TimeBudget(o.time_limit, *((ckpt.get("train_seconds", 0.0), ckpt.get("warm_seconds"))
                                        if ckpt is not None else ()))
    remaining = budget.remaining if o.time_limit is not None else None
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear(s.warmup, s.max_steps, remaining))
    scaler = torch.amp.GradScaler("cuda", enabled=s.dtype == "fp16")
    step = 0
    if ckpt is not None:
        _load_state_dicts(model, optimizer, ckpt["model"], ckpt["optimizer"], s.fsdp)
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        step = int(ckpt["step"])
        rng = ckpt["rng"]
        torch.set_rng_state(rng["cpu"][s.rank] if s.rank < len(rng["cpu"]) else rng["cpu"][0])
        if s.device.type == "cuda" and rng.get("cuda"):
            torch.cuda.set_rng_state(rng["cuda"][s.rank % len(rng["cuda"])])
        _log(s.rank, f"resumed from {s.ckpt_path} at step {step}")
        old, now = ckpt.get("args", {}), s.data_args()
        changed = {k: (old.get(k), v) for k, v in now.items() if k in old and old[k] != v}
        if changed:
            _log(s.rank, "warning: the data options differ from the checkpoint's, so the data order is not "
                         "the one the run would have seen: "
                         + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
        s.ckpt = None  # free the checkpoint's tensors
    if o.compile:  # the encoder, in place (state dict keys unchanged), shapes dynamic: batches vary
        model.bert.compile(dynamic=True)
    return Trainer(model, wrapped, optimizer, scheduler, scaler, step, n_params, budget)


def _banner(s, t):
    o, cfg, data = s.opts, s.cfg, s.data
    kind = f"{data.pairs} pairs" if has_nsp(cfg) else ("chunks" if data.chunks else "sentence pairs")
    held = (f"{s.heldout.n_examples} examples of {s.heldout.n_docs_used} held-out documents"
            if s.heldout is not None else "no held-out split")
    arch = (f", window {cfg.local_window} with a global layer every {cfg.global_every}, MLM only"
            if cfg.preset == "modernbert" else "")
    _log(s.rank, f"fastbert pretrain: {cfg.preset} {o.size} (layers {cfg.n_layers}, hidden {cfg.hidden}, "
                 f"heads {cfg.heads}{arch}), {t.n_params / 1e6:.1f}M parameters, vocab {len(s.vocab)}, on "
                 f"{s.device} "
                 f"({s.dtype}{', compiled' if o.compile else ''}"
                 f"{f', {o.threads} thread(s)' if s.device.type == 'cpu' else ''}) x{s.world} | corpus "
                 f"{s.shard.meta['n_sentences']} sentences, {s.shard.meta['n_tokens']} tokens, "
                 f"{data.n_examples} {kind} for training, {held}, {data.steps_per_epoch} "
                 f"steps/epoch of {data.global_batch} sequences (seq_len {o.seq_len}) | lr {o.lr:g}, mask "
                 f"{o.mask_prob:g}{' whole words' if o.whole_word else ''} | "
                 + (f"max steps {s.max_steps}" if s.max_steps else "")
                 + (", " if s.max_steps and o.time_limit else "")
                 + (f"time limit {o.time_limit:.0f}s" if o.time_limit else ""))


def _open_runlog(s, t):
    """config.json and the metrics sinks of the run folder (rank 0; None elsewhere)."""
    if s.rank != 0:
        return None
    o = s.opts
    resumed = {"step": t.step, "checkpoint": s.ckpt_path} if s.ckpt_path else None
    write_config(o.out, "pretrain", vars(o), model=asdict(s.cfg), device=s.device, resumed=resumed)
    try:
        return RunLog(o.out, o.log_json, o.tensorboard, resume_step=t.step if resumed else None,
                      marker=resumed and {"checkpoint": s.ckpt_path, "argv": sys.argv[1:]})
    except ImportError as e:
        raise ConfigError(str(e)) from e


def _stop_reason(s, t, budget, signals, comm):
    """Why the loop stops before this step, the same on every rank: "done", "halt", "signal", "time"
    or None (go on)."""
    o = s.opts
    if s.max_steps is not None and t.step >= s.max_steps:
        return "done"
    if o.halt_at is not None and t.step >= o.halt_at:
        return "halt"
    flags = [float(signals.signum or 0), float(budget.over())]
    if s.world > 1:
        v = torch.tensor(flags, device=comm)
        dist.all_reduce(v, op=dist.ReduceOp.MAX)
        flags = v.tolist()
        if flags[0] and not signals.signum:  # another rank was signalled
            signals.signum = int(flags[0])
    return "signal" if flags[0] else ("time" if flags[1] else None)


def _train(s, t, packed, masker, metrics, logger, signals, comm):
    """The training loop; returns (why it stopped, the step of the last checkpoint written, the
    implementation each op ran in the first step, or None when no step ran)."""
    o = s.opts
    from fastbert.info import last_used

    steps_per_epoch = packed.steps_per_epoch if packed else s.data.steps_per_epoch
    first = t.step
    last_saved, ops_run = t.step if s.ckpt_path else None, None
    t.budget.start()
    t.model.train()
    signals.arm()
    while (reason := _stop_reason(s, t, t.budget, signals, comm)) is None:
        if packed:
            packed.step(metrics)
        else:
            epoch, k = divmod(t.step, steps_per_epoch)
            train_step(s, t, masker, s.data.step_batches(epoch, k, s.rank, s.world), metrics, comm)
        if t.step == first + 1:  # what the first step ran, per op (fastbert.ops' own record)
            ops_run = last_used(s.device.type)
            _log(s.rank, "ops run: " + ", ".join(f"{op} {impl}" for op, impl in ops_run.items()))
        if logger.after_step(t.step, comm):
            if packed:
                packed.flush(metrics)  # the device sums: one read-back per logging interval
            lr = packed.lr() if packed else t.scheduler.get_last_lr()[0]
            logger.log(t.step, metrics.reduce(s.world, comm), lr)
            metrics.reset()
        if t.step % o.save_every == 0:
            _save(s, t)
            last_saved = t.step
    return reason, last_saved, ops_run


def _time_limit_warning(s, t, logger):
    o = s.opts
    if s.max_steps:
        msg = (f"warning: --time-limit {o.time_limit:g}s ended the run at step {t.step} of {s.max_steps} "
               f"({100 * t.step / s.max_steps:.0f}% of the steps); the learning rate decayed over the time "
               f"limit, so the run ends on a finished schedule, but with fewer steps than asked: results "
               f"depend on this machine's speed (leave out --time-limit to run every step)")
    else:
        msg = (f"time limit {o.time_limit:g}s reached at step {t.step}; the learning rate decayed over "
               f"the time limit")
    _log(s.rank, msg)
    logger.write_json({"event": "time_limit", "step": t.step, "max_steps": s.max_steps,
                       "time_limit": o.time_limit})


def run(args):
    """Pretrain as `args` says; returns {"step", "history", "model", "vocab", "config", "ops", "heldout",
    "train_seconds", "stopped"} where stopped is "done", "halt", "time" or a signal's name, and
    "exit_code" (0, or 128 + the signal's number)."""
    with StopSignals() as signals:
        return _run(args, signals)


def _run(args, signals):
    s = setup(args)
    o = s.opts
    t = build(s)
    _banner(s, t)
    from fastbert.info import implementation

    ops_used = {op: implementation(op, s.device.type)
                for op in (MODERN_OPS if s.cfg.preset == "modernbert" else OPS)}
    _log(s.rank, "ops: " + ", ".join(f"{op} {impl}" for op, impl in ops_used.items()))
    packed = None
    if o.packed:
        from .packed_run import PackedLoop

        packed = PackedLoop(s, t, ConfigError)
        d = packed.data
        _log(s.rank, f"packed: {d.tokens} token slots, {d.max_seqs} sequence slots and {d.max_predictions} "
                     f"prediction slots per pack, {packed.steps_per_epoch} steps per epoch"
                     f"{', CUDA graph' if packed.graphs else ''}")
    runlog = _open_runlog(s, t)
    masker, metrics, logger = Masker(s), Metrics(), Logger(s, t.step, runlog)
    comm = s.device if s.world > 1 and s.device.type == "cuda" else torch.device("cpu")  # NCCL: CUDA tensors
    start = t.step
    try:
        reason, last_saved, ops_run = _train(s, t, packed, masker, metrics, logger, signals, comm)
    finally:
        logger.bar.close()
    ops_used = ops_run or ops_used
    path = _save(s, t) if last_saved != t.step else None
    if path is None and s.rank == 0:
        path = list_checkpoints(s.ckpt_dir)[-1][1] if list_checkpoints(s.ckpt_dir) else None
    if signals.signum and s.world == 1:  # came during the last step's checkpoint: stop here all the same
        reason = "signal"
    train_s = t.budget.elapsed()
    result = {"step": t.step, "history": logger.history, "model": t.model, "vocab": s.vocab, "config": s.cfg,
              "ops": ops_used, "heldout": None, "train_seconds": train_s, "stopped": reason, "exit_code": 0,
              "checkpoint": path, "out": o.out}
    if reason == "signal":
        logger.write_json({"event": "interrupted", "step": t.step, "signal": signals.name,
                           "checkpoint": path})
        logger.close()
        if s.rank == 0:
            print(f"fastbert pretrain: {signals.name} at step {t.step}: checkpoint written to {path}; "
                  f"continue with --resume {o.out}", file=sys.stderr, flush=True)
        _barrier(s.world)
        return {**result, "stopped": signals.name, "exit_code": signals.exit_code}
    if reason == "time":
        _time_limit_warning(s, t, logger)
    signals.armed = False  # from here a signal stops at once: the checkpoint is written
    heldout = None
    if s.heldout is not None:
        heldout = evaluate(s, t.model, masker)
        logger.write_json({"step": t.step, "heldout": heldout})
        nsp = f" | nsp acc {heldout['nsp_acc']:.3f}" if "nsp_acc" in heldout else ""
        _log(s.rank, f"held-out ({heldout['examples']} examples, {heldout['masked']} masked tokens): mlm "
                     f"loss {heldout['mlm_loss']:.4f} | mlm acc {heldout['mlm_acc']:.3f}{nsp}")
    logger.close()
    if s.rank == 0:
        _exports(s, t)
        h = logger.history
        if h:
            nsp = f", nsp acc {h[-1]['nsp_acc']:.3f}" if "nsp_acc" in h[-1] else ""
            print(f"done: {t.step} steps ({t.step - start} in this session) in {train_s:.0f}s; loss "
                  f"{h[0]['loss']:.3f} -> {h[-1]['loss']:.3f}, mlm acc {h[-1]['mlm_acc']:.3f}{nsp} "
                  f"(training batches); checkpoint {path}; metrics "
                  f"{os.path.join(o.out, 'metrics.jsonl')}")
    _barrier(s.world)
    return {**result, "heldout": heldout}


def _exports(s, t):
    o = s.opts
    if o.export_hf:
        export_hf(t.model, s.vocab, o.export_hf, progress=not o.no_progress)
        what = ("ModernBertForMaskedLM (encoder, MLM head, tokenizer)" if s.cfg.preset == "modernbert"
                else "BertForPreTraining (encoder, pooler, MLM and NSP heads, tokenizer)")
        print(f"exported transformers {what} to {o.export_hf}")
    if o.export_bert_pytorch:
        export_bert_pytorch(t.model, o.export_bert_pytorch)
        print(f"exported bert_pytorch BERTLM state dict to {o.export_bert_pytorch}")


def _save(s, t):
    """Write a checkpoint of the current step (every rank joins); its path on rank 0, else None."""
    msd, osd = _state_dicts(t.model, t.optimizer, s.fsdp)
    cpu_states = [torch.get_rng_state()]
    if s.world > 1:
        gathered = [None] * s.world
        dist.all_gather_object(gathered, cpu_states[0])
        cpu_states = gathered
    cuda_states = []
    if s.device.type == "cuda":
        cuda_states = [torch.cuda.get_rng_state(s.device)]
        if s.world > 1:
            gathered = [None] * s.world
            dist.all_gather_object(gathered, cuda_states[0])
            cuda_states = gathered
    path = None
    if s.rank == 0:
        o = s.opts
        state = {"model": msd, "optimizer": osd, "scheduler": t.scheduler.state_dict(),
                 "scaler": t.scaler.state_dict() if t.scaler.is_enabled() else None,
                 "config": asdict(s.cfg), "vocab": s.vocab.to_dict(),
                 "vocab_fingerprint": s.vocab.fingerprint(),
                 "rng": {"cpu": cpu_states, "cuda": cuda_states},
                 "train_seconds": t.budget.elapsed(), "warm_seconds": t.budget.warm_at,
                 "args": {**{k: v for k, v in vars(o).items() if isinstance(v, int | float | str | bool)},
                          **s.data_args()}}
        path = save_checkpoint(s.ckpt_dir, t.step, state, keep=o.keep)
    _barrier(s.world)
    return path


def main(argv=None):
    args = build_parser().parse_args(argv)
    return run_main(args)


def run_main(args):
    try:
        return exit_status("pretrain", run, args, (CorpusError, VocabError, CheckpointError, ConfigError))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

