"""What pretraining buys: pretrain on the embedded corpus, then fine-tune both embedded tasks from the
checkpoint and from scratch (same config, vocabulary, seed and data order), for several seeds.

    python tools/pretrain_payoff.py --out runs/payoff --seeds 0 1 2 [-- PRETRAIN OPTIONS]

Each seed pretrains its own checkpoint (`fastbert pretrain --seed S`, the demo's defaults unless
options follow `--`), then runs `fastbert finetune --compare-scratch --seeds S` on the sequence and the
token task. Prints one markdown table (held-out MLM/NSP accuracy of the pretraining, pretraining
time, sequence accuracy and token non-O F1, pretrained vs scratch) and writes it with every number
to OUT/payoff.md and OUT/payoff.json. --finetune-seeds fine-tunes every checkpoint with these seeds
instead of its own. The issue's acceptance (#14): pretrained >= scratch + 0.05 on both tasks and
sequence accuracy >= 0.5, for every seed.
"""

import argparse
import contextlib
import io
import json
import os
import sys
import time

import torch

from fastbert.train import finetune, pretrain


def _quiet(fn, *a):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        out = fn(*a)
    return out, buf.getvalue()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--finetune-seeds", type=int, nargs="+")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--finetune-args", default="", help="extra fine-tuning options, one string")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(args.threads)
    rows = []
    for seed in args.seeds:
        run_dir = os.path.join(args.out, f"pretrain-seed{seed}")
        pargs = pretrain.build_parser().parse_args(
            ["--out", run_dir, "--seed", str(seed), "--no-progress", "--threads", str(args.threads),
             "--log-json", os.path.join(args.out, f"pretrain-seed{seed}.jsonl")] + extra)
        t0 = time.perf_counter()
        res, log = _quiet(pretrain.run, pargs)
        wall = time.perf_counter() - t0
        with open(os.path.join(args.out, f"pretrain-seed{seed}.log"), "w") as f:
            f.write(log)
        row = {"pretrain_seed": seed, "steps": res["step"], "train_seconds": res["train_seconds"],
               "wall_seconds": wall, "heldout": res["heldout"], "pretrain_args": extra}
        print(f"seed {seed}: pretrained {res['step']} steps in {res['train_seconds']:.0f}s; held-out "
              f"{res['heldout']}", flush=True)
        for task in ("sequence", "token"):
            fseeds = args.finetune_seeds or [seed]
            fargs = finetune.build_parser().parse_args(
                ["--checkpoint", run_dir, "--task", task, "--compare-scratch", "--threads", str(args.threads),
                 "--seeds", *map(str, fseeds)] + args.finetune_args.split())
            t0 = time.perf_counter()
            fres, log = _quiet(finetune.run, fargs)
            with open(os.path.join(args.out, f"finetune-seed{seed}-{task}.log"), "w") as f:
                f.write(log)
            metric = "f1" if task == "token" else "accuracy"
            runs = [{k: v for k, v in r.items() if k != "history"} | {"metric": r[metric]}
                    for r in fres["runs"]]
            row[task] = {"runs": runs, "seconds": time.perf_counter() - t0, "metric": metric}
            for r in runs:
                print(f"  {task} seed {r['seed']} {r['init']}: {metric} {r['metric']:.3f}", flush=True)
        rows.append(row)
        with open(os.path.join(args.out, "payoff.json"), "w") as f:
            json.dump(rows, f, indent=1)
    table = render(rows)
    print(table)
    with open(os.path.join(args.out, "payoff.md"), "w") as f:
        f.write(table + "\n")
    return 0


def render(rows):
    lines = ["| pretrain seed | steps | pretrain s | held-out MLM acc | held-out NSP acc | fine-tune seed | "
             "sequence acc: pretrained / scratch | token non-O F1: pretrained / scratch |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        h = r["heldout"] or {}
        nsp = f"{h['nsp_acc']:.3f}" if "nsp_acc" in h else "- (MLM only)"
        by = {}
        for task in ("sequence", "token"):
            for x in r[task]["runs"]:
                by.setdefault(x["seed"], {}).setdefault(task, {})[x["init"]] = x["metric"]
        for fs, t in by.items():
            seq, tok = t["sequence"], t["token"]
            lines.append(f"| {r['pretrain_seed']} | {r['steps']} | {r['train_seconds']:.0f} | "
                         f"{h.get('mlm_acc', float('nan')):.3f} | {nsp} | "
                         f"{fs} | "
                         f"{seq['pretrained']:.3f} / {seq['scratch']:.3f} | "
                         f"{tok['pretrained']:.3f} / {tok['scratch']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
