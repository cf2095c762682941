"""What a training run leaves in its folder besides checkpoints: metrics.jsonl, config.json and,
with --tensorboard, TensorBoard event files (tensorboard/).

metrics.jsonl  one JSON object per line: a record per log step ({"step": N, "loss": ...}), the
               held-out evaluation ({"step": N, "heldout": {...}}) and events ({"event": "resume" |
               "interrupted" | "time_limit", "step": N, ...}). A fresh run starts the file anew; a
               resumed run keeps the records up to the checkpoint's step, drops the later ones (they
               were trained again) and writes a "resume" event, so step numbers never repeat.
config.json    the command line, the resolved options, the model config, the library versions and
               the device; a resumed run adds an entry to its "resumes" list.
"""

import importlib.metadata
import json
import os
import platform
import sys
import time


def versions():
    """{package: version} of what a run depends on (absent packages are left out)."""
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("fastbert", "triton", "transformers", "tokenizers", "numpy"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    if "fastbert" not in out:
        import fastbert

        out["fastbert"] = fastbert.__version__
    return out


def _now():
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _write_json(path, obj):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)


def write_config(run_dir, command, options, model=None, device=None, resumed=None):
    """config.json of the run (see the module docstring); returns its path."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "config.json")
    session = {"command": command, "argv": sys.argv[1:], "started": _now(), "versions": versions(),
               "device": str(device) if device is not None else None,
               "options": {k: v for k, v in sorted(options.items()) if isinstance(v, int | float | str | bool
                                                                                  | list | None)}}
    if resumed is not None and os.path.isfile(path):
        try:
            with open(path) as f:
                record = json.load(f)
        except (OSError, ValueError):
            record = None
        if isinstance(record, dict):
            record.setdefault("resumes", []).append({**session, **resumed})
            _write_json(path, record)
            return path
    record = {**session, "model": model}
    if resumed is not None:
        record["resumed"] = resumed
    _write_json(path, record)
    return path


class MetricsFile:
    """Appends JSON lines to one file; see the module docstring for fresh and resumed runs."""

    def __init__(self, path, resume_step=None, marker=None):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if resume_step is None:
            open(path, "w").close()
            return
        kept, dropped = self._records_up_to(resume_step)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
        self.write({"event": "resume", "step": resume_step, "dropped_records": dropped, "time": _now(),
                    **(marker or {})})

    def _records_up_to(self, step):
        if not os.path.isfile(self.path):
            return [], 0
        kept, dropped = [], 0
        with open(self.path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    dropped += 1  # a line cut short by a crash
                    continue
                late = isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] > step
                # the held-out record at the resumed step belongs to the end of the old session
                late = late or (isinstance(rec, dict) and rec.get("step") == step and "heldout" in rec)
                if late:
                    dropped += 1
                else:
                    kept.append(line if line.endswith("\n") else line + "\n")
        return kept, dropped

    def write(self, rec):
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")


class TensorBoard:
    """Scalars of each record into <run>/tensorboard (torch.utils.tensorboard, needs `tensorboard`)."""

    def __init__(self, run_dir, purge_step=None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError("--tensorboard needs the tensorboard package (pip install tensorboard)") from e
        self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=purge_step)

    def write(self, rec, prefix="train"):
        step = rec.get("step")
        if not isinstance(step, int):
            return
        for key, value in rec.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(f"{prefix}/{key}", value, step)
            elif isinstance(value, dict):
                for k, v in value.items():
                    if isinstance(v, int | float) and not isinstance(v, bool):
                        self.writer.add_scalar(f"{key}/{k}", v, step)
        self.writer.flush()

    def close(self):
        self.writer.close()


class RunLog:
    """The metrics sinks of a run: metrics.jsonl in the run folder, an optional extra JSON-lines file
    (--log-json) and optional TensorBoard; write() sends a record to all of them."""

    def __init__(self, run_dir, extra_json=None, tensorboard=False, resume_step=None, marker=None):
        paths = [os.path.join(run_dir, "metrics.jsonl")]
        if extra_json and os.path.abspath(extra_json) != os.path.abspath(paths[0]):
            paths.append(extra_json)
        self.files = [MetricsFile(p, resume_step, marker) for p in paths]
        self.path = paths[0]
        self.tb = TensorBoard(run_dir, purge_step=resume_step) if tensorboard else None

    def write(self, rec, prefix="train"):
        for f in self.files:
            f.write(rec)
        if self.tb is not None:
            self.tb.write(rec, prefix)

    def close(self):
        if self.tb is not None:
            self.tb.close()
            self.tb = None
