"""Text classification on real text: labeled .tsv/.csv files through the LabeledTextFiles
tfds builder (header, gzip, CSV quoting, broken files refused naming the file, line and
field), label names mapped to ids and kept with the run, accuracy / macro F1 / confusion
matrix against hand-computed values, padding that never changes a prediction, a tiny
end-to-end run on a separable task (TensorBoard image, best checkpoint, eval and predict
modes through main.py), tfds names with mock data, and no TensorFlow on the data path."""

import csv
import glob
import gzip
import json
import os
import random
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

import modes
import tasks
import train
from configs import classification as classification_config
from configs import presets
from input_pipeline import local_builders, normalize, sources
from input_pipeline.local_builders import DataError
from tasks import classification_metrics
from tasks.sources import labeled_text
from tests.cli_helpers import run_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_DEVICE = jax.local_devices()[:1]

GOOD = ("good", "great", "lovely", "superb", "fine")
BAD = ("bad", "awful", "poor", "dull", "terrible")
FILLER = "the a movie film plot actor story was is very quite".split()


def sentence(rng, label: str) -> str:
  """A few filler words and one word that decides the label."""
  words = [rng.choice(FILLER) for _ in range(rng.randint(2, 8))]
  words.insert(rng.randint(0, len(words)), rng.choice(GOOD if label == "positive" else BAD))
  return " ".join(words)


def write_table(path, header, rows, delimiter="\t", gz=False):
  """A .tsv/.csv table (csv-quoted when comma-separated); only `path.gz` when gz."""
  lines = []
  for row in [header] + rows:
    if delimiter == ",":
      lines.append(",".join(f'"{f}"' if ("," in f or '"' in f) else f for f in row))
    else:
      lines.append("\t".join(row))
  data = ("\n".join(lines) + "\n").encode("utf-8")
  if gz:
    with gzip.open(str(path) + ".gz", "wb") as f:
      f.write(data)
  else:
    with open(path, "wb") as f:
      f.write(data)


def write_corpus(directory, sizes=(("train", 400), ("dev", 64)), seed=0):
  """train.tsv.gz and dev.tsv (sentence, label) and an unlabeled test.tsv (index, sentence),
  the layout of GLUE SST-2. Returns {file stem: [(sentence, label)]}."""
  os.makedirs(directory, exist_ok=True)
  rng = random.Random(seed)
  out = {}
  for stem, n in sizes:
    rows = []
    for _ in range(n):
      label = rng.choice(["positive", "negative"])
      rows.append((sentence(rng, label), label))
    write_table(os.path.join(directory, f"{stem}.tsv"), ["sentence", "label"],
                [list(r) for r in rows], gz=stem == "train")
    out[stem] = rows
  test = [sentence(rng, "positive") for _ in range(5)]
  write_table(os.path.join(directory, "test.tsv"), ["index", "sentence"],
              [[str(i), s] for i, s in enumerate(test)])
  out["test"] = test
  return out


# {group: {field: value}}; config_flags passes each field as --config.<group>.<field>.
TINY = dict(
    data=dict(dataset="files", file_splits="train=train.tsv,validation=dev.tsv,test=test.tsv",
              max_input_length=16),
    model=dict(tokenizer="sentencepiece", sentencepiece_type="unigram", vocab_size=40,
               d_model=32, d_ff=64, num_heads=2, num_encoder_layers=1),
    train=dict(batch_size=32, num_train_steps=120, log_every_steps=40,
               checkpoint_every_steps=60),
    eval=dict(eval_batch_size=32, eval_every_steps=60, num_print_examples=2,
              best_metric="accuracy"),
    # (no SAM: the SST-2 recipe's second pass a step; seeds 0-3 of the runs below reach
    # accuracy 1.0 without it)
    optim=dict(learning_rate=3e-3, warmup_steps=10, schedule="cosine", dropout_rate=0.0,
               attention_dropout_rate=0.0, sam_rho=0.0))


def tiny_config(corpus_dir, tfds_dir, **overrides):
  """TINY on the files in `corpus_dir`; `overrides` are grouped like TINY:
  `tiny_config(d, t, model=dict(pooling="cls"))`."""
  c = classification_config.get_config()
  presets.update_groups(c, TINY)
  presets.update_groups(c, dict(data=dict(data_dir=str(corpus_dir),
                                          tfds_data_dir=str(tfds_dir))))
  presets.update_groups(c, overrides)
  return c


