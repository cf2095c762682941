"""A whole training step in one CUDA graph: captured once after warm-up, replayed every step.

At BERT sizes an eager step is bound by host work (tools/host_overhead.py): hundreds of kernel
launches, each behind Python, autograd and dispatch. A CUDA graph records the step's kernels once and
replays them with one launch, so the host only copies the next batch into the graph's input buffers.
What the step may contain follows from that (the helper checks what it can and says so):
  - fixed shapes and no device-to-host sync: packed batches (fastbert.train.packing) and
    Encoder.forward_packed have both; a sync inside capture raises, a shape change needs a new graph;
  - nothing decided on the host from data: loss normalisers come in as device tensors (`shared`),
    not Python floats, since a float is baked into the graph at capture;
  - an optimizer whose state lives on the device: torch.optim.AdamW(..., capturable=True, fused=True)
    with a tensor lr; the learning-rate schedule runs on the device from a step counter
    (`warmup_linear_lr`), gradient clipping is torch's foreach clip_grad_norm_ (no sync);
  - random numbers from torch's CUDA generator (dropout), which a replay advances: every replay draws
    new masks (torch registers the default CUDA generator with the graph);
  - loss and metrics accumulate on the device and are read only when asked (`read_metrics`, one sync
    per logging interval).

    step = GraphedTrainStep(loss_fn, optimizer, accumulation=2, max_grad_norm=1.0,
                            lr_schedule=warmup_linear_lr(1e-4, warmup=100, total=10_000))
    for batches in loader:                      # `accumulation` micro-batches per step
        step([b.inputs_on_device for b in batches], shared=(n_masked, n_examples))
        if step.steps % 100 == 0:
            print(step.read_metrics())          # {"loss": ..., ...}: sums since the last read

loss_fn(*micro_batch, *shared) -> (loss, {name: tensor}) computes the loss to backpropagate (already
divided by whatever normaliser the caller wants) and the metrics to sum. The first `warmup` calls run
eagerly on a side stream (real steps: they train), the next one captures the graph and replays it.
`enabled=False` runs every step eagerly with the same code (CPU runs and the eager reference).

Not run on a GPU yet in this repository (the development machines have none): tests/test_graphs.py
checks the eager mode, the schedule and the errors on the CPU, and its CUDA tests (graph replay
equals eager for 20 steps, no sync under torch.cuda.set_sync_debug_mode("error")) run wherever CUDA
is present.
"""

import contextlib

import torch


def warmup_linear_lr(peak_lr, warmup, total=None):
    """lr(step) on the device: linear warmup over `warmup` steps to peak_lr, then linear decay to 0 at
    `total` steps (constant after warmup when total is None). step is a 0-d tensor (the count of steps
    taken); the result is a 0-d float tensor on its device. Equals peak_lr times
    fastbert.train.optim.warmup_linear(warmup, total)(step)."""
    if warmup < 1:
        raise ValueError(f"warmup must be >= 1 step, got {warmup}")

    def lr(step):
        s = step.to(torch.float64)
        up = (s + 1) / warmup
        if total is None:
            down = torch.ones_like(s)
        else:
            down = ((total - s) / max(1, total - warmup)).clamp(min=0.0)
        return (torch.where(s < warmup, up, down) * peak_lr).to(torch.float32)

    return lr


