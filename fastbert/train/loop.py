"""The pretraining loop's pieces (fastbert.train.pretrain runs them): MLM masking of a batch on its
device, the sums of a logging interval, one optimizer step over a rank's micro-batches, the held-out
evaluation, and the logger that turns interval sums into printed lines and metrics records."""

import contextlib
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .heads import flops_per_step, has_nsp

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def log_rank0(rank, msg):
    if rank == 0:
        print(msg, flush=True)


class Masker:
    """Masks a batch for MLM on its device: seeded per (seed, step, micro-batch), whole words optional."""

    def __init__(self, s):
        from fastbert.ops import mlm_mask

        v = s.vocab
        self.mlm_mask, self.vocab, self.device = mlm_mask, v, s.device
        self.mask_prob, self.max_predictions = s.opts.mask_prob, s.opts.max_predictions
        self.special = (v.unk_id, v.cls_id, v.sep_id, v.mask_id)
        self.continuation = None
        if s.opts.whole_word and v.kind == "wordpiece":
            self.continuation = torch.tensor([t.startswith("##") for t in v.tokens], device=s.device)

    def __call__(self, mb, seed):
        """(masked ids, segments, is_next, flat masked positions, their labels, original ids)."""
        ids = torch.from_numpy(mb["input_ids"]).to(self.device, non_blocking=True)
        seg = torch.from_numpy(mb["segment_ids"]).to(self.device, non_blocking=True)
        nxt = torch.from_numpy(mb["is_next"]).to(self.device, non_blocking=True)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        ws = None if self.continuation is None else ~self.continuation[ids]
        v = self.vocab
        masked, labels, pos = self.mlm_mask(ids, len(v), v.mask_id, v.pad_id, self.special,
                                            mask_prob=self.mask_prob, generator=gen, word_starts=ws,
                                            max_predictions=self.max_predictions, return_positions=True)
        return masked, seg, nxt, pos, labels.view(-1).index_select(0, pos), ids


class Metrics:
    """Sums of one logging interval (losses, hits, counts, tokens, FLOPs), reduced over processes."""

    KEYS = ("mlm", "nsp", "mlm_hit", "nsp_hit", "masked", "examples", "tokens", "flops")

    def __init__(self):
        self.reset()

    def reset(self):
        self.acc = dict.fromkeys(self.KEYS, 0.0)

    def add(self, cfg, mlm_sum, mlm_hit, nsp_sum, nsp, nxt, pos, ids, sparse):
        a = self.acc
        a["mlm"] += mlm_sum.detach()
        a["nsp"] += nsp_sum.detach()
        a["mlm_hit"] += mlm_hit
        if nsp is not None:
            a["nsp_hit"] += (nsp.argmax(1) == nxt).sum()
        a["masked"] += pos.numel()
        a["examples"] += ids.shape[0]
        lens = (ids != cfg.pad_id).sum(1)
        tokens = int(lens.sum())
        a["tokens"] += tokens
        a["flops"] += flops_per_step(cfg, tokens, int((lens.double() ** 2).sum()), pos.numel(), sparse)

    def reduce(self, world, comm):
        vals = torch.tensor([float(self.acc[k]) for k in self.KEYS], dtype=torch.float64, device=comm)
        if world > 1:
            dist.all_reduce(vals)
        return dict(zip(self.KEYS, vals.tolist()))


def train_step(s, t, masker, batches, metrics, comm):
    """One optimizer step over this rank's micro-batches. Losses are normalised by the global count
    of masked tokens and of examples of the step, so any split over processes and micro-batches
    gives the same gradient."""
    o = s.opts
    prepared = [masker(mb, (o.seed * 1_000_003 + t.step) * 4099 + mb["micro_index"]) for mb in batches]
    n_masked = sum(p[3].numel() for p in prepared)
    counts = torch.tensor([float(n_masked), float(s.data.global_batch)], device=comm)
    if s.world > 1:
        dist.all_reduce(counts)
    g_masked, g_examples = max(1.0, counts[0].item()), counts[1].item()
    amp = _autocast(s)
    for k, (masked, seg, nxt, pos, lab, ids) in enumerate(prepared):
        sync = k == len(prepared) - 1 or s.world == 1 or s.fsdp
        no_sync = not sync and hasattr(t.forward, "no_sync")
        with t.forward.no_sync() if no_sync else contextlib.nullcontext():
            with torch.autocast(**amp):
                mlm_sum, mlm_hit, nsp = t.forward(masked, seg, pos, lab)
            nsp_sum = _nsp_sum(nsp, nxt, mlm_sum)
            loss = (mlm_sum / g_masked + nsp_sum / g_examples) * s.world
            t.scaler.scale(loss).backward()
        metrics.add(s.cfg, mlm_sum, mlm_hit, nsp_sum, nsp, nxt, pos, ids, not o.dense_mlm)
    t.scaler.unscale_(t.optimizer)
    if o.grad_clip:
        torch.nn.utils.clip_grad_norm_(t.model.parameters(), o.grad_clip)
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.scheduler.step()
    t.optimizer.zero_grad(set_to_none=True)
    t.step += 1