def builder_rows(directory, splits, data_dir, text="sentence", label="label"):
  builder = local_builders.labeled_text_builder(str(directory), splits, text, label,
                                                str(data_dir))
  out = {}
  for split, source in sources.open_splits(builder, list(splits),
                                           needs_tensorflow=False).items():
    out[split] = [(sources.as_text(source[i]["text"]), sources.as_text(source[i]["label"]),
                   int(source[i]["line"])) for i in range(len(source))]
  return out


# ----------------------------------------------------------------------------- the builder


def test_builder_reads_tsv_gz_and_csv_with_quotes_and_unlabeled_files(tmp_path):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  write_table(corpus / "train.tsv", ["id", "sentence", "label"],
              [["1", "a fine film ", "pos"], ["2", 'it "works"', "neg"]], gz=True)
  # CSV: a quoted field holds commas, a quote and a newline; columns in another order.
  (corpus / "dev.csv").write_text('label,sentence\npos,"one, two, ""three"""\n'
                                  'neg,"first line\nsecond line"\n\nneg,plain\n',
                                  encoding="utf-8")
  write_table(corpus / "test.tsv", ["index", "sentence"], [["0", "no label here"]])
  rows = builder_rows(corpus, {"train": "train.tsv", "validation": "dev.csv",
                               "test": "test.tsv"}, tmp_path / "tfds")
  # TSV is not quoted: quotes stay as they are; the trailing space is kept.
  assert rows["train"] == [("a fine film ", "pos", 2), ('it "works"', "neg", 3)]
  # Lines are where each row starts (the quoted newline spans lines 3-4; line 5 is blank).
  assert rows["validation"] == [('one, two, "three"', "pos", 2),
                                ("first line\nsecond line", "neg", 3), ("plain", "neg", 6)]
  assert rows["test"] == [("no label here", "", 2)]


def test_editing_a_labeled_file_reprepares_it_under_a_new_name(tmp_path):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  write_table(corpus / "a.tsv", ["sentence", "label"], [["x", "1"]])
  splits = {"train": "a.tsv"}
  first = local_builders.labeled_text_builder(str(corpus), splits, "sentence", "label",
                                              str(tmp_path / "tfds"))
  other_column = local_builders.labeled_text_builder(str(corpus), splits, "sentence", "y",
                                                     str(tmp_path / "tfds"))
  assert first.builder_config.name != other_column.builder_config.name
  assert builder_rows(corpus, splits, tmp_path / "tfds")["train"] == [("x", "1", 2)]
  write_table(corpus / "a.tsv", ["sentence", "label"], [["y", "0"], ["z", "1"]])
  edited = local_builders.labeled_text_builder(str(corpus), splits, "sentence", "label",
                                               str(tmp_path / "tfds"))
  assert edited.builder_config.name != first.builder_config.name
  assert builder_rows(corpus, splits, tmp_path / "tfds")["train"] == [("y", "0", 2),
                                                                      ("z", "1", 3)]


def _unknown_text_column(d):
  write_table(d / "train.tsv", ["text", "label"], [["x", "1"]])
  return "train.tsv", [r"train\.tsv, line 1 \(header\)", r"no column 'sentence'",
                       r"'text', 'label'", r"text_feature"]


def _ragged_row(d):
  write_table(d / "train.tsv", ["sentence", "label"], [["x", "1"], ["a\tb", "0"]])
  return "train.tsv", [r"train\.tsv, line 3", r"3 fields", r"header \(line 1\) has 2"]


def _empty_text(d):
  write_table(d / "train.csv", ["sentence", "label"], [["x", "1"], ["  ", "0"]],
              delimiter=",", gz=True)
  return "train.csv", [r"train\.csv\.gz, line 3: empty text in column 'sentence'"]


def _empty_label(d):
  write_table(d / "train.tsv", ["sentence", "label"], [["x", "1"], ["y", ""]])
  return "train.tsv", [r"train\.tsv, line 3: empty label in column 'label'"]


def _empty_file(d):
  (d / "train.tsv").write_text("\n\n", encoding="utf-8")
  return "train.tsv", [r"train\.tsv: the file is empty"]


