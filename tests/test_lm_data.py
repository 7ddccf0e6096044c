"""Language-model data: local text files prepared through the TextFiles tfds builder (file
order, gzip, "file" and "line" documents, the nanoGPT-style held-out tail, broken files
refused with the file and line named, re-preparation on edit), windows of one token stream
(evaluation covers the stream exactly once; training batches are pure functions of their
index, real slices of the stream, never repeated within an epoch and split cleanly over
processes), whitespace-keeping SentencePiece and the characters each token stands for,
and the generation task's data path end to end (tokenizer saved and reloaded, windows or
packed documents, config validation, tfds names with mock data, no TensorFlow)."""

import collections
import gzip
import os
import random
import re
import subprocess
import sys
import textwrap

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

import config_checks
import train
import tasks
from configs import default, presets
from input_pipeline import batching, local_builders, sources, tokenizers, windows
from input_pipeline.local_builders import DataError
from input_pipeline.tokenizers import TokenizerError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the king queen speak hear me citizen first all rather die famish resolved you "
         "are proceed further before we any good night sweet prince").split()


def words_text(lines: int, seed: int) -> str:
  """Deterministic lines of words, with blank lines and double spaces mixed in."""
  rng = random.Random(seed)
  out = []
  for i in range(lines):
    line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 7)))
    out.append(line.replace(" ", "  ", 1) if i % 5 == 1 else line)
    if i % 4 == 3:
      out.append("")
  return "\n".join(out) + "\n"


def write_text(path, text: str, gz: bool = False) -> None:
  """`path` as UTF-8, or only `path.gz` when gz."""
  data = text.encode("utf-8")
  if gz:
    with gzip.open(str(path) + ".gz", "wb") as f:
      f.write(data)
  else:
    path.write_bytes(data)


def text_builder(directory, splits, data_dir, documents="file", fraction=0.0):
  return local_builders.text_files_builder(str(directory), splits, documents, fraction,
                                           str(data_dir))


def read_splits(builder, splits):
  """`{split: [texts]}` of a prepared builder, checking `document` numbers 0, 1, ..."""
  out = {}
  for split, source in sources.open_splits(builder, splits, needs_tensorflow=False).items():
    examples = [source[i] for i in range(len(source))]
    assert [int(ex["document"]) for ex in examples] == list(range(len(examples)))
    out[split] = [sources.as_text(ex["text"]) for ex in examples]
  return out


def prepared_dirs(data_dir):
  """Finished dataset directories (tfds writes dataset_info.json last, on success)."""
  return sorted(str(p.parent) for p in data_dir.rglob("dataset_info.json"))


# ----------------------------------------------------------------------------- text files


def test_line_documents_read_files_in_order_find_gz_and_skip_empty_lines(tmp_path):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  write_text(corpus / "a.txt", "alpha one\r\n\r\n  \nbeta  two \n")
  write_text(corpus / "b.txt", "gamma\n\n\ndelta\nÜber Straße", gz=True)  # no final newline
  write_text(corpus / "c.txt", "held out\n")
  assert local_builders.text_file_path(str(corpus), "b.txt") == str(corpus / "b.txt.gz")
  builder = text_builder(corpus, {"train": ["b.txt", "a.txt"], "test": ["c.txt"]},
                         tmp_path / "tfds", documents="line")
  got = read_splits(builder, ["train", "test"])
  # The order of file_splits, not the directory's; CR stripped, inner spaces kept.
  assert got["train"] == ["gamma", "delta", "Über Straße", "alpha one", "beta  two "]
  assert got["test"] == ["held out"]
  assert "tensorflow" not in sys.modules


def test_file_documents_keep_the_whole_text(tmp_path):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  texts = ["ROMEO:\n  But soft!\n\n\nWhat light  through yonder\r\n", "  Grüße\n\n", "x"]
  write_text(corpus / "a.txt", texts[0])
  write_text(corpus / "b.txt", texts[1], gz=True)
  write_text(corpus / "c.txt", texts[2])
  builder = text_builder(corpus, {"train": ["a.txt", "b.txt", "c.txt"]}, tmp_path / "tfds")
  assert read_splits(builder, ["train"]) == {"train": texts}


