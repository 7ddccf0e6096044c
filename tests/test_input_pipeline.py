"""Synthetic sources (deterministic, right layouts, a truly held-out eval split), the
batching path (device shapes, padding, one exact pass for evaluation, resumability,
per-process sharding), reading a split whole, and the pipeline benchmark's smoke mode."""

import itertools
import json
import os

import numpy as np
import pytest

import tasks
from configs import default
from input_pipeline import batching, sources, synthetic
from input_pipeline.synthetic import EOS, FIRST_DIGIT, SEP

SHARED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                           "shared", "data")

# ----------------------------------------------------------------------------- synthetic


def _source(kind="seq2seq", task="reverse", split="train", size=200, lo=1, hi=8, seed=0):
  return synthetic.SyntheticDigits(kind, task, split, size, lo, hi, seed=seed)


def _digits(tokens):
  tokens = np.asarray(tokens)
  assert np.all((tokens >= FIRST_DIGIT) & (tokens < FIRST_DIGIT + 10)), tokens
  return tokens - FIRST_DIGIT


def _same(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind,task", [("seq2seq", "reverse"), ("lm", "sort"),
                                       ("classification", "majority")])
def test_records_are_deterministic(kind, task):
  source = _source(kind, task)
  again = _source(kind, task)
  for i in (0, 1, 17, 199, 10**9):
    assert _same(source[i], source[i]) and _same(source[i], again[i])
  other_seed = _source(kind, task, seed=1)
  differ = sum(not _same(source[i], other_seed[i]) for i in range(50))
  assert differ > 40
  differ = sum(not _same(source[i], source[i + 1]) for i in range(50))
  assert differ > 40


@pytest.mark.parametrize("task,f", [("reverse", lambda d: d[::-1]), ("sort", np.sort),
                                    ("copy", lambda d: d)])
def test_seq2seq_layout(task, f):
  source = _source("seq2seq", task)
  for i in range(100):
    record = source[i]
    assert set(record) == {"inputs", "targets"}
    assert record["inputs"].dtype == record["targets"].dtype == np.int32
    assert record["inputs"][-1] == EOS and record["targets"][-1] == EOS
    x = _digits(record["inputs"][:-1])
    np.testing.assert_array_equal(_digits(record["targets"][:-1]), f(x))


@pytest.mark.parametrize("task,f", [("reverse", lambda d: d[::-1]), ("sort", np.sort),
                                    ("copy", lambda d: d)])
def test_lm_layout(task, f):
  source = _source("lm", task)
  for i in range(100):
    record = source[i]
    assert set(record) == {"inputs"}
    tokens = record["inputs"]
    assert tokens.dtype == np.int32
    assert tokens[-1] == EOS and np.sum(tokens == SEP) == 1 and np.sum(tokens == EOS) == 1
    sep = int(np.argmax(tokens == SEP))
    x, y = _digits(tokens[:sep]), _digits(tokens[sep + 1:-1])
    np.testing.assert_array_equal(y, f(x))
    assert len(tokens) == 2 * len(x) + 2


def test_classification_layout_and_majority_rule():
  source = _source("classification", "majority", size=400)
  labels = []
  for i in range(400):
    record = source[i]
    assert set(record) == {"inputs", "label"}
    x = _digits(record["inputs"])  # no EOS in classification inputs
    high = int(np.sum(x >= 5))
    assert int(record["label"]) == int(high > len(x) - high), (x, record["label"])
    labels.append(int(record["label"]))
  assert 0.2 < np.mean(labels) < 0.8  # both classes occur


@pytest.mark.parametrize("lo,hi", [(1, 8), (3, 5), (4, 4)])
def test_lengths_vary_within_bounds(lo, hi):
  source = _source(lo=lo, hi=hi)
  lengths = [len(source[i]["inputs"]) - 1 for i in range(300)]
  assert min(lengths) >= lo and max(lengths) <= hi
  assert set(lengths) == set(range(lo, hi + 1))  # every length occurs


def test_eval_split_is_held_out():
  """With 1-4 digits there are only 11110 strings, so a leaking split would collide."""
  def strings(split, n):
    source = _source("seq2seq", "copy", split, size=n, lo=1, hi=4, seed=0)
    return {tuple(source[i]["inputs"]) for i in range(n)}

  eval_strings = strings("eval", 1000)
  train_strings = strings("train", 5000)
  assert len(eval_strings) > 200 and len(train_strings) > 1500
  assert not eval_strings & train_strings
  # The splits partition the strings: every 1-digit string is in exactly one of them.
  one_digit = {s for s in eval_strings | train_strings if len(s) == 2}
  assert one_digit == {(FIRST_DIGIT + d, EOS) for d in range(10)}
  # Held out for every kind and seed: the split depends on the string, not on the record.
  other = _source("lm", "reverse", "train", size=3000, lo=1, hi=4, seed=7)
  for i in range(3000):
    tokens = other[i]["inputs"]
    x = tuple(tokens[:int(np.argmax(tokens == SEP))]) + (EOS,)
    assert x not in eval_strings


