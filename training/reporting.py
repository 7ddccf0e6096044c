"""Where metrics go: TensorBoard event files, a JSON-lines file, and the progress line."""

import json
import logging
import math
import os
import socket
import struct
import time
from typing import Dict, Mapping

import jax
import numpy as np
from tensorboardX import summary as tb_summary
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

import files


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
  """A TensorBoard event file, written in the calling thread. (tensorboardX's SummaryWriter
  writes from a background thread: a full disk there came out as tracebacks, at a later
  flush and again at exit.) Each call appends whole TFRecords through `files.Appender`."""

  def __init__(self, directory: str, intact: str):
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
    self._file = files.Appender(os.path.join(directory, name), intact)
    self._append([event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")])

  def write(self, step: int, *summaries) -> None:
    self._append([event_pb2.Event(summary=s, step=int(step), wall_time=time.time())
                  for s in summaries])

  def _append(self, events) -> None:
    records = []
    for event in events:  # TFRecord framing: length, its CRC, the data, its CRC
      data = event.SerializeToString()
      header = struct.pack("<Q", len(data))
      records += [header, struct.pack("<I", masked_crc32c(header)), data,
                  struct.pack("<I", masked_crc32c(data))]
    self._file.append(b"".join(records))

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
    self._tb.write(step, *(tb_summary.scalar(name, float(value))
                           for name, value in scalars.items()))

  def write_text(self, step: int, name: str, text: str) -> None:
    if self.enabled:
      self._tb.write(step, tb_summary.text(name, text))

  def write_image(self, step: int, name: str, image) -> None:
    """`image`: `[height, width, 3]` uint8 (e.g. a rendered confusion matrix)."""
    if self.enabled:
      self._tb.write(step, tb_summary.image(name, image, dataformats="HWC"))

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

  Each interval is measured on its own, so the compilation in the first interval slows
  only that interval's rate and ETA; the first report is flagged `includes_compile`.
  """

  def __init__(self, first_step: int, total_steps: int):
    self.total_steps = total_steps
    self._last_step = first_step
    self._last_time = time.perf_counter()
    self._first = True

  def update(self, step: int, tokens: float) -> dict:
    """Call at a log step with the tokens processed since the last call."""
    now = time.perf_counter()
    elapsed = max(now - self._last_time, 1e-9)
    rate = (step - self._last_step) / elapsed
    includes_compile, self._first = self._first, False
    self._last_step, self._last_time = step, now
    remaining = (self.total_steps - step) / rate if rate > 0 else float("inf")
    return {"steps_per_sec": rate, "tokens_per_sec": tokens / elapsed,
            "eta_seconds": remaining, "includes_compile": includes_compile}

  def exclude(self, seconds: float) -> None:
    """Leaves `seconds` of work that is not training (evaluation, saves) out of the rate."""
    self._last_time += seconds


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
