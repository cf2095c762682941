"""Host time of a BERT training step, measured on a CPU where the ops compute (almost) nothing.

On a GPU a BERT-base step takes about 10 ms of device time; if the Python host work (module calls,
op wrappers, autograd, dispatch, launches) takes as long, the step is host-bound and no kernel
speed-up shows. This tool measures that host work without a GPU:
  - the model is tiny (default hidden 32, 2 heads, 4 x 16 tokens), so each aten op costs its dispatch
    and not its arithmetic (a matmul here is a few thousand multiply-adds);
  - fastbert runs its fused path (the one CUDA tensors take) with every Triton kernel launch replaced
    by a no-op that only counts, so what is timed is the host code around the kernels.
The baselines (transformers BertModel with sdpa and eager attention, bert_pytorch) run at the same
size. Each row reports, per training step (forward, a square loss, backward):
  ms/step, ms/layer  median host time: CPU time of the one thread torch runs on (time.thread_time, so
                     other processes competing for the CPU do not inflate it)
  launches           kernels a GPU would launch: Triton launches, plus every aten or fastbert C++ op
                     that computes (views, detach and allocations launch nothing); each costs the CUDA
                     driver a few microseconds beyond the host time measured here
  syncs              values read back to the host (aten _local_scalar_dense: .item(), bool(), int()
                     of a tensor; nonzero): on a GPU each stops the host until the device catches up
  aten ops           every aten op dispatched, views included
Not measured: Triton's own launcher (tens of microseconds per launch in triton 3.x; a CUDA graph
removes it with the rest of the host work) and the driver's launch cost.

Rows: `fastbert` is the packed step: hf-sdpa's model converted (fastbert.from_hf: the same
architecture and weights) running Encoder.forward_packed on the batch's real tokens packed into fixed
slots (fastbert.train.packing), what pretraining runs; `fastbert-hf` the same model on the padded
batch (unpadded inside: one sync for the count of real tokens); `fastbert-padded` fastbert.BERT (the
bert_pytorch preset: pre-LN, two more dropouts per layer) on the padded batch; `hf-sdpa`, `hf-eager`
transformers BertModel; `bert_pytorch` its BERT. ModernBERT (not in the default list):
`modernbert` (fastbert.ModernEncoder.forward_packed), `modernbert-hf` (its padded forward),
`hf-modernbert` (transformers' ModernBertModel, sdpa), `hf-modernbert-patched` (patched in place).

Timing: each provider is timed in --rounds rounds of --steps steps, providers interleaved, and the
lowest of its round medians is reported, so a burst of load on a shared machine does not decide.

--per-op adds a table of each fused op's wrapper host time (forward; forward + backward) next to
torch's native op on the same tensors.

Usage: python tools/host_overhead.py [--layers 12] [--steps 10] [--rounds 8] [--optimizer] [--profile]
                                     [--per-op]
"""

import argparse
import gc
import importlib
import os
import pkgutil
import statistics
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # before triton decorates the kernels (none of them runs)
os.environ["FASTBERT_BACKEND"] = "triton"

import fastbert.kernels  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import fastbert  # noqa: E402
from fastbert.train.packing import pack_rows  # noqa: E402

LAUNCHES = {"n": 0}
NO_LAUNCH = ("aten.empty", "aten.new_empty", "aten.detach", "aten.alias", "aten.lift_fresh",
             "aten._local_scalar_dense", "aten.set_", "aten.resize_")
SYNCS = ("aten._local_scalar_dense", "aten.nonzero")


class _NoLaunch:
    """Stands in for a Triton kernel: kernel[grid](...) counts the launch and does nothing."""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            LAUNCHES["n"] += 1

        return launch


def stub_kernels():
    """Replace every Triton kernel of every fastbert.kernels module by a counting no-op."""
    for info in pkgutil.iter_modules(fastbert.kernels.__path__):
        mod = importlib.import_module(f"fastbert.kernels.{info.name}")
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, triton.runtime.KernelInterface):
                setattr(mod, name, _NoLaunch())


class _Count(TorchDispatchMode):
    """Counts dispatched ops: all of them, those that would launch a kernel, and host syncs."""

    def __init__(self):
        super().__init__()
        self.ops = self.launches = self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        self.ops += name.startswith("aten.")
        if not (getattr(func, "is_view", False) or name.startswith(NO_LAUNCH)):
            self.launches += 1
        self.syncs += name.startswith(SYNCS)
        return func(*args, **(kwargs or {}))


def hf_config(args, attn):
    import transformers

    return transformers.BertConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, intermediate_size=4 * args.hidden, max_position_embeddings=512,
        attn_implementation=attn)


def modernbert_config(args, attn):
    import transformers

    return transformers.ModernBertConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, intermediate_size=3 * args.hidden // 2, max_position_embeddings=512,
        local_attention=max(2, args.seq // 2), pad_token_id=0, bos_token_id=None, eos_token_id=None,
        cls_token_id=None, sep_token_id=None, attn_implementation=attn)


