"""Language-model windows: one token stream cut into fixed-length rows.

Character-level models are trained on windows of a contiguous stream (the documents'
tokens one after another, each followed by EOS) rather than on padded documents:

    stream   t0 t1 t2 ... tN
    windows  [t0 .. tL-1] [tL .. t2L-1] ...        (length L = the model's context)

Evaluation cuts the stream from its start, the last window zero-padded, so every token is
scored exactly once (`cut_windows`). Training (`WindowBatches`) starts each epoch at a
different offset, so window boundaries move between epochs, and shuffles the windows (the
tokens before the offset form a shorter first window); each epoch drops the windows of its
last, partial batch, a different random few each time.
Batch k is a pure function of (stream, seed, k), so a resumed run reads the same batches.
"""

import sys
import threading
from typing import Dict, List

import numpy as np


def concatenate(documents: List[np.ndarray], eos_id: int) -> np.ndarray:
  """One int32 stream: each document's tokens followed by `eos_id`."""
  if not documents:
    return np.zeros(0, np.int32)
  eos = np.array([eos_id], np.int32)
  return np.concatenate([part for doc in documents for part in (np.asarray(doc, np.int32),
                                                                eos)])


def window_bounds(size: int, length: int, offset: int = 0) -> np.ndarray:
  """`[n, 2]` (start, end) of the windows covering `[0, size)`: a first window `[0, offset)`
  when offset > 0, then windows of `length` from `offset`, the last one possibly shorter."""
  starts = list(range(offset, size, length))
  if offset > 0:
    starts.insert(0, 0)
  ends = starts[1:] + [size]
  return np.array(list(zip(starts, ends)), np.int64).reshape(-1, 2)


def cut_windows(stream: np.ndarray, length: int) -> List[Dict[str, np.ndarray]]:
  """Examples `{"inputs": tokens}` of at most `length` tokens, covering `stream` in order,
  without overlap or gaps (evaluation)."""
  return [{"inputs": stream[s:e]} for s, e in window_bounds(len(stream), length)]


class WindowBatches:
  """Random access to training batch k of the endlessly repeated, shuffled windows.

  Epoch e cuts the stream at a random offset in [0, length) (seeded by (seed, e)),
  shuffles the windows and batches them, dropping the last partial batch. Every process
  computes the same windows and keeps its own rows of each batch. Use as a grain source.
  """

  def __init__(self, stream: np.ndarray, length: int, *, batch_size: int, num_devices: int,
               seed: int = 0, process_index: int = 0, process_count: int = 1):
    """batch_size: global rows per batch; split over processes, then local devices."""
    if batch_size % (process_count * num_devices):
      raise ValueError(f"batch size {batch_size} is not divisible by {process_count} "
                       f"processes x {num_devices} devices")
    if len(stream) < batch_size * length:
      raise ValueError(f"the training stream has {len(stream)} tokens, fewer than one batch "
                       f"of {batch_size} windows of {length}; lower batch_size or the context "
                       f"length, or give more text")
    self.stream = np.asarray(stream, np.int32)
    self.length, self.batch_size, self.num_devices = length, batch_size, num_devices
    self.seed = seed
    self.local_rows = batch_size // process_count
    self.first_row = process_index * self.local_rows
    # Each epoch has the same number of batches: windows differ by at most one in count.
    self.batches_per_epoch = (len(self.stream) // length) // batch_size
    self._cache: Dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return sys.maxsize  # endless

  def epoch_windows(self, epoch: int) -> np.ndarray:
    """`[windows, 2]` (start, end) in the shuffled order of `epoch`."""
    with self._lock:
      if epoch not in self._cache:
        rng = np.random.default_rng([self.seed, epoch])
        offset = int(rng.integers(self.length))
        bounds = window_bounds(len(self.stream), self.length, offset)
        self._cache[epoch] = bounds[rng.permutation(len(bounds))]
        for old in [e for e in self._cache if e < epoch - 1]:
          del self._cache[old]
      return self._cache[epoch]

  def __getitem__(self, index: int) -> Dict[str, np.ndarray]:
    epoch, batch = divmod(int(index), self.batches_per_epoch)
    first = batch * self.batch_size + self.first_row
    rows = np.zeros((self.local_rows, self.length), np.int32)
    for r, (start, end) in enumerate(self.epoch_windows(epoch)[first:first + self.local_rows]):
      rows[r, :end - start] = self.stream[start:end]
    return {"inputs": rows.reshape(self.num_devices, self.local_rows // self.num_devices,
                                   self.length)}