def test_plain_file_wins_over_gz_when_both_exist(tmp_path):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  write_text(corpus / "a.txt", "plain\n")
  write_text(corpus / "a.txt", "gzipped\n", gz=True)
  assert local_builders.text_file_path(str(corpus), "a.txt") == str(corpus / "a.txt")
  assert local_builders.read_text(str(corpus / "a.txt.gz")) == "gzipped\n"
  (corpus / "bom.tsv").write_bytes("\ufeffsentence\tlabel\nfine\t1\n".encode("utf-8"))
  assert local_builders.read_text(str(corpus / "bom.tsv")) == "sentence\tlabel\nfine\t1\n"
  assert local_builders.read_labeled_rows(str(corpus / "bom.tsv"), "sentence", "label") == [
      (2, "fine", "1")]
  builder = text_builder(corpus, {"train": ["a.txt"]}, tmp_path / "tfds")
  assert read_splits(builder, ["train"]) == {"train": ["plain\n"]}


def test_validation_fraction_by_characters_is_the_nanogpt_cut(tmp_path):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  a, b = words_text(30, seed=1), words_text(12, seed=2)
  write_text(corpus / "a.txt", a)
  write_text(corpus / "b.txt", b, gz=True)
  text = a + b
  cut = int(len(text) * 0.9)
  assert len(a) < cut < len(text) - 1  # the cut falls inside b: b is split in two
  builder = text_builder(corpus, {"train": ["a.txt", "b.txt"]}, tmp_path / "tfds",
                         fraction=0.1)
  got = read_splits(builder, ["train", "validation"])
  assert got["train"] == [a, b[:cut - len(a)]]
  assert got["validation"] == [b[cut - len(a):]]
  assert "".join(got["train"]) == text[:cut] and "".join(got["validation"]) == text[cut:]


@pytest.mark.parametrize("sizes,fraction", [((5, 7, 3), 0.1), ((10, 10), 0.5),
                                            ((4, 6), 0.6), ((1, 1, 30), 0.25)])
def test_hold_out_by_characters_splits_the_concatenation_at_one_point(sizes, fraction):
  documents = ["".join(chr(97 + (d + i) % 26) for i in range(n)) for d, n in enumerate(sizes)]
  text = "".join(documents)
  kept, held = local_builders.hold_out(documents, fraction, "file")
  cut = int(len(text) * (1 - fraction))
  assert "".join(kept) == text[:cut] and "".join(held) == text[cut:]
  assert all(kept) and all(held)  # no empty document is made at the cut
  assert len(kept) + len(held) in (len(documents), len(documents) + 1)


def test_validation_fraction_by_lines_holds_out_the_last_lines(tmp_path):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  write_text(corpus / "a.txt", "".join(f"a{i}\n" for i in range(6)))
  write_text(corpus / "b.txt", "b0\n\nb1\nb2\nb3\n", gz=True)
  builder = text_builder(corpus, {"train": ["a.txt", "b.txt"]}, tmp_path / "tfds",
                         documents="line", fraction=0.2)
  got = read_splits(builder, ["train", "validation"])
  lines = [f"a{i}" for i in range(6)] + ["b0", "b1", "b2", "b3"]
  assert got == {"train": lines[:8], "validation": lines[8:]}
  assert local_builders.hold_out(lines, 0.01, "line") == (lines[:-1], lines[-1:])


def test_editing_a_file_reprepares_under_a_new_name(tmp_path, monkeypatch):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  data_dir = tmp_path / "tfds"
  write_text(corpus / "a.txt", "first version\n")
  builder = text_builder(corpus, {"train": ["a.txt"]}, data_dir)
  assert read_splits(builder, ["train"]) == {"train": ["first version\n"]}

  # A new builder object for the same files reads the prepared data without preparing.
  again = text_builder(corpus, {"train": ["a.txt"]}, data_dir)
  assert again.builder_config.name == builder.builder_config.name
  with monkeypatch.context() as patch:
    patch.setattr(local_builders.TextFiles, "download_and_prepare",
                  lambda *a, **k: pytest.fail("prepared data was not reused"))
    assert read_splits(again, ["train"]) == {"train": ["first version\n"]}

  write_text(corpus / "a.txt", "second, longer version\n")
  edited = text_builder(corpus, {"train": ["a.txt"]}, data_dir)
  assert edited.builder_config.name != builder.builder_config.name
  assert not edited.is_prepared()
  assert read_splits(edited, ["train"]) == {"train": ["second, longer version\n"]}
  # The unit and the held-out share are part of the name too.
  names = {text_builder(corpus, {"train": ["a.txt"]}, data_dir, unit, f).builder_config.name
           for unit in ("file", "line") for f in (0.0, 0.1)}
  assert len(names) == 4
  assert len(prepared_dirs(data_dir)) == 2


def _missing_file(d):
  write_text(d / "a.txt", "text\n")
  write_text(d / "other.txt", "text\n")
  return {"train": ["a.txt", "nope.txt"]}, "file", 0.0, [r"nope\.txt: no such file",
                                                          r"has a\.txt, other\.txt"]