def build_modernbert(provider, args, batch):
    """The ModernBERT rows: `modernbert` fastbert's ModernEncoder (converted from hf-modernbert's model)
    on the packed batch, `modernbert-hf` the same on the padded batch, `hf-modernbert` transformers'
    ModernBertModel (sdpa), `hf-modernbert-patched` that model patched in place."""
    import transformers

    hf = transformers.ModernBertModel(modernbert_config(args, "sdpa"))
    if provider in ("modernbert", "modernbert-hf"):
        model = fastbert.from_hf(hf)
        if provider == "modernbert-hf":
            return model, lambda: model(batch["ids"], attention_mask=batch["mask"])
        pack = batch["hf_pack"]
        return model, lambda: model.forward_packed(pack.input_ids, None, None, pack.cu_seqlens,
                                                   pack.max_seqlen)
    if provider == "hf-modernbert-patched":
        fastbert.patch_hf(hf)
    return hf, lambda: hf(input_ids=batch["ids"], attention_mask=batch["mask"]).last_hidden_state


def build(provider, args, batch):
    torch.manual_seed(0)
    if "modernbert" in provider:
        return build_modernbert(provider, args, batch)
    if provider == "fastbert-hf":
        import transformers

        hf = transformers.BertModel(hf_config(args, "sdpa"), add_pooling_layer=False)
        model = fastbert.from_hf(hf)
        return model, lambda: model(batch["ids"], batch["token_type"], batch["mask"])
    if provider == "fastbert":  # the same architecture and weights as hf-sdpa, fed packed
        import transformers

        model = fastbert.from_hf(transformers.BertModel(hf_config(args, "sdpa"), add_pooling_layer=False))
        pack = batch["hf_pack"]
        return model, lambda: model.forward_packed(pack.input_ids, pack.segment_ids, pack.position_ids,
                                                   pack.cu_seqlens, pack.max_seqlen)
    if provider == "fastbert-padded":
        model = fastbert.BERT(args.vocab, args.hidden, args.layers, args.heads)
        return model, lambda: model(batch["ids"], batch["seg"])
    if provider == "bert_pytorch":
        from bert_pytorch.model import BERT

        model = BERT(args.vocab, args.hidden, args.layers, args.heads)
        return model, lambda: model(batch["ids"], batch["seg"])
    import transformers

    attn = "sdpa" if provider == "hf-patched" else provider.removeprefix("hf-")
    model = transformers.BertModel(hf_config(args, attn), add_pooling_layer=False)
    if provider == "hf-patched":  # the same model, patched in place (fastbert.patch_hf)
        fastbert.patch_hf(model)
    return model, lambda: model(input_ids=batch["ids"], token_type_ids=batch["token_type"],
                                attention_mask=batch["mask"]).last_hidden_state


