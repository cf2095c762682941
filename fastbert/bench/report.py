"""Turn a pytest-benchmark JSON (pytest benchmarks/ --benchmark-json RUN.json) into RESULTS.md.

Rows are compared within a group at equal parameters: the provider parameter (one of
PROVIDER_KEYS) names the implementation, every other parameter is the shape. A provider is fastbert's
("ours") when its name matches OURS_PATTERN or its extra_info says ours=True; every other provider
of the same comparison is a baseline (or only those named in the ours row's extra_info
compare_with), and speedup = baseline median / ours median (> 1: fastbert is faster). Rates
(tokens/s, GB/s, TFLOP/s, roofline fraction, peak memory) come from extra_info, which
benchmarks/_util.run fills at the median.
"""

import json
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field

PROVIDER_KEYS = ("provider", "impl", "backend", "variant", "method")
OURS_PATTERN = r"fastbert|triton|fused|ours|\bext\b|\bcpp\b"


@dataclass
class Row:
    """One benchmark result of the JSON."""

    name: str  # test function, without parameters
    group: str
    provider: str | None
    params: dict  # every parameter except the provider
    median: float  # seconds
    iqr: float
    rounds: int
    extra: dict = field(default_factory=dict)
    ours: bool = False

    @property
    def shape_key(self):
        return tuple(sorted((k, str(v)) for k, v in self.params.items()))

    @property
    def params_text(self):
        return ", ".join(f"{k}={v}" for k, v in self.params.items()) or "-"


def load(path):
    """The parsed JSON of a pytest-benchmark run; ValueError when it is not one."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"benchmark JSON {path!r} does not exist")
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path!r} is not JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ValueError(f"{path!r} is not a pytest-benchmark JSON: it has no 'benchmarks' list "
                         "(write one with pytest benchmarks/ --benchmark-json RUN.json)")
    return data


def rows(data, ours_pattern=OURS_PATTERN):
    """Row per benchmark result, in the JSON's order."""
    ours_re = re.compile(ours_pattern, re.IGNORECASE)
    out = []
    for bench in data["benchmarks"]:
        stats = bench.get("stats") or {}
        if "median" not in stats:
            raise ValueError(f"benchmark {bench.get('fullname', bench.get('name'))!r} has no median "
                             "in its stats")
        params = dict(bench.get("params") or {})
        provider = None
        for key in PROVIDER_KEYS:
            if key in params:
                provider = str(params.pop(key))
                break
        extra = dict(bench.get("extra_info") or {})
        if provider is None and "provider" in extra:
            provider = str(extra["provider"])
        name = bench.get("name", "?").split("[")[0]
        ours = extra.get("ours")
        if ours is None:
            ours = provider is not None and bool(ours_re.search(provider))
        out.append(Row(name=name, group=bench.get("group") or name, provider=provider, params=params,
                       median=float(stats["median"]), iqr=float(stats.get("iqr", 0.0)),
                       rounds=int(stats.get("rounds", 0)), extra=extra, ours=bool(ours)))
    return out


def comparisons(all_rows):
    """OrderedDict (group, name, shape_key) -> rows of that comparison, in JSON order."""
    out = OrderedDict()
    for r in all_rows:
        out.setdefault((r.group, r.name, r.shape_key), []).append(r)
    return out


def speedups(cmp_rows):
    """[(ours_row, [(baseline_row, speedup), ...]), ...] for one comparison.

    An ours row whose extra_info has compare_with (a list of provider names) is compared with those
    baselines only (like-for-like pairs, e.g. fastbert.BERT with bert_pytorch); otherwise with all.
    """
    baselines = [r for r in cmp_rows if not r.ours]
    out = []
    for o in cmp_rows:
        if not o.ours or o.median <= 0:
            continue
        only = o.extra.get("compare_with")
        mine = [b for b in baselines if only is None or b.provider in only]
        out.append((o, [(b, b.median / o.median) for b in mine]))
    return out


