"""`python -m fastbert.bench report` on a small synthetic pytest-benchmark JSON.

The synthetic run has two comparisons per sequence length with known medians, so the speedups in
RESULTS.md are checked against numbers computed here; the plots are checked to be real PNGs.
"""

import json
import runpy
import sys

import pytest

from fastbert.bench import report
from fastbert.bench.__main__ import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _bench(name, group, params, median, extra=None):
    pstr = "-".join(str(v) for v in params.values())
    return {
        "group": group, "name": f"{name}[{pstr}]", "fullname": f"benchmarks/bench_x.py::{name}[{pstr}]",
        "params": params, "param": pstr, "extra_info": extra or {},
        "stats": {"min": median * 0.9, "max": median * 1.2, "mean": median, "stddev": 0.0,
                  "rounds": 10, "median": median, "iqr": median * 0.05, "q1": median, "q3": median,
                  "iterations": 1, "ops": 1 / median, "total": 10 * median},
    }


def synthetic_run(cuda=True):
    benches = []
    for seq, scale in ((128, 1.0), (512, 4.0)):
        group = f"model-train-seq{seq}-full"
        tokens = 8192
        for provider, ms in (("fastbert", 10.0), ("hf-sdpa", 15.0), ("hf-eager", 25.0)):
            median = ms * scale * 1e-3
            extra = {"tokens_per_s": tokens / median, "tflops": 1.0 / median}
            if cuda:
                extra.update(roofline_frac=0.3 / scale if provider == "fastbert" else 0.2 / scale,
                             peak_mem_mb=1000.0)
            benches.append(_bench("test_model", group, {"mode": "train", "seq": seq, "provider": provider},
                                  median, extra))
    for shape in ((8, 768), (4096, 1024)):
        for provider, us in (("triton", 20.0), ("torch", 50.0), ("torch-compile", 30.0)):
            extra = {"gbps": 100.0 / us}
            if cuda:
                extra["roofline_frac"] = 0.03 / us
            params = {"shape": f"{shape[0]}x{shape[1]}", "provider": provider}
            benches.append(_bench("test_layer_norm_fwd", "layer_norm-fwd", params, us * 1e-6, extra))
    benches.append(_bench("test_train_peak_memory", "model-memory-seq512-b32", {"padding": "full"}, 0.2,
                          {"provider": "fastbert-hf", "peak_mem_fastbert_mb": 6000.0,
                           "peak_mem_hf_sdpa_mb": 8000.0, "mem_ratio": 0.75}))
    env = {"device_name": "NVIDIA H100 80GB HBM3" if cuda else "cpu (x86_64, 2 threads)",
           "torch": "2.11.0+cu130", "triton": "3.6.0", "cuda": "13.0", "transformers": "5.17.0"}
    if cuda:
        env.update(copy_gbps=3000.0, matmul_tflops=790.0, sm_count=132, gpu_mem_gb=79.2, capability="9.0")
    return {"machine_info": {"fastbert_env": env, "python_version": "3.12.3"},
            "commit_info": {"id": "0123456789abcdef", "dirty": False, "branch": "main"},
            "benchmarks": benches, "datetime": "2026-11-26T06:00:00+00:00", "version": "5.3.1"}


@pytest.fixture
def run_json(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(synthetic_run()))
    return path


def test_report_tables_and_plots(run_json, tmp_path, capsys):
    out = tmp_path / "out" / "RESULTS.md"
    assert main(["report", str(run_json), "--out", str(out)]) == 0
    text = out.read_text()
    assert "NVIDIA H100 80GB HBM3" in text and "torch 2.11.0+cu130" in text and "2026-11-26" in text
    assert "3000.0 GB/s" in text and "790.0 TFLOP/s" in text
    # speedups = baseline median / fastbert median: 15/10 and 25/10 at both lengths
    summary = text[text.index("## Speedup"):text.index("## All results")]
    rows = [line for line in summary.splitlines() if line.startswith("| model-train")]
    assert len(rows) == 2
    for line in rows:
        assert "hf-sdpa **1.50x**" in line and "hf-eager **2.50x**" in line
    ln = [line for line in summary.splitlines() if line.startswith("| layer_norm-fwd")]
    assert len(ln) == 2
    assert all("torch **2.50x**" in line and "torch-compile **1.50x**" in line for line in ln)
    # memory table, with the ratio and the verdict
    assert "6,000 MiB" in text and "8,000 MiB" in text and "| 0.75 | yes |" in text
    # detail table shows rates and the roofline fraction (0.3 -> 30.0%)
    assert "30.0%" in text and "819k" in text  # 8192 tokens / 10 ms
    for name in ("throughput_vs_seq.png", "roofline.png"):
        png = out.parent / name
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert f"]({name})" in text
    assert "wrote" in capsys.readouterr().out


def test_compare_with_restricts_baselines(tmp_path):
    data = synthetic_run()
    for bench in data["benchmarks"]:
        if bench["params"].get("provider") == "fastbert":
            bench["extra_info"]["compare_with"] = ["hf-eager"]
    path = tmp_path / "run.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "RESULTS.md"
    assert main(["report", str(path), "--out", str(out), "--no-plots"]) == 0
    summary = out.read_text().split("## All results")[0]
    rows = [line for line in summary.splitlines() if line.startswith("| model-train")]
    assert len(rows) == 2
    assert all("hf-eager **2.50x**" in line and "hf-sdpa" not in line for line in rows)


