"""Option checks shared by `fastbert pretrain` and `fastbert finetune`: argparse types that refuse
zero, negative or non-finite numbers at parse time (argparse then exits with status 2 and names the
option), and the --device check."""

import argparse
import math
import re

import torch


def _number(kind, text):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _checked(kind, ok, words):
    """An argparse type: `kind` (int or float) parsed, then refused unless ok(value), with `words`."""
    def parse(text):
        value = _number(kind, text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{words}, got {text}")
        return value
    return parse


positive_int = _checked(int, lambda v: v > 0, "must be a positive whole number")
nonnegative_int = _checked(int, lambda v: v >= 0, "must be 0 or more")
positive_float = _checked(float, lambda v: v > 0, "must be a positive number")
nonnegative_float = _checked(float, lambda v: v >= 0, "must be 0 or more")
probability = _checked(float, lambda v: 0 <= v < 1, "must be in [0, 1)")  # dropout-like fractions


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def resolve_device(text, error=ValueError):
    """torch.device for --device auto|cpu|cuda|cuda:N; `error` (an exception class) names what is wrong:
    an unknown name, or CUDA asked for where there is none or not that many."""
    if not _DEVICE.match(text or ""):
        raise error(f"--device {text!r} is not a device; expected auto, cpu, cuda or cuda:N")
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(text)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise error(f"--device {text} but no CUDA device is available (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise error(f"--device {text} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


# a model this narrow gains little from a second CPU thread and loses much when the cores are shared:
# the demo's tiny model (hidden 128) ran 60 steps in 7 s on one thread and 8 s on two on an idle 2-core
# VM, and in 10 s against 91 s while another process kept one core busy
SINGLE_THREAD_HIDDEN = 128


def cpu_threads(requested, device, hidden):
    """Set torch's CPU threads: --threads when given, else 1 for a model of hidden <= 128 on the CPU
    (else torch's default). Returns the count in use."""
    if requested:
        torch.set_num_threads(requested)
    elif device.type == "cpu" and hidden <= SINGLE_THREAD_HIDDEN:
        torch.set_num_threads(1)
    return torch.get_num_threads()
