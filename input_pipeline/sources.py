"""Random-access example sources from tensorflow-datasets, by name or from local files.

Both kinds are tfds builders prepared to array_record files and read through
`builder.as_data_source(split)`, which needs no TensorFlow. Preparing a public dataset
does need it for many builders (they read their downloads through tf.io.gfile): when it
is missing and the data is not prepared yet, the run stops before any work and names the
command that installs it.
"""

import contextlib
import fcntl
import importlib
import importlib.util
import io
import os
import time
from typing import Any, Callable, Dict, List, Mapping

import tensorflow_datasets as tfds
from absl import logging

import files
from input_pipeline.local_builders import DataError

INSTALL_TENSORFLOW = "pip install tensorflow-cpu"
# tfds registers some builders only once their package is imported (e.g. wmt14_translate).
_BUILDER_PACKAGES = ("tensorflow_datasets.translate", "tensorflow_datasets.text")


def default_data_dir(data_dir: str = "") -> str:
  """Where prepared tfds data lives: `data_dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  return os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR", "")
                            or "~/tensorflow_datasets")


def has_tensorflow() -> bool:
  return importlib.util.find_spec("tensorflow") is not None


def tfds_builder(name: str, data_dir: str = ""):
  """The tfds builder for `name` (e.g. "wmt14_translate/de-en"); DataError if unknown."""
  tfds.disable_progress_bar()
  try:
    return tfds.builder(name, data_dir=default_data_dir(data_dir), file_format="array_record")
  except tfds.core.registered.DatasetNotFoundError:
    pass
  for package in _BUILDER_PACKAGES:
    importlib.import_module(package)
  try:
    return tfds.builder(name, data_dir=default_data_dir(data_dir), file_format="array_record")
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DataError(f"config.data.dataset={name!r}: tensorflow-datasets has no such dataset; "
                    f"see https://www.tensorflow.org/datasets/catalog") from e


def prepare(builder, needs_tensorflow: bool = True) -> None:
  """Downloads and prepares `builder`'s data once (a no-op when already prepared).

  Runs that start together on one data directory (a sweep, two experiments) take turns
  through an flock on the dataset's directory (the parent of the version directory): one
  prepares, the others wait and then read what it prepared, instead of failing on tfds's
  rename into a directory that another process has just created. Locking the directory
  itself leaves no lock file behind, so a refused preparation writes no file.
  """
  if builder.is_prepared():
    _refresh_info(builder)
    return
  if needs_tensorflow and not has_tensorflow():  # before any directory is made
    raise DataError(
        f"the tensorflow-datasets dataset {builder.info.full_name} is not prepared in "
        f"{builder.data_dir} and preparing it needs TensorFlow: run `{INSTALL_TENSORFLOW}` "
        f"and start again (training itself never imports TensorFlow)")
  try:
    fd = os.open(lock_directory(builder), os.O_RDONLY)
  except OSError:  # an unwritable data directory: _prepare names it
    return _prepare(builder)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      logging.info("waiting for another process preparing %s in %s ...",
                   builder.info.full_name, builder.data_dir)
      fcntl.flock(fd, fcntl.LOCK_EX)
    if builder.is_prepared():  # another process prepared it while this one waited
      _refresh_info(builder)
      return
    _prepare(builder)
  finally:
    os.close(fd)  # releases the flock


def lock_directory(builder) -> str:
  """The directory whose flock serialises preparing `builder` (created if missing)."""
  path = os.path.dirname(builder.data_dir.rstrip(os.sep))
  os.makedirs(path, exist_ok=True)
  return path


def _refresh_info(builder) -> None:
  """Reads the split info of data that another process prepared after `builder` was made
  (a builder reads its info once, when made: with no data then, it has no splits)."""
  if not builder.info.splits:
    builder.info.read_from_directory(builder.data_dir)


def _prepare(builder) -> None:
  tfds.disable_progress_bar()  # logs, not progress bars, in training output
  # tfds prepares into an incomplete.* directory, renamed in when complete and removed
  # when preparing fails: a full or unwritable data directory leaves no partial data.
  # One tfds call with its progress bars off: announced and timed instead.
  logging.info("preparing the dataset %s in %s (once; later runs read it) ...",
               builder.info.full_name, builder.data_dir)
  start = time.perf_counter()
  with files.checked(builder.data_dir, "no partial preparation is left and data prepared "
                     "before is intact", advice="set config.data.tfds_data_dir to a "
                     "directory this user can write, on a disk with room"):
    # tfds prints "Downloading and preparing dataset Unknown size ..." and "... Subsequent
    # calls will reuse this data." to stdout (decode's output there); our two lines say it.
    with contextlib.redirect_stdout(io.StringIO()):
      builder.download_and_prepare(file_format="array_record")
  logging.info("prepared %s (%s) in %.1fs", builder.info.full_name,
               ", ".join(f"{name}: {split.num_examples} examples"
                         for name, split in builder.info.splits.items()),
               time.perf_counter() - start)


def open_splits(builder, splits, needs_tensorflow: bool = True) -> Dict[str, Any]:
  """`{split: random-access source}` for the named splits of `builder`.

  tfds.testing.mock_data serves `as_data_source` without prepared files, so the builder
  is only prepared when reading fails for lack of data.
  """
  # tfds raises KeyError ("splits is empty") before preparation, ValueError for a split
  # name the prepared data lacks.
  try:
    return {split: builder.as_data_source(split) for split in splits}
  except (KeyError, ValueError):
    if builder.is_prepared() and builder.info.splits:
      _check_splits(builder, splits)
      raise
  prepare(builder, needs_tensorflow)
  try:
    return {split: builder.as_data_source(split) for split in splits}
  except (KeyError, ValueError):
    _check_splits(builder, splits)
    raise


def _check_splits(builder, splits) -> None:
  """DataError listing the known splits when a split (slices aside) is not one of them."""
  known = sorted(builder.info.splits)
  missing = [s for s in splits if str(s).split("[")[0] not in known]
  if missing:
    raise DataError(f"dataset {builder.info.full_name} has no split {', '.join(missing)}; "
                    f"it has {', '.join(known)}") from None


def read_all(source, convert: Callable[[Any], Any], chunk: int = 1024) -> List[Any]:
  """`[convert(record) for record in source]` in order, reading `chunk` records a call.

  A split is read whole once per run (then tokenized once, in memory). tfds array_record
  sources read many records in one `__getitems__` call: about 5x faster than one record at
  a time through grain threads, which contend for the GIL (Multi30k's training split:
  1.3 s against 7 s on 2 cores). Sources without it, or whose `__getitems__` fails (that of
  tfds.testing.mock_data's sources raises TypeError), are read one record at a time.
  """
  many = getattr(source, "__getitems__", None)
  out = []
  for start in range(0, len(source), chunk):
    keys = list(range(start, min(start + chunk, len(source))))
    records = None
    if many is not None:
      try:
        records = many(keys)
      except (TypeError, NotImplementedError):
        many = None
    if records is None:
      records = [source[i] for i in keys]
    out += [convert(record) for record in records]
  return out


def as_text(value) -> str:
  """A tfds Text feature as str (array_record gives bytes; mock data gives str)."""
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def parse_mapping(spec: str, field: str) -> Mapping[str, str]:
  """"a=b,c=d" -> {"a": "b", "c": "d"}; DataError naming `field` when malformed."""
  out = {}
  for item in filter(None, (s.strip() for s in spec.split(","))):
    key, sep, value = item.partition("=")
    if not sep or not key.strip() or not value.strip():
      raise DataError(f"config.{field}={spec!r} is invalid: expected name=value pairs "
                      f"separated by commas")
    out[key.strip()] = value.strip()
  return out
