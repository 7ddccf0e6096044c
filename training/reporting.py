"""Where metrics go: TensorBoard event files, a JSON-lines file, and the progress line."""

import json
import logging
import math
import os
import socket
import time
from typing import Callable, Dict, Mapping, Optional

import jax
import numpy as np
from absl import logging as absl_logging

import files
from training import events


class _QuietLibraries(logging.Filter):
  """Drops INFO/DEBUG records from orbax (dozens per save); warnings still pass, without
  tracebacks."""

  def filter(self, record: logging.LogRecord) -> bool:
    if "/orbax/" not in record.pathname:
      return True
    # A failed background save is reported once, as one line, by the CheckpointWriteError
    # it raises; orbax's own records keep their message but not their tracebacks.
    record.exc_info, record.exc_text = None, None
    if record.getMessage().startswith("Given directory is read only"):
      return False  # said of every read-only (eval, decode, ...) checkpoint reader
    return record.levelno >= logging.WARNING


def quiet_library_logs() -> None:
  """Keeps the progress lines readable; call once before training."""
  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, _QuietLibraries) for f in absl_logger.filters):
    absl_logger.addFilter(_QuietLibraries())


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Library warnings given on every run about nothing a user can change: tfds, before it
# has prepared local files, and when it builds a local files builder's config.
_ROUTINE_WARNINGS = ("Variant folder ", "Using custom data configuration")


_LIBRARY_DIRS = {"site-packages", "dist-packages"}


def _from_project(record: logging.LogRecord) -> bool:
  """Whether this project (or a script of the user's) logged `record` through absl, rather
  than a library (jax through its own loggers; tfds, orbax through absl from an installed
  package's directory)."""
  if record.name != "absl":
    return False
  path = os.path.abspath(record.pathname)
  relative = os.path.relpath(path, _ROOT).split(os.sep)
  if relative[0] != ".." and not _LIBRARY_DIRS & set(relative):
    return True  # this project's files (all of them where it is installed in site-packages)
  return not _LIBRARY_DIRS & set(path.split(os.sep))


class _LibraryNoise(logging.Filter):
  """Drops what libraries log below WARNING (jax probing for a TPU, tfds preparing data,
  orbax saving) and their routine warnings; their other warnings and errors pass."""

  def filter(self, record: logging.LogRecord) -> bool:
    if _from_project(record):
      return True
    return (record.levelno >= logging.WARNING
            and not record.getMessage().startswith(_ROUTINE_WARNINGS))


class PlainFormatter(logging.Formatter):
  """A log record as a person reads it: the message alone, a warning marked "warning: ",
  an error "ERROR: " (a line "error: ..." is main.py's last word on a failed run)."""

  def format(self, record: logging.LogRecord) -> str:
    text = super().format(record)
    if record.levelno >= logging.ERROR:
      return "ERROR: " + text
    return "warning: " + text if record.levelno >= logging.WARNING else text


def plain_logs() -> None:
  """main.py's output unless --verbose: absl's lines without their prefix ("I1204
  17:06:19.557893 139664382217088 train.py:616] "), warnings and errors marked, what
  libraries say for themselves left out, and the config as its differences from the
  defaults (`config_summary`). Without this call (--verbose, a Python caller) everything
  is logged as absl does."""
  absl_logging.use_absl_handler()  # app.run has; a Python caller may not have
  handler = absl_logging.get_absl_handler()
  handler.setFormatter(PlainFormatter())
  if not any(isinstance(f, _LibraryNoise) for f in handler.filters):
    handler.addFilter(_LibraryNoise())


def _plain() -> bool:
  return isinstance(absl_logging.get_absl_handler().python_handler.formatter, PlainFormatter)


def _leaves(config, prefix: str = ""):
  """(dotted name, value) of each field of a ConfigDict (or dict), in its order."""
  for key, value in config.items():
    if hasattr(value, "items"):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield prefix + key, value


def config_summary(config, defaults, defaults_name: str, saved_in: str) -> str:
  """The config as the log shows it: whole where lines keep absl's prefix (--verbose, a
  Python caller), else after `plain_logs` only its fields whose values differ from
  `defaults` (named `defaults_name`; the whole config is in the file `saved_in`)."""
  if not _plain():
    return f"config:\n{config}"
  default_values = dict(_leaves(defaults))
  changed = [f"  {name} = {value!r}" for name, value in _leaves(config)
             if name not in default_values or default_values[name] != value]
  where = f"the whole config is in {saved_in}; --verbose prints it"
  if not changed:
    return f"config: the defaults of {defaults_name} ({where})"
  return "\n".join([f"config, where it differs from {defaults_name} ({where}):"] + changed)


def _drop_partial_line(path: str) -> None:
  """A run killed while writing a line leaves it unfinished; the resumed run's records
  would be glued to it. Cut the file back to its last complete line."""
  if not os.path.exists(path):
    return
  with open(path, "rb+") as f:
    data = f.read()
    if data and not data.endswith(b"\n"):
      f.truncate(data.rfind(b"\n") + 1)


class _EventFile:
  """A TensorBoard event file (training/events.py encodes its records), written in the
  calling thread: a full disk is one WriteError at the write that met it, not a
  traceback from a background thread at a later flush. Each call appends whole TFRecords
  through `files.Appender`."""

  def __init__(self, directory: str, intact: str):
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
    self._file = files.Appender(os.path.join(directory, name), intact)
    self._file.append(events.record(events.event(time.time(), file_version="brain.Event:2")))

  def write(self, step: int, *summaries: bytes) -> None:
    now = time.time()
    self._file.append(b"".join(events.record(events.event(now, step, summary))
                               for summary in summaries))

  def close(self) -> None:
    self._file.close()


