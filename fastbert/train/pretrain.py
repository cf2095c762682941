"""`fastbert pretrain`: BERT pretraining (masked LM + next sentence prediction) on fastbert's encoder.

With no arguments it trains a WordPiece vocabulary on the embedded corpus (fastbert/data/corpus.txt.gz,
cached under <out>/cache), tokenizes the corpus once into a memory-mapped shard, and pretrains a
small model (tiny on CPU, base on CUDA) for --time-limit seconds (120 by default when neither
--max-steps nor --epochs is given), printing loss, MLM/NSP accuracy and tokens/s (non-padding
tokens). --device cuda runs the fused ops in bf16 autocast and also reports model TFLOP/s and MFU.

Under torchrun each rank takes its own micro-batches of every global batch (DistributedDataParallel,
or FSDP2 fully_shard with --fsdp). Losses are normalised by the global count of masked tokens and
examples of the step, so a run on P processes with batch B matches one process with --accum P.

Exit status: 0 on success, 2 on bad input (corpus, vocabulary, options, checkpoint) with one message
on stderr; an existing checkpoint is never overwritten or removed by a run that fails its checks.
"""

import argparse
import json
import os
import sys
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastbert.reference.model import BertConfig

from .checkpoint import (
    CheckpointError,
    check_compatible,
    export_bert_pytorch,
    export_hf,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from .data import CorpusError, PretrainData, cached_shard, detect_format
from .heads import PretrainModel
from .vocab import Vocab, VocabError, read_vocab, train_vocab

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
DEFAULT_CORPUS = os.path.join(DATA_DIR, "corpus.txt.gz")
DEFAULT_OUT = os.path.join("runs", "fastbert")
SIZES = {  # name: (layers, hidden, heads); Google's BERT miniatures, base and large
    "tiny": (2, 128, 2), "mini": (4, 256, 4), "small": (4, 512, 8), "medium": (8, 512, 8),
    "base": (12, 768, 12), "large": (24, 1024, 16),
}
OPS = ("embed", "layer_norm", "bias_gelu", "attention", "mlm_mask")  # logged with their implementation

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


class ConfigError(ValueError):
    pass


def build_parser(p=None):
    p = p or argparse.ArgumentParser(prog="fastbert pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--corpus", default=DEFAULT_CORPUS, help="text corpus (default: the embedded one)")
    d.add_argument("--format", default="auto", choices=["auto", "plain", "tab"],
                   help="plain: sentence per line, blank line between documents; tab: `A\\tB` per line")
    d.add_argument("--vocab", help="vocab.txt or bert_pytorch WordVocab pickle (default: train WordPiece)")
    d.add_argument("--vocab-size", type=int, default=8000)
    d.add_argument("--out", help=f"run directory (default: {DEFAULT_OUT}; when that holds a previous run "
                   f"and --resume is not given, the next free {DEFAULT_OUT}-N)")
    d.add_argument("--cache-dir", help="vocab and shard cache (default: <out>/cache)")
    d.add_argument("--seq-len", type=int, default=128)
    d.add_argument("--pairs", default="auto", choices=["auto", "sentence", "packed"],
                   help="NSP examples: one sentence each (bert_pytorch) or chunks of sentences filling "
                   "seq_len (Google BERT); auto: sentence for the tab format, packed for plain text")
    d.add_argument("--mask-prob", type=float, default=0.15)
    d.add_argument("--max-predictions", type=int, help="cap on masked tokens per sequence")
    d.add_argument("--whole-word", action="store_true", help="mask whole words (wordpiece vocab)")
    m = p.add_argument_group("model")
    m.add_argument("--size", choices=sorted(SIZES), help="layers/hidden/heads preset (default: tiny on CPU, "
                   "base on CUDA)")
    m.add_argument("--preset", default="hf", choices=["hf", "bert_pytorch"])
    m.add_argument("--layers", type=int)
    m.add_argument("--hidden", type=int)
    m.add_argument("--heads", type=int)
    m.add_argument("--intermediate", type=int, help="FFN width (default 4 x hidden)")
    m.add_argument("--max-position", type=int, default=512)
    m.add_argument("--dropout", type=float, default=0.1)
    m.add_argument("--dense-mlm", action="store_true", help="dense MLM head (logits at every position)")
    t = p.add_argument_group("training")
    t.add_argument("--batch", type=int, help="micro-batch per process (default: 32 on CPU, 128 on CUDA)")
    t.add_argument("--accum", type=int, default=1, help="gradient accumulation micro-batches")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--warmup", type=int, help="warmup steps (default: 6%% of the steps when they are "
                   "known, else 20)")
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--max-steps", type=int)
    t.add_argument("--epochs", type=float)
    t.add_argument("--halt-at", type=int, help="stop at this step as if interrupted (the schedule still "
                   "runs to --max-steps; for preemption drills and the resume test)")
    t.add_argument("--time-limit", type=float, help="stop after this many seconds (default 120 when "
                   "neither --max-steps nor --epochs is given); counted from the first step")
    t.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="autocast dtype (default: bf16 on "
                   "CUDA, fp32 on CPU)")
    t.add_argument("--compile", action="store_true", help="torch.compile the encoder (dynamic shapes)")
    t.add_argument("--checkpoint-activations", action="store_true", help="recompute blocks in backward")
    t.add_argument("--fsdp", action="store_true", help="FSDP2 fully_shard instead of DDP under torchrun")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    t.add_argument("--threads", type=int, help="CPU threads")
    t.add_argument("--seed", type=int, default=0)
    c = p.add_argument_group("checkpoints and logs")
    c.add_argument("--save-every", type=int, default=500)
    c.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    c.add_argument("--resume", nargs="?", const="latest", help="continue from the latest checkpoint in "
                   "<out>/checkpoints, or from the given file")
    c.add_argument("--export-hf", help="write the encoder as a transformers BertModel directory")
    c.add_argument("--export-bert-pytorch", help="write a bert_pytorch BERTLM state dict file")
    c.add_argument("--log-every", type=int, default=10, help="log every N steps")
    c.add_argument("--log-seconds", type=float, default=10.0, help="and at least every S seconds")
    c.add_argument("--log-json", help="append each log record as a JSON line to this file (rank 0)")
    c.add_argument("--peak-tflops", type=float, help="device peak for MFU (default by device name)")
    c.add_argument("--no-progress", action="store_true")
    return p


