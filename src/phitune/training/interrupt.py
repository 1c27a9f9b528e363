"""Ctrl-C (SIGINT) and SIGTERM (job schedulers, ``docker stop``) during training: stop at a step boundary, save.

While the training loop runs, :class:`StopOnSignal` replaces the two signals' handlers:

- the first signal only records itself; the loop finishes the optimizer step in progress (all its micro-batches,
  so the saved state is exactly the uninterrupted run's after that step), writes a checkpoint through the usual
  atomic protocol (phitune.training.checkpoint) and raises :class:`Interrupted`; the CLI prints the resume command and
  exits
  128 + the signal number (130 for SIGINT, 143 for SIGTERM);
- a second signal stops at once (no new checkpoint; the previous ones are intact), except while a checkpoint or
  the final run folder is being written (:meth:`StopOnSignal.saving`): then it waits until that save is complete.

Under torchrun every process checks at each step boundary whether any of them got a signal (one tiny all-reduce),
so all stop after the same step. Outside the loop (loading, data preparation) the default handlers stay.
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Training stopped on a signal; ``exit_code`` is 128 + the signal number, ``checkpoint`` what was saved."""

    def __init__(self, signum: int, message: str, checkpoint=None, output_dir=None):
        super().__init__(message)
        self.signum, self.message = signum, message
        self.exit_code = 128 + signum
        self.checkpoint, self.output_dir = checkpoint, output_dir

    def __str__(self) -> str:
        return self.message


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopOnSignal:
    """Context manager recording SIGINT/SIGTERM for the training loop (see the module docstring)."""

    def __init__(self, say=None):
        self.signum: int | None = None
        self._saving = 0
        self._pending: int | None = None
        self._previous: dict = {}
        self._say = say or (lambda text: print(f"\nphitune: {text}", file=sys.stderr, flush=True))

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            self._say(f"{signal_name(signum)} received: finishing the current step, then saving a checkpoint "
                      "(send it again to stop at once without that checkpoint)")
            return
        if self._saving:
            self._pending = signum
            self._say(f"{signal_name(signum)} again: stopping as soon as the save in progress is complete")
            return
        raise Interrupted(signum, f"stopped by {signal_name(signum)} (a second signal) before the step's checkpoint "
                                  "was written; the previous checkpoints are intact")

    @contextmanager
    def saving(self):
        """A save that a second signal must not cut short: the signal is honoured once the block has finished."""
        self._saving += 1
        try:
            yield
        finally:
            self._saving -= 1
        if not self._saving and self._pending is not None:
            signum, self._pending = self._pending, None
            raise Interrupted(signum, f"stopped by {signal_name(signum)} after the save in progress completed")