class MetricWriter:
  """Writes scalars to TensorBoard (`tensorboard --logdir <workdir>`) and metrics.jsonl.

  Each write is on the disk when it returns; one that fails (a full disk) raises
  WriteError, and the files keep their complete earlier records. Only process 0 writes;
  other processes get a writer that does nothing.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    if enabled:
      intact = "its earlier records are intact, and so are the checkpoints saved before"
      path = os.path.join(workdir, "metrics.jsonl")
      with files.checked(path, "its complete records are intact"):
        _drop_partial_line(path)
      self._jsonl = files.Appender(path, intact)
      self._tb = _EventFile(os.path.join(workdir, "tensorboard"), intact)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "time": time.time()}
    record.update({k: float(v) for k, v in scalars.items()})
    self._jsonl.append((json.dumps(record) + "\n").encode("utf-8"))
    self._tb.write(step, *(events.scalar(name, float(value))
                           for name, value in scalars.items()))

  def write_text(self, step: int, name: str, text: str) -> None:
    if self.enabled:
      self._tb.write(step, events.text(name, text))

  def write_image(self, step: int, name: str, image) -> None:
    """`image`: `[height, width, 3]` uint8 (e.g. a rendered confusion matrix)."""
    if self.enabled:
      self._tb.write(step, events.image(name, image))

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


def format_duration(seconds: float) -> str:
  """12345 -> '3h25m45s'; 75 -> '1m15s'; 4.2 -> '4s'."""
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m{secs:02d}s"
  if minutes:
    return f"{minutes}m{secs:02d}s"
  return f"{secs}s"


class Progress:
  """Throughput and ETA over each interval between log steps.

  Each interval is measured on its own, and what `exclude` is told of (evaluations, saves,
  the train step's compilations) is left out, so the rate and ETA are those of training.
  """

  def __init__(self, first_step: int, total_steps: int):
    self.total_steps = total_steps
    self._last_step = first_step
    self._last_time = time.perf_counter()

  def update(self, step: int, tokens: float) -> dict:
    """Call at a log step with the tokens processed since the last call."""
    now = time.perf_counter()
    elapsed = max(now - self._last_time, 1e-9)
    rate = (step - self._last_step) / elapsed
    self._last_step, self._last_time = step, now
    remaining = (self.total_steps - step) / rate if rate > 0 else float("inf")
    return {"steps_per_sec": rate, "tokens_per_sec": tokens / elapsed,
            "eta_seconds": remaining}

  def exclude(self, seconds: float) -> None:
    """Leaves `seconds` of work that is not training (evaluation, saves, compilation) out
    of the rate."""
    self._last_time += seconds


# A long phase (an evaluation, head importance, tokenizer training) logs its progress line
# at most this often; a phase shorter than this logs nothing.
PHASE_EVERY_SECONDS = 10.0


class PhaseProgress:
  """The progress line of a long phase that counts to a known total: "<what> 12/40  ETA
  1m05s" (the ETA from the rate so far), logged at most every `every` seconds; `finish()`
  adds "<what> 40/40 in 2m10s" when a line was logged, so a short phase stays silent.

      progress = PhaseProgress("final evaluation: batch", len(batches))
      for i, batch in enumerate(batches):
        ...
        progress.update(i + 1)
      progress.finish()
  """

  def __init__(self, what: str, total: Optional[int], every: Optional[float] = None,
               clock: Callable[[], float] = time.perf_counter,
               log: Optional[Callable[..., None]] = None):
    self.what, self.total = what, total
    self.every = PHASE_EVERY_SECONDS if every is None else every
    self._clock, self._log = clock, log or absl_logging.info
    self._start = self._last = clock()
    self.count, self.lines = 0, 0

  def update(self, count: int) -> None:
    """`count` items are done (at the total, `finish` says so)."""
    self.count = count
    now = self._clock()
    if now - self._last < self.every or (self.total and count >= self.total):
      return
    self._last, self.lines = now, self.lines + 1
    if self.total:
      rate = count / max(now - self._start, 1e-9)
      eta = (self.total - count) / rate if rate > 0 else float("inf")
      self._log("%s %d/%d  ETA %s", self.what, count, self.total, format_duration(eta))
    else:
      self._log("%s %d  (%s so far)", self.what, count,
                format_duration(now - self._start))

  def finish(self) -> float:
    """The phase's seconds; logged when a progress line was."""
    elapsed = self._clock() - self._start
    if self.lines:
      self._log("%s %d%s in %s", self.what, self.count,
                f"/{self.total}" if self.total else "", format_duration(elapsed))
    return elapsed


def parameter_table(params, depth: int = 2) -> str:
  """Parameter counts grouped by the first `depth` levels of module names."""
  counts: Dict[str, int] = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    names = [str(getattr(k, "key", k)) for k in path]
    key = "/".join(names[:depth])
    counts[key] = counts.get(key, 0) + int(np.prod(leaf.shape))
  width = max(len(k) for k in counts)
  lines = [f"{'module':<{width}}  {'parameters':>12}"]
  lines += [f"{k:<{width}}  {v:>12,}" for k, v in counts.items()]
  lines.append(f"{'total':<{width}}  {sum(counts.values()):>12,}")
  return "\n".join(lines)


def count_parameters(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