def model_config(args, vocab_size):
    layers, hidden, heads = SIZES[args.size or "tiny"]
    layers, hidden, heads = args.layers or layers, args.hidden or hidden, args.heads or heads
    kw = dict(intermediate=args.intermediate or 4 * hidden, max_position=args.max_position,
              dropout=args.dropout, attn_dropout=args.dropout, emb_dropout=args.dropout)
    if args.seq_len > args.max_position:
        raise ConfigError(f"--seq-len {args.seq_len} is larger than the model's maximum position "
                          f"{args.max_position} (--max-position)")
    try:
        if args.preset == "hf":
            return BertConfig.hf(vocab_size, hidden, layers, heads, **kw)
        return BertConfig.bert_pytorch(vocab_size, hidden, layers, heads, **kw)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def flops_per_step(cfg, tokens, sum_len2, masked, sparse=True):
    """Model FLOPs (forward + backward = 3 x forward) of one step: matmuls of the encoder on the
    non-padding tokens, attention scores and values (4 L^2 N per layer and sequence), MLM head."""
    n, i = cfg.hidden, cfg.intermediate
    per_token = 2 * cfg.n_layers * (4 * n * n + 2 * n * i)
    attn = 4 * cfg.n_layers * n * sum_len2
    head_rows = masked if sparse else tokens
    head = 2 * head_rows * (n * cfg.vocab_size + (n * n if cfg.preset == "hf" else 0))
    return 3 * (per_token * tokens + attn + head)


def _log(rank, msg):
    if rank == 0:
        print(msg, flush=True)


def _lr_lambda(warmup, total):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        if total is None:
            return 1.0
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


def _enable_activation_checkpointing(encoder):
    from torch.utils.checkpoint import checkpoint

    for block in encoder.transformer_blocks:
        inner = block.forward

        def fwd(*a, _inner=inner):
            return checkpoint(_inner, *a, use_reentrant=False)
        block.forward = fwd