def _nsp_sum(nsp, nxt, like):
    """The NSP loss sum of a batch; a zero where the model has no NSP head (nsp None)."""
    if nsp is None:
        return like.new_zeros((), dtype=torch.float32)
    return F.nll_loss(nsp.float(), nxt, reduction="sum")


def _autocast(s):
    return dict(device_type=s.device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(s.dtype),
                enabled=s.dtype != "fp32")


def evaluate(s, model, masker, data=None):
    """Held-out MLM loss and accuracy and NSP accuracy: every example of the held-out documents, the
    same masks and pairs for every run and seed (masks seeded by batch index), dropout off. Every
    process computes the same figures (FSDP's forward needs them all)."""
    data = data if data is not None else s.heldout
    was_training = model.training
    model.eval()
    m = dict.fromkeys(("mlm", "mlm_hit", "masked", "nsp", "nsp_hit", "examples"), 0.0)
    with torch.no_grad(), torch.autocast(**_autocast(s)):
        for i, mb in enumerate(data.all_batches(32)):
            masked, seg, nxt, pos, lab, ids = masker(mb, 7919 * (i + 1))
            mlm_sum, mlm_hit, nsp = model(masked, seg, pos, lab)
            m["mlm"] += float(mlm_sum)
            m["mlm_hit"] += float(mlm_hit)
            m["masked"] += pos.numel()
            if nsp is not None:
                m["nsp"] += float(F.nll_loss(nsp.float(), nxt, reduction="sum"))
                m["nsp_hit"] += float((nsp.argmax(1) == nxt).sum())
            m["examples"] += ids.shape[0]
    model.train(was_training)
    out = {"mlm_loss": m["mlm"] / max(1, m["masked"]), "mlm_acc": m["mlm_hit"] / max(1, m["masked"]),
           "masked": int(m["masked"]), "examples": int(m["examples"])}
    if has_nsp(s.cfg):
        out.update(nsp_loss=m["nsp"] / max(1, m["examples"]), nsp_acc=m["nsp_hit"] / max(1, m["examples"]))
    return out


class Logger:
    """Turns the interval sums into records: printed (through the progress bar when it shows), kept
    in `history`, written to the run's RunLog (metrics.jsonl, --log-json, TensorBoard); rank 0 writes."""

    def __init__(self, s, step, runlog=None):
        from tqdm import tqdm

        o = s.opts
        self.s, self.history, self.t_log, self.runlog = s, [], time.perf_counter(), runlog
        self.bar = tqdm(total=s.max_steps, initial=step, unit="step", desc="pretrain", dynamic_ncols=True,
                        disable=True if o.no_progress or s.rank != 0 else None, leave=False)  # None: tty only
        self.say = self.bar.write if not self.bar.disable else (lambda m: log_rank0(s.rank, m))
        self.peak = o.peak_tflops
        if self.peak is None and s.device.type == "cuda":
            name = torch.cuda.get_device_name(s.device)
            self.peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)

    def after_step(self, step, comm):
        """Advance the bar; whether to log now (every rank must agree: they all join the reduction)."""
        o, s = self.s.opts, self.s
        self.bar.update(1)
        late = time.perf_counter() - self.t_log >= o.log_seconds
        if s.world > 1 and o.log_seconds:
            flag = torch.tensor([float(late)], device=comm)
            dist.broadcast(flag, 0)
            late = bool(flag.item())
        return step % o.log_every == 0 or step == s.max_steps or late

    def log(self, step, v, lr):
        s = self.s
        if s.device.type == "cuda":
            torch.cuda.synchronize(s.device)
        dt = time.perf_counter() - self.t_log
        mlm = v["mlm"] / max(1, v["masked"])
        rec = {"step": step, "loss": mlm, "mlm_loss": mlm, "mlm_acc": v["mlm_hit"] / max(1, v["masked"])}
        if has_nsp(s.cfg):
            nsp = v["nsp"] / max(1, v["examples"])
            rec.update(loss=mlm + nsp, nsp_loss=nsp, nsp_acc=v["nsp_hit"] / max(1, v["examples"]))
            msg = (f"step {step:6d} | loss {rec['loss']:.4f} (mlm {mlm:.4f} nsp {nsp:.4f}) | mlm acc "
                   f"{rec['mlm_acc']:.3f} | nsp acc {rec['nsp_acc']:.3f}")
        else:  # MLM only (ModernBERT)
            msg = f"step {step:6d} | mlm loss {mlm:.4f} | mlm acc {rec['mlm_acc']:.3f}"
        rec.update(tokens_per_s=v["tokens"] / dt, lr=lr)
        msg += f" | lr {rec['lr']:.2e} | {rec['tokens_per_s']:,.0f} tok/s"
        if s.device.type == "cuda":
            tf = v["flops"] / dt / 1e12
            rec["tflops"] = tf
            msg += f" | {tf:.1f} TFLOP/s"
            if self.peak:
                rec["mfu"] = tf / self.peak
                msg += f" | MFU {100 * tf / self.peak:.1f}%"
        self.say(msg)
        self.history.append(rec)
        self.write_json(rec)
        self.t_log = time.perf_counter()

    def write_json(self, rec):
        if self.runlog is not None:
            self.runlog.write(rec)

    def close(self):
        self.bar.close()
        if self.runlog is not None:
            self.runlog.close()


