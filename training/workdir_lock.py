"""One trainer per workdir: an exclusive lock held for the training run's lifetime.

The lock is `flock(2)` on `<workdir>/train.lock`, taken without waiting. The kernel drops
it when the holding process ends in any way (exit, crash, SIGKILL), so no stale lock is
ever left behind and nothing has to be cleaned up by hand; the file itself stays (removing
it would let a new trainer lock a new file while an old one still holds the removed one).
While locked, the file names its holder (process id, host, start time), which is what a
second trainer is told. Read-only modes (eval, decode, ...) take no lock: they only read
finished checkpoints, so they run beside a live trainer. With several processes only
process 0 locks. On Linux NFS, flock is carried out as an NFS byte-range lock, so it
also guards a workdir shared between hosts.
"""

import datetime
import fcntl
import json
import os
import socket
import sys
from typing import Optional

import files
from errors import UserError

LOCK_FILE = "train.lock"


class WorkdirBusyError(UserError):
  """Another training run holds the workdir."""


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds the workdir's lock, creating the workdir (and the
  lock file) if needed; raises WorkdirBusyError at once if another process holds it."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd: Optional[int] = None
    self.created_file = False  # this run made the lock file (a failed start removes it)

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  def acquire(self) -> None:
    with files.checked(self.path, "nothing was written there",
                       "give a --workdir this user can create and write"):
      os.makedirs(self.workdir, exist_ok=True)
      self.created_file = not os.path.exists(self.path)
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      self.created_file = False
      raise WorkdirBusyError(
          f"--workdir={self.workdir} is in use by another training run "
          f"({_holder(self.path)}); wait for it to end or stop it, or train in another "
          f"--workdir (eval, decode and the other read-only modes may run beside it)") from e
    self._fd = fd
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join(sys.argv)}
    try:  # the holder's name, for the message above; the lock itself is the flock
      os.ftruncate(fd, 0)
      os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    except OSError:
      pass  # a full disk: the lock holds all the same, unnamed

  def release(self, remove: bool = False) -> None:
    """Drops the lock; `remove` also deletes the lock file (a start that failed before
    writing anything else leaves the workdir as it found it)."""
    if self._fd is None:
      return
    if remove:
      try:
        os.remove(self.path)
      except OSError:
        pass
    os.close(self._fd)  # closing the descriptor releases the flock
    self._fd = None


def _holder(path: str) -> str:
  """'process 1234 on host h, started 2026-12-04T20:31:05', from the lock file."""
  try:
    with open(path, encoding="utf-8") as f:
      record = json.loads(f.read() or "{}")
    return (f"process {record['pid']} on host {record['host']}, started "
            f"{record['started']}")
  except (OSError, ValueError, KeyError, TypeError):
    return "a process that is still starting"
