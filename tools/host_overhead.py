"""Host time of a BERT training step, measured on a CPU with fastbert's Triton launches stubbed out.

On a GPU a BERT-base step at BERT sizes takes about 10 ms of device time; if the Python host work
(module calls, op wrappers, autograd, launches) takes as long, the step is host-bound and no kernel
speed-up shows. This tool measures that host work without a GPU: it runs the fast path (the one
CUDA tensors take: unpadded encoder, fused-op wrappers, autograd.Functions) on tiny CPU tensors with
every Triton kernel launch replaced by a no-op, so what is timed is the host code around the kernels.
The baselines (HF BertModel with sdpa and eager attention, bert_pytorch) run at the same tiny size,
where their CPU ops cost little more than their dispatch. Not measured here: Triton's own launcher
(tens of microseconds per launch in triton 3.x) and the CUDA driver's launch cost.

The report also counts aten ops per step (torch profiler): on a GPU each is a kernel launch or more.

Usage: python tools/host_overhead.py [--layers 12] [--steps 30] [--optimizer] [--profile]
"""

import argparse
import os
import statistics
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # before triton decorates the kernels (none of them runs)
os.environ["FASTBERT_BACKEND"] = "triton"

import torch  # noqa: E402
import triton  # noqa: E402
from fastbert.kernels import attention as k_attn  # noqa: E402
from fastbert.kernels import bias_gelu as k_gelu  # noqa: E402
from fastbert.kernels import layer_norm as k_ln  # noqa: E402

import fastbert  # noqa: E402

LAUNCHES = {"n": 0}


class _NoLaunch:
    """Stands in for a Triton kernel: kernel[grid](...) counts the launch and does nothing."""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            LAUNCHES["n"] += 1

        return launch


def stub_kernels():
    for mod in (k_attn, k_gelu, k_ln):
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, triton.runtime.KernelInterface):
                setattr(mod, name, _NoLaunch())


def hf_config(args, attn):
    import transformers

    return transformers.BertConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, intermediate_size=4 * args.hidden, max_position_embeddings=512,
        attn_implementation=attn)


def build(provider, args):
    torch.manual_seed(0)
    if provider == "fastbert-hf":
        import transformers

        hf = transformers.BertModel(hf_config(args, "sdpa"), add_pooling_layer=False)
        model = fastbert.from_hf(hf)
        return model, lambda b: model(b["ids"], b["token_type"], b["mask"])
    if provider == "fastbert":
        model = fastbert.BERT(args.vocab, args.hidden, args.layers, args.heads)
        return model, lambda b: model(b["ids"], b["seg"])
    if provider == "bert_pytorch":
        from bert_pytorch.model import BERT

        model = BERT(args.vocab, args.hidden, args.layers, args.heads)
        return model, lambda b: model(b["ids"], b["seg"])
    import transformers

    model = transformers.BertModel(hf_config(args, provider.removeprefix("hf-")), add_pooling_layer=False)
    return model, lambda b: model(input_ids=b["ids"], token_type_ids=b["token_type"],
                                  attention_mask=b["mask"]).last_hidden_state


def make_batch(args):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.seq // 2, args.seq + 1, (args.batch,), generator=g)
    real = torch.arange(args.seq)[None, :] < lengths[:, None]
    ids = torch.randint(1, args.vocab, (args.batch, args.seq), generator=g) * real
    second = torch.arange(args.seq)[None, :] >= (lengths[:, None] // 2)
    return {"ids": ids, "seg": (1 + second.long()) * real, "token_type": second.long() * real,
            "mask": real.long()}


def measure(provider, args):
    model, forward = build(provider, args)
    model.train()
    # the optimizer is left out unless asked for: on a GPU it is one fused AdamW for every
    # provider, while on the CPU its per-parameter loop would dominate the step
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5) if args.optimizer else None
    batch = make_batch(args)

    def step():
        loss = forward(batch).float().square().mean()
        loss.backward()
        if opt is not None:
            opt.step()
        model.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    LAUNCHES["n"] = 0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    launches = LAUNCHES["n"] // args.steps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    aten = sum(e.count for e in events if e.key.startswith("aten::"))
    if args.profile:
        print(events.table(sort_by="self_cpu_time_total", row_limit=25))
    return statistics.median(times) * 1e3, launches, aten


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--providers", default="fastbert,fastbert-hf,bert_pytorch,hf-sdpa,hf-eager")
    parser.add_argument("--optimizer", action="store_true", help="include an AdamW step")
    parser.add_argument("--profile", action="store_true", help="print the top ops of each provider")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    stub_kernels()
    what = "fwd + bwd + AdamW" if args.optimizer else "fwd + bwd"
    print(f"host time per training step ({what}), {args.layers} layers, hidden {args.hidden}, "
          f"batch {args.batch} x seq {args.seq}, torch {torch.__version__}, 1 CPU thread")
    print(f"{'provider':<14}{'ms/step':>9}{'ms/layer':>10}{'triton launches':>17}{'aten ops':>10}")
    for provider in args.providers.split(","):
        try:
            ms, launches, aten = measure(provider, args)
        except ImportError as exc:
            print(f"{provider:<14} skipped: {exc}")
            continue
        print(f"{provider:<14}{ms:9.2f}{ms / args.layers:10.3f}{launches:17d}{aten:10d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
