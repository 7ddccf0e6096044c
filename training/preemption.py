"""Stopping on SIGTERM, SIGINT or SIGHUP without losing work.

Schedulers (SLURM, Kubernetes, preemptible cloud VMs) send SIGTERM some seconds before they
kill a job; Ctrl-C sends SIGINT; a closed terminal or SSH session sends SIGHUP. All three
mean the same: stop soon, keep what is done.

One `StopRequest` is active at a time (main.py opens one for the whole run; the training
loop nests its own around the steps), and every long phase consults it:

- During the training steps a signal only sets the flag: the loop finishes the step in
  flight, writes a checkpoint, waits until it is on disk and raises `Preempted` (exit
  status EXIT_PREEMPTED). Phases inside the loop that may take long check the flag often
  (`check`): a periodic evaluation stops between two batches, and waiting for a training
  batch is `interrupting` (the wait ends at once); the loop then saves the current step.
- Everywhere else (`StopRequest(interrupt=True)`: preparing data, training a tokenizer,
  building the first batch, compiling, evaluation, decoding, generation) there is nothing
  to save, so the signal stops the work at once: the handler raises `Stopped` as soon as
  Python code runs again (a computation already running on a device finishes first).

A second signal exits at once with status 128 + signal number: a checkpoint being written,
if any, stays in orbax's temporary directory and is never taken for a finished one, so the
earlier checkpoints remain the newest readable ones.
"""

import contextlib
import os
import signal
import sys
import threading
from typing import List, Optional

# Stopped by a signal with nothing lost: after the checkpoint of the last step was written,
# or before anything needed saving. Run the same command to resume (or start again).
EXIT_PREEMPTED = 4
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Preempted(Exception):
  """Training stopped on a signal after its checkpoint was written."""

  def __init__(self, step: int, signum: int, directory: str):
    self.step, self.signum, self.directory = step, signum, directory
    super().__init__(
        f"stopped by {signal.Signals(signum).name} after step {step}; its checkpoint is "
        f"complete in {directory}. Run the same command to resume")


class Stopped(BaseException):
  """A signal stopped work that had nothing to save (data preparation, the first batch,
  an evaluation, decoding). A BaseException, as KeyboardInterrupt is: an `except
  Exception` on the way (one that turns errors into user errors) lets it through."""

  def __init__(self, signum: int, doing: str):
    self.signum, self.doing = signum, doing
    super().__init__(
        f"stopped by {signal.Signals(signum).name} while {doing}; nothing needed saving "
        f"(every checkpoint on disk is complete). Run the same command to start again")


_ACTIVE: List["StopRequest"] = []  # the StopRequests entered and not yet left, innermost last


def current() -> Optional["StopRequest"]:
  """The innermost active StopRequest, or None (no signal is caught)."""
  return _ACTIVE[-1] if _ACTIVE else None


def check(doing: Optional[str] = None) -> None:
  """Raises `Stopped` when a stop signal has arrived: called between the units of work of
  every long phase (batches of an evaluation, of decoding, of generation)."""
  stop = current()
  if stop is not None and stop.signum is not None:
    raise Stopped(stop.signum, doing or stop.doing)


class StopRequest:
  """Catches SIGTERM, SIGINT and SIGHUP while active (a context manager); `signum` is the
  first signal received, or None. With `interrupt`, the handler also raises `Stopped`
  (`doing` names the work in its message); without, it only sets the flag, except inside
  `interrupting()`. Signal handlers can only be installed from the main thread; elsewhere
  (a training loop run in a worker thread) it catches nothing."""

  def __init__(self, interrupt: bool = False, doing: str = "preparing the run"):
    self.signum: Optional[int] = None
    self.doing = doing
    self._interrupt = interrupt
    self._previous = {}

  def __enter__(self) -> "StopRequest":
    outer = current()  # one flag: a nested request starts with (and hands back) the outer's
    if outer is not None and self.signum is None:
      self.signum = outer.signum
    if threading.current_thread() is threading.main_thread():
      for sig in SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    _ACTIVE.append(self)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}
    _ACTIVE.remove(self)
    outer = current()
    if outer is not None and outer.signum is None:
      outer.signum = self.signum

  @contextlib.contextmanager
  def interrupting(self, doing: str):
    """Within: a signal (or one received before) raises `Stopped` at once, e.g. while the
    training loop waits for a batch: nothing is lost by leaving that wait."""
    check(doing)
    saved = self._interrupt, self.doing
    self._interrupt, self.doing = True, doing
    try:
      yield
    finally:
      self._interrupt, self.doing = saved

  def _handle(self, signum, frame) -> None:
    del frame
    if self.signum is not None:
      # The second signal: out now. os._exit skips the interpreter's cleanup, which could
      # block on the background checkpoint write this signal asks us not to wait for.
      os._exit(128 + signum)
    self.signum = signum
    _say(f"{signal.Signals(signum).name} received: " + (
        "stopping now" if self._interrupt else
        "finishing the step (or evaluation batch) in flight and writing a checkpoint")
         + " (send it again to exit at once)")
    if self._interrupt:
      raise Stopped(signum, self.doing)

  @property
  def requested(self) -> bool:
    return self.signum is not None


def _say(message: str) -> None:
  """`message` on stderr; after SIGHUP the terminal may be gone (the write fails)."""
  try:
    print(message, file=sys.stderr, flush=True)
  except (OSError, ValueError):
    pass
