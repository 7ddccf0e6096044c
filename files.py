"""One way to write a file: whole or not at all.

The data goes to a temporary file in the same directory, is flushed to the disk (fsync),
then renamed over the target: a reader, or a run killed at any moment, sees the old file or
the complete new one, never a part. Every file the project writes beside its checkpoints
(config.json, tokenizers, labels, reports, images) goes through `write_atomically`.
"""

import os
import tempfile
from typing import Union

from errors import WriteError


def write_atomically(path: str, data: Union[str, bytes]) -> str:
  """Writes `data` (str as UTF-8, or bytes) to `path` and returns `path`; a directory that
  cannot be created or written is a WriteError (a user error) that names it."""
  directory = os.path.dirname(os.path.abspath(path))
  payload = data.encode("utf-8") if isinstance(data, str) else data
  tmp = None
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
  except OSError as e:
    raise WriteError(f"cannot write {path} ({e.strerror or e}); give a directory this user "
                     f"can create and write, on a disk with room") from e
  finally:
    if tmp is not None and os.path.exists(tmp):
      os.remove(tmp)
  return path