def test_source_rejects_bad_arguments():
  with pytest.raises(ValueError, match="kind"):
    _source(kind="images")
  with pytest.raises(ValueError, match="'majority'"):
    _source(kind="seq2seq", task="majority")
  with pytest.raises(ValueError, match="'test'"):
    _source(split="test")


def test_decode_tokens():
  assert synthetic.decode_tokens([3, 4, 5, SEP, 5, 4, 3, EOS, 9, 9]) == "0 1 2 | 2 1 0"
  assert synthetic.decode_tokens([12, 0, 0]) == "9"
  assert synthetic.decode_tokens(np.array([[EOS, 3]])[0]) == ""
  record = _source("lm", "reverse")[3]
  text = synthetic.decode_tokens(record["inputs"])
  left, right = text.split(" | ")
  assert left.split() == right.split()[::-1]


# ----------------------------------------------------------------------------- batching


class _Numbered:
  """Example i has inputs [i+1] * (1 + i % 5), targets [i+1, i+1] and label i."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"inputs": np.full(1 + i % 5, i + 1, np.int32),
            "targets": np.full(2, i + 1, np.int32), "label": np.int32(i)}


LENGTHS = {"inputs": 6, "targets": 3}


def _ids(batches):
  """Example ids (in order) of the real rows of device-shaped batches."""
  out = []
  for batch in batches:
    first = batch["inputs"][..., 0].reshape(-1)
    out += [int(t) - 1 for t in first if t > 0]
  return out


def _dataset(n=21, batch_size=8, num_devices=4, **kwargs):
  return batching.batched_dataset(_Numbered(n), batch_size=batch_size,
                                  num_devices=num_devices, lengths=LENGTHS, **kwargs)


def test_batch_shapes_and_padding():
  batch = next(batching.iterate(_dataset(shuffle=False)))
  assert batch["inputs"].shape == (4, 2, 6) and batch["targets"].shape == (4, 2, 3)
  assert batch["label"].shape == (4, 2)
  assert all(v.dtype == np.int32 for v in batch.values())
  flat = batch["inputs"].reshape(-1, 6)
  for i, row in enumerate(flat):  # unshuffled: row i is example i
    n = 1 + i % 5
    np.testing.assert_array_equal(row, [i + 1] * n + [0] * (6 - n))
  np.testing.assert_array_equal(batch["label"].reshape(-1), np.arange(8))


@pytest.mark.parametrize("shuffle", [False, True])
def test_eval_pass_has_every_example_once(shuffle):
  """One pass: 21 examples in batches of 8 -> 3 batches, the last zero-filled."""
  dataset = _dataset(shuffle=shuffle, seed=3)
  batches = list(batching.iterate(dataset))
  assert len(batches) == 3
  assert all(b["inputs"].shape == (4, 2, 6) for b in batches)
  ids = _ids(batches)
  assert sorted(ids) == list(range(21))
  last = {k: v.reshape((8,) + v.shape[2:]) for k, v in batches[-1].items()}
  real = last["inputs"].any(axis=-1)
  assert real.sum() == 5
  for key, value in last.items():
    assert not value[~real].any(), key  # fill rows are all zero (padding) in every field
  if shuffle:
    assert ids != sorted(ids)


def test_eval_pass_of_a_task_source_covers_num_eval_examples():
  config = default.get_config()
  config.data.num_eval_examples = 50
  task = tasks.get_task(config)
  source = task.data_source("eval")
  dataset = batching.batched_dataset(source, batch_size=16, num_devices=8,
                                     lengths=task.lengths, shuffle=False)
  batches = list(batching.iterate(dataset))
  assert len(batches) == 4
  rows = [r for b in batches for r in b["inputs"].reshape(-1, b["inputs"].shape[-1])]
  real = [r for r in rows if r.any()]
  assert len(real) == 50
  expected = [batching.pad_example(source[i], task.lengths)["inputs"] for i in range(50)]
  np.testing.assert_array_equal(np.stack(real), np.stack(expected))


def test_shuffle_is_seeded_and_every_epoch_is_a_permutation():
  def stream(seed):
    return _ids(batching.iterate(_dataset(shuffle=True, seed=seed, repeat=True), limit=8))

  ids = stream(0)
  assert len(ids) == 64  # training batches are full (drop_remainder)
  epochs = [ids[0:21], ids[21:42], ids[42:63]]
  for epoch in epochs:
    assert sorted(epoch) == list(range(21))
  assert epochs[0] != epochs[1]  # reshuffled each epoch
  assert stream(0) == ids
  assert stream(1) != ids


@pytest.mark.parametrize("start", [1, 2, 5])
def test_iterate_from_start_resumes_exactly(start):
  dataset = _dataset(shuffle=True, seed=0, repeat=True)
  fresh = list(batching.iterate(dataset, limit=start + 3))
  resumed = batching.iterate(_dataset(shuffle=True, seed=0, repeat=True), start=start)
  for k in range(start, start + 3):
    assert _same(next(resumed), fresh[k]), k
  limited = list(batching.iterate(dataset, start=start, limit=2))
  assert len(limited) == 2 and all(_same(a, b) for a, b in zip(limited, fresh[start:]))


@pytest.mark.parametrize("shuffle,repeat", [(False, False), (True, False), (True, True)])
def test_processes_partition_the_source(shuffle, repeat):
  """Two processes, each with half the global batch, read disjoint halves of the data."""
  per_process = []
  for index in range(2):
    dataset = _dataset(n=20, batch_size=4, num_devices=2, shuffle=shuffle, seed=0,
                       repeat=repeat, process_index=index, process_count=2)
    per_process.append(_ids(batching.iterate(dataset, limit=None if not repeat else 2)))
  a, b = map(set, per_process)
  assert len(a) == len(per_process[0]) and len(b) == len(per_process[1])
  assert not a & b
  if not repeat:
    assert sorted(a | b) == list(range(20))


def test_one_pass_gives_every_process_the_same_number_of_batches():
  """17 examples over 2 processes in batches of 4: shards of 9 and 8 examples must both
  make 3 batches, or a cross-process collective in evaluation would wait forever."""
  counts, ids = [], []
  for index in range(2):
    dataset = _dataset(n=17, batch_size=4, num_devices=2, shuffle=False,
                       process_index=index, process_count=2)
    batches = list(batching.iterate(dataset))
    counts.append(len(batches))
    ids += _ids(batches)
  assert counts == [3, 3]
  assert sorted(ids) == list(range(17))


def test_batch_size_must_divide_over_devices():
  with pytest.raises(ValueError, match="divisible"):
    _dataset(batch_size=6, num_devices=4, shuffle=False)


def test_pad_example():
  out = batching.pad_example({"inputs": [5, 6], "label": 1}, {"inputs": 4})
  np.testing.assert_array_equal(out["inputs"], [5, 6, 0, 0])
  assert out["inputs"].dtype == np.int32 and int(out["label"]) == 1
  exact = batching.pad_example({"inputs": [5, 6, 7, 8]}, {"inputs": 4})
  np.testing.assert_array_equal(exact["inputs"], [5, 6, 7, 8])


def test_too_long_example_is_an_error_not_a_truncation():
  with pytest.raises(batching.ExampleTooLongError) as info:
    batching.pad_example({"inputs": np.ones(3), "targets": np.ones(5)},
                         {"inputs": 4, "targets": 4})
  message = str(info.value)
  assert "'targets'" in message and "5 tokens" in message and "4" in message
  assert issubclass(batching.ExampleTooLongError, ValueError)
  # ... also from inside the pipeline.
  dataset = batching.batched_dataset(_Numbered(10), batch_size=4, num_devices=2,
                                     lengths={"inputs": 4, "targets": 3}, shuffle=False)
  with pytest.raises(batching.ExampleTooLongError, match="'inputs' has 5 tokens"):
    list(batching.iterate(dataset))


def test_task_lengths_fit_every_synthetic_record():
  """The validated minimum lengths hold every record the sources produce."""
  for task_name in default.TASKS:
    config = default.get_config(f"task={task_name}")
    config.data.min_digits = config.data.max_digits
    task = tasks.get_task(config)
    source = task.data_source("train")
    for i in range(5):
      padded = batching.pad_example(source[i], task.lengths)
      assert set(task.lengths) <= set(padded)


def test_training_stream_is_infinite_and_lazy():
  """A repeating training stream is infinite; taking a few batches must not hang."""
  stream = batching.iterate(_dataset(shuffle=True, seed=0, repeat=True))
  assert len(list(itertools.islice(stream, 4))) == 4


class _Records:
  """A random-access source of the numbers 0..n-1, counting its calls."""

  def __init__(self, n):
    self.n, self.calls = n, 0

  def __len__(self):
    return self.n

  def __getitem__(self, index):
    self.calls += 1
    return int(index)


class _BatchedRecords(_Records):
  """... that also reads many records a call, as tfds array_record sources do."""

  def __getitems__(self, keys):
    self.calls += 1
    return [int(k) for k in keys]


@pytest.mark.parametrize("kind", [_Records, _BatchedRecords])
def test_read_all_reads_every_record_once_in_order(kind):
  source = kind(2500)
  assert sources.read_all(source, lambda r: -r, chunk=1000) == [-i for i in range(2500)]
  assert source.calls == (3 if kind is _BatchedRecords else 2500)
  assert sources.read_all(kind(0), lambda r: r) == []


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "tinyshakespeare")),
                    reason="the shared tiny Shakespeare text is not here")
def test_input_pipeline_benchmark_quick_mode_runs(tmp_path, capsys):
  """The benchmark's smoke mode on one corpus (seconds): both tables, a JSON file."""
  from benchmarks import input_pipeline as input_pipeline_benchmark  # imports train.py
  output = tmp_path / "bench.json"
  input_pipeline_benchmark.main(["--quick", "--corpora=tinyshakespeare",
                                 f"--data_root={SHARED_DATA}",
                                 f"--tfds_data_dir={tmp_path / 'tfds'}",
                                 f"--workdir={tmp_path / 'work'}", f"--output={output}"])
  printed = capsys.readouterr().out
  assert "| tinyshakespeare | windows | 8 x 64 |" in printed
  assert "constant ms/step" in printed
  row = json.loads(output.read_text())["rows"][0]
  assert row["by_threads"]["0"]["batches_per_sec"] > 0
  assert set(row["steps"]["step_s"]) == {"constant", "pipeline", "no ahead"}


