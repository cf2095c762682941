"""Benchmark-session setup shared by every benchmarks/bench_*.py.

* bench_*.py files are collected through python_files in pyproject.toml; test functions keep the
  usual test_ prefix. _util is importable as a plain module (`from _util import run, devices`).
* Measures the roofline once per session on CUDA (copy GB/s, bf16 matmul TFLOP/s) and adds the
  device, versions and roofline to the JSON's machine_info; the JSON's "not_measured" lists the
  benchmarks that were skipped or failed, with the reason, so the report can say what is missing.
* Never times the Triton interpreter: with FASTBERT_BACKEND=triton and no GPU (kernels would run
  interpreted) timed runs are skipped; --benchmark-disable smoke runs still go.
* CPU threads: FASTBERT_BENCH_THREADS if set, else 1 for --benchmark-disable smoke runs.
* A time budget (FASTBERT_BENCH_BUDGET_S, seconds from session start; unset means none): once spent,
  the remaining benchmarks are skipped with that reason, so a run under `timeout` still ends
  normally and writes its JSON. Order: the headline numbers first (the pretraining step, then
  bench_model.py's training steps, peak memory and inference), then the per-op files, and every
  torch.compile baseline (slow to compile) last, so the budget cuts those first.
  `bench_budget.require(s)` skips a test that needs at least s seconds when fewer are left.
"""

import os
import platform
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

_SESSION_START = time.monotonic()
PROVIDER_KEYS = ("provider", "impl", "backend", "variant", "method")


def _budget_s():
    env = os.environ.get("FASTBERT_BENCH_BUDGET_S", "").strip()
    if not env:
        return None
    value = float(env)
    if value <= 0:
        raise ValueError(f"FASTBERT_BENCH_BUDGET_S={env!r}; expected a positive number of seconds")
    return value


def remaining_s():
    """Seconds left of the session's benchmark budget (inf when there is none)."""
    budget = _budget_s()
    return float("inf") if budget is None else budget - (time.monotonic() - _SESSION_START)


def _provider(item):
    params = getattr(getattr(item, "callspec", None), "params", {}) or {}
    for key in PROVIDER_KEYS:
        if key in params:
            return str(params[key])
    return ""


_COLLECTED = []  # node ids of the benchmarks in this session, in run order
_REPORTED = set()  # node ids that reached a result (passed, skipped or failed)


# the headline numbers, in the order they run: the pretraining step (issue 6's acceptance), the
# model training step, peak training memory, then the rest of bench_model.py
HEADLINE = ("bench_data.py::test_pretrain_step", "bench_model.py::test_model[train",
            "bench_model.py::test_train_peak_memory", "bench_model.py::")


def _priority(item):
    nodeid = item.nodeid.replace("benchmarks/", "")
    return next((i for i, prefix in enumerate(HEADLINE) if nodeid.startswith(prefix)), len(HEADLINE))


def pytest_collection_modifyitems(session, config, items):
    # stable sort: the headline benchmarks first (HEADLINE order), then the per-op ones, and the
    # torch.compile baselines (slow to compile) last; file and parameter order otherwise
    items.sort(key=lambda item: ("compile" in _provider(item).lower(), _priority(item)))


def pytest_collection_finish(session):
    # after every plugin's deselection (-k, -m)
    _COLLECTED[:] = [item.nodeid for item in session.items
                     if "benchmark" in getattr(item, "fixturenames", ())]


def _timing_enabled(config):
    return not (config.getoption("benchmark_disable", False) or config.getoption("benchmark_skip", False))


def pytest_configure(config):
    # CPU threads: FASTBERT_BENCH_THREADS when set; else one thread for --benchmark-disable smoke runs
    # (nothing is timed, and on a shared CI box oversubscribed OpenMP threads make tiny models ~20x
    # slower); timed CPU runs keep torch's default.
    import torch

    threads = os.environ.get("FASTBERT_BENCH_THREADS", "").strip()
    if threads:
        torch.set_num_threads(int(threads))
    elif not _timing_enabled(config) and not torch.cuda.is_available():
        torch.set_num_threads(1)


def _interpreting_kernels():
    import torch

    backend = os.environ.get("FASTBERT_BACKEND", "auto").strip().lower()
    return backend == "triton" and not torch.cuda.is_available()


