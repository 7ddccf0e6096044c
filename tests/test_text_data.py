"""Real-text data paths: local parallel files prepared through a tfds builder (read back in
file order, prepared once, re-prepared when a file changes, broken files refused with the
file and line named), tfds datasets by name (mock data; no TensorFlow), and packing (every
example placed exactly once, resumable, sharded over processes, and numerically the same to
the model as each example run alone)."""

import collections
import fcntl
import gzip
import os
import re
import subprocess
import sys
import textwrap
import threading

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from input_pipeline import batching, local_builders, packing, sources
from input_pipeline.local_builders import DataError
from models.transformer import EncoderDecoder, shift_right
from tasks.losses import cross_entropy_sums
from tests.model_fixtures import init_params, tiny_model_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRAIN_DE = ["Grüße aus Köln", "Äpfel und Öl", "schön, dass du da bist", "Straße"]
TRAIN_EN = ["greetings from Cologne", "apples and oil", "nice that you are here", "street"]
VAL_DE = ["Übermorgen", "Fußgänger"]
VAL_EN = ["the day after tomorrow", "pedestrian"]
SPLITS = {"train": "train", "validation": "val"}


def write(path, lines, gz=False, newline="\n"):
  data = "".join(line + newline for line in lines).encode("utf-8")
  if gz:
    with gzip.open(str(path) + ".gz", "wb") as f:
      f.write(data)
  else:
    path.write_bytes(data)


def write_corpus(directory):
  """train.de plain with CRLF line ends, train.en gzipped, val.de gzipped, val.en plain."""
  directory.mkdir(exist_ok=True)
  write(directory / "train.de", TRAIN_DE, newline="\r\n")
  write(directory / "train.en", TRAIN_EN, gz=True)
  write(directory / "val.de", VAL_DE, gz=True)
  write(directory / "val.en", VAL_EN)
  return directory


def read_all(source, langs=("de", "en")):
  """[(line, de, en)] of a random-access source, as str."""
  return [(int(ex["line"]),) + tuple(sources.as_text(ex[lang]) for lang in langs)
          for ex in (source[i] for i in range(len(source)))]


def expected(*columns):
  return [(i + 1,) + row for i, row in enumerate(zip(*columns))]


def prepared_dirs(data_dir):
  """Finished dataset directories (tfds writes dataset_info.json last, on success)."""
  return sorted(str(p.parent) for p in data_dir.rglob("dataset_info.json"))


# ----------------------------------------------------------------------------- local files


def test_local_files_prepare_once_read_in_file_order_and_reprepare_on_edit(
    tmp_path, monkeypatch):
  files = write_corpus(tmp_path / "corpus")
  data_dir = tmp_path / "tfds"
  builder = local_builders.parallel_text_builder(str(files), ("de", "en"), SPLITS,
                                                 str(data_dir))
  opened = sources.open_splits(builder, ["train", "validation"], needs_tensorflow=False)
  # Gzip, CRLF and umlauts come back as the exact lines, in file order, numbered from 1.
  assert read_all(opened["train"]) == expected(TRAIN_DE, TRAIN_EN)
  assert read_all(opened["validation"]) == expected(VAL_DE, VAL_EN)
  assert len(prepared_dirs(data_dir)) == 1

  # A second run (new builder object) reads the prepared data without preparing again.
  def no_preparation(*args, **kwargs):
    raise AssertionError("prepared data was not reused")
  again = local_builders.parallel_text_builder(str(files), ("de", "en"), SPLITS,
                                               str(data_dir))
  assert again.builder_config.name == builder.builder_config.name
  with monkeypatch.context() as patch:
    patch.setattr(local_builders.ParallelTextFiles, "download_and_prepare", no_preparation)
    reopened = sources.open_splits(again, ["train", "validation"], needs_tensorflow=False)
  assert read_all(reopened["train"]) == expected(TRAIN_DE, TRAIN_EN)

  # Editing a file gives a new config name, so the stale preparation is never read.
  edited_en = TRAIN_EN[:3] + ["the street"]
  write(files / "train.en", edited_en, gz=True)
  edited = local_builders.parallel_text_builder(str(files), ("de", "en"), SPLITS,
                                                str(data_dir))
  assert edited.builder_config.name != builder.builder_config.name
  assert not edited.is_prepared()
  fresh = sources.open_splits(edited, ["train"], needs_tensorflow=False)
  assert read_all(fresh["train"]) == expected(TRAIN_DE, edited_en)
  assert len(prepared_dirs(data_dir)) == 2
  assert "tensorflow" not in sys.modules


