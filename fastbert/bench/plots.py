"""PNG plots for the benchmark report (matplotlib, Agg backend: no display needed).

throughput_vs_seq.png: one panel per benchmark family (test, group pattern and every parameter but
    the provider and the sequence length) that ran at two or more sequence lengths; one line per
    provider; y is tokens/s when the benchmark reports it, else GB/s, else TFLOP/s, else calls/s.
    A run with no such family (one length each) gets a bar per result of its rate instead.
roofline.png: the fraction of the roofline (extra_info["roofline_frac"]: the larger of achieved
    GB/s over the measured copy bandwidth and TFLOP/s over the measured bf16 matmul rate) per
    benchmark, fastbert's rows highlighted (GPU runs).
speedup.png: on a CPU run (no roofline), instead: fastbert's speedup over each baseline per
    comparison (what did run: the C++ extension and the eager CPU paths against torch, transformers
    and bert_pytorch), a line at 1x.
"""

import os
import re
from collections import OrderedDict

SEQ_KEYS = ("seq", "seq_len", "seqlen", "max_seqlen", "S")  # benchmark params that give a seq length

MAX_PANELS = 12
MAX_BARS = 60
OURS_COLOR, BASE_COLOR = "#d62728", "#7f7f7f"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _seq_key(params):
    for key in SEQ_KEYS:
        if key in params:
            try:
                int(params[key])
            except (TypeError, ValueError):
                continue
            return key
    return None


def _family_label(row, seq_key):
    # a group name usually repeats the sequence length ("model-train-seq128-full"): drop it there
    keys = "|".join(re.escape(k) for k in SEQ_KEYS)
    group = re.sub(rf"[-_ ]?\b(?:{keys})[=_-]?\d+\b", "", row.group).strip()
    rest = ", ".join(f"{k}={v}" for k, v in row.params.items() if k != seq_key)
    return f"{group}" + (f" [{rest}]" if rest else "")


def _throughput(row):
    e = row.extra
    if e.get("tokens_per_s"):
        return float(e["tokens_per_s"]), "tokens/s"
    if e.get("gbps"):
        return float(e["gbps"]), "GB/s"
    if e.get("tflops"):
        return float(e["tflops"]), "TFLOP/s"
    return (1.0 / row.median if row.median > 0 else 0.0), "calls/s"


def throughput_families(rows):
    """OrderedDict label -> (unit, {provider: [(seq, value), ...]}) for families with >= 2 lengths."""
    fams = OrderedDict()
    for r in rows:
        key = _seq_key(r.params)
        if key is None:
            continue
        value, unit = _throughput(r)
        label = _family_label(r, key)
        label = f"{r.name}: {label}" if r.group == r.name else label
        entry = fams.setdefault(label, [unit, OrderedDict()])
        entry[1].setdefault(r.provider or "default", []).append((int(r.params[key]), value))
    out = OrderedDict()
    for label, (unit, lines) in fams.items():
        seqs = {s for pts in lines.values() for s, _ in pts}
        if len(seqs) >= 2:
            out[label] = (unit, lines)
    return out


def _bars(plt, labels, values, colors, xlabel, title, xscale=None, line=None):
    """A horizontal bar chart, one bar per label (the first MAX_BARS); returns the figure."""
    labels, values, colors = labels[:MAX_BARS], values[:MAX_BARS], colors[:MAX_BARS]
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(labels) + 1.2))
    ax.barh(range(len(labels)), values, color=colors)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=6)
    ax.invert_yaxis()
    if xscale:
        ax.set_xscale(xscale)
    if line is not None:
        ax.axvline(line, color="black", linewidth=0.8)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return fig


def _empty(plt, text):
    fig, ax = plt.subplots(figsize=(6, 2))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center")
    return fig