def _header_only(d):
  write_table(d / "train.tsv", ["sentence", "label"], [])
  return "train.tsv", [r"train\.tsv: the file has a header \(line 1\) but no rows"]


def _missing_file(d):
  write_table(d / "other.tsv", ["sentence", "label"], [["x", "1"]])
  return "train.tsv", [r"train\.tsv: no such file", r"has other\.tsv"]


def _unknown_extension(d):
  write_table(d / "train.txt", ["sentence", "label"], [["x", "1"]])
  return "train.txt", [r"train\.txt: cannot tell the column delimiter", r"\.tsv or \.csv"]


def _bad_csv_quote(d):
  (d / "train.csv").write_text('sentence,label\n"unclosed,1\n', encoding="utf-8")
  return "train.csv", [r"train\.csv, line 2: cannot parse the row"]


@pytest.mark.parametrize("make", [_unknown_text_column, _ragged_row, _empty_text,
                                  _empty_label, _empty_file, _header_only, _missing_file,
                                  _unknown_extension, _bad_csv_quote],
                         ids=lambda f: f.__name__[1:])
def test_broken_labeled_files_name_file_line_and_field_and_prepare_nothing(tmp_path, make):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  data_dir = tmp_path / "tfds"
  name, messages = make(corpus)
  with pytest.raises(DataError) as error:
    builder_rows(corpus, {"train": name}, data_dir)
  for message in messages:
    assert re.search(message, str(error.value)), (message, str(error.value))
  assert not list(data_dir.rglob("*.array_record*"))


# ----------------------------------------------------------------------------- labels


def test_label_names_sort_strings_and_integers_and_round_trip(tmp_path):
  assert labeled_text.label_names_from(["pos", "neg", "pos", "mixed"], "f") == [
      "mixed", "neg", "pos"]
  # Integers sort by value (not "10" < "2") and are written canonically.
  names = labeled_text.label_names_from(["10", "2", "02", "1"], "f")
  assert names == ["1", "2", "10"]
  raw = ["10", "1", "02", "2"]
  ids = labeled_text.map_labels(raw, names, "f.tsv", [2, 3, 4, 5])
  assert ids == [2, 0, 1, 1] and [names[i] for i in ids] == ["10", "1", "2", "2"]
  path = str(tmp_path / "run" / "labels.json")
  labeled_text.save_labels(path, names)
  assert labeled_text.load_labels(path) == names
  assert not glob.glob(str(tmp_path / "run" / "*.tmp"))


@pytest.mark.parametrize("names,label,message", [
    (["neg", "pos"], "neutral", r"dev\.tsv, line 7: label 'neutral' is not one of the "
                                r"training labels \(neg, pos\)"),
    (["0", "1"], "2", r"dev\.tsv, line 7: label '2' is not one of the training labels"),
    (["0", "1"], "one", r"dev\.tsv, line 7: label 'one' does not parse as an integer"),
])
def test_a_label_outside_the_mapping_names_file_line_and_value(names, label, message):
  with pytest.raises(DataError, match=message):
    labeled_text.map_labels(["pos" if names[0] == "neg" else "1", label], names,
                              "dev.tsv", [6, 7])
  # Classes read from a workdir's labels.json: the message says so (the data may have been
  # relabelled since the run was first trained).
  saved = message.replace(r"\)", "") + r".*the run's classes, saved in run/labels\.json"
  with pytest.raises(DataError, match=saved):
    labeled_text.map_labels(["pos" if names[0] == "neg" else "1", label], names,
                              "dev.tsv", [6, 7], "run/labels.json")


def test_one_training_label_or_a_broken_labels_file_is_refused(tmp_path):
  with pytest.raises(DataError, match=r"train\.tsv: every training label is 'pos'"):
    labeled_text.label_names_from(["pos", "pos"], "train.tsv")
  path = tmp_path / "labels.json"
  path.write_text('{"labels": ["a", "a"]}')
  with pytest.raises(DataError, match="distinct"):
    labeled_text.load_labels(str(path))
  path.write_text("not json")
  with pytest.raises(DataError, match=r"labels\.json: cannot read the label names"):
    labeled_text.load_labels(str(path))


