"""One way to write a file, and one answer when a write fails.

`write_atomically` writes a whole file: the data goes to a temporary file in the same
directory, is flushed to the disk (fsync), then renamed over the target, so a reader, or a
run killed at any moment, sees the old file or the complete new one, never a part.
`Appender` adds whole records to a growing file (metrics.jsonl, TensorBoard events): a
record that cannot be written is cut off again, so the file keeps only complete ones.
`check_writable` tries a directory before any compute needs it.

Every file the project writes beside its checkpoints (whose saves training/checkpointing.py
answers for) goes through these, and third-party writers (tfds preparing data, the jax
profiler) run inside `checked`: it is the one place where an OSError of a write (a full or
read-only disk, a path through a file) becomes a `WriteError` that names the path, the
cause and what is intact, which main.py prints as one line.
"""

import contextlib
import errno
import os
import tempfile
from typing import Optional, Union

from errors import UserError, WriteError

ADVICE = "make room on that disk or give a directory this user can write"
# The causes that C++ writers (array_record under tfds, the jax profiler) report in a
# RuntimeError's text.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES,
                 errno.EPERM, errno.ENOTDIR, errno.EIO)


@contextlib.contextmanager
def checked(path: str, intact: str, advice: str = ADVICE):
  """Runs the body; an OSError it raises (or a RuntimeError whose text reports an OS write
  error) becomes WriteError('cannot write PATH (CAUSE); INTACT; ADVICE')."""
  try:
    yield
  except UserError:
    raise
  except OSError as e:
    raise WriteError(f"cannot write {path} ({_cause(e)}); {intact}; {advice}") from e
  except RuntimeError as e:
    cause = next((os.strerror(n) for n in _WRITE_ERRNOS
                  if os.strerror(n).lower() in str(e).lower()), None)
    if cause is None:
      raise
    raise WriteError(f"cannot write {path} ({cause}); {intact}; {advice}") from e


def _cause(error: OSError) -> str:
  """'No space left on device', or for a path through a file, which file that is."""
  cause = error.strerror or str(error)
  if error.errno in (errno.ENOTDIR, errno.EEXIST) and error.filename:
    existing = os.path.abspath(error.filename)  # the deepest part of the path that exists
    while not os.path.lexists(existing) and existing != os.path.dirname(existing):
      existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
      return f"Not a directory: {existing} is a file"
  return cause


def write_atomically(path: str, data: Union[str, bytes]) -> str:
  """Writes `data` (str as UTF-8, or bytes) to `path` and returns `path`; WriteError when
  it cannot (the earlier file, if any, is then unchanged and no temporary file is left)."""
  directory = os.path.dirname(os.path.abspath(path))
  payload = data.encode("utf-8") if isinstance(data, str) else data
  intact = ("the earlier file there is unchanged" if os.path.isfile(path)
            else "no part of it was written")
  tmp = None
  with checked(path, intact):
    try:
      os.makedirs(directory, exist_ok=True)
      fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".",
                                 suffix=".tmp")
      with os.fdopen(fd, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, path)
      tmp = None
    finally:
      if tmp is not None and os.path.exists(tmp):
        os.remove(tmp)
  return path


def check_writable(directory: str) -> str:
  """Creates `directory` if needed and writes and removes a small file in it, so that an
  unwritable place or a full disk stops a run before its compute; returns `directory`."""
  with checked(directory, "nothing has been written there yet"):
    os.makedirs(directory, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-check.", suffix=".tmp")
    try:
      os.write(fd, b"\n")
      os.fsync(fd)
    finally:
      os.close(fd)
      os.remove(probe)
  return directory


class Appender:
  """A file that grows by whole records (each `append` is on the disk, fsynced, when it
  returns); a record that cannot be written is cut off again, and WriteError says so."""

  def __init__(self, path: str, intact: str = "its earlier records are intact"):
    self.path, self.intact = path, intact
    self._fd: Optional[int] = None
    with checked(path, "nothing has been written to it"):
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

  def append(self, data: bytes) -> None:
    with checked(self.path, self.intact):
      size = os.fstat(self._fd).st_size
      try:
        view = memoryview(data)
        while view:
          view = view[os.write(self._fd, view):]
        os.fsync(self._fd)
      except OSError:
        with contextlib.suppress(OSError):  # cutting back needs no space
          os.ftruncate(self._fd, size)
        raise

  def close(self) -> None:
    if self._fd is not None:
      fd, self._fd = self._fd, None
      os.close(fd)