def make_batch(args):
    """Right-padded rows of lengths in [seq/2, seq], and the same rows packed (fastbert's row)."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.seq // 2, args.seq + 1, (args.batch,), generator=g)
    real = torch.arange(args.seq)[None, :] < lengths[:, None]
    ids = torch.randint(1, args.vocab, (args.batch, args.seq), generator=g) * real
    second = torch.arange(args.seq)[None, :] >= (lengths[:, None] // 2)
    seg = (1 + second.long()) * real
    token_type = second.long() * real
    pack = pack_rows(ids, token_type, torch.zeros(args.batch), tokens=args.batch * args.seq,
                     max_seqs=2 * args.batch, max_seqlen=args.seq, max_predictions=1)
    return {"ids": ids, "seg": seg, "token_type": token_type, "mask": real.long(), "hf_pack": pack}


def setup(provider, args):
    """(step function, launch/sync/op counts of one step) of a provider, after warm-up steps."""
    batch = make_batch(args)
    model, forward = build(provider, args, batch)
    model.train(not args.inference)
    # the optimizer is left out unless asked for: on a GPU it is one fused AdamW for every
    # provider, while on the CPU its per-parameter loop would dominate the step
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5) if args.optimizer else None

    def step():
        if args.inference:
            with torch.inference_mode():
                forward()
            return
        loss = forward().float().square().mean()
        loss.backward()
        if opt is not None:
            opt.step()
        model.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    LAUNCHES["n"] = 0
    with _Count() as count:
        step()
    if args.profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step()
        print(f"--- {provider}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    return step, (count.launches + LAUNCHES["n"], count.syncs, count.ops)


def time_steps(step, n):
    """Median CPU time of n steps, in ms (Python's cyclic garbage collector paused, as timeit does)."""
    times = []
    gc.collect()
    gc.disable()
    try:
        for _ in range(n):
            t0 = time.thread_time()  # CPU time of this thread: other processes on the machine add nothing
            step()
            times.append(time.thread_time() - t0)
    finally:
        gc.enable()
    return statistics.median(times) * 1e3


def per_op(args, calls=200):
    """Host time of each fused op's wrapper (launches stubbed) next to torch's native op, in us per
    call: forward alone, and forward + backward of a sum. embed is fastbert's C++ op, which runs (on
    these tiny tensors its arithmetic is a small part)."""
    import torch.nn.functional as F

    from fastbert import ops

    n, tokens, heads = args.hidden, args.batch * args.seq, args.heads
    leaf = lambda *shape: torch.randn(*shape, requires_grad=True)  # noqa: E731
    x, r, w, b = leaf(tokens, n), leaf(tokens, n), leaf(n), leaf(n)
    h, bias = leaf(tokens, 4 * n), leaf(4 * n)
    q, k, v = (leaf(tokens, heads, n // heads) for _ in range(3))
    cu = torch.arange(0, tokens + 1, args.seq, dtype=torch.int32)
    qb, kb, vb = (t.detach().view(args.batch, args.seq, heads, -1).transpose(1, 2).requires_grad_()
                  for t in (q, k, v))
    ids = torch.randint(1, args.vocab, (args.batch, args.seq))
    seg = torch.zeros_like(ids)
    tok, pos, segw = leaf(args.vocab, n), leaf(512, n), leaf(2, n)
    cases = {
        "layer_norm (+residual)": (lambda: ops.layer_norm(x, w, b, 1e-12, residual=r)[0],
                                   lambda: F.layer_norm(x + r, (n,), w, b, 1e-12)),
        "bias_gelu": (lambda: ops.bias_gelu(h, bias), lambda: F.gelu(h + bias)),
        "attention (varlen)": (lambda: ops.attention(q, k, v, cu_seqlens=cu, max_seqlen=args.seq),
                               lambda: F.scaled_dot_product_attention(qb, kb, vb)),
        "embed (+LayerNorm)": (lambda: ops.embed(ids, tok, pos, seg, segw, ln_weight=w, ln_bias=b),
                               lambda: F.layer_norm(F.embedding(ids, tok) + pos[:args.seq]
                                                    + F.embedding(seg, segw), (n,), w, b)),
    }

    def us(fn):
        for _ in range(10):
            fn()
        t0 = time.thread_time()
        for _ in range(calls):
            fn()
        return (time.thread_time() - t0) / calls * 1e6

    print(f"per-op host time, us per call ({tokens} tokens, hidden {n}; fastbert launches stubbed)")
    print(f"{'op':<24}{'fastbert fwd':>14}{'native fwd':>12}{'fastbert f+b':>14}{'native f+b':>12}")
    for name, (fast, native) in cases.items():
        row = [us(fast), us(native), us(lambda f=fast: f().sum().backward()),
               us(lambda f=native: f().sum().backward())]
        print(f"{name:<24}" + "".join(f"{t:{wd}.1f}" for t, wd in zip(row, (14, 12, 14, 12))))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=100)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=8, help="rounds over all providers (best kept)")
    parser.add_argument("--providers",
                        default="fastbert,fastbert-padded,fastbert-hf,bert_pytorch,hf-sdpa,hf-patched,hf-eager")
    parser.add_argument("--optimizer", action="store_true", help="include an AdamW step")
    parser.add_argument("--inference", action="store_true",
                        help="time an inference forward (eval mode, torch.inference_mode) instead of a step")
    parser.add_argument("--profile", action="store_true", help="print the top ops of each provider")
    parser.add_argument("--per-op", action="store_true",
                        help="also time each fused op's wrapper against torch's native op")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    stub_kernels()
    what = "inference forward" if args.inference else "fwd + bwd + AdamW" if args.optimizer else "fwd + bwd"
    print(f"host time per {'call' if args.inference else 'training step'} ({what}), {args.layers} layers, "
          f"hidden {args.hidden}, "
          f"batch {args.batch} x seq {args.seq}, torch {torch.__version__}, 1 CPU thread")
    print(f"{'provider':<16}{'ms/step':>9}{'ms/layer':>10}{'launches':>10}{'syncs':>7}{'aten ops':>10}")
    steps, counts = {}, {}
    for provider in args.providers.split(","):
        try:
            steps[provider], counts[provider] = setup(provider, args)
        except ImportError as exc:
            print(f"{provider:<16} skipped: {exc}")
    rows = {p: float("inf") for p in steps}
    for _ in range(args.rounds):  # providers interleaved; the best round's median of each
        for provider, step in steps.items():
            rows[provider] = min(rows[provider], time_steps(step, args.steps))
    for provider, ms in rows.items():
        launches, syncs, ops = counts[provider]
        print(f"{provider:<16}{ms:9.2f}{ms / args.layers:10.3f}{launches:10d}{syncs:7d}{ops:10d}")
    if args.per_op:
        per_op(args)
    if "fastbert" in rows and "hf-sdpa" in rows:
        print(f"host time ratio fastbert / hf-sdpa: {rows['fastbert'] / rows['hf-sdpa']:.2f}")
    if "hf-patched" in rows and "hf-sdpa" in rows:
        print(f"host time ratio hf-patched / hf-sdpa: {rows['hf-patched'] / rows['hf-sdpa']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