def test_not_measured_section(tmp_path):
    data = synthetic_run()
    data["not_measured"] = [
        {"test": "benchmarks/bench_model.py::test_model[train-512-full-hf-compile]", "status": "skipped",
         "reason": "hf-compile (cold torch.compile) needs about 60 s; 12 s of the benchmark budget are left"},
        {"test": "benchmarks/bench_x.py::test_y[a|b]", "status": "failed (call)",
         "reason": "E   boom | bang"},
    ]
    path = tmp_path / "run.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "RESULTS.md"
    assert main(["report", str(path), "--out", str(out), "--no-plots"]) == 0
    section = out.read_text().split("## Not measured in this run")[1]
    assert "test_model[train-512-full-hf-compile]" in section and "12 s of the benchmark budget" in section
    assert "failed (call)" in section and "boom / bang" in section and "test_y[a/b]" in section


def test_families_for_throughput_plot():
    rows = report.rows(synthetic_run())
    from fastbert.bench.plots import throughput_families

    fams = throughput_families(rows)
    # model rows at seq 128 and 512 form one family (seq stripped from the group); layer_norm has no seq
    assert list(fams) == ["model-train-full [mode=train]"]
    unit, lines = fams["model-train-full [mode=train]"]
    assert unit == "tokens/s"
    assert sorted(lines) == ["fastbert", "hf-eager", "hf-sdpa"]
    assert sorted(s for s, _ in lines["fastbert"]) == [128, 512]


def test_cpu_run_reports_what_ran(tmp_path):
    """A CPU run: no roofline; the note says the Triton rows need a GPU; the speedup plot (what did
    run against its baselines) takes the roofline plot's place."""
    data = synthetic_run(cuda=False)
    data["not_measured"] = [{"test": "benchmarks/bench_layer_norm.py::test_fwd[triton]", "status": "skipped",
                             "reason": "compiled Triton kernels need CUDA"}]
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "RESULTS.md"
    assert main(["report", str(path), "--out", str(out), "--plots", str(tmp_path / "plots")]) == 0
    text = out.read_text()
    assert "roofline: none (CPU run" in text
    assert "**CPU run.**" in text and "Triton kernels" in text and "need a GPU" in text
    assert "the 1 benchmarks that need a GPU" in text
    assert "](plots/speedup.png)" in text and "roofline.png" not in text
    assert (tmp_path / "plots" / "speedup.png").read_bytes()[:8] == PNG_MAGIC
    assert "hf-sdpa **1.50x**" in text  # the rows that ran are reported
    gpu = tmp_path / "gpu.json"
    gpu.write_text(json.dumps(synthetic_run()))
    assert main(["report", str(gpu), "--out", str(tmp_path / "g.md"), "--no-plots"]) == 0
    assert "CPU run." not in (tmp_path / "g.md").read_text()


def test_default_output_is_beside_the_input(tmp_path, monkeypatch):
    """Without --out: RUN.md and RUN-*.png beside RUN.json, nothing in the working directory's
    benchmarks/ (the committed RESULTS.md)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "benchmarks").mkdir()
    committed = tmp_path / "benchmarks" / "RESULTS.md"
    committed.write_text("the committed GPU record\n")
    runs = tmp_path / "runs"
    runs.mkdir()
    path = runs / "cpu-run.json"
    path.write_text(json.dumps(synthetic_run(cuda=False)))
    assert main(["report", str(path)]) == 0
    assert committed.read_text() == "the committed GPU record\n"
    assert sorted(p.name for p in (tmp_path / "benchmarks").iterdir()) == ["RESULTS.md"]
    assert sorted(p.name for p in runs.iterdir()) == ["cpu-run-speedup.png", "cpu-run-throughput_vs_seq.png",
                                                      "cpu-run.json", "cpu-run.md"]
    assert "](cpu-run-speedup.png)" in (runs / "cpu-run.md").read_text()


def test_one_length_each_plots_the_rates(tmp_path):
    """No benchmark at two sequence lengths: the throughput figure is a bar per result, not empty."""
    from fastbert.bench.plots import plot_throughput, throughput_families

    data = synthetic_run(cuda=False)
    data["benchmarks"] = [b for b in data["benchmarks"] if b["params"].get("seq") != 512]
    rows = report.rows(data)
    assert not throughput_families(rows)
    png = plot_throughput(rows, str(tmp_path / "t.png"))
    assert open(png, "rb").read()[:8] == PNG_MAGIC


def test_empty_run_and_bad_input(tmp_path, capsys):
    empty = synthetic_run()
    empty["benchmarks"] = []
    path = tmp_path / "empty.json"
    path.write_text(json.dumps(empty))
    out = tmp_path / "RESULTS.md"
    assert main(["report", str(path), "--out", str(out), "--no-plots"]) == 0
    assert "No benchmark results" in out.read_text()

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"something": 1}))
    assert main(["report", str(bad), "--out", str(out)]) == 2
    assert "not a pytest-benchmark JSON" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing.json"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not JSON"):
        (tmp_path / "garbage.json").write_text("{nope")
        report.load(str(tmp_path / "garbage.json"))


def test_module_entry_point(run_json, tmp_path, monkeypatch):
    """What `python -m fastbert.bench report ...` runs (in-process: a new interpreter costs seconds)."""
    out = tmp_path / "cli" / "RESULTS.md"
    monkeypatch.setattr(sys, "argv", ["fastbert.bench", "report", str(run_json), "--out", str(out),
                                      "--no-plots"])
    monkeypatch.delitem(sys.modules, "fastbert.bench.__main__", raising=False)  # run it fresh
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("fastbert.bench", run_name="__main__", alter_sys=True)
    assert exc.value.code == 0
    assert out.exists() and "## Speedup of fastbert" in out.read_text()
