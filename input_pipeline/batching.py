"""From a random-access source to device-shaped numpy batches, with grain.

    source -> shuffle -> (repeat) -> this process's rows of each global batch -> pad
           -> batch -> reshape to [local_devices, per_device_batch, ...] -> prefetching iterator

Every step is a grain `MapDataset` transformation, so the batch at step k is a pure
function of (source, seed, k): a run resumed at step k reads exactly the batches the
uninterrupted run would have read, without replaying the first k. With several processes,
process p reads rows [p * b, (p + 1) * b) of the global batch a single process would read
(b = global batch / processes), so the global batch does not depend on the process count.
"""

import functools
from typing import Dict, Iterator, Mapping, Optional

import grain
import numpy as np

from errors import UserError

Batch = Dict[str, np.ndarray]


class ExampleTooLongError(UserError, ValueError):
  """An example does not fit the padded length configured for its field."""


def pad_example(example: Mapping[str, np.ndarray], lengths: Mapping[str, int]) -> Batch:
  """Pads each sequence field to its length with 0; scalar fields pass through.

  Raises ExampleTooLongError instead of truncating silently.
  """
  out = {}
  for key, value in example.items():
    value = np.asarray(value, np.int32)
    if key in lengths:
      _check_fits(key, value.shape[0], lengths[key])
      value = np.pad(value, (0, lengths[key] - value.shape[0]))
    out[key] = value
  return out


def _check_fits(key: str, size: int, length: int) -> None:
  if size > length:
    raise ExampleTooLongError(
        f"an example's {key!r} has {size} tokens, more than the padded length {length}; "
        f"raise the config's max length for {key!r} or filter the data")


def _pad_and_stack(examples, lengths: Mapping[str, int], batch_size: int,
                   num_devices: int) -> Batch:
  """`pad_example` on each example, stacked into `[num_devices, batch_size // num_devices,
  ...]` int32 arrays.

  Each example is copied once into a preallocated zero array, not padded on its own first:
  this runs once per training example per epoch, in Python (it halves the time of a padded
  SST-2 batch). A short final batch (evaluation) is filled with all-zero examples: token 0
  is padding, so they carry no weight in any metric.
  """
  out = {}
  for key in examples[0]:
    if key in lengths:
      stacked = np.zeros((batch_size, lengths[key]), np.int32)
      for row, example in enumerate(examples):
        value = np.asarray(example[key], np.int32)
        _check_fits(key, value.shape[0], lengths[key])
        stacked[row, :value.shape[0]] = value
    else:
      values = np.stack([np.asarray(e[key], np.int32) for e in examples])
      stacked = np.zeros((batch_size,) + values.shape[1:], np.int32)
      stacked[:len(examples)] = values
    out[key] = stacked.reshape((num_devices, batch_size // num_devices) + stacked.shape[1:])
  return out


def batched_dataset(source, *, batch_size: int, num_devices: int,
                    lengths: Mapping[str, int], shuffle: bool, seed: int = 0,
                    repeat: bool = False, process_index: int = 0,
                    process_count: int = 1, bucket: int = 0) -> grain.MapDataset:
  """A grain MapDataset of device-shaped batches (see module docstring).

  Args:
    source: random-access source of example dicts (len + getitem).
    batch_size: examples per batch for this process (global batch / process count).
    num_devices: local devices; batch_size must be divisible by it.
    lengths: padded length per sequence field, e.g. {"inputs": 32, "targets": 32}.
    shuffle: shuffle (each epoch differently when repeating).
    seed: shuffle seed.
    repeat: cycle forever (training); otherwise one pass, last batch zero-filled.
    process_index, process_count: this process reads rows [process_index * batch_size,
      (process_index + 1) * batch_size) of each global batch (see module docstring).
    bucket: > 0 (one process, endless shuffled training batches): batches of examples of
      similar length, each cut to a multiple of `bucket` tokens (`length_bucketed`).
  """
  if batch_size % num_devices:
    raise ValueError(f"batch size {batch_size} is not divisible by {num_devices} devices")
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if repeat:
    ds = ds.repeat(None)
  if bucket:
    if not (shuffle and repeat) or process_count > 1:
      raise ValueError("length buckets are for one process's endless shuffled batches")
    return length_bucketed(ds, batch_size, num_devices, lengths, bucket, seed)
  if process_count > 1:
    ds = _rows_of_process(ds, source, batch_size, process_index, process_count, repeat)
  return ds.batch(batch_size, drop_remainder=repeat,
                  batch_fn=lambda examples: _pad_and_stack(examples, lengths, batch_size,
                                                           num_devices))


BUCKET_WINDOW = 32  # batches whose examples are sorted by length together


def length_bucketed(ds: grain.MapDataset, batch_size: int, num_devices: int,
                    lengths: Mapping[str, int], bucket: int, seed: int) -> grain.MapDataset:
  """Batches of `ds` (shuffled, endless) in which examples of similar length sit together.

  Each window of BUCKET_WINDOW batches' examples is sorted by length and cut into batches,
  taken in a random order (seeded per window); each batch is padded to its longest example
  rounded up to a multiple of `bucket` (at most `lengths`), so short rows are not padded
  to the longest row of the data. Every example of the window is still seen once, and
  batch k stays a pure function of (data, seed, k). A step compiles once per padded length.
  """
  window = BUCKET_WINDOW * batch_size

  @functools.lru_cache(maxsize=4)  # the data threads read a window's batches in turn
  def window_order(w: int):
    examples = [ds[w * window + i] for i in range(window)]
    size = [max(len(e[k]) for k in lengths) for e in examples]
    order = sorted(range(window), key=size.__getitem__)
    turn = np.random.default_rng([seed, w]).permutation(BUCKET_WINDOW)
    return examples, order, turn

  def make(b: int) -> Batch:
    w, k = divmod(b, BUCKET_WINDOW)
    examples, order, turn = window_order(w)
    rows = [examples[i] for i in order[turn[k] * batch_size:(turn[k] + 1) * batch_size]]
    longest = max(len(e[key]) for e in rows for key in lengths)
    cut = {key: min(n, -(-longest // bucket) * bucket) for key, n in lengths.items()}
    return _pad_and_stack(rows, cut, batch_size, num_devices)

  return grain.MapDataset.range(len(ds) // window * BUCKET_WINDOW).map(make)


def _rows_of_process(ds: grain.MapDataset, source, rows: int, process_index: int,
                     process_count: int, repeat: bool) -> grain.MapDataset:
  """The examples of `ds` this process batches: its `rows` of each global batch of
  `rows * process_count`. One pass (evaluation) has the same number of batches in every
  process, as a cross-process collective needs: a process's rows past the end of the
  data are empty examples (padding, no weight in any metric)."""
  total = rows * process_count
  first = process_index * rows
  batches = len(ds) // total if repeat else -(-len(ds) // total)
  empty = {k: np.zeros_like(np.asarray(v))[:0] if np.ndim(v) else np.zeros_like(v)
           for k, v in source[0].items()}

  def pick(i: int):
    batch, row = divmod(i, rows)
    index = batch * total + first + row
    return ds[index] if index < len(ds) else empty

  return grain.MapDataset.range(batches * rows).map(pick)


def iterate(dataset: grain.MapDataset, start: int = 0, num_threads: int = 2,
            prefetch: int = 4, limit: Optional[int] = None) -> Iterator[Batch]:
  """Iterates batches `start, start+1, ...` (up to `limit` of them), prefetched by threads."""
  if limit is not None:
    dataset = dataset[start:start + limit]
  elif start:
    dataset = dataset[start:]
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  return iter(dataset.to_iter_dataset(options))
