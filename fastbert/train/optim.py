"""Optimizer pieces shared by pretraining and fine-tuning: AdamW parameter groups and the LR schedule."""


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
