"""One plumbing for every Triton op: its custom ops (for torch.compile) and its autograd, written once.

A FusedOp is built from the op's launchers (kernels/) and two small functions:

    fwd(*args) -> tuple of tensors          the forward launcher
    bwd(*bargs) -> tuple of tensors         the backward launcher
    save(ctx, args, outputs)                keeps what the backward needs on ctx
    backward(ctx, grads, bwd) -> grads      input gradients; bwd is the raw backward to call

and registers fastbert::<name>_fwd and fastbert::<name>_bwd (custom ops with fakes; the forward with
register_autograd), so torch.compile traces the op without a graph break. Eager calls skip the
dispatcher (tens of microseconds of host time per call, more than a kernel takes at BERT sizes): they
run one torch.autograd.Function whose forward and backward call the launchers directly, with the same
save() and backward(). Without gradients, the forward launcher runs alone.
"""

import operator

import torch

_RAW_APPLY = getattr(torch._C, "_FunctionBase", object).__dict__.get("apply")


def fast_apply(fn):
    """fn.apply (fn a torch.autograd.Function) without the Python wrapper of Function.apply, which
    passes every argument through functorch's unwrap_if_dead (about 1 us per argument: 20 us for a
    fused block's 23). The tensors that can carry such a dead wrapper are the activations (one that
    escaped a functorch transform), so `unwrap` names the argument positions to unwrap (activations,
    not parameters). Under an active functorch transform, or on a torch without the C entry point,
    it is fn.apply itself."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    unwrap_if_dead = getattr(getattr(torch._C, "_functorch", None), "unwrap_if_dead", None)
    if _RAW_APPLY is None or active is None or unwrap_if_dead is None:  # pragma: no cover
        return lambda unwrap, *args: fn.apply(*args)
    raw = _RAW_APPLY.__get__(None, fn)
    slow = fn.apply

    def apply(unwrap, *args):
        if active():
            return slow(*args)
        if unwrap:
            args = list(args)
            for i in unwrap:
                if isinstance(args[i], torch.Tensor):
                    args[i] = unwrap_if_dead(args[i])
        return raw(*args)

    return apply


class FusedOp:
    def __init__(self, name, *, fwd, fwd_schema, fwd_fake, bwd, bwd_schema, bwd_fake, save, backward,
                 grad_args, non_differentiable=()):
        self.name = name
        self.fwd = fwd
        self.grad_args = tuple(grad_args)  # indices of the arguments that may require grad
        self.fwd_op = torch.library.custom_op(f"fastbert::{name}_fwd", fwd, mutates_args=(),
                                              schema=fwd_schema)
        self.fwd_op.register_fake(fwd_fake)
        self.bwd_op = torch.library.custom_op(f"fastbert::{name}_bwd", bwd, mutates_args=(),
                                              schema=bwd_schema)
        self.bwd_op.register_fake(bwd_fake)
        bwd_op = self.bwd_op
        # the outputs that carry no gradient, picked without a generator (host time: every call)
        nondiff = None
        if non_differentiable:
            pick = operator.itemgetter(*non_differentiable)
            nondiff = (lambda out: pick(out)) if len(non_differentiable) > 1 else (lambda out: (pick(out),))

        def compiled_backward(ctx, *grads):
            return backward(ctx, grads, bwd_op)

        self.fwd_op.register_autograd(compiled_backward, setup_context=save)

        class Eager(torch.autograd.Function):
            # forward takes ctx itself: a separate setup_context makes every apply() bind the
            # arguments with inspect.signature (about 100 us of host time)
            @staticmethod
            def forward(ctx, *args):
                out = fwd(*args)
                save(ctx, args, out)
                if nondiff is not None:
                    ctx.mark_non_differentiable(*nondiff(out))
                return out

            @staticmethod
            def backward(ctx, *grads):
                return backward(ctx, grads, bwd)

        Eager.__name__ = Eager.__qualname__ = f"{name}_eager"
        self.eager = Eager
        self._apply = fast_apply(Eager)

    def __call__(self, *args):
        """The op's outputs (a tuple), through the custom op when compiling, else eagerly."""
        if torch.compiler.is_compiling():
            return self.fwd_op(*args)
        if torch.is_grad_enabled():
            for i in self.grad_args:
                t = args[i]
                if t is not None and t.requires_grad:
                    return self._apply(self.grad_args, *args)
        return self.fwd(*args)