def test_a_rare_training_label_is_refused_or_named_in_a_warning(caplog):
  ids, names = [0] * 500 + [1] * 480 + [2] * 3, ["0", "1", "positive"]
  lines = list(range(2, 2 + len(ids)))
  with pytest.raises(DataError) as error:
    labeled_text.check_class_sizes(ids, names, "train.tsv", lines, minimum=10)
  assert str(error.value).startswith(
      "train.tsv: label 'positive' has 3 training example(s) (line(s) 982, 983, 984), fewer "
      "than config.data.min_class_examples=10")
  assert "('0': 500, '1': 480, 'positive': 3)" in str(error.value)
  # Allowed by the minimum, a class under 1/100 of the largest and a mix of integers and
  # words are warned about; balanced integer labels are not.
  with caplog.at_level("WARNING"):
    labeled_text.check_class_sizes(ids, names, "train.tsv", lines, minimum=3)
  warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert len(warned) == 2, warned
  assert "label 'positive' has only 3 training examples, under 1/100 of the largest" in warned[0]
  assert "mix integers (0, 1) and words (positive)" in warned[1]
  caplog.clear()
  with caplog.at_level("WARNING"):
    labeled_text.check_class_sizes([0, 1, 2] * 10, ["Neg", "neg", "pos"], "train.tsv", lines,
                                   minimum=10)
  warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert len(warned) == 1 and "labels 'Neg' and 'neg' differ only in case" in warned[0]
  caplog.clear()
  with caplog.at_level("WARNING"):
    labeled_text.check_class_sizes([0, 1] * 10, ["0", "1"], "train.tsv", lines, minimum=10)
  assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_a_mistyped_training_label_stops_the_run_before_anything_is_written(tmp_path):
  rows = write_corpus(tmp_path / "corpus")["train"]
  write_table(tmp_path / "corpus" / "train.tsv", ["sentence", "label"],
              [list(r) for r in rows[:-1]] + [[rows[-1][0], "postive"]], gz=True)
  config = tiny_config(tmp_path / "corpus", tmp_path / "tfds")
  workdir = tmp_path / "run"
  with pytest.raises(DataError, match=r"train\.tsv\.gz: label 'postive' has 1 training "
                                      r"example\(s\) \(line\(s\) 401\)"):
    tasks.get_task(config, str(workdir), training=True)
  assert not workdir.exists()
  presets.update_groups(config, dict(data=dict(min_class_examples=1)))  # kept on request
  assert tasks.get_task(config, None).label_names == ["negative", "positive", "postive"]


# ----------------------------------------------------------------------------- metrics


def test_metrics_match_hand_computed_values():
  labels = [0, 0, 0, 1, 1, 2, 2]
  predicted = [0, 1, 0, 1, 1, 0, 2]
  matrix = classification_metrics.confusion_matrix(labels, predicted, 4)
  np.testing.assert_array_equal(matrix, [[2, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0],
                                         [0, 0, 0, 0]])
  # F1 = 2tp / (2tp + fp + fn): class 0: 4 / (4 + 1 + 1); class 1: 4 / (4 + 1 + 0);
  # class 2: 2 / (2 + 0 + 1); class 3 is neither a label nor a prediction: left out.
  np.testing.assert_allclose(classification_metrics.f1_per_class(matrix),
                             [4 / 6, 4 / 5, 2 / 3, 0.0])
  got = classification_metrics.scores(matrix)
  assert got["accuracy"] == pytest.approx(5 / 7)
  assert got["macro_f1"] == pytest.approx((4 / 6 + 4 / 5 + 2 / 3) / 3)
  # A true class never predicted counts with F1 0 (class 0: tp 1, fp 2, fn 0 -> 2 / 4).
  never = classification_metrics.confusion_matrix([0, 1, 1], [0, 0, 0], 2)
  assert classification_metrics.scores(never)["macro_f1"] == pytest.approx((2 / 4 + 0) / 2)
  table = classification_metrics.table(matrix[:3, :3], ["neg", "pos", "mixed"])
  assert table.splitlines()[1].split() == ["neg", "2", "1", "0", "0.6667"]
  image = classification_metrics.image(matrix[:3, :3], ["neg", "pos", "mixed"])
  assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
  assert image.std() > 0  # something is drawn