def _empty_file(d):
  write_text(d / "a.txt", "text\n")
  write_text(d / "b.txt", "", gz=True)
  return {"train": ["a.txt", "b.txt"]}, "file", 0.0, [r"b\.txt\.gz: the file is empty"]


def _whitespace_only_file(d):
  write_text(d / "a.txt", " \n\t\n\n")
  return {"train": ["a.txt"]}, "line", 0.0, [r"a\.txt: the file is empty \(or only "
                                             r"whitespace\)"]


def _invalid_utf8(d):
  write_text(d / "a.txt", "fine\n")
  with gzip.open(d / "b.txt.gz", "wb") as f:
    f.write("Grüße\nzwei\n".encode("utf-8") + b"kaputt \xff\n" + b"vier\n")
  return {"train": ["a.txt", "b.txt"]}, "file", 0.0, [r"b\.txt\.gz, line 3: not valid UTF-8"]


def _missing_directory(d):
  d.rmdir()
  return {"train": ["a.txt"]}, "file", 0.0, [r"corpus: no such data directory"]


def _fraction_leaves_no_characters(d):
  write_text(d / "a.txt", "abcdefghij")
  return {"train": ["a.txt"]}, "file", 0.95, [r"validation_fraction=0\.95 of 10 characters "
                                              r"leaves one part empty"]


def _fraction_leaves_no_lines(d):
  write_text(d / "a.txt", "one line only\n\n")
  return {"train": ["a.txt"]}, "line", 0.1, [r"validation_fraction=0\.1 of 1 lines leaves "
                                             r"no training text"]


def _fraction_with_a_validation_split(d):
  write_text(d / "a.txt", "text\n")
  write_text(d / "b.txt", "more\n")
  return ({"train": ["a.txt"], "validation": ["b.txt"]}, "file", 0.1,
          [r"validation_fraction.*no validation split"])


@pytest.mark.parametrize("make", [_missing_file, _empty_file, _whitespace_only_file,
                                  _invalid_utf8, _missing_directory,
                                  _fraction_leaves_no_characters, _fraction_leaves_no_lines,
                                  _fraction_with_a_validation_split],
                         ids=lambda f: f.__name__[1:])
def test_broken_text_files_name_the_problem_and_prepare_nothing(tmp_path, make):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  data_dir = tmp_path / "tfds"
  splits, unit, fraction, messages = make(corpus)
  with pytest.raises(DataError) as error:
    builder = text_builder(corpus, splits, data_dir, unit, fraction)
    sources.open_splits(builder, list(splits), needs_tensorflow=False)
  for message in messages:
    assert re.search(message, str(error.value)), (message, str(error.value))
  assert prepared_dirs(data_dir) == []
  assert not list(data_dir.rglob("*.array_record*"))


# ----------------------------------------------------------------------------- windows


def test_concatenate_follows_every_document_with_eos():
  stream = windows.concatenate([np.array([5, 6]), np.array([7]), np.array([], np.int32)], 1)
  np.testing.assert_array_equal(stream, [5, 6, 1, 7, 1, 1])
  assert stream.dtype == np.int32
  assert windows.concatenate([], 1).shape == (0,)