class GraphedTrainStep:
    """One training step (micro-batches, backward, clipping, optimizer, LR schedule) as a CUDA graph.

    loss_fn       (*micro_batch, *shared) -> (loss, {metric: tensor}); see the module docstring
    optimizer     a torch.optim optimizer; with enabled=True its groups need capturable=True, and a
                  tensor lr when lr_schedule is given
    accumulation  micro-batches per step (gradients accumulate inside the one graph)
    max_grad_norm clip the total gradient norm to this (None: no clipping)
    lr_schedule   step tensor -> lr tensor (device ops only), e.g. warmup_linear_lr(...)
    autocast      dtype for torch.autocast around loss_fn (None: off); caching is off while capturing
    warmup        eager steps before the capture (cuBLAS workspaces, autograd state, lazy allocations)
    enabled       False: every step eager (no CUDA needed)
    """

    def __init__(self, loss_fn, optimizer, *, accumulation=1, max_grad_norm=None, lr_schedule=None,
                 autocast=None, warmup=3, enabled=True):
        if accumulation < 1:
            raise ValueError(f"accumulation must be >= 1, got {accumulation}")
        if warmup < 1 and enabled:
            raise ValueError(f"warmup must be >= 1 eager step before the capture, got {warmup}")
        self.loss_fn, self.optimizer = loss_fn, optimizer
        self.accumulation, self.max_grad_norm = accumulation, max_grad_norm
        self.lr_schedule, self.autocast, self.warmup, self.enabled = lr_schedule, autocast, warmup, enabled
        self.params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        if not self.params:
            raise ValueError("the optimizer holds no parameter that requires a gradient")
        self.device = self.params[0].device
        if enabled:
            self._check_graphable()
        if lr_schedule is not None:
            for i, g in enumerate(optimizer.param_groups):
                if not isinstance(g["lr"], torch.Tensor):
                    raise ValueError(f"param group {i} has lr {g['lr']!r}, a Python float: with lr_schedule "
                                     f"the optimizer needs a tensor lr (lr=torch.tensor(...)) to update in "
                                     f"place")
        self.steps = 0  # steps taken (host count)
        self._step_t = torch.zeros((), dtype=torch.int64, device=self.device)  # the same, on device
        self._metrics = {}
        self._static = None  # input buffers of the graph
        self._shared = None
        self.graph = None

    def _check_graphable(self):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device, and torch sees none; run the step eagerly "
                               "(GraphedTrainStep(..., enabled=False), or leave out --cuda-graphs)")
        if self.device.type != "cuda":
            raise RuntimeError(f"CUDA graphs need the parameters on a CUDA device; they are on {self.device}")
        for i, g in enumerate(self.optimizer.param_groups):
            if not g.get("capturable", False):
                raise ValueError(f"param group {i} is not capturable: build the optimizer with "
                                 f"capturable=True (torch.optim.AdamW(..., capturable=True, fused=True)) so "
                                 f"its state and step count stay on the device")

    # -- the step -------------------------------------------------------------------------------

    def _amp(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        # cached casts must not outlive a capture: each replay recasts the weights
        return torch.autocast(self.device.type, dtype=self.autocast, cache_enabled=not self._capturing)

    _capturing = False

    def _run(self, micro_batches, shared):
        """The step's work (eager, or recorded while capturing)."""
        self.optimizer.zero_grad(set_to_none=False)  # in place: the grads keep their addresses
        for micro in micro_batches:
            with self._amp():
                loss, metrics = self.loss_fn(*micro, *shared)
            loss.backward()
            for name, value in {"loss": loss, **metrics}.items():
                acc = self._metrics.get(name)
                if acc is None:  # allocated by the first (eager) step, reused by the graph
                    if self._capturing:
                        raise RuntimeError(f"metric {name!r} appeared after the first step; loss_fn must "
                                           f"return the same metrics every step")
                    acc = self._metrics[name] = torch.zeros((), dtype=torch.float64, device=self.device)
                acc.add_(value.detach().to(torch.float64))
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm, foreach=True)
        if self.lr_schedule is not None:
            lr = self.lr_schedule(self._step_t)
            for g in self.optimizer.param_groups:
                g["lr"].copy_(lr)
        self.optimizer.step()
        self._step_t.add_(1)

    def _check_inputs(self, micro_batches, shared):
        if len(micro_batches) != self.accumulation:
            raise ValueError(f"got {len(micro_batches)} micro-batches, accumulation is {self.accumulation}")
        for m in micro_batches:
            for t in (*m, *shared):
                if isinstance(t, torch.Tensor) and t.device != self.device:
                    raise ValueError(f"an input is on {t.device}, the parameters on {self.device}: move "
                                     f"the batch first (PackedBatch.to(device) copies non-blocking)")

    def __call__(self, micro_batches, shared=()):
        """One step on `micro_batches` (a list of `accumulation` tuples of tensors, or objects with
        .inputs()), with `shared` tensors passed to every loss_fn call after the micro-batch."""
        micro_batches = [tuple(m.inputs()) if hasattr(m, "inputs") else tuple(m) for m in micro_batches]
        shared = tuple(shared)
        self._check_inputs(micro_batches, shared)
        if not self.enabled:
            self._run(micro_batches, shared)
        elif self.graph is not None:
            self._copy_in(micro_batches, shared)
            self.graph.replay()
        elif self.steps < self.warmup:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._run(micro_batches, shared)
            torch.cuda.current_stream(self.device).wait_stream(side)
        else:
            self._capture(micro_batches, shared)
            self.graph.replay()
        self.steps += 1

    # -- graph plumbing -------------------------------------------------------------------------

    @staticmethod
    def _clone(x):
        return x.clone() if isinstance(x, torch.Tensor) else x

    def _copy_in(self, micro_batches, shared):
        for static, new in zip((*self._static, self._shared), (*micro_batches, shared)):
            for s, n in zip(static, new):
                if isinstance(s, torch.Tensor):
                    if s.shape != n.shape or s.dtype != n.dtype:
                        raise ValueError(f"input of shape {tuple(n.shape)} {n.dtype} where the graph was "
                                         f"captured with {tuple(s.shape)} {s.dtype}: a CUDA graph replays "
                                         f"fixed shapes (pack batches to a fixed size)")
                    s.copy_(n, non_blocking=True)
                elif s != n:
                    raise ValueError(f"non-tensor input {n!r} differs from {s!r} it was captured with")

    def _capture(self, micro_batches, shared):
        torch.cuda.synchronize(self.device)
        self._static = [tuple(self._clone(x) for x in m) for m in micro_batches]
        self._shared = tuple(self._clone(x) for x in shared)
        self.graph = torch.cuda.CUDAGraph()
        self._capturing = True
        try:
            with torch.cuda.graph(self.graph):
                self._run(self._static, self._shared)
        finally:
            self._capturing = False

    # -- metrics --------------------------------------------------------------------------------

    def read_metrics(self, reset=True):
        """{name: sum since the last read} as Python floats: one device-to-host copy (a sync)."""
        names = list(self._metrics)
        if not names:
            return {}
        values = torch.stack([self._metrics[n] for n in names]).tolist()
        if reset:
            for n in names:
                self._metrics[n].zero_()
        return dict(zip(names, values))