def test_task_summarize_uses_the_outputs_for_macro_f1(tmp_path, monkeypatch):
  write_corpus(tmp_path / "corpus")
  monkeypatch.chdir(tmp_path)
  task = tasks.get_task(tiny_config(tmp_path / "corpus", tmp_path / "tfds"), None)
  assert not (tmp_path / "tokenizer.model").exists()  # no workdir: nothing is saved
  outputs = [{"label": y, "predicted": p} for y, p in
             [("negative", "negative"), ("negative", "positive"), ("positive", "positive")]]
  metrics = task.summarize({"loss": 1.2, "weight": 3.0, "correct": 2.0}, outputs)
  assert metrics["accuracy"] == pytest.approx(2 / 3) and "perplexity" not in metrics
  # negative: tp 1, fp 0, fn 1 -> 2 / 3; positive: tp 1, fp 1, fn 0 -> 2 / 3.
  assert metrics["macro_f1"] == pytest.approx(2 / 3)
  assert task.eval_report(outputs)["confusion_matrix"] == [[1, 1], [0, 1]]


# ----------------------------------------------------------------------------- padding


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_padding_never_changes_the_prediction(tmp_path, pooling):
  """The same sentence padded to different lengths, alone or beside longer sentences,
  gives the same logits and probabilities."""
  write_corpus(tmp_path / "corpus")
  config = tiny_config(tmp_path / "corpus", tmp_path / "tfds", model=dict(pooling=pooling),
                       data=dict(max_input_length=32))
  task = tasks.get_task(config, None)
  params = task.init_params(jax.random.PRNGKey(1))
  tokens = task.data.tokenizer.encode("the plot was awful")
  other = task.data.tokenizer.encode("a very lovely film with the actor and the story " * 2)
  apply = jax.jit(lambda p, x: task.model.apply({"params": p}, x))
  predict = jax.jit(lambda p, x: task.predict(p, {"inputs": x}))
  rows = {}
  for length in (len(tokens), 12, 32):
    batch = np.zeros((2, length), np.int32)
    batch[0, :len(tokens)] = tokens
    if length == 32:
      batch[1, :min(len(other), 32)] = other[:32]
    rows[length] = apply(params, jnp.asarray(batch))[0]
    probabilities = predict(params, jnp.asarray(batch))[0]
    np.testing.assert_allclose(probabilities, jax.nn.softmax(rows[length]), atol=1e-6)
  for length in (12, 32):
    np.testing.assert_allclose(rows[length], rows[len(tokens)], atol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_pooling_ignores_what_is_behind_the_padding(tmp_path, pooling):
  """Whatever the padded positions hold (here: a different embedding of the padding id,
  which changes the encoder's outputs there), the logits stay the same."""
  write_corpus(tmp_path / "corpus")
  task = tasks.get_task(tiny_config(tmp_path / "corpus", tmp_path / "tfds",
                                    model=dict(pooling=pooling)), None)
  params = task.init_params(jax.random.PRNGKey(2))
  batch = np.zeros((1, 16), np.int32)
  tokens = task.data.tokenizer.encode("a dull story")
  batch[0, :len(tokens)] = tokens
  table = params["encoder"]["embed"]["embedding"]
  changed = jax.tree.map(lambda x: x, params)
  changed["encoder"]["embed"]["embedding"] = table.at[0].set(
      50.0 * jax.random.normal(jax.random.PRNGKey(3), table[0].shape))

  def run(p):
    logits, state = task.model.apply({"params": p}, jnp.asarray(batch),
                                     capture_intermediates=True)
    return logits, state["intermediates"]["encoder"]["__call__"][0]

  logits, encoded = run(params)
  logits2, encoded2 = run(changed)
  offset = 1 if pooling == "cls" else 0
  padded = slice(offset + len(tokens), None)
  assert not np.allclose(encoded[0, padded], encoded2[0, padded], atol=1e-3)
  np.testing.assert_allclose(encoded[0, :offset + len(tokens)],
                             encoded2[0, :offset + len(tokens)], atol=1e-5)
  np.testing.assert_allclose(logits, logits2, atol=1e-5)


# ----------------------------------------------------------------------------- end to end


def config_flags(config):
  fields = [(group, field) for group, values in TINY.items() for field in values]
  fields += [("data", "data_dir"), ("data", "tfds_data_dir")]
  return [f"--config.{group}.{field}={config[group][field]}" for group, field in fields]


def test_a_classifier_reading_with_its_lstm_alone_learns_and_has_no_heads(tmp_path):
  """model.encoder_lstm with no Transformer blocks: it trains and evaluates (no attention
  summaries), and the modes that inspect attention heads refuse in one line."""
  write_corpus(tmp_path / "corpus")
  config = tiny_config(tmp_path / "corpus", tmp_path / "tfds",
                       model=dict(encoder_lstm=True, num_encoder_layers=0, pooling="attention",
                                  conv_kernel=0,
                                  positional_encoding="none"))
  workdir = str(tmp_path / "run")
  metrics = train.train_and_evaluate(config, workdir, devices=ONE_DEVICE)
  assert metrics["accuracy"] >= 0.95, metrics
  for call in (lambda: modes.attention_report(config, workdir, example=0),
               lambda: modes.head_importance(config, workdir, ONE_DEVICE)):
    with pytest.raises(DataError, match="no attention layers to inspect"):
      call()


def test_tiny_run_learns_a_separable_task_end_to_end(tmp_path):
  corpus = write_corpus(tmp_path / "corpus")
  config = tiny_config(tmp_path / "corpus", tmp_path / "tfds")
  workdir = str(tmp_path / "run")
  metrics = train.train_and_evaluate(config, workdir, devices=ONE_DEVICE)
  assert metrics["accuracy"] >= 0.95 and metrics["macro_f1"] >= 0.95, metrics
  assert labeled_text.load_labels(os.path.join(workdir, "labels.json")) == [
      "negative", "positive"]
  assert os.path.exists(os.path.join(workdir, "tokenizer.model"))
  # The confusion matrix goes to TensorBoard as a PNG image at every evaluation.
  events = b"".join(open(p, "rb").read() for p in
                    glob.glob(os.path.join(workdir, "tensorboard", "*tfevents*")))
  assert b"eval/confusion_matrix" in events and b"final/confusion_matrix" in events
  assert b"\x89PNG" in events
  # The best checkpoint by validation accuracy.
  with open(os.path.join(workdir, "best", "best.json")) as f:
    best = json.load(f)
  assert best["metric"] == "accuracy" and best["step"] in (60, 120)
  jsonl = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  evals = {r["step"]: r["eval/accuracy"] for r in jsonl if "eval/accuracy" in r}
  assert best["value"] == pytest.approx(max(evals.values()))

  # Eval mode on the labeled dev split, with the best checkpoint.
  result = modes.evaluate_checkpoint(config, workdir, devices=ONE_DEVICE, checkpoint="best")
  assert result["accuracy"] == pytest.approx(best["value"])
  report = json.load(open(glob.glob(os.path.join(workdir, "eval", "validation-best-*.json"))[0]))
  assert np.sum(report["confusion_matrix"]) == len(corpus["dev"])
  assert report["labels"] == ["negative", "positive"]
  with open(report["predictions"], encoding="utf-8") as f:
    table = list(csv.reader(f, delimiter="\t"))
  assert table[0] == ["index", "label", "predicted", "p(negative)", "p(positive)", "text"]
  assert [(r[5], r[1]) for r in table[1:]] == corpus["dev"]
  # The unlabeled test split cannot be evaluated.
  with pytest.raises(DataError, match=r"split 'test' has no labels \(file .*test\.tsv has "
                                      r"no column 'label'\)"):
    modes.evaluate_checkpoint(config, workdir, devices=ONE_DEVICE, split="test")

  # Predict mode through the command line: one line per input line, empty for empty.
  lines = ["the film was superb", "", "a terrible plot", "quite good"]
  result = run_main(f"--config={REPO}/configs/classification.py",
                    f"--workdir={workdir}", "--mode=predict", *config_flags(config),
                    stdin="\n".join(lines) + "\n")
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout.split("\n")[:-1]
  assert len(out) == len(lines) and out[1] == ""
  for line, expected in zip(out, ["positive", None, "negative", "positive"]):
    if expected is None:
      continue
    label, confidence, classes = line.split("\t")
    probabilities = dict(item.split("=") for item in classes.split())
    assert label == expected and list(probabilities) == ["negative", "positive"]
    assert sum(map(float, probabilities.values())) == pytest.approx(1.0, abs=2e-4)
    assert float(confidence) == pytest.approx(float(probabilities[label]))
  # The same lines through the function, in one batch with others: the same answers.
  again = modes.predict_lines(config, workdir, ["padding", "a terrible plot"] * 3,
                              devices=ONE_DEVICE)
  assert again[1] == again[3] == out[2]


def test_eval_and_predict_need_what_training_saves(tmp_path):
  write_corpus(tmp_path / "corpus")
  config = tiny_config(tmp_path / "corpus", tmp_path / "tfds")
  with pytest.raises(DataError, match=r"no label names at .*labels\.json: train first"):
    tasks.get_task(config, str(tmp_path / "empty"), training=False)
  assert not (tmp_path / "empty").exists()
  # Labels are read back, not rebuilt: a new training file does not change them.
  task = tasks.get_task(config, str(tmp_path / "run"), training=True)
  assert task.label_names == ["negative", "positive"]
  write_table(tmp_path / "corpus" / "train.tsv", ["sentence", "label"],
              [["x", "a"], ["y", "b"]])
  again = tasks.get_task(config, str(tmp_path / "run"), training=False)
  assert again.label_names == ["negative", "positive"]


def test_predict_mode_refuses_synthetic_data(tmp_path):
  result = run_main(f"--workdir={tmp_path / 'run'}", "--mode=predict",
                    "--config=configs/default.py:task=classification", stdin="text\n")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith(
      "error: --mode=predict labels text: it needs config.task='classification' on real data")


def test_a_dev_label_unseen_in_training_names_its_line(tmp_path):
  write_corpus(tmp_path / "corpus")
  write_table(tmp_path / "corpus" / "dev.tsv", ["sentence", "label"],
              [["a good film", "positive"], ["so so", "mixed"]])
  task = tasks.get_task(tiny_config(tmp_path / "corpus", tmp_path / "tfds"), None)
  with pytest.raises(DataError, match=r"dev\.tsv, line 3: label 'mixed' is not one of the "
                                      r"training labels \(negative, positive\)"):
    task.data_source("eval")


def test_long_texts_are_cut_to_max_input_length(tmp_path):
  write_corpus(tmp_path / "corpus")
  write_table(tmp_path / "corpus" / "dev.tsv", ["sentence", "label"],
              [["good " * 40, "positive"], ["bad", "negative"]])
  task = tasks.get_task(tiny_config(tmp_path / "corpus", tmp_path / "tfds"), None)
  examples = task.data_source("eval")
  assert [len(e["inputs"]) for e in examples] == [16, len(task.data.tokenizer.encode("bad"))]
  assert [int(e["label"]) for e in examples] == [1, 0]
  assert [int(e["index"]) for e in examples] == [0, 1]


# ----------------------------------------------------------------------------- tfds names


@pytest.mark.parametrize("variant,num_classes", [("glue_sst2", 2), ("imdb", 2),
                                                 ("ag_news", 4)])
def test_tfds_datasets_by_name_with_mock_data(tmp_path, variant, num_classes):
  config = classification_config.get_config(f"dataset={variant},tokenizer=bytes")
  # (A run of the data, not of the SST-2 recipe: no convolution, dropout or SAM's second
  # pass, which take most of the train step's compilation.)
  presets.update_groups(config, dict(
      model=dict(d_model=32, d_ff=64, num_heads=2, num_encoder_layers=1, conv_kernel=0),
      optim=dict(sam_rho=0.0, dropout_rate=0.0, attention_dropout_rate=0.0),
      train=dict(batch_size=8, num_train_steps=2, log_every_steps=1, checkpoint_every_steps=2),
      eval=dict(eval_batch_size=8, eval_every_steps=2, num_print_examples=1,
                num_attention_images=0),
      # rows of one length: the SST-2 recipe's length buckets compile a step per length
      data=dict(max_input_length=32, length_bucket=0, tfds_data_dir=str(tmp_path / "tfds"))))
  train.validate(config)
  workdir = str(tmp_path / "run")
  with tfds.testing.mock_data(num_examples=12):
    builder = sources.tfds_builder(config.data.dataset, str(tmp_path / "tfds"))
    raw = builder.as_data_source("train")
    raw = [(sources.as_text(raw[i][config.data.text_feature]), int(raw[i]["label"]))
           for i in range(len(raw))]
    names = builder.info.features["label"].names
    task = tasks.get_task(config, workdir, training=True)
    assert task.num_classes == num_classes and task.label_names == names
    examples = task.data_source("train")
    # The text as config.data.text_normalization writes it (glue_sst2: ptb_lower).
    normal = normalize.NORMALIZATIONS[config.data.text_normalization]
    kept = [(normal(t), y) for t, y in raw if normal(t)]
    assert [(task.data.tokenizer.decode(e["inputs"]), int(e["label"])) for e in examples] == [
        (t[:32], y) for t, y in kept]
    metrics = train.train_and_evaluate(config, workdir, devices=ONE_DEVICE)
    # GLUE test labels are -1: that split has no labels to evaluate.
    task.data._rows["test"] = (["some text"], [labeled_text.NO_LABEL], [0])
    with pytest.raises(DataError, match=r"split 'test' of .* has no labels"):
      task.data_source("test")
  assert np.isfinite(metrics["loss"]) and 0 <= metrics["macro_f1"] <= 1
  assert labeled_text.load_labels(os.path.join(workdir, "labels.json")) == names
  assert "tensorflow" not in sys.modules


def test_unknown_tfds_feature_is_named(tmp_path):
  config = classification_config.get_config("dataset=imdb,tokenizer=bytes")
  presets.update_groups(config, dict(data=dict(text_feature="sentence",
                                                tfds_data_dir=str(tmp_path / "tfds"))))
  with tfds.testing.mock_data(num_examples=4):
    with pytest.raises(DataError, match=r"config\.data\.text_feature='sentence': dataset "
                                        r"imdb_reviews has no such feature; it has"):
      tasks.get_task(config, None)


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("variant", ["", "dataset=glue_sst2", "dataset=imdb,tokenizer=bytes",
                                     "dataset=ag_news,size=small,accel=gpu", "recipe=mlm",
                                     "recipe=finetune", "tokenizer=bytes,recipe=mlm",
                                     "recipe=lstm"])
def test_classification_configs_validate(variant):
  config = classification_config.get_config(variant)
  train.validate(config)
  assert config.task == "classification" and config.eval.best_metric == "accuracy"
  if "tokenizer=bytes" in variant:  # a byte vocabulary, whatever the recipe
    assert config.model.vocab_size == 259
  if variant == "recipe=lstm":  # the recurrent reading alone, with SGD
    assert config.model.encoder_lstm and config.model.num_encoder_layers == 0
    assert config.optim.optimizer == "sgd" and config.model.pooling == "attention"
  elif variant.startswith("recipe="):  # two stages of one model: the same config.model
    assert config.model == classification_config.get_config("recipe=mlm").model
    # ... SST2_CPU's, but for the fields the masked-token recipe was measured with.
    default_model = classification_config.get_config().model
    plain = classification_config.SST2_CPU_PLAIN_MODEL
    assert ({k for k in default_model if default_model[k] != config.model[k]}
            == set(plain) | {"vocab_size"})  # 2,000 pieces instead of 8,000 words
    assert all(config.model[k] == v for k, v in plain.items())
    assert config.model.vocab_size == 2000
    assert config.optim.sam_rho == 0.0
    assert (config.objective == "mlm") == (variant == "recipe=mlm")
    assert bool(config.init_encoder_from) == (variant == "recipe=finetune")
  if not variant:
    assert config.data.dataset == "files" and os.path.basename(config.data.data_dir) == "sst2"
    assert (config.data.eval_split == "validation"
            and "validation=dev.tsv" in config.data.file_splits)


# ----------------------------------------------------------------------------- no TensorFlow


def test_classification_data_path_never_imports_tensorflow(tmp_path):
  """In a fresh interpreter: preparing local files, training the tokenizer, reading a
  training batch and the evaluation split."""
  write_corpus(tmp_path / "corpus")
  config = tiny_config(tmp_path / "corpus", tmp_path / "tfds")
  script = textwrap.dedent(f"""
      import sys
      from configs import classification, presets
      import tasks
      c = classification.get_config()
      presets.update_groups(c, {config.to_dict()!r})
      task = tasks.get_task(c, {str(tmp_path / "run")!r}, training=True)
      batch = task.train_dataset(c.train.batch_size, 1)[0]
      assert batch["inputs"].shape == (1, c.train.batch_size, c.data.max_input_length)
      assert len(task.data_source("eval")) == 64
      print("tensorflow imported:", "tensorflow" in sys.modules)
  """)
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "tensorflow imported: False" in result.stdout
