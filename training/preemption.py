"""Stopping on SIGTERM or SIGINT without losing work.

Schedulers (SLURM, Kubernetes, preemptible cloud VMs) send SIGTERM some seconds before they
kill a job; Ctrl-C sends SIGINT. The first signal only sets a flag: the training loop
finishes the step in flight, writes a checkpoint, waits until it is on disk and stops
(main.py then exits with status EXIT_PREEMPTED). A second signal exits at once with
status 128 + signal number: the checkpoint being written, if any, stays in orbax's
temporary directory and is never taken for a finished one, so the earlier checkpoints
remain the newest readable ones.
"""

import os
import signal
import sys
import threading
from typing import Optional

EXIT_PREEMPTED = 4  # stopped by a signal after saving a checkpoint; rerun to resume
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
  """Training stopped on a signal after its checkpoint was written."""

  def __init__(self, step: int, signum: int, directory: str):
    self.step, self.signum, self.directory = step, signum, directory
    super().__init__(
        f"stopped by {signal.Signals(signum).name} after step {step}; its checkpoint is "
        f"complete in {directory}. Run the same command to resume")


class StopRequest:
  """Catches SIGTERM and SIGINT while active (a context manager); `signum` is the first
  signal received, or None. Signal handlers can only be installed from the main thread;
  elsewhere (a training loop run in a worker thread) it catches nothing."""

  def __init__(self):
    self.signum: Optional[int] = None
    self._previous = {}

  def __enter__(self) -> "StopRequest":
    if threading.current_thread() is threading.main_thread():
      for sig in SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def _handle(self, signum, frame) -> None:
    del frame
    if self.signum is not None:
      # The second signal: out now. os._exit skips the interpreter's cleanup, which could
      # block on the background checkpoint write this signal asks us not to wait for.
      os._exit(128 + signum)
    self.signum = signum
    print(f"{signal.Signals(signum).name} received: finishing this step and writing a "
          f"checkpoint (send it again to exit at once)", file=sys.stderr, flush=True)

  @property
  def requested(self) -> bool:
    return self.signum is not None