def speedup_pairs(all_rows):
    """[(label, speedup)]: each fastbert result over each of its baselines (the speedup plot's bars)."""
    out = []
    for (group, _name, _shape), cmp_rows in comparisons(all_rows).items():
        for ours, pairs in speedups(cmp_rows):
            for base, speedup in pairs:
                out.append((f"{group} [{ours.params_text}] {ours.provider} vs {base.provider}", speedup))
    return out


def fmt_time(seconds):
    if seconds is None or not math.isfinite(seconds):
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def fmt_num(value, digits=3):
    if value is None:
        return "-"
    value = float(value)
    if not math.isfinite(value):
        return "-"
    if abs(value) >= 1e6:
        return f"{value / 1e6:.{digits}g}M"
    if abs(value) >= 1e3:
        return f"{value / 1e3:.{digits}g}k"
    return f"{value:.{digits}g}"


def fmt_rate(extra):
    """The headline rate of a result: tokens/s, else GB/s, else TFLOP/s."""
    for key, unit in (("tokens_per_s", "tok/s"), ("gbps", "GB/s"), ("tflops", "TFLOP/s")):
        if extra.get(key):
            return f"{fmt_num(extra[key])} {unit}"
    return "-"


def fmt_mib(value):
    return "-" if value is None else f"{float(value):,.0f} MiB"


def fmt_pct(value):
    return "-" if value is None else f"{100 * float(value):.1f}%"


def _env(data):
    machine = data.get("machine_info") or {}
    env = dict(machine.get("fastbert_env") or {})
    if not env.get("device_name"):
        # no conftest info: fall back on the first result's extra_info and pytest-benchmark's own
        for bench in data["benchmarks"]:
            extra = bench.get("extra_info") or {}
            if "device" in extra:
                env.setdefault("device_name", extra["device"])
                for key in ("torch", "triton", "cuda"):
                    env.setdefault(key, extra.get(key))
                break
        env.setdefault("device_name", (machine.get("cpu") or {}).get("brand_raw", "unknown device"))
    env.setdefault("python", machine.get("python_version"))
    return env


_GPU_ONLY = re.compile(r"cuda|gpu|triton", re.IGNORECASE)


def is_cpu_run(data):
    """True when the run had no CUDA device (no roofline, no GPU name in its environment)."""
    env = _env(data)
    name = str(env.get("device_name") or "")
    gpu_name = re.search(r"nvidia|cuda|gpu|amd instinct", name, re.IGNORECASE)
    return not (env.get("sm_count") or env.get("copy_gbps") or gpu_name)


def cpu_note_lines(data):
    """On a CPU run: what the rows are, and that the Triton (and other CUDA-only) rows need a GPU."""
    if not is_cpu_run(data):
        return []
    gpu_only = [m for m in data.get("not_measured") or [] if _GPU_ONLY.search(str(m.get("reason", "")))]
    lines = ["> **CPU run.** fastbert's Triton kernels (LayerNorm, bias+GELU, attention) and the other "
             "CUDA-only rows need a GPU: this report has the rows that ran on the CPU, fastbert's CPU "
             "providers (the C++ extension `fastbert._C`, the eager fused block) against the baselines"]
    if gpu_only:
        lines[-1] += (f"; the {len(gpu_only)} benchmarks that need a GPU are listed under \"Not measured "
                      "in this run\".")
    else:
        lines[-1] += "."
    lines[-1] += " Run `bash benchmarks/gpu_run.sh OUTDIR` on a CUDA machine for the kernels' numbers."
    return lines


