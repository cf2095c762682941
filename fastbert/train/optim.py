"""Optimizer pieces shared by pretraining and fine-tuning: AdamW parameter groups, the LR schedule and
the time budget it can follow (--time-limit)."""

import time


def param_groups(model, weight_decay):
    """AdamW groups: weight decay on the weight matrices, none on biases, LayerNorm and other 1-D
    parameters (BERT's rule). Tied parameters appear once (named_parameters deduplicates)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_linear(warmup, total, remaining=None):
    """LambdaLR factor: linear warmup over `warmup` steps, then linear decay to 0 at `total` steps
    (constant after warmup when total is None). remaining: a callable giving the fraction of a time
    budget still left after warmup (1 -> 0); the factor is then at most that fraction too, so a run
    cut by its time budget ends on a decayed schedule."""
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        down = 1.0 if total is None else max(0.0, (total - step) / max(1, total - warmup))
        if remaining is not None:
            down = min(down, max(0.0, remaining()))
        return down
    return f


class TimeBudget:
    """--time-limit: the seconds trained so far (a resumed run starts from its checkpoint's), and the
    fraction of the budget left after warmup, which the LR schedule follows (warmup_linear's
    `remaining`). Without a limit it only counts."""

    def __init__(self, limit=None, spent=0.0, warm_at=None):
        self.limit, self.spent, self.warm_at, self.t0 = limit, float(spent), warm_at, None

    def start(self):
        self.t0 = time.perf_counter()

    def elapsed(self):
        return self.spent + (time.perf_counter() - self.t0 if self.t0 is not None else 0.0)

    def remaining(self):
        """1 when warmup ends (the first time the schedule asks), 0 when the limit is reached."""
        if self.limit is None:
            return 1.0
        if self.warm_at is None:
            self.warm_at = min(self.elapsed(), 0.5 * self.limit)
        return (self.limit - self.elapsed()) / max(1e-9, self.limit - self.warm_at)

    def over(self):
        return self.limit is not None and self.elapsed() >= self.limit