def test_runs_starting_together_prepare_once_and_all_read_it(tmp_path, monkeypatch):
  """Two runs on one data directory whose builders were both made before either prepared
  (a sweep's jobs starting together): the second waits for the first's preparation on the
  lock, then reads it, instead of failing on tfds's rename into a directory that exists."""
  files = write_corpus(tmp_path / "corpus")
  data_dir = tmp_path / "tfds"
  make = lambda: local_builders.parallel_text_builder(str(files), ("de", "en"), SPLITS,
                                                      str(data_dir))
  first, second, third = make(), make(), make()
  assert not first.is_prepared() and not second.is_prepared()
  prepare_calls = []
  real_prepare = local_builders.ParallelTextFiles.download_and_prepare

  def counted(self, *args, **kwargs):
    prepare_calls.append(self)
    return real_prepare(self, *args, **kwargs)
  monkeypatch.setattr(local_builders.ParallelTextFiles, "download_and_prepare", counted)

  # The first run holds the lock (as while it prepares); the second, in a thread, must wait.
  fd = os.open(sources.lock_directory(first), os.O_RDONLY)
  fcntl.flock(fd, fcntl.LOCK_EX)
  results = {}
  waiter = threading.Thread(target=lambda: results.update(
      sources.open_splits(second, ["train", "validation"], needs_tensorflow=False)))
  waiter.start()
  waiter.join(timeout=1.0)
  assert waiter.is_alive(), "the second run did not wait for the lock"
  sources._prepare(first)
  fcntl.flock(fd, fcntl.LOCK_UN)
  os.close(fd)
  waiter.join(timeout=60)
  assert not waiter.is_alive()
  assert prepare_calls == [first]  # prepared once, by the lock's holder
  assert read_all(results["train"]) == expected(TRAIN_DE, TRAIN_EN)
  assert read_all(results["validation"]) == expected(VAL_DE, VAL_EN)
  # A run whose builder was made before the preparation and opens after it reads it too.
  assert read_all(sources.open_splits(third, ["validation"], needs_tensorflow=False)
                  ["validation"]) == expected(VAL_DE, VAL_EN)
  assert prepare_calls == [first]
  assert len(prepared_dirs(data_dir)) == 1
  assert not [p for p in data_dir.rglob("*.lock")]  # the lock leaves no file


def _unequal_lengths(d):
  write(d / "train.de", TRAIN_DE)
  write(d / "train.en", TRAIN_EN[:3], gz=True)
  return ("de", "en"), {"train": "train"}, [r"train\.de has 4 lines", r"train\.en\.gz has 3 lines"]


def _invalid_utf8(d):
  write(d / "train.en", TRAIN_EN)
  with gzip.open(d / "train.de.gz", "wb") as f:
    f.write("Grüße\n".encode("utf-8") + b"kaputt \xff\xfe\n" + b"a\nb\n")
  return ("de", "en"), {"train": "train"}, [r"train\.de\.gz, line 2: not valid UTF-8"]


def _empty_line(d):
  write(d / "train.de", TRAIN_DE[:2] + ["  "] + TRAIN_DE[3:])
  write(d / "train.en", TRAIN_EN)
  return ("de", "en"), {"train": "train"}, [r"train\.de, line 3: empty line"]


def _missing_split_file(d):
  write(d / "train.de", TRAIN_DE)
  write(d / "train.en", TRAIN_EN)
  write(d / "val.de", VAL_DE)
  return ("de", "en"), SPLITS, [r"val\.en: no such file", r"has val\.de\. Put the file there",
                                 r"leave its split out of config\.data\.file_splits$"]


def _missing_directory(d):
  d.rmdir()
  return ("de", "en"), {"train": "train"}, [r"corpus: no such data directory"]


def _language_not_in_files(d):
  write(d / "train.de", TRAIN_DE)
  write(d / "train.en", TRAIN_EN)
  return ("de", "fr"), {"train": "train"}, [r"train\.fr: no such file",
                                            r"has train\.de, train\.en"]


@pytest.mark.parametrize("make", [_unequal_lengths, _invalid_utf8, _empty_line,
                                  _missing_split_file, _missing_directory,
                                  _language_not_in_files], ids=lambda f: f.__name__[1:])