def _setup_distributed(args):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want = args.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA device is available")
    if want == "cuda":
        want = f"cuda:{local}" if world > 1 else "cuda"
    device = torch.device(want)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, world, device


def _barrier(world):
    if world > 1:
        dist.barrier()


def _resolve_vocab(args, corpus, cache, rank, world, ckpt):
    if ckpt is not None:
        v = Vocab.from_dict(ckpt["vocab"])
        if args.vocab and read_vocab(args.vocab).fingerprint() != v.fingerprint():
            raise CheckpointError(f"--vocab {args.vocab} differs from the checkpoint's vocabulary")
        return v
    if args.vocab:
        return read_vocab(args.vocab)
    import hashlib

    st = os.stat(corpus)
    src = f"{os.path.abspath(corpus)}|{st.st_size}|{st.st_mtime_ns}|{args.vocab_size}"
    key = hashlib.sha256(src.encode())
    path = os.path.join(cache, f"vocab-{key.hexdigest()[:12]}.txt")
    if rank == 0 and not os.path.isfile(path):
        os.makedirs(cache, exist_ok=True)
        t0 = time.perf_counter()
        v = train_vocab([corpus], args.vocab_size, progress=not args.no_progress)
        v.save(path)
        _log(rank, f"vocab: trained {len(v)} WordPiece tokens on {corpus} in "
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


def run(args):
    rank, world, device = _setup_distributed(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    args.size = args.size or ("base" if cuda else "tiny")
    args.batch = args.batch or (128 if cuda else 32)
    for name in ("batch", "accum", "save_every", "log_every", "vocab_size", "seq_len"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.time_limit is None and args.max_steps is None and args.epochs is None:
        args.time_limit = 120.0
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    if dtype == "fp16" and device.type != "cuda":
        raise ConfigError("--dtype fp16 needs CUDA (use bf16 or fp32 on CPU)")
    corpus = args.corpus
    if not os.path.isfile(corpus):
        raise CorpusError(f"corpus file {corpus!r} does not exist")
    if os.path.getsize(corpus) == 0:
        raise CorpusError(f"corpus file {corpus!r} is empty")
    fmt = args.format if args.format != "auto" else detect_format(corpus)
    cache = args.cache_dir or os.path.join(args.out or DEFAULT_OUT, "cache")
    if args.out is None:  # the default run directory: never reuse one that holds checkpoints
        args.out, n = DEFAULT_OUT, 1
        while not args.resume and list_checkpoints(os.path.join(args.out, "checkpoints")):
            n += 1
            args.out = f"{DEFAULT_OUT}-{n}"
        if n > 1:
            _log(rank, f"{DEFAULT_OUT} holds a previous run (continue it with --resume); this run "
                       f"writes to {args.out}")
    ckpt_dir = os.path.join(args.out, "checkpoints")
    existing = list_checkpoints(ckpt_dir)
    ckpt, ckpt_path = None, None
    if args.resume:
        if args.resume == "latest":
            if not existing:
                raise CheckpointError(f"--resume: no checkpoint in {ckpt_dir}")
            ckpt_path = existing[-1][1]
        else:
            ckpt_path = args.resume
        ckpt = load_checkpoint(ckpt_path)
    elif existing:
        raise CheckpointError(f"{ckpt_dir} already holds checkpoints (latest step {existing[-1][0]}); pass "
                              f"--resume to continue that run, or --out DIR for a new one")
    if args.seq_len > args.max_position:
        raise ConfigError(f"--seq-len {args.seq_len} is larger than the model's maximum position "
                          f"{args.max_position} (--max-position)")
    vocab = _resolve_vocab(args, corpus, cache, rank, world, ckpt)
    cfg = model_config(args, len(vocab))
    if ckpt is not None:
        check_compatible(ckpt, asdict(cfg), vocab.fingerprint(), ckpt_path)
    if rank == 0:
        shard = cached_shard(corpus, vocab, cache, fmt, progress=not args.no_progress)
    _barrier(world)
    if rank != 0:
        shard = cached_shard(corpus, vocab, cache, fmt, progress=False)
    micro = args.accum * world
    pairs = args.pairs if args.pairs != "auto" else ("sentence" if fmt == "tab" else "packed")
    args._pairs = pairs
    data = PretrainData(shard, args.seq_len, args.batch, micro, args.seed, vocab.cls_id, vocab.sep_id,
                        segments=(1, 2) if cfg.preset == "bert_pytorch" else (0, 1), pairs=pairs)
    spe = data.steps_per_epoch
    max_steps = args.max_steps
    if args.epochs is not None:
        by_epochs = max(1, int(args.epochs * spe))
        max_steps = by_epochs if max_steps is None else min(max_steps, by_epochs)

    torch.manual_seed(args.seed)
    model = PretrainModel(cfg, sparse=not args.dense_mlm).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    if args.checkpoint_activations:
        _enable_activation_checkpointing(model.bert)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or "norm" in name else decay).append(p)
    fused = device.type == "cuda"
    if args.fsdp and world > 1:
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6
            from torch.distributed._composable.fsdp import fully_shard
        for block in model.bert.transformer_blocks:
            fully_shard(block)
        fully_shard(model)
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            (no_decay if p.dim() < 2 or "norm" in name else decay).append(p)
        wrapped = model
    elif world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        wrapped = model
    fsdp = args.fsdp and world > 1
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.98), eps=1e-6, fused=fused or None)
    warmup = args.warmup if args.warmup is not None else (max(1, int(0.06 * max_steps)) if max_steps else 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(warmup, max_steps))
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == "fp16")
    step = 0
    if ckpt is not None:
        _load_state_dicts(model, optimizer, ckpt["model"], ckpt["optimizer"], fsdp)
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        step = int(ckpt["step"])
        rng = ckpt["rng"]
        torch.set_rng_state(rng["cpu"][rank] if rank < len(rng["cpu"]) else rng["cpu"][0])
        if device.type == "cuda" and rng.get("cuda"):
            torch.cuda.set_rng_state(rng["cuda"][rank % len(rng["cuda"])])
        _log(rank, f"resumed from {ckpt_path} at step {step}")
        old = ckpt.get("args", {})
        now = {"corpus": os.path.abspath(corpus), "seq_len": args.seq_len, "seed": args.seed, "pairs": pairs,
               "global_batch": data.global_batch}
        changed = {k: (old.get(k), v) for k, v in now.items() if k in old and old[k] != v}
        if changed:
            _log(rank, "warning: the data options differ from the checkpoint's, so the data order is not "
                       "the one the run would have seen: "
                       + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
        del ckpt
    if args.compile:  # the encoder, in place (state dict keys unchanged), shapes dynamic: batches vary
        model.bert.compile(dynamic=True)
    forward = wrapped
    amp = dict(device_type=device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype),
               enabled=dtype != "fp32")
    special = (vocab.unk_id, vocab.cls_id, vocab.sep_id, vocab.mask_id)
    continuation = None
    if args.whole_word and vocab.kind == "wordpiece":
        continuation = torch.tensor([t.startswith("##") for t in vocab.tokens], device=device)
    from fastbert.ops import mlm_mask

    peak = args.peak_tflops
    if peak is None and device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    _log(rank, f"fastbert pretrain: {cfg.preset} {args.size} (layers {cfg.n_layers}, hidden {cfg.hidden}, "
               f"heads {cfg.heads}), {n_params / 1e6:.1f}M parameters, vocab {len(vocab)}, on {device} "
               f"({dtype}{', compiled' if args.compile else ''}) x{world} | corpus "
               f"{shard.meta['n_sentences']} sentences, {shard.meta['n_tokens']} tokens, "
               f"{data.n_examples} {data.pairs} pairs, {spe} steps/epoch of {data.global_batch} "
               f"sequences (seq_len {args.seq_len}) | "
               + (f"max steps {max_steps}" if max_steps else f"time limit {args.time_limit:.0f}s"))
    from fastbert.info import implementation

    ops_used = {op: implementation(op, device.type) for op in OPS}
    _log(rank, "ops: " + ", ".join(f"{op} {impl}" for op, impl in ops_used.items()))
    from tqdm import tqdm

    bar = tqdm(total=max_steps, initial=step, unit="step", desc="pretrain", dynamic_ncols=True,
               disable=True if args.no_progress or rank != 0 else None, leave=False)  # None: tty only
    say = bar.write if not bar.disable else (lambda m: _log(rank, m))
    acc = {k: 0.0 for k in ("mlm", "nsp", "mlm_hit", "nsp_hit", "masked", "examples", "tokens", "flops")}
    t_log = time.perf_counter()
    last_saved = step if args.resume else None
    history = []
    comm = device if world > 1 and device.type == "cuda" else torch.device("cpu")  # NCCL needs CUDA tensors
    t_train = time.perf_counter()
    model.train()
    while True:
        halted = args.halt_at is not None and step >= args.halt_at
        if (max_steps is not None and step >= max_steps) or halted:
            break
        if args.time_limit is not None:
            stop = torch.tensor([float(time.perf_counter() - t_train >= args.time_limit)], device=comm)
            if world > 1:
                dist.broadcast(stop, 0)
            if stop.item():
                break
        epoch, s = divmod(step, spe)
        batches = data.step_batches(epoch, s, rank, world)
        prepared = []
        n_masked = 0
        for mb in batches:
            ids = torch.from_numpy(mb["input_ids"]).to(device, non_blocking=True)
            seg = torch.from_numpy(mb["segment_ids"]).to(device, non_blocking=True)
            nxt = torch.from_numpy(mb["is_next"]).to(device, non_blocking=True)
            gen = torch.Generator(device=device)
            gen.manual_seed((args.seed * 1_000_003 + step) * 4099 + mb["micro_index"])
            ws = None if continuation is None else ~continuation[ids]
            masked, labels, pos = mlm_mask(ids, len(vocab), vocab.mask_id, vocab.pad_id, special,
                                           mask_prob=args.mask_prob, generator=gen, word_starts=ws,
                                           max_predictions=args.max_predictions, return_positions=True)
            lab = labels.view(-1).index_select(0, pos)
            n_masked += pos.numel()
            prepared.append((masked, seg, nxt, pos, lab, ids))
        counts = torch.tensor([float(n_masked), float(data.global_batch)], device=comm)
        if world > 1:
            dist.all_reduce(counts)
        g_masked, g_examples = max(1.0, counts[0].item()), counts[1].item()
        for k, (masked, seg, nxt, pos, lab, ids) in enumerate(prepared):
            sync = k == len(prepared) - 1 or world == 1 or fsdp
            ctx = wrapped.no_sync() if not sync and hasattr(wrapped, "no_sync") else _null()
            with ctx:
                with torch.autocast(**amp):
                    mlm_sum, mlm_hit, nsp = forward(masked, seg, pos, lab)
                nsp_sum = F.nll_loss(nsp.float(), nxt, reduction="sum")
                loss = (mlm_sum / g_masked + nsp_sum / g_examples) * world
                scaler.scale(loss).backward()
            acc["mlm"] += mlm_sum.detach()
            acc["nsp"] += nsp_sum.detach()
            acc["mlm_hit"] += mlm_hit
            acc["nsp_hit"] += (nsp.argmax(1) == nxt).sum()
            acc["masked"] += pos.numel()
            acc["examples"] += ids.shape[0]
            lens = (ids != 0).sum(1)
            tokens = int(lens.sum())
            acc["tokens"] += tokens
            acc["flops"] += flops_per_step(cfg, tokens, int((lens.double() ** 2).sum()), pos.numel(),
                                           not args.dense_mlm)
        scaler.unscale_(optimizer)
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        due = time.perf_counter() - t_log >= args.log_seconds
        if world > 1 and args.log_seconds:  # every rank must join the metrics all-reduce
            flag = torch.tensor([float(due)], device=comm)
            dist.broadcast(flag, 0)
            due = bool(flag.item())
        if step % args.log_every == 0 or step == max_steps or due:
            vals = torch.tensor([float(acc[k]) for k in acc], dtype=torch.float64, device=comm)
            if world > 1:
                dist.all_reduce(vals)
            v = dict(zip(acc, vals.tolist()))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t_log
            mlm = v["mlm"] / max(1, v["masked"])
            nsp = v["nsp"] / max(1, v["examples"])
            rec = {"step": step, "loss": mlm + nsp, "mlm_loss": mlm, "nsp_loss": nsp,
                   "mlm_acc": v["mlm_hit"] / max(1, v["masked"]),
                   "nsp_acc": v["nsp_hit"] / max(1, v["examples"]),
                   "tokens_per_s": v["tokens"] / dt, "lr": scheduler.get_last_lr()[0]}
            msg = (f"step {step:6d} | loss {rec['loss']:.4f} (mlm {mlm:.4f} nsp {nsp:.4f}) | mlm acc "
                   f"{rec['mlm_acc']:.3f} | nsp acc {rec['nsp_acc']:.3f} | lr {rec['lr']:.2e} | "
                   f"{rec['tokens_per_s']:,.0f} tok/s")
            if device.type == "cuda":
                tf = v["flops"] / dt / 1e12
                rec["tflops"] = tf
                msg += f" | {tf:.1f} TFLOP/s"
                if peak:
                    rec["mfu"] = tf / peak
                    msg += f" | MFU {100 * tf / peak:.1f}%"
            say(msg)
            history.append(rec)
            if args.log_json and rank == 0:
                with open(args.log_json, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            acc = {k: 0.0 for k in acc}
            t_log = time.perf_counter()
        if step % args.save_every == 0:
            _save(args, ckpt_dir, step, model, optimizer, scheduler, scaler, cfg, vocab, fsdp, rank, world,
                  device)
            last_saved = step
    bar.close()
    if last_saved != step:
        _save(args, ckpt_dir, step, model, optimizer, scheduler, scaler, cfg, vocab, fsdp, rank, world,
                  device)
    train_s = time.perf_counter() - t_train
    if rank == 0:
        if args.export_hf:
            export_hf(model.bert, vocab, args.export_hf)
            print(f"exported HF BertModel to {args.export_hf}")
        if args.export_bert_pytorch:
            export_bert_pytorch(model, args.export_bert_pytorch)
            print(f"exported bert_pytorch BERTLM state dict to {args.export_bert_pytorch}")
        first, last = (history[0], history[-1]) if history else (None, None)
        if first:
            print(f"done: {step} steps in {train_s:.0f}s; loss {first['loss']:.3f} -> {last['loss']:.3f}, "
                  f"mlm acc {last['mlm_acc']:.3f}, nsp acc {last['nsp_acc']:.3f}; checkpoints in {ckpt_dir}")
    _barrier(world)
    return {"step": step, "history": history, "model": model, "vocab": vocab, "config": cfg, "ops": ops_used}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _save(args, ckpt_dir, step, model, optimizer, scheduler, scaler, cfg, vocab, fsdp, rank, world,
                  device):
    msd, osd = _state_dicts(model, optimizer, fsdp)
    cpu_states = [torch.get_rng_state()]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, cpu_states[0])
        cpu_states = gathered
    cuda_states = []
    if device.type == "cuda":
        cuda_states = [torch.cuda.get_rng_state(device)]
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, cuda_states[0])
            cuda_states = gathered
    if rank == 0:
        state = {"model": msd, "optimizer": osd, "scheduler": scheduler.state_dict(),
                 "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                 "config": asdict(cfg), "vocab": vocab.to_dict(), "vocab_fingerprint": vocab.fingerprint(),
                 "rng": {"cpu": cpu_states, "cuda": cuda_states},
                 "args": {**{k: v for k, v in vars(args).items() if isinstance(v, int | float | str | bool)},
                          "corpus": os.path.abspath(args.corpus), "pairs": getattr(args, "_pairs", None),
                          "global_batch": args.batch * args.accum * world}}
        save_checkpoint(ckpt_dir, step, state, keep=args.keep)
    _barrier(world)


def main(argv=None):
    args = build_parser().parse_args(argv)
    return run_main(args)


def run_main(args):
    try:
        run(args)
    except (CorpusError, VocabError, CheckpointError, ConfigError) as e:
        print(f"fastbert pretrain: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastbert pretrain: interrupted", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

