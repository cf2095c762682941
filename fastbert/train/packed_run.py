"""`fastbert pretrain --packed` and `--cuda-graphs`: the pretraining loop's step on packed batches.

--packed    each micro-batch is a pack of whole examples in batch x seq-len token slots
            (fastbert.train.packing, Krell et al. 2021): every tensor has the same shape at every step
            and the forward, loss, backward and optimizer step read nothing back from the device. The
            loss and hit sums stay on the device and are read once per logging interval.
--cuda-graphs  the same step captured in one CUDA graph after 3 eager warm-up steps and replayed
            (fastbert.train.graphs.GraphedTrainStep): AdamW with capturable state and a device learning
            rate, the warmup-linear schedule computed on the device, gradient clipping and
            accumulation inside the graph. Needs a CUDA device and one process.

PackedLoop(s, t) takes a Setup and a Trainer of fastbert.train.pretrain and replaces the step;
step(metrics) runs one optimizer step, flush(metrics) moves the device sums into the logging interval's
metrics, lr() is the learning rate of the last step.
"""

import torch

from .graphs import packed_pretrain_step, warmup_linear_lr
from .heads import flops_per_step  # the same FLOP count as the padded loop
from .optim import param_groups
from .packing import PackedPretrainData, step_counts


class PackedLoop:
    def __init__(self, s, t, config_error=ValueError):
        o = s.opts
        self.graphs = bool(o.cuda_graphs)
        if self.graphs and s.device.type != "cuda":
            raise config_error("--cuda-graphs needs a CUDA device (run with --device cuda on a machine with "
                               "a GPU); without one, leave it out (--packed runs the same step eagerly)")
        if s.world > 1:
            raise config_error("--packed and --cuda-graphs run one process for now; start without torchrun")
        if self.graphs and (o.compile or o.checkpoint_activations or s.dtype == "fp16"):
            raise config_error("--cuda-graphs does not combine with --compile, --checkpoint-activations or "
                               "--dtype fp16 (its loss scaler reads the gradients back); use bf16 or fp32")
        if o.dense_mlm or o.whole_word or o.max_predictions is not None:
            raise config_error("--packed predicts a fixed number of sparse MLM slots per pack: --dense-mlm, "
                               "--whole-word and --max-predictions are not supported with it yet")
        self.s, self.t = s, t
        v, cfg = s.vocab, s.cfg
        tokens = o.batch * o.seq_len
        self.data = PackedPretrainData(
            s.data, tokens=tokens, max_seqs=o.pack_seqs or max(1, tokens // 16),
            max_predictions=-(-int(1.25 * o.mask_prob * tokens) // 8) * 8, vocab_size=len(v),
            mask_id=v.mask_id, special_ids=(v.unk_id, v.cls_id, v.sep_id, v.mask_id), pad_id=cfg.pad_id,
            mask_prob=o.mask_prob, micro_batches=o.accum,
            type_vocab_size=cfg.type_vocab_size if cfg.type_vocab_size else None)  # ModernBERT: no segments
        if o.epochs is not None:  # a pack holds more examples than a row batch: fewer steps per epoch
            by_epochs = max(1, int(o.epochs * self.data.steps_per_epoch))
            s.max_steps = by_epochs if o.max_steps is None else min(o.max_steps, by_epochs)
        schedule = None
        if self.graphs:  # device state: a capturable AdamW with a tensor lr, the schedule on the device
            old = t.optimizer
            t.optimizer = torch.optim.AdamW(param_groups(t.model, o.weight_decay),
                                            lr=torch.tensor(o.lr, device=s.device), betas=(0.9, 0.98),
                                            eps=1e-6, fused=True, capturable=True)
            if old.state:  # resumed: carry the moments over
                t.optimizer.load_state_dict(old.state_dict())
            for g in t.optimizer.param_groups:
                g["lr"] = torch.tensor(float(g["lr"]), device=s.device)
            schedule = warmup_linear_lr(o.lr, s.warmup, s.max_steps)
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(s.dtype)
        self.step_fn = packed_pretrain_step(t.model, t.optimizer, accumulation=o.accum,
                                            max_grad_norm=o.grad_clip or None, lr_schedule=schedule,
                                            autocast=amp, cuda_graphs=self.graphs)
        self.step_fn.steps = t.step
        self.step_fn._step_t.fill_(t.step)  # the device schedule continues a resumed run
        self._host = dict.fromkeys(("masked", "examples", "tokens", "flops"), 0.0)

    @property
    def steps_per_epoch(self):
        return self.data.steps_per_epoch

    def step(self, metrics):
        s, t = self.s, self.t

        epoch, k = divmod(t.step, self.data.steps_per_epoch)
        packs = self.data.step_batches(epoch, k)  # CPU: packed, masked, checked
        dev = [p.to(s.device) for p in packs]  # pinned, non-blocking copies
        self.step_fn(dev, shared=step_counts(dev, s.device))
        a = metrics.acc
        for p in packs:
            a["masked"] += p.n_masked
            a["examples"] += p.n_examples
            a["tokens"] += p.n_tokens
            a["flops"] += flops_per_step(s.cfg, p.n_tokens, p.sum_len2, p.n_masked, True)
        if not self.graphs:
            t.scheduler.step()  # host learning rate (the graph computes its own on the device)
        t.step += 1

    def flush(self, metrics):
        """The device sums since the last flush (one read-back) into the interval's metrics."""
        sums = self.step_fn.read_metrics()
        for key in ("mlm", "nsp", "mlm_hit", "nsp_hit"):
            metrics.acc[key] += float(sums[key])

    def lr(self):
        lr = self.t.optimizer.param_groups[0]["lr"]
        return float(lr)