def pytest_runtest_setup(item):
    if "benchmark" not in getattr(item, "fixturenames", ()):
        return
    if not _timing_enabled(item.config):
        return
    if _interpreting_kernels():
        pytest.skip("FASTBERT_BACKEND=triton without a GPU runs the Triton interpreter, which is never "
                    "timed; unset it or run with --benchmark-disable")
    left = remaining_s()
    if left <= 0:
        pytest.skip(f"benchmark time budget FASTBERT_BENCH_BUDGET_S={os.environ['FASTBERT_BENCH_BUDGET_S']}"
                    " s is spent")


class Budget:
    """What is left of FASTBERT_BENCH_BUDGET_S; require(s) skips when less than s seconds remain."""

    def remaining(self):
        return remaining_s()

    def require(self, seconds, what="this benchmark"):
        left = remaining_s()
        if left < seconds:
            pytest.skip(f"{what} needs about {seconds:.0f} s; {max(left, 0):.0f} s of the benchmark "
                        "budget (FASTBERT_BENCH_BUDGET_S) are left")


@pytest.fixture
def bench_budget(request):
    budget = Budget()
    if not _timing_enabled(request.config):
        budget.require = lambda seconds, what="": None  # smoke runs are not budgeted
    return budget


def _collect_env():
    """Device, versions and (CUDA) roofline of this run; the roofline is measured once."""
    import torch
    from _util import device_name, roofline, versions

    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = {"bench_device": device, "device_name": device_name(device), **versions(),
           "python": platform.python_version()}
    for name in ("transformers", "bert_pytorch"):
        try:
            module = __import__(name)
            env[name] = getattr(module, "__version__", "present")
        except Exception:  # noqa: BLE001
            env[name] = None
    try:
        import fastbert
        from fastbert import _ext
        from fastbert.ops._dispatch import backend

        env["fastbert"] = fastbert.__version__
        env["fastbert_backend"] = backend()
        env["fastbert_ext"] = "cuda" if _ext.has_cuda() else ("cpu" if _ext.available() else
                                                               f"not loaded ({_ext.load_error})")
    except Exception as exc:  # noqa: BLE001
        env["fastbert"] = f"import failed: {type(exc).__name__}: {exc}"
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env["sm_count"] = props.multi_processor_count
        env["gpu_mem_gb"] = round(props.total_memory / 2**30, 1)
        env["capability"] = f"{props.major}.{props.minor}"
        copy_gbps, matmul_tflops = roofline("cuda")
        env["copy_gbps"] = round(copy_gbps, 1)
        env["matmul_tflops"] = round(matmul_tflops, 1)
    return env


_ENV = {}


@pytest.fixture(scope="session", autouse=True)
def bench_env(request):
    """Records device, versions and the roofline once (at the first benchmark) for the JSON."""
    if not _ENV:
        _ENV.update(_collect_env())
    return _ENV


_NOT_MEASURED = []  # benchmarks that were skipped or failed, with the reason, for the report


def pytest_runtest_logreport(report):
    if report.when == "call" or report.skipped or report.failed:
        _REPORTED.add(report.nodeid)
    if report.skipped and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        if "non-benchmark" not in reason:
            _NOT_MEASURED.append({"test": report.nodeid, "status": "skipped", "reason": reason[:300]})
    elif report.failed:
        text = (report.longreprtext or "").strip().splitlines()
        last = next((ln for ln in reversed(text) if ln.startswith("E ")), text[-1] if text else "")
        _NOT_MEASURED.append({"test": report.nodeid, "status": f"failed ({report.when})",
                              "reason": last[:300]})


def pytest_benchmark_update_json(config, benchmarks, output_json):
    # the run was interrupted (timeout, Ctrl-C) before these started
    # (one interrupted mid-way is in the results with fewer rounds)
    have = {b.get("fullname") for b in output_json.get("benchmarks", [])}
    not_reached = [{"test": nodeid, "status": "not reached", "reason": "the run was interrupted before it"}
                   for nodeid in _COLLECTED if nodeid not in _REPORTED and nodeid not in have]
    output_json["not_measured"] = list(_NOT_MEASURED) + not_reached


def pytest_benchmark_update_machine_info(config, machine_info):
    if not _ENV:
        _ENV.update(_collect_env())
    machine_info["fastbert_env"] = dict(_ENV)


def pytest_report_header(config):
    budget = _budget_s()
    rounds = os.environ.get("FASTBERT_BENCH_ROUNDS", "default")
    return [f"fastbert benchmarks: rounds FASTBERT_BENCH_ROUNDS={rounds}, "
            f"budget {'none' if budget is None else f'{budget:.0f} s'}"]