def test_broken_files_name_the_problem_and_prepare_nothing(tmp_path, make):
  directory = tmp_path / "corpus"
  directory.mkdir()
  data_dir = tmp_path / "tfds"
  languages, splits, messages = make(directory)
  with pytest.raises(DataError) as error:
    builder = local_builders.parallel_text_builder(str(directory), languages, splits,
                                                   str(data_dir))
    sources.open_splits(builder, list(splits), needs_tensorflow=False)
  for message in messages:
    assert re.search(message, str(error.value)), (message, str(error.value))
  assert prepared_dirs(data_dir) == []
  assert not list(data_dir.rglob("*.array_record*"))


def test_unknown_split_of_a_prepared_dataset_lists_the_known_splits(tmp_path):
  files = write_corpus(tmp_path / "corpus")
  builder = local_builders.parallel_text_builder(str(files), ("de", "en"), SPLITS,
                                                 str(tmp_path / "tfds"))
  sources.open_splits(builder, ["train"], needs_tensorflow=False)
  assert builder.is_prepared()
  with pytest.raises(DataError, match=r"no split test; it has train, validation"):
    sources.open_splits(builder, ["test"], needs_tensorflow=False)


# ----------------------------------------------------------------------------- tfds by name


@pytest.mark.parametrize("name,langs", [("wmt14_translate/de-en", ("de", "en")),
                                        ("wmt17_translate/de-en", ("de", "en")),
                                        ("ted_hrlr_translate/pt_to_en", ("pt", "en"))])
def test_tfds_names_resolve_and_read_as_text(tmp_path, name, langs):
  with tfds.testing.mock_data(num_examples=3):
    builder = sources.tfds_builder(name, str(tmp_path))
    assert set(langs) <= set(builder.info.features)
    opened = sources.open_splits(builder, ["train", "validation"])
    for split in ("train", "validation"):
      assert len(opened[split]) == 3
      texts = [sources.as_text(opened[split][i][lang]) for i in range(3) for lang in langs]
      assert all(isinstance(t, str) and t for t in texts)
  assert sources.as_text("Grüße".encode("utf-8")) == "Grüße"


def test_unprepared_public_dataset_without_tensorflow_names_the_install(tmp_path,
                                                                        monkeypatch):
  builder = sources.tfds_builder("wmt14_translate/de-en", str(tmp_path))
  assert not builder.is_prepared()
  monkeypatch.setattr(sources, "has_tensorflow", lambda: False)
  monkeypatch.setattr(type(builder), "download_and_prepare",
                      lambda *a, **k: pytest.fail("tried to download"))
  for call in (lambda: sources.prepare(builder),
               lambda: sources.open_splits(builder, ["train"])):
    with pytest.raises(DataError, match=r"wmt14_translate/de-en.*pip install tensorflow-cpu"):
      call()
  with pytest.raises(DataError, match=r"config.data.dataset='no_such_corpus_xyz'"):
    sources.tfds_builder("no_such_corpus_xyz", str(tmp_path))


def test_data_path_never_imports_tensorflow(tmp_path):
  """In a fresh interpreter (this one may have imported TensorFlow elsewhere): preparing
  and reading local files, resolving a public name and refusing to prepare it."""
  write_corpus(tmp_path / "corpus")
  script = textwrap.dedent(f"""
      import sys
      from input_pipeline import local_builders, sources
      b = local_builders.parallel_text_builder({str(tmp_path / "corpus")!r}, ("de", "en"),
                                               {{"train": "train"}}, {str(tmp_path / "tfds")!r})
      s = sources.open_splits(b, ["train"], needs_tensorflow=False)["train"]
      assert sources.as_text(s[0]["de"]) == {TRAIN_DE[0]!r}
      w = sources.tfds_builder("wmt14_translate/de-en", {str(tmp_path / "tfds")!r})
      sources.has_tensorflow = lambda: False
      try:
        sources.prepare(w)
      except local_builders.DataError:
        pass
      print("tensorflow imported:", "tensorflow" in sys.modules)
  """)
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "tensorflow imported: False" in result.stdout


# ----------------------------------------------------------------------------- packing