def packed_pretrain_step(model, optimizer, *, accumulation=1, max_grad_norm=None, lr_schedule=None,
                         autocast=None, cuda_graphs=False, warmup=3, forward=None):
    """The pretraining step on packs (fastbert.train.packing) as a GraphedTrainStep.

    model: a fastbert.train.heads.PretrainModel; forward: what to call instead of
    PackedPretrain(model) (e.g. its DistributedDataParallel wrapper; CUDA graphs are for one process
    here). Call it with the step's packs on the device and their step-wide counts:

        step = packed_pretrain_step(model, opt, accumulation=2, cuda_graphs=True, ...)
        packs = [p.to(device) for p in packed_data.step_batches(epoch, k)]
        step(packs, shared=step_counts(packs, device))
        sums = step.read_metrics()  # {"loss", "mlm", "nsp", "mlm_hit", "nsp_hit"}: sums since last read

    The loss of each pack is mlm_sum / masked + nsp_sum / examples with the step's counts, so the
    gradient of a step does not depend on how its examples were split into packs.
    """
    from .packing import PackedPretrain

    module = forward if forward is not None else PackedPretrain(model)

    def loss_fn(*args):
        *inputs, max_seqlen, n_masked, n_examples = args
        mlm_sum, mlm_hit, nsp_sum, nsp_hit = module(*inputs, max_seqlen)
        loss = mlm_sum / n_masked + nsp_sum / n_examples
        return loss, {"mlm": mlm_sum, "nsp": nsp_sum, "mlm_hit": mlm_hit, "nsp_hit": nsp_hit}

    return GraphedTrainStep(loss_fn, optimizer, accumulation=accumulation, max_grad_norm=max_grad_norm,
                            lr_schedule=lr_schedule, autocast=autocast, warmup=warmup, enabled=cuda_graphs)