def header_lines(data, source):
    env = _env(data)
    commit = data.get("commit_info") or {}
    lines = ["# fastbert benchmark results", ""]
    lines.append(f"- date: {data.get('datetime', 'unknown')}")
    gpu = ""
    if env.get("sm_count") and env.get("capability"):
        gpu = f" ({env['sm_count']} SMs, {env['gpu_mem_gb']} GiB, sm_{env['capability'].replace('.', '')})"
    lines.append(f"- device: {env.get('device_name')}{gpu}")
    versions = [f"{k} {env[k]}" for k in ("torch", "triton", "cuda", "transformers", "bert_pytorch",
                                          "python", "fastbert") if env.get(k)]
    lines.append(f"- versions: {', '.join(versions) or 'unknown'}")
    if env.get("fastbert_backend") or env.get("fastbert_ext"):
        lines.append(f"- fastbert backend: {env.get('fastbert_backend', '?')}, compiled extension: "
                     f"{env.get('fastbert_ext', '?')}")
    if env.get("copy_gbps") or env.get("matmul_tflops"):
        lines.append(f"- roofline, measured once in this run: device-to-device copy {env.get('copy_gbps')} "
                     f"GB/s (read + write), bf16 matmul 8192^3 {env.get('matmul_tflops')} TFLOP/s")
    else:
        lines.append("- roofline: none (CPU run; GB/s and TFLOP/s are reported without a fraction)")
    if commit.get("id"):
        lines.append(f"- commit: {commit['id'][:12]}{' (dirty tree)' if commit.get('dirty') else ''}"
                     + (f" on {commit['branch']}" if commit.get("branch") else ""))
    lines.append(f"- source: `{os.path.basename(source)}`, pytest-benchmark {data.get('version', '?')}; "
                 "times are medians; generated by `python -m fastbert.bench report`")
    return lines


def summary_lines(cmps):
    lines = ["## Speedup of fastbert over each baseline", "",
             "Speedup = baseline median / fastbert median at equal parameters (> 1: fastbert is faster).",
             "", "| group | params | fastbert | median | rate | speedup vs each baseline |",
             "| --- | --- | --- | --- | --- | --- |"]
    n = 0
    for (group, _name, _shape), cmp_rows in cmps.items():
        for ours, pairs in speedups(cmp_rows):
            if not pairs:  # nothing to compare with (a single-provider benchmark, or baselines skipped)
                continue
            cells = ", ".join(f"{b.provider} **{s:.2f}x**" for b, s in pairs)
            lines.append(f"| {group} | {ours.params_text} | {ours.provider} | {fmt_time(ours.median)} | "
                         f"{fmt_rate(ours.extra)} | {cells} |")
            n += 1
    if n == 0:
        lines.append("| - | - | - | - | - | no fastbert result with a baseline in this run |")
    return lines