def random_examples(n, seed=0, max_inputs=7, max_targets=5):
  """Examples with distinct token sequences (1..15) of varied lengths, as the task makes."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    out.append({"inputs": rng.integers(1, 16, rng.integers(1, max_inputs + 1)).astype(np.int32),
                "targets": rng.integers(1, 16, rng.integers(1, max_targets + 1)).astype(np.int32),
                "index": np.int32(i)})
  return out


ROW_LENGTHS = {"inputs": 10, "targets": 8}


def test_pack_rows_fits_places_each_example_once_and_is_deterministic():
  examples = random_examples(60)
  lengths = {f: np.array([len(e[f]) for e in examples]) for f in ROW_LENGTHS}
  order = np.random.default_rng(1).permutation(60)
  rows = packing.pack_rows(lengths, order, ROW_LENGTHS, open_rows=4)
  for row in rows:
    for field, length in ROW_LENGTHS.items():
      assert lengths[field][row].sum() <= length, (field, row)
  assert sorted(i for row in rows for i in row) == list(range(60))
  assert len(rows) < 40  # it does pack: these examples average well under half a row
  assert rows == packing.pack_rows(lengths, order.copy(), ROW_LENGTHS, open_rows=4)


def test_pack_row_segmentation_and_positions():
  a = {"inputs": np.array([3, 4, 5]), "targets": np.array([6])}
  b = {"inputs": np.array([7]), "targets": np.array([8, 9, 10])}
  row = packing.pack_row([a, b], {"inputs": 6, "targets": 5})
  np.testing.assert_array_equal(row["inputs"], [3, 4, 5, 7, 0, 0])
  np.testing.assert_array_equal(row["inputs_segmentation"], [1, 1, 1, 2, 0, 0])
  np.testing.assert_array_equal(row["inputs_position"], [0, 1, 2, 0, 0, 0])
  np.testing.assert_array_equal(row["targets"], [6, 8, 9, 10, 0])
  np.testing.assert_array_equal(row["targets_segmentation"], [1, 2, 2, 2, 0])
  np.testing.assert_array_equal(row["targets_position"], [0, 0, 1, 2, 0])
  assert all(v.dtype == np.int32 for v in row.values())


def unpack(batch):
  """Counter of (inputs, targets) token tuples of every packed example in a batch, checking
  each segment's positions and that padding is all zero."""
  found = collections.Counter()
  flat = {k: v.reshape(-1, v.shape[-1]) for k, v in batch.items()}
  for r in range(flat["inputs"].shape[0]):
    parts = {}
    for field in ROW_LENGTHS:
      tokens, seg = flat[field][r], flat[f"{field}_segmentation"][r]
      pos = flat[f"{field}_position"][r]
      assert np.all(tokens[seg == 0] == 0) and np.all(tokens[seg > 0] > 0)
      ids = [s for s in np.unique(seg) if s > 0]
      assert ids == list(range(1, len(ids) + 1))
      for s in ids:
        np.testing.assert_array_equal(pos[seg == s], np.arange(np.sum(seg == s)))
      parts[field] = [tuple(tokens[seg == s]) for s in ids]
    assert len(parts["inputs"]) == len(parts["targets"])
    found.update(zip(parts["inputs"], parts["targets"]))
  return found


def make_packed(examples, **kwargs):
  args = dict(batch_size=8, num_devices=4, seed=3)
  return packing.PackedBatches(examples, ROW_LENGTHS, **{**args, **kwargs})