@pytest.mark.parametrize("size,length", [(20, 4), (23, 4), (3, 8), (1, 1), (17, 17)])
def test_cut_windows_cover_the_stream_once_in_order(size, length):
  stream = np.arange(3, 3 + size, dtype=np.int32)
  cut = windows.cut_windows(stream, length)
  np.testing.assert_array_equal(np.concatenate([w["inputs"] for w in cut]), stream)
  assert all(len(w["inputs"]) == length for w in cut[:-1])
  assert 1 <= len(cut[-1]["inputs"]) <= length
  assert len(cut) == -(-size // length)


def test_window_bounds_with_an_offset_start_with_the_short_head():
  np.testing.assert_array_equal(windows.window_bounds(10, 4, 3),
                                [[0, 3], [3, 7], [7, 10]])
  np.testing.assert_array_equal(windows.window_bounds(10, 4, 1),
                                [[0, 1], [1, 5], [5, 9], [9, 10]])
  for offset in range(4):
    bounds = windows.window_bounds(11, 4, offset)
    assert bounds[0, 0] == 0 and bounds[-1, 1] == 11
    np.testing.assert_array_equal(bounds[1:, 0], bounds[:-1, 1])  # no gap, no overlap


STREAM = np.arange(3, 3 + 203, dtype=np.int32)  # token t stands at position t - 3
LENGTH, BATCH, DEVICES = 8, 8, 4


def make_windows(**kwargs):
  args = dict(batch_size=BATCH, num_devices=DEVICES, seed=0)
  return windows.WindowBatches(STREAM, LENGTH, **{**args, **kwargs})


def row_slices(batch):
  """(start, end) stream positions of each row, checking the row is a real slice of the
  stream followed by padding."""
  out = []
  for row in batch["inputs"].reshape(-1, LENGTH):
    n = int(np.count_nonzero(row))
    assert n >= 1 and np.all(row[n:] == 0)
    start = int(row[0]) - 3
    np.testing.assert_array_equal(row[:n], STREAM[start:start + n])
    out.append((start, start + n))
  return out


def test_window_batches_are_real_distinct_slices_within_an_epoch():
  source = make_windows()
  per_epoch = source.batches_per_epoch
  assert per_epoch == (len(STREAM) // LENGTH) // BATCH == 3
  phases = []
  for epoch in range(4):
    slices = []
    for k in range(epoch * per_epoch, (epoch + 1) * per_epoch):
      batch = source[k]
      assert batch["inputs"].shape == (DEVICES, BATCH // DEVICES, LENGTH)
      assert batch["inputs"].dtype == np.int32
      slices += row_slices(batch)
    assert len(set(slices)) == len(slices) == per_epoch * BATCH  # no window twice
    covered = np.zeros(len(STREAM), int)
    for start, end in slices:
      covered[start:end] += 1
    assert covered.max() == 1  # windows never overlap within an epoch
    # All full windows share one phase (the epoch's offset), and every window read is one
    # of that epoch's cut: a short head [0, offset) or the stream's short tail.
    full = {s % LENGTH for s, e in slices if e - s == LENGTH}
    assert len(full) == 1
    offset = full.pop()
    bounds = {tuple(b) for b in windows.window_bounds(len(STREAM), LENGTH, offset).tolist()}
    assert set(slices) <= bounds
    phases.append(offset)
  assert len(set(phases)) > 1  # window boundaries move between epochs


def test_window_batches_epochs_shuffle_differently():
  source = make_windows()
  per_epoch = source.batches_per_epoch
  firsts = [row_slices(source[e * per_epoch]) for e in range(3)]
  assert firsts[0] != firsts[1] != firsts[2]
  assert row_slices(make_windows(seed=1)[0]) != firsts[0]


def test_window_batch_k_is_a_pure_function_of_k_so_resume_reads_the_same_batches():
  source = make_windows()
  per_epoch = source.batches_per_epoch
  reads = {k: source[k]["inputs"] for k in (0, 1, per_epoch, 2 * per_epoch + 1, 50)}
  for k, expected in reads.items():  # a fresh object, batch k read cold
    np.testing.assert_array_equal(make_windows()[k]["inputs"], expected)
  resumed = list(batching.iterate(grain.MapDataset.source(make_windows()),
                                  start=per_epoch - 1, limit=3))
  for i, batch in enumerate(resumed):
    np.testing.assert_array_equal(batch["inputs"], source[per_epoch - 1 + i]["inputs"])


def test_window_batches_of_two_processes_make_up_the_one_process_batch():
  source = make_windows()
  for k in (0, 2, 4):
    halves = [make_windows(num_devices=2, process_index=p, process_count=2)[k]["inputs"]
              for p in (0, 1)]
    assert halves[0].shape == (2, BATCH // 4, LENGTH)
    np.testing.assert_array_equal(np.concatenate([h.reshape(-1, LENGTH) for h in halves]),
                                  source[k]["inputs"].reshape(-1, LENGTH))


def test_window_batches_reject_a_short_stream_or_an_indivisible_batch():
  with pytest.raises(ValueError, match=r"has 63 tokens, fewer than one batch of 8 windows"):
    windows.WindowBatches(STREAM[:63], LENGTH, batch_size=8, num_devices=4)
  windows.WindowBatches(STREAM[:64], LENGTH, batch_size=8, num_devices=4)  # exactly enough
  with pytest.raises(ValueError, match="not divisible"):
    windows.WindowBatches(STREAM, LENGTH, batch_size=6, num_devices=4)


# ----------------------------------------------------------------------------- tokenizers


MULTILINE = "the king  speak\n\nhear me    all\n  before we die\n\n\nsweet prince \n"


@pytest.fixture(scope="module")
def sentencepiece_pair(tmp_path_factory):
  """(whitespace-keeping, default) sentencepiece models on the same lines of words."""
  lines = [line for line in words_text(300, seed=3).split("\n") if line]
  path = str(tmp_path_factory.mktemp("sp") / "keep.model")
  keep = tokenizers.train_sentencepiece(lines, 48, path, keep_whitespace=True)
  normal = tokenizers.get_or_build("sentencepiece", None, lambda: lines, 48)
  return keep, normal


def test_sentencepiece_keep_whitespace_round_trips_multiline_text(tmp_path,
                                                                  sentencepiece_pair):
  keep, normal = sentencepiece_pair
  assert keep.decode(keep.encode(MULTILINE)) == MULTILINE
  assert normal.decode(normal.encode(MULTILINE)) == " ".join(MULTILINE.split())
  # get_or_build passes keep_whitespace on, and the reloaded file keeps it too.
  lines = [line for line in words_text(300, seed=3).split("\n") if line]
  path = str(tmp_path / "lm.model")
  built = tokenizers.get_or_build("sentencepiece", path, lambda: lines, 48,
                                  keep_whitespace=True)
  reloaded = tokenizers.load_tokenizer(path)
  for tokenizer in (built, reloaded):
    assert tokenizer.decode(tokenizer.encode(MULTILINE)) == MULTILINE


@pytest.mark.parametrize("kind", ["chars", "bytes", "sentencepiece"])
def test_text_lengths_count_the_characters_each_token_stands_for(kind, sentencepiece_pair):
  text = "the king speak\nhear me all\nbefore we die\nsweet  prince"
  tokenizer = {"chars": lambda: tokenizers.CharacterTokenizer.build([text + "Ü"]),
               "bytes": tokenizers.ByteTokenizer,
               "sentencepiece": lambda: sentencepiece_pair[0]}[kind]()
  lengths = tokenizer.text_lengths()
  assert lengths.shape == (tokenizer.vocab_size,)
  assert lengths[tokenizers.PAD_ID] == 0 and lengths[tokenizers.EOS_ID] == 1
  for sample in (text, "prince", "die\n\nall"):
    total = lengths[tokenizer.encode(sample)].sum() + lengths[tokenizer.eos_id]
    # keep_whitespace models add no hidden leading "▁", which would count a space the
    # text does not have.
    assert total == len(sample) + 1
  if kind == "bytes":
    assert lengths[tokenizer.encode("Über")].sum() == len("Über".encode("utf-8")) == 5
  if kind == "chars":
    assert lengths[tokenizer.encode("Über")].sum() == 4


# ----------------------------------------------------------------------------- the task


def write_corpus(directory):
  """a.txt plain and b.txt gzipped: lines of words with blank lines and double spaces."""
  directory.mkdir(exist_ok=True)
  a, b = words_text(60, seed=4), words_text(40, seed=5)
  write_text(directory / "a.txt", a)
  write_text(directory / "b.txt", b, gz=True)
  return a, b


def lm_config(tmp_path, **overrides):
  """A tiny language model on the generated text files, validated for 8 devices;
  `overrides` are grouped: `lm_config(tmp_path, data=dict(lm_batching="documents"))`."""
  c = default.get_config("task=generation")
  presets.update_groups(c, dict(
      data=dict(dataset="files", data_dir=str(tmp_path / "corpus"),
                file_splits="train=a.txt+b.txt", validation_fraction=0.1,
                tfds_data_dir=str(tmp_path / "tfds"), max_target_length=16),
      model=dict(tokenizer="chars", vocab_size=64, d_model=32, d_ff=64, num_heads=2,
                 num_decoder_layers=1),
      decode=dict(eval_prompt_length=4), train=dict(batch_size=16),
      eval=dict(eval_batch_size=8)))
  presets.update_groups(c, overrides)
  train.validate(c, num_devices=8)
  return c


def stream_slices(rows, stream):
  """Checks every non-empty row is a contiguous slice of `stream` then padding."""
  for row in rows.reshape(-1, rows.shape[-1]):
    n = int(np.count_nonzero(row))
    assert np.all(row[n:] == 0)
    if n:
      hits = [i for i in range(len(stream) - n + 1) if np.array_equal(stream[i:i + n],
                                                                       row[:n])]
      assert hits, row


@pytest.mark.parametrize("tokenizer,vocab_size", [("chars", 64), ("bytes", 259),
                                                  ("sentencepiece", 48)])
def test_files_task_eval_windows_are_the_held_out_stream(tmp_path, tokenizer, vocab_size):
  a, b = write_corpus(tmp_path / "corpus")
  config = lm_config(tmp_path, model=dict(tokenizer=tokenizer, vocab_size=vocab_size))
  task = tasks.get_task(config, str(tmp_path / "run"), training=True)
  text = a + b
  cut = int(len(text) * 0.9)
  assert task.data.documents("train") == [a, b[:cut - len(a)]]
  assert task.data.documents("validation") == [text[cut:]]
  stream = task.data.stream("validation")
  # Each document's tokens then EOS; whitespace survives every tokenizer.
  np.testing.assert_array_equal(stream[:-1], task.data.tokenizer.encode(text[cut:]))
  assert stream[-1] == tokenizers.EOS_ID and task.data.tokenizer.decode(stream) == text[cut:]
  cut_rows = task.data_source("eval")
  np.testing.assert_array_equal(np.concatenate([w["inputs"] for w in cut_rows]), stream)
  assert all(len(w["inputs"]) == config.data.max_target_length for w in cut_rows[:-1])

  train = task.train_dataset(config.train.batch_size, 8)
  assert isinstance(train, grain.MapDataset)
  batch = train[0]
  assert set(batch) == {"inputs"}
  assert batch["inputs"].shape == (8, 2, config.data.max_target_length)
  assert batch["inputs"].dtype == np.int32
  stream_slices(batch["inputs"], task.data.stream("train"))
  assert int(np.count_nonzero(batch["inputs"])) > batch["inputs"].size // 2


def test_chars_tokenizer_is_saved_in_the_workdir_and_reloaded_outside_training(
    tmp_path, monkeypatch):
  write_corpus(tmp_path / "corpus")
  config = lm_config(tmp_path)
  workdir = tmp_path / "run"
  with pytest.raises(TokenizerError, match=r"no tokenizer at .*tokenizer\.json"):
    tasks.get_task(config, str(workdir), training=False)
  trained = tasks.get_task(config, str(workdir), training=True)
  assert (workdir / "tokenizer.json").exists()
  assert set(trained.data.tokenizer.characters) == set("".join(trained.data.documents("train")))
  assert trained.vocab_size == len(trained.data.tokenizer.characters) + 3

  monkeypatch.setattr(tokenizers.CharacterTokenizer, "build",
                      lambda *a: pytest.fail("rebuilt instead of loading the file"))
  loaded = tasks.get_task(config, str(workdir), training=False)
  assert loaded.data.tokenizer.characters == trained.data.tokenizer.characters
  np.testing.assert_array_equal(loaded.data.stream("validation"), trained.data.stream("validation"))


def test_characters_only_in_the_held_out_text_are_named_before_the_vocabulary_is_saved(
    tmp_path):
  a, b = write_corpus(tmp_path / "corpus")
  lines = b.split("\n")
  lines[-3] = "good night ~ sweet prince Ω"  # in the held-out last 10% of a.txt + b.txt
  b = "\n".join(lines)
  write_text(tmp_path / "corpus" / "b.txt", b, gz=True)
  config = lm_config(tmp_path)
  workdir = tmp_path / "run"
  workdir.mkdir()
  with pytest.raises(DataError) as error:
    tasks.get_task(config, str(workdir), training=True)
  message = str(error.value)
  held = (a + b)[int(len(a + b) * 0.9):]
  line = held[:held.index("~")].count("\n") + 1
  assert message.startswith(
      f"split 'validation' (the held-out last 10% of the 'train' text) has characters that "
      f"the training split 'train' lacks: '~' (U+007E) first in line {line}; 'Ω' (U+03A9) "
      f"first in line {line}.")
  assert "config.model.tokenizer='bytes'" in message and "delete" not in message
  assert os.listdir(workdir) == []  # no vocabulary saved for the next run to trip on

  # A vocabulary made before (another run's) names its file; evaluating a split with
  # characters it lacks does not advise deleting it: the checkpoints were trained with it.
  write_corpus(tmp_path / "corpus")
  tasks.get_task(config, str(workdir), training=True)
  write_text(tmp_path / "corpus" / "c.txt", "the king ~ speaks\n")
  presets.update_groups(config, dict(data=dict(file_splits="train=a.txt+b.txt,test=c.txt")))
  task = tasks.get_task(config, str(workdir), training=False)
  with pytest.raises(DataError) as error:
    task.data_source("test")
  message = str(error.value)
  assert message.startswith(f"split 'test' has characters outside the character vocabulary "
                            f"{workdir / 'tokenizer.json'}: '~' (U+007E) first in line 1.")
  assert "train a new run (another --workdir)" in message and "delete" not in message


def test_documents_batching_packs_each_document_row_once_per_epoch(tmp_path):
  a, b = write_corpus(tmp_path / "corpus")
  config = lm_config(tmp_path, data=dict(lm_batching="documents", pack_examples=True,
                                         text_documents="line", validation_fraction=0.0,
                                         file_splits="train=a.txt+b.txt", eval_split="train"))
  task = tasks.get_task(config, str(tmp_path / "run"), training=True)
  lines = [line for line in (a + b).split("\n") if line.strip()]
  assert task.data.documents("train") == lines
  length = config.data.max_target_length
  want = collections.Counter()
  for line in lines:  # each line + EOS, cut into rows of the context length
    tokens = tuple(task.data.tokenizer.encode(line)) + (tokenizers.EOS_ID,)
    want.update(tokens[i:i + length] for i in range(0, len(tokens), length))
  assert max(len(t) for t in want) == length  # some lines are cut

  train = task.train_dataset(config.train.batch_size, 8)
  found, k = collections.Counter(), 0
  while sum(found.values()) < sum(want.values()):
    batch = train[k]
    assert set(batch) == {"inputs", "inputs_segmentation", "inputs_position"}
    for key, value in batch.items():
      assert value.shape == (8, 2, length) and value.dtype == np.int32, key
    flat = {key: value.reshape(-1, length) for key, value in batch.items()}
    for tokens, seg, pos in zip(flat["inputs"], flat["inputs_segmentation"],
                                flat["inputs_position"]):
      assert np.all(tokens[seg == 0] == 0) and np.all(tokens[seg > 0] > 0)
      for s in range(1, int(seg.max()) + 1):
        np.testing.assert_array_equal(pos[seg == s], np.arange(np.sum(seg == s)))
        found[tuple(tokens[seg == s].tolist())] += 1
    k += 1
  assert found == want  # one epoch: every document row exactly once
  assert k < len(want) // config.train.batch_size  # it does pack several rows into one


def test_documents_batching_without_packing_pads_each_row(tmp_path):
  a, b = write_corpus(tmp_path / "corpus")
  config = lm_config(tmp_path, data=dict(lm_batching="documents", text_documents="line",
                                         file_splits="train=a.txt+b.txt.gz"))  # .gz works too
  task = tasks.get_task(config, str(tmp_path / "run"), training=True)
  lines = [line for line in (a + b).split("\n") if line.strip()]
  assert task.data.documents("train") + task.data.documents("validation") == lines
  rows = {tuple(r["inputs"].tolist()) for r in task.data_source("train")}
  batch = task.train_dataset(config.train.batch_size, 8)[0]
  assert set(batch) == {"inputs"} and batch["inputs"].shape == (8, 2, 16)
  for row in batch["inputs"].reshape(-1, 16):
    n = int(np.count_nonzero(row))
    assert np.all(row[n:] == 0) and tuple(row[:n].tolist()) in rows


def test_documents_split_not_in_the_files_is_named(tmp_path):
  write_corpus(tmp_path / "corpus")
  task = tasks.get_task(lm_config(tmp_path), str(tmp_path / "run"), training=True)
  with pytest.raises(DataError, match=r"split 'test' is not one of .*train, validation"):
    task.data.documents("test")


def test_too_little_training_text_for_one_batch_is_a_data_error(tmp_path):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  write_text(corpus / "a.txt", "short text\n" * 4)
  write_text(corpus / "b.txt", "text\n")  # (characters of the training text only)
  task = tasks.get_task(lm_config(tmp_path), str(tmp_path / "run"), training=True)
  with pytest.raises(DataError, match=r"fewer than one batch of 16 windows of 16"):
    task.train_dataset(16, 8)


def _config_with(**overrides):
  """A language model config on files; `overrides` are grouped (`data=dict(...)`) or
  top-level fields (`task=...`)."""
  c = default.get_config("task=generation")
  presets.update_groups(c, dict(
      data=dict(dataset="files", data_dir="/data", file_splits="train=a.txt",
                validation_fraction=0.1, max_target_length=16),
      model=dict(tokenizer="chars", vocab_size=64), decode=dict(eval_prompt_length=4),
      train=dict(batch_size=16), eval=dict(eval_batch_size=8)))
  presets.update_groups(c, overrides)
  return c


@pytest.mark.parametrize("field,overrides", [
    ("model.tokenizer", dict(task="translation", model=dict(tokenizer="chars"),
                             data=dict(file_splits="train=train,validation=val",
                                       validation_fraction=0.0))),
    ("data.lm_batching", dict(data=dict(lm_batching="bogus"))),
    ("data.text_documents", dict(data=dict(text_documents="paragraph"))),
    ("data.validation_fraction", dict(data=dict(validation_fraction=1.5))),
    ("data.validation_fraction", dict(data=dict(validation_fraction=-0.1))),
    ("data.pack_examples", dict(data=dict(pack_examples=True, lm_batching="windows"))),
    ("decode.temperature", dict(decode=dict(temperature=0.0, greedy=False))),
    ("decode.top_p", dict(decode=dict(top_p=0.0))),
    ("decode.top_p", dict(decode=dict(top_p=1.5))),
    ("decode.top_k", dict(decode=dict(top_k=-1))),
    ("decode.eval_prompt_length", dict(decode=dict(eval_prompt_length=16))),
    ("decode.eval_prompt_length", dict(decode=dict(eval_prompt_length=20))),
    ("data.validation_fraction", dict(data=dict(file_splits="train=a.txt,validation=b.txt"))),
    # no held-out split to evaluate
    ("data.eval_split", dict(data=dict(validation_fraction=0.0))),
    ("data.data_dir", dict(data=dict(data_dir=""))),
])
def test_validation_rejects_bad_language_model_fields(field, overrides):
  with pytest.raises(config_checks.ConfigError, match="^" + re.escape(f"config.{field}=")):
    train.validate(_config_with(**overrides), num_devices=8)


@pytest.mark.parametrize("overrides", [
    dict(), dict(decode=dict(temperature=0.0, greedy=True)),
    dict(decode=dict(top_p=1.0, top_k=5)),
    dict(data=dict(lm_batching="documents", pack_examples=True, text_documents="line")),
    dict(decode=dict(eval_prompt_length=15)), dict(model=dict(tokenizer="bytes", vocab_size=259)),
    dict(data=dict(validation_fraction=0.0, file_splits="train=a.txt,validation=b.txt")),
])
def test_validation_accepts_good_language_model_configs(overrides):
  train.validate(_config_with(**overrides), num_devices=8)


# ----------------------------------------------------------------------------- tfds by name


@pytest.mark.parametrize("name,overrides", [
    ("tiny_shakespeare", dict(model=dict(tokenizer="chars", vocab_size=64), data=dict())),
    ("lm1b", dict(model=dict(tokenizer="bytes", vocab_size=259),
                  data=dict(eval_split="test", lm_batching="documents", pack_examples=True))),
])
def test_tfds_text_datasets_by_name_with_mock_data(tmp_path, name, overrides):
  config = lm_config(tmp_path, model=overrides["model"],
                     data=dict(dataset=name, validation_fraction=0.0, max_target_length=8,
                               **overrides["data"]),
                     train=dict(batch_size=8))
  with tfds.testing.mock_data(num_examples=8):
    raw = sources.tfds_builder(name, str(tmp_path / "tfds")).as_data_source("train")
    raw = [sources.as_text(raw[i]["text"]) for i in range(len(raw))]
    task = tasks.get_task(config, str(tmp_path / "run"), training=True)
    assert task.data.documents("train") == [t for t in raw if t] and len(raw) == 8
    np.testing.assert_array_equal(
        task.data.stream("train"),
        windows.concatenate([task.data.tokenizer.encode(t) for t in raw if t], tokenizers.EOS_ID))
    assert len(task.data_source("eval")) > 0
    batch = task.train_dataset(config.train.batch_size, 8)[0]
  assert batch["inputs"].shape == (8, 1, 8) and batch["inputs"].dtype == np.int32
  if config.data.lm_batching == "windows":
    stream_slices(batch["inputs"], task.data.stream("train"))
  else:
    assert batch["inputs_segmentation"].shape == (8, 1, 8)
    rows = {tuple(r["inputs"].tolist()) for r in task.data_source("train")}
    flat = batch["inputs"].reshape(-1, 8)
    seg = batch["inputs_segmentation"].reshape(-1, 8)
    for tokens, s in zip(flat, seg):
      for i in range(1, int(s.max()) + 1):
        assert tuple(tokens[s == i].tolist()) in rows
  assert "tensorflow" not in sys.modules


# ----------------------------------------------------------------------------- no TensorFlow


def test_language_model_data_path_never_imports_tensorflow(tmp_path):
  """In a fresh interpreter (this one may have imported TensorFlow elsewhere): building a
  generation task on local files and reading a training batch."""
  write_corpus(tmp_path / "corpus")
  config = lm_config(tmp_path)
  script = textwrap.dedent(f"""
      import sys
      from configs import default, presets
      import tasks
      c = default.get_config("task=generation")
      presets.update_groups(c, {config.to_dict()!r})
      task = tasks.get_task(c, {str(tmp_path / "run")!r}, training=True)
      batch = task.train_dataset(c.train.batch_size, 1)[0]
      assert batch["inputs"].shape == (1, c.train.batch_size, c.data.max_target_length)
      print("tensorflow imported:", "tensorflow" in sys.modules)
  """)
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "tensorflow imported: False" in result.stdout