def memory_lines(all_rows):
    mem = [r for r in all_rows if "mem_ratio" in r.extra]
    if not mem:
        return []
    lines = ["## Peak training memory", "",
             "| group | params | fastbert peak | HF sdpa peak | ratio | fastbert uses less |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in mem:
        ratio = r.extra.get("mem_ratio")
        less = "yes" if ratio is not None and ratio < 1 else "**NO**"
        lines.append(f"| {r.group} | {r.params_text} | {fmt_mib(r.extra.get('peak_mem_fastbert_mb'))} | "
                     f"{fmt_mib(r.extra.get('peak_mem_hf_sdpa_mb'))} | {fmt_num(ratio)} | {less} |")
    return lines


def not_measured_lines(data):
    """The benchmarks the run skipped or failed (benchmarks/conftest.py records them)."""
    missing = data.get("not_measured") or []
    if not missing:
        return []
    lines = ["## Not measured in this run", "", "| benchmark | status | reason |", "| --- | --- | --- |"]
    for m in missing:
        reason = str(m.get("reason", "")).replace("|", "/").replace("\n", " ")
        test = str(m.get("test", "?")).replace("|", "/")
        lines.append(f"| `{test}` | {m.get('status', '?')} | {reason} |")
    return lines


def detail_lines(all_rows):
    lines = ["## All results by group", "",
             "median: wall time per call (CUDA: synchronized, L2 flushed before each round); GPU time: "
             "median of CUDA events around the call (device time without host overhead); rates use the "
             "wall median; roofline: the larger of GB/s / copy bandwidth and TFLOP/s / matmul peak.", ""]
    groups = OrderedDict()
    for r in all_rows:
        groups.setdefault(r.group, []).append(r)
    for group, group_rows in groups.items():
        lines += [f"### {group}", "",
                  "| test | params | provider | median | IQR | GPU time | rounds | tokens/s | GB/s | TFLOP/s "
                  "| roofline | peak mem |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in sorted(group_rows, key=lambda r: (r.name, r.shape_key, not r.ours, r.median)):
            e = r.extra
            peak = e.get("peak_mem_mb")
            provider = f"**{r.provider}**" if r.ours else (r.provider or "-")
            gpu_ms = e.get("gpu_median_ms")
            lines.append(f"| {r.name} | {r.params_text} | {provider} | {fmt_time(r.median)} | "
                         f"{fmt_time(r.iqr)} | {'-' if gpu_ms is None else fmt_time(gpu_ms / 1e3)} | "
                         f"{r.rounds} | {fmt_num(e.get('tokens_per_s'))} | "
                         f"{fmt_num(e.get('gbps'))} | {fmt_num(e.get('tflops'))} | "
                         f"{fmt_pct(e.get('roofline_frac'))} | "
                         f"{fmt_mib(peak)} |")
        lines.append("")
    return lines


def render(data, source, plots=()):
    """RESULTS.md text. plots: [(title, path relative to RESULTS.md)] to link."""
    return render_rows(data, source, rows(data), plots)


def default_out(json_path):
    """Where a report goes without --out: beside its input, named after it (RUN.json -> RUN.md), so
    that it never replaces a committed RESULTS.md."""
    return os.path.splitext(os.path.abspath(json_path))[0] + ".md"


def write_report(json_path, out_path=None, plots_dir=None, ours_pattern=OURS_PATTERN, make_plots=True):
    """Write the Markdown report (default: default_out(json_path)) and the PNG plots (into plots_dir,
    default the report's folder; named after the input when out_path is not given).

    Returns (out_path, [plot paths], note) where note says why plots are missing, if they are.
    """
    data = load(json_path)
    all_rows = rows(data, ours_pattern)
    prefix = ""
    if out_path is None:
        out_path = default_out(json_path)
        prefix = os.path.splitext(os.path.basename(json_path))[0] + "-"
    out_dir = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(out_dir, exist_ok=True)
    plots_dir = os.path.abspath(plots_dir or out_dir)
    written, links, note = [], [], None
    if make_plots:
        try:
            from . import plots as plotting

            written = plotting.make_plots(all_rows, plots_dir, prefix=prefix, roofline=not is_cpu_run(data),
                                          speedup_pairs=speedup_pairs(all_rows))
        except ImportError as exc:
            note = f"plots skipped: {exc}"
        links = [(title, os.path.relpath(path, out_dir)) for title, path in written]
    text = render_rows(data, json_path, all_rows, links)
    if note:
        text += f"\n_{note}_\n"
    with open(out_path, "w") as f:
        f.write(text)
    return out_path, [path for _, path in written], note


def render_rows(data, source, all_rows, plots=()):
    """render() on rows already parsed (with a custom ours pattern)."""
    lines = header_lines(data, source) + [""]
    note = cpu_note_lines(data)
    if note:
        lines += note + [""]
    missing = not_measured_lines(data)
    if not all_rows:
        lines += ["No benchmark results in this run (all skipped or failed).", ""]
        return "\n".join(lines + missing).rstrip() + "\n"
    lines += summary_lines(comparisons(all_rows)) + [""]
    mem = memory_lines(all_rows)
    if mem:
        lines += mem + [""]
    if plots:
        lines += ["## Plots", ""] + [f"![{title}]({path})" for title, path in plots] + [""]
    lines += detail_lines(all_rows)
    if missing:
        lines += [""] + missing
    return "\n".join(lines).rstrip() + "\n"