def test_packed_batches_epoch_resume_shapes_and_process_slices():
  examples = random_examples(50)
  packed = make_packed(examples)
  per_epoch = -(-len(packed.epoch_rows(0)) // 8)
  assert per_epoch >= 2
  epoch0 = [packed[k] for k in range(per_epoch)]
  for batch in epoch0:
    assert set(batch) == {f"{f}{s}" for f in ROW_LENGTHS
                          for s in ("", "_segmentation", "_position")}
    for key, value in batch.items():
      assert value.shape == (4, 2, ROW_LENGTHS[key.split("_")[0]]) and value.dtype == np.int32
  # One epoch holds every (inputs, targets) pair exactly once, none lost or duplicated.
  want = collections.Counter((tuple(e["inputs"]), tuple(e["targets"])) for e in examples)
  assert sum((unpack(b) for b in epoch0), collections.Counter()) == want
  epoch1 = [packed[per_epoch + k] for k in range(-(-len(packed.epoch_rows(1)) // 8))]
  assert sum((unpack(b) for b in epoch1), collections.Counter()) == want
  assert packed.epoch_rows(0) != packed.epoch_rows(1)  # each epoch its own shuffle

  def same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

  # Batch k is a pure function of (examples, seed, k): read cold, or through grain.
  for k in (1, per_epoch - 1, per_epoch + 1):
    assert same(make_packed(examples)[k], packed[k])
  resumed = list(batching.iterate(grain.MapDataset.source(make_packed(examples)),
                                  start=per_epoch - 1, limit=3))
  assert len(resumed) == 3
  assert all(same(r, packed[per_epoch - 1 + i]) for i, r in enumerate(resumed))
  assert not same(make_packed(examples, seed=4)[0], packed[0])

  # Two processes' slices, stacked, are the one-process batch (the last, short one too).
  for k in (0, per_epoch - 1):
    halves = [make_packed(examples, num_devices=2, process_index=p, process_count=2)[k]
              for p in (0, 1)]
    for key, value in packed[k].items():
      assert halves[0][key].shape == (2, 2, value.shape[-1])
      np.testing.assert_array_equal(
          np.concatenate([h[key].reshape(4, -1) for h in halves]), value.reshape(8, -1))


def test_packed_batches_reject_what_cannot_pack():
  with pytest.raises(ValueError, match="'targets' has 9 tokens, more than the row length 8"):
    make_packed([{"inputs": np.ones(2, np.int32), "targets": np.ones(9, np.int32)}])
  with pytest.raises(ValueError, match="not divisible"):
    make_packed(random_examples(4), batch_size=6)


# ----------------------------------------------------------------------------- through the model


def test_shift_right_restarts_every_packed_segment():
  examples = random_examples(12, seed=5, max_inputs=3, max_targets=2)
  rows = [packing.pack_row(examples[i:i + 3], ROW_LENGTHS) for i in range(0, 12, 3)]
  targets = np.stack([r["targets"] for r in rows])
  seg = np.stack([r["targets_segmentation"] for r in rows])
  shifted = np.asarray(shift_right(jnp.asarray(targets), jnp.asarray(seg)))
  starts = np.stack([r["targets_position"] for r in rows]) == 0
  starts &= seg > 0
  assert np.all(shifted[starts] == 0)
  inside = (seg > 0) & ~starts
  assert np.array_equal(shifted[:, 1:][inside[:, 1:]], targets[:, :-1][inside[:, 1:]])


def test_packed_rows_train_on_exactly_their_examples_tokens():
  """Each packed example's logits (and the summed loss) equal those of the example run
  alone, padded: the masks keep segments apart and positions restart per segment."""
  examples = random_examples(9, seed=7, max_inputs=4, max_targets=3)
  lengths = {f: np.array([len(e[f]) for e in examples]) for f in ROW_LENGTHS}
  rows = packing.pack_rows(lengths, np.arange(9), ROW_LENGTHS)
  assert max(len(r) for r in rows) >= 3  # the test needs rows of several examples
  packed = {k: jnp.asarray(np.stack([packing.pack_row([examples[i] for i in r],
                                                      ROW_LENGTHS)[k] for r in rows]))
            for k in packing.pack_row([], ROW_LENGTHS)}
  alone = {f: jnp.asarray(np.stack([np.pad(e[f], (0, n - len(e[f]))) for e in examples]))
           for f, n in ROW_LENGTHS.items()}

  model = EncoderDecoder(tiny_model_config())
  params = init_params(model, alone["inputs"], alone["targets"])

  @jax.jit
  def run(batch):
    logits = model.apply({"params": params}, batch["inputs"], batch["targets"],
                         inputs_positions=batch.get("inputs_position"),
                         targets_positions=batch.get("targets_position"),
                         inputs_segmentation=batch.get("inputs_segmentation"),
                         targets_segmentation=batch.get("targets_segmentation"))
    weights = (batch["targets"] > 0).astype(jnp.float32)
    return logits, cross_entropy_sums(logits, batch["targets"], weights)

  packed_logits, packed_sums = run(packed)
  alone_logits, alone_sums = run(alone)
  seg = np.asarray(packed["targets_segmentation"])
  for r, row in enumerate(rows):
    for s, i in enumerate(row, 1):
      n = len(examples[i]["targets"])
      np.testing.assert_allclose(np.asarray(packed_logits)[r][seg[r] == s],
                                 np.asarray(alone_logits)[i, :n], atol=1e-5)
  assert float(packed_sums["weight"]) == float(alone_sums["weight"]) == lengths["targets"].sum()
  np.testing.assert_allclose(float(packed_sums["loss"]), float(alone_sums["loss"]), rtol=1e-5)
