"""Ctrl-C (SIGINT) and SIGTERM during training: finish the step, save, say where, exit 128 + signal.

    with StopSignals() as stop:
        ...                      # before arm(): a signal raises Interrupted at once (nothing to save)
        stop.arm()
        while not stop.signum:   # armed: the first signal only sets stop.signum
            train_step()
        save(); print(stop.message(path))

A second signal while the first is being handled raises Interrupted at once (the checkpoint writes
are atomic, so that never leaves a half-written file under a final name). Outside the main thread
(where Python cannot install handlers) signals keep their default behaviour.
"""

import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A stop signal that could not wait for the end of the step."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self):
        return 128 + self.signum


class StopSignals:
    def __init__(self):
        self.signum = None
        self.armed = False
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}
        return False

    def arm(self):
        self.armed = True

    def _handle(self, signum, frame):
        if not self.armed or self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum

    @property
    def name(self):
        return signal.Signals(self.signum).name if self.signum else None

    @property
    def exit_code(self):
        return 128 + self.signum if self.signum else 0


def exit_status(command, run, args, errors):
    """run(args)'s "exit_code"; 2 with one message for the error classes `errors` (bad input); 128 +
    the signal's number for a signal that came outside the training loop (nothing to save then)."""
    import sys

    try:
        return run(args)["exit_code"]
    except errors as e:
        print(f"fastbert {command}: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"fastbert {command}: {e} outside training (before it started, or after the last save): "
              f"stopped", file=sys.stderr)
        return e.exit_code
