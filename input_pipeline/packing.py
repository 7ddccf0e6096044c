"""Sequence packing: several short examples share one row of a training batch.

Each epoch, the examples are shuffled and placed first-fit into rows of fixed lengths (all
fields of an example go into the same row); a row carries, per field `f`,

    f                   the examples' tokens one after another, then padding (0)
    f_segmentation      1, 2, 3, ... for the row's first, second, third example; 0 = padding
    f_position          0, 1, 2, ... restarting at every example

so the model's masks keep the examples apart (see models/transformer.py). Batch k of the
endless packed stream is a pure function of (examples, seed, k): a resumed run reads the
very batches the uninterrupted run would have read.
"""

import sys
import threading
from typing import Dict, List, Mapping, Sequence

import numpy as np

Example = Mapping[str, np.ndarray]


def pack_rows(lengths: Mapping[str, np.ndarray], order: np.ndarray,
              row_lengths: Mapping[str, int], open_rows: int = 8) -> List[List[int]]:
  """Groups example indices into rows, first-fit over the `open_rows` newest rows.

  Args:
    lengths: per field, the token count of every example.
    order: the example indices in the order to place them.
    row_lengths: per field, the row length; every example must fit an empty row.
    open_rows: how many not-yet-full rows an example may go into (more packs tighter).

  Returns:
    rows, each a list of example indices, in the order the rows were opened.
  """
  fields = list(row_lengths)
  rows: List[List[int]] = []
  free: List[List[int]] = []  # per row: free slots per field
  first_open = 0  # rows before this one are closed
  sizes = list(zip(*[np.asarray(lengths[f]).tolist() for f in fields]))
  for index in np.asarray(order).tolist():
    size = sizes[index]
    for r in range(first_open, len(rows)):
      if all(s <= f for s, f in zip(size, free[r])):
        rows[r].append(index)
        free[r] = [f - s for s, f in zip(size, free[r])]
        break
    else:
      rows.append([index])
      free.append([row_lengths[f] - s for f, s in zip(fields, size)])
      first_open = max(first_open, len(rows) - open_rows)
  return rows


def pack_row(examples: Sequence[Example], row_lengths: Mapping[str, int]) -> Dict[str, np.ndarray]:
  """One packed row (with segmentation and positions) from the examples that fill it."""
  out = {}
  for field, length in row_lengths.items():
    tokens = np.zeros(length, np.int32)
    segmentation = np.zeros(length, np.int32)
    position = np.zeros(length, np.int32)
    offset = 0
    for segment, example in enumerate(examples, 1):
      values = np.asarray(example[field], np.int32)
      end = offset + len(values)
      tokens[offset:end] = values
      segmentation[offset:end] = segment
      position[offset:end] = np.arange(len(values))
      offset = end
    out[field] = tokens
    out[f"{field}_segmentation"] = segmentation
    out[f"{field}_position"] = position
  return out


class PackedBatches:
  """Random access to batch k of the shuffled, packed, endlessly repeated examples.

  Every process computes the same global packing (it is cheap: token counts only) and
  keeps its own slice of each batch's rows, so all processes agree on the batch count.
  Use as a grain source: `grain.MapDataset.source(PackedBatches(...))`.
  """

  def __init__(self, examples: Sequence[Example], row_lengths: Mapping[str, int], *,
               batch_size: int, num_devices: int, seed: int = 0, process_index: int = 0,
               process_count: int = 1, open_rows: int = 8):
    """batch_size: global rows per batch; split over processes, then local devices."""
    if batch_size % (process_count * num_devices):
      raise ValueError(f"batch size {batch_size} is not divisible by {process_count} "
                       f"processes x {num_devices} devices")
    if not examples:
      raise ValueError("no examples to pack")
    self.examples = examples
    self.row_lengths = dict(row_lengths)
    self.batch_size, self.num_devices, self.seed = batch_size, num_devices, seed
    self.local_rows = batch_size // process_count
    self.first_row = process_index * self.local_rows
    self.open_rows = open_rows
    self.lengths = {f: np.array([len(e[f]) for e in examples]) for f in self.row_lengths}
    for field, length in self.row_lengths.items():
      longest = int(self.lengths[field].max())
      if longest > length:
        raise ValueError(f"an example's {field!r} has {longest} tokens, more than the row "
                         f"length {length}; filter the examples first")
    self._epoch_batches: List[int] = []  # batches in each epoch computed so far
    self._rows: Dict[int, List[List[int]]] = {}  # the latest epochs' rows
    self._lock = threading.Lock()  # grain reads batches from several threads

  def __len__(self) -> int:
    return sys.maxsize  # endless; epochs differ in their shuffle

  def epoch_rows(self, epoch: int) -> List[List[int]]:
    """The packed rows of one epoch (a fresh shuffle per epoch)."""
    with self._lock:
      if epoch not in self._rows:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
        self._rows[epoch] = pack_rows(self.lengths, order, self.row_lengths, self.open_rows)
        for old in [e for e in self._rows if e < epoch - 1]:
          del self._rows[old]  # threads read at most two neighbouring epochs
      return self._rows[epoch]

  def _locate(self, index: int):
    """(epoch, first row of the batch within the epoch) of global batch `index`."""
    epoch, start = 0, 0
    while True:
      if epoch == len(self._epoch_batches):
        rows = len(self.epoch_rows(epoch))
        with self._lock:
          if epoch == len(self._epoch_batches):
            self._epoch_batches.append(-(-rows // self.batch_size))
      count = self._epoch_batches[epoch]
      if index < start + count:
        return epoch, (index - start) * self.batch_size
      start += count
      epoch += 1

  def __getitem__(self, index: int) -> Dict[str, np.ndarray]:
    epoch, first = self._locate(int(index))
    rows = self.epoch_rows(epoch)[first:first + self.batch_size]
    # An epoch's last batch may have fewer rows; the missing rows are all padding.
    rows = rows[self.first_row:self.first_row + self.local_rows]
    packed = [pack_row([self.examples[i] for i in row], self.row_lengths) for row in rows]
    empty = pack_row([], self.row_lengths)
    packed += [empty] * (self.local_rows - len(packed))
    per_device = self.local_rows // self.num_devices
    return {k: np.stack([p[k] for p in packed]).reshape(self.num_devices, per_device, -1)
            for k in packed[0]}

  def packing_efficiency(self, epoch: int = 0) -> Dict[str, float]:
    """Per field, the share of row slots that hold real tokens in an epoch."""
    rows = len(self.epoch_rows(epoch))
    return {f: float(self.lengths[f].sum()) / (rows * n) for f, n in self.row_lengths.items()}