def test_read_all_falls_back_when_batched_reads_fail():
  class Broken(_Records):
    def __getitems__(self, keys):  # as tfds.testing.mock_data's sources do
      raise TypeError("_getitems() missing 1 required positional argument")

  assert sources.read_all(Broken(5), lambda r: r, chunk=2) == list(range(5))


def test_length_buckets_keep_every_example_once_and_cut_rows_to_a_multiple():
  """config.data.length_bucket: a window's examples each appear once, in batches of
  similar lengths padded to a multiple of the bucket; batch k is the same when read again
  (a resumed run reads what the uninterrupted one read)."""
  rng = np.random.default_rng(0)
  window = batching.BUCKET_WINDOW * 8
  source = [{"inputs": np.arange(1, rng.integers(1, 41) + 1, dtype=np.int32),
             "index": np.int32(i)} for i in range(window * 2 + 5)]
  ds = batching.batched_dataset(source, batch_size=8, num_devices=2, lengths={"inputs": 40},
                                shuffle=True, seed=3, repeat=True, bucket=16)
  batches = [ds[k] for k in range(batching.BUCKET_WINDOW)]
  seen = np.concatenate([b["index"].ravel() for b in batches])
  assert sorted(seen) == sorted(set(seen)) and len(seen) == window
  widths = [b["inputs"].shape[-1] for b in batches]
  assert set(widths) <= {16, 32, 40} and len(set(widths)) > 1
  for b in batches:
    real = (b["inputs"] > 0).sum(-1)
    assert real.max() > b["inputs"].shape[-1] - 16 or b["inputs"].shape[-1] == 16
    for row, index in zip(b["inputs"].reshape(8, -1), b["index"].ravel()):
      np.testing.assert_array_equal(row[row > 0], source[index]["inputs"])
  np.testing.assert_array_equal(ds[5]["inputs"], batches[5]["inputs"])


def test_length_buckets_with_several_processes_are_a_config_error(monkeypatch):
  """Buckets are made by one process (each would sort its own rows differently): a
  multi-process run with length_bucket stops before anything runs, naming the field."""
  import jax
  import train
  from config_checks import ConfigError
  config = default.get_config("task=classification")
  config.data.length_bucket = 16
  train.validate(config)  # one process: fine
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(ConfigError, match=r"config\.data\.length_bucket=16.*2.*set it to 0"):
    train.validate(config, num_devices=2)
  config.data.length_bucket = 0
  train.validate(config, num_devices=2)