def _save(plt, fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_rates(rows, path):
    """A bar per result of its rate (tokens/s, GB/s, TFLOP/s or calls/s; one unit per figure: the
    most common), fastbert's rows highlighted."""
    plt = _pyplot()
    rated = [(r, *_throughput(r)) for r in rows]
    if not rated:
        return _save(plt, _empty(plt, "no benchmark results in this run"), path)
    units = [u for _, _, u in rated]
    unit = max(set(units), key=units.count)
    picked = [(r, v) for r, v, u in rated if u == unit]
    labels = [f"{r.group} [{r.params_text}] {r.provider or ''}" for r, _ in picked]
    colors = [OURS_COLOR if r.ours else BASE_COLOR for r, _ in picked]
    fig = _bars(plt, labels, [v for _, v in picked], colors, unit, f"{unit} per result (red: fastbert)",
                xscale="log")
    return _save(plt, fig, path)


def plot_throughput(rows, path):
    plt = _pyplot()
    fams = throughput_families(rows)
    labels = list(fams)[:MAX_PANELS]
    ours = {r.provider for r in rows if r.ours}
    if not labels:
        plt.close("all")
        return plot_rates(rows, path)
    else:
        cols = 2 if len(labels) > 1 else 1
        nrows = (len(labels) + cols - 1) // cols
        fig, axes = plt.subplots(nrows, cols, figsize=(6.5 * cols, 3.6 * nrows), squeeze=False)
        for ax in axes.flat[len(labels):]:
            ax.axis("off")
        for ax, label in zip(axes.flat, labels):
            unit, lines = fams[label]
            for provider, pts in lines.items():
                pts = sorted(pts)
                ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o",
                        linewidth=2.2 if provider in ours else 1.2,
                        linestyle="-" if provider in ours else "--", label=provider)
            ax.set_title(label, fontsize=9)
            ax.set_xlabel("sequence length")
            ax.set_ylabel(unit)
            ax.set_xscale("log", base=2)
            seqs = sorted({s for pts in lines.values() for s, _ in pts})
            ax.set_xticks(seqs)
            ax.set_xticklabels([str(s) for s in seqs])
            ax.minorticks_off()
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        if len(fams) > MAX_PANELS:
            fig.suptitle(f"first {MAX_PANELS} of {len(fams)} families", fontsize=9)
    return _save(plt, fig, path)


def plot_speedups(pairs, path):
    """fastbert's speedup over each baseline, one bar per (label, speedup) of pairs (the report's
    comparisons, fastbert.bench.report.speedup_pairs)."""
    plt = _pyplot()
    labels = [label for label, _ in pairs]
    values = [value for _, value in pairs]
    if not labels:
        return _save(plt, _empty(plt, "no fastbert result with a baseline in this run"), path)
    colors = [OURS_COLOR if v >= 1 else BASE_COLOR for v in values]
    fig = _bars(plt, labels, values, colors, "speedup (baseline median / fastbert median)",
                "fastbert's speedup over each baseline (red: faster)", xscale="log", line=1.0)
    return _save(plt, fig, path)


def plot_roofline(rows, path):
    plt = _pyplot()
    data = [r for r in rows if r.extra.get("roofline_frac") is not None]
    if len(data) > MAX_BARS:  # keep fastbert's rows and the best baseline of each comparison
        best = OrderedDict()
        for r in data:
            key = (r.group, r.name, r.shape_key)
            if r.ours:
                best.setdefault(key, []).append(r)
            else:
                cur = best.setdefault(("base",) + key, [r])
                if r.median < cur[0].median:
                    cur[0] = r
        data = [r for rs in best.values() for r in rs][:MAX_BARS]
    if not data:
        return _save(plt, _empty(plt, "no roofline data in this run\n(measured on CUDA only)"), path)
    data.sort(key=lambda r: (r.group, r.params_text, not r.ours))
    labels = [f"{r.group} [{r.params_text}] {r.provider or ''}" for r in data]
    values = [100 * float(r.extra["roofline_frac"]) for r in data]
    fig = _bars(plt, labels, values, [OURS_COLOR if r.ours else BASE_COLOR for r in data],
                "% of roofline (max of copy-bandwidth and bf16-matmul fractions)",
                "roofline fraction per kernel (red: fastbert)")
    return _save(plt, fig, path)


def make_plots(rows, out_dir, prefix="", roofline=True, speedup_pairs=()):
    """Write the PNGs into out_dir, file names prefixed by `prefix`: the throughput plot, and the
    roofline plot (roofline=True: a GPU run) or the speedup plot of speedup_pairs (a CPU run).
    Returns [(title, path)]."""
    os.makedirs(out_dir, exist_ok=True)
    throughput = plot_throughput(rows, os.path.join(out_dir, f"{prefix}throughput_vs_seq.png"))
    if roofline:
        second = ("roofline fraction per kernel",
                  plot_roofline(rows, os.path.join(out_dir, f"{prefix}roofline.png")))
    else:
        second = ("speedup over each baseline",
                  plot_speedups(speedup_pairs, os.path.join(out_dir, f"{prefix}speedup.png")))
    return [("throughput vs sequence length", throughput), second]
