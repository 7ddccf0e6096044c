"""Labeled text for classification: a tfds dataset by name (a text feature and a ClassLabel
feature named by config.data.text_feature and label_feature: glue/sst2, imdb_reviews,
ag_news_subset) or local .tsv/.csv files with a header row (columns named by the same
fields).

Labels map to class ids once: a ClassLabel's names, or the sorted label strings of the
training file (numerically sorted when all are integers); the names are saved as
<workdir>/labels.json and read back by evaluation and prediction. Text is tokenized
(SentencePiece trained on the training text, or bytes; saved in the workdir) and cut to
config.data.max_input_length tokens. Every text is first normalised by
config.data.text_normalization (input_pipeline/normalize.py): the tokenizer's training
text, the splits, and the lines of --mode=predict alike.
"""

import json
import os
from typing import Dict, List, Optional, Tuple

import numpy as np
from absl import logging

import files
from input_pipeline import local_builders, normalize, sources, tokenizers
from input_pipeline.local_builders import DataError
from tasks import masked_lm
from tasks.sources import TextSource, tokenizer_paths

LABELS_FILE = "labels.json"
TOKENIZER_FILES = {"sentencepiece": "tokenizer.model",
                   "bytes": "tokenizer.bytes"}  # bytes need no file; the name is unused
NO_LABEL = -1  # tfds ClassLabel value of an unlabeled example (e.g. the GLUE test splits)


class LabeledText(TextSource):
  """Texts with class labels; the class names of the run in `label_names`."""

  def __init__(self, config, workdir: Optional[str], training: bool):
    self.workdir, self.training = workdir, training
    # Runs saved before the field existed read their text as it is.
    self.normalize = normalize.NORMALIZATIONS[config.data.get("text_normalization", "none")]
    super().__init__(config)
    self._rows: Dict[str, Tuple[list, list, list]] = {}
    self._examples: Dict[str, list] = {}
    # Whether the class names came from the workdir's labels.json (an earlier run's).
    self._names_saved_before = bool(workdir) and os.path.exists(self.labels_path)
    names = self._label_names_of_run()  # read and checked before anything is written
    if training and workdir:
      # So are the eval split's labels: one outside `names` stops the run before the
      # tokenizer and the label names are saved in the workdir.
      self.label_names = names
      self.label_ids("eval")
    model = config.model
    paths = tokenizer_paths(config, workdir, [TOKENIZER_FILES[model.tokenizer]], training)
    if training:  # a pre-trained encoder reads its own tokenizer's ids
      paths[0] = masked_lm.source_tokenizer(config, paths[0], TOKENIZER_FILES[model.tokenizer])
    self.tokenizer = tokenizers.get_or_build(model.tokenizer, paths[0],
                                             self._tokenizer_texts, model.vocab_size,
                                             model_type=model.sentencepiece_type)
    self.vocab_size = self.tokenizer.vocab_size
    self.eos_id = self.tokenizer.eos_id
    self.label_names = names
    if training and workdir and not os.path.exists(self.labels_path):
      save_labels(self.labels_path, names)
    self.kind_label = f"{len(names)} classes ({', '.join(names)})"

  @property
  def labels_path(self) -> str:
    return os.path.join(self.workdir or "", LABELS_FILE)

  def _make_builder(self):
    """The tfds builder of config.data.dataset (local labeled files or a tfds name)."""
    d = self.config.data
    if d.dataset == "files":
      return local_builders.labeled_text_builder(
          d.data_dir, dict(sources.parse_mapping(d.file_splits, "data.file_splits")),
          d.text_feature, d.label_feature, sources.default_data_dir(d.tfds_data_dir))
    builder = sources.tfds_builder(d.dataset, d.tfds_data_dir)
    features = builder.info.features
    for field in ("text_feature", "label_feature"):
      if d[field] not in features:
        raise DataError(f"config.data.{field}={d[field]!r}: dataset {d.dataset} has no such "
                        f"feature; it has {', '.join(features.keys())}")
    if not hasattr(features[d.label_feature], "names"):
      raise DataError(f"config.data.label_feature={d.label_feature!r} of {d.dataset} is not "
                      f"a class label (tfds ClassLabel); classification needs one")
    return builder

  def split_name(self, split: str) -> str:
    d = self.config.data
    split = {"train": d.train_split, "eval": d.eval_split}.get(split, split)
    if d.dataset == "files" and split not in dict(self._builder.builder_config.splits):
      raise DataError(f"split {split!r} is not in config.data.file_splits={d.file_splits!r}")
    return split

  def _file_of(self, split: str) -> str:
    return local_builders.text_file_path(
        self.config.data.data_dir, dict(self._builder.builder_config.splits)[split])

  def rows(self, split: str) -> Tuple[list, list, list]:
    """(texts, raw labels, where) of a split in dataset order: labels are strings for
    files ("" = no label column) and ints for tfds (-1 = none); `where` is each row's line
    in its file, or its 0-based position in a tfds split."""
    split = self.split_name(split)
    if split not in self._rows:
      d = self.config.data
      local = d.dataset == "files"
      text_key, label_key = ("text", "label") if local else (d.text_feature, d.label_feature)
      records = sources.read_all(
          self._open(split),
          lambda ex: (sources.as_text(ex[text_key]),
                      sources.as_text(ex[label_key]) if local else int(ex[label_key]),
                      int(ex["line"]) if local else -1))
      where = [r[2] for r in records] if local else list(range(len(records)))
      self._rows[split] = ([r[0] for r in records], [r[1] for r in records], where)
    return self._rows[split]

  def _check_labeled(self, split: str) -> None:
    """DataError when a split used for training or evaluation has no labels."""
    split = self.split_name(split)
    _, labels, _ = self.rows(split)
    d = self.config.data
    if d.dataset == "files" and all(label == "" for label in labels):
      raise DataError(f"split {split!r} has no labels (file {self._file_of(split)} has no "
                      f"column {d.label_feature!r}); train and evaluate on labeled splits "
                      f"and use --mode=predict for unlabeled text")
    if d.dataset != "files" and all(label == NO_LABEL for label in labels):
      raise DataError(f"split {split!r} of {d.dataset} has no labels (every "
                      f"{d.label_feature!r} is {NO_LABEL}); evaluate on a labeled split")

  def _label_names_of_run(self) -> List[str]:
    """The class names: from <workdir>/labels.json when it exists (never rebuilt outside
    training), else from the ClassLabel feature or the training file's labels."""
    d = self.config.data
    if self.workdir and os.path.exists(self.labels_path):
      return load_labels(self.labels_path)
    if not self.training:
      raise DataError(f"no label names at {self.labels_path}: train first with "
                      f"--mode=train in this workdir (it saves them there)")
    if d.dataset != "files":
      return list(self._builder.info.features[d.label_feature].names)
    self._check_labeled("train")
    _, labels, lines = self.rows("train")
    path = self._file_of(self.split_name("train"))
    names = label_names_from(labels, path)
    check_class_sizes(map_labels(labels, names, path, lines), names, path, lines,
                      d.min_class_examples)
    return names

  def _tokenizer_texts(self) -> List[str]:
    """An evenly strided sample of at most config.data.tokenizer_max_sentences texts."""
    texts = self.rows("train")[0]
    stride = -(-len(texts) // self.config.data.tokenizer_max_sentences)
    return [self.normalize(t) for t in texts[::stride]]

  def label_ids(self, split: str) -> List[int]:
    """Class ids of a labeled split; DataError naming the file, line and value of a label
    outside the run's classes."""
    d = self.config.data
    self._check_labeled(split)
    split = self.split_name(split)
    _, labels, where = self.rows(split)
    if d.dataset == "files":
      saved = self.labels_path if self._names_saved_before else ""
      return map_labels(labels, self.label_names, self._file_of(split), where, saved)
    ids = []
    for position, label in zip(where, labels):
      if not 0 <= label < len(self.label_names):
        raise DataError(f"{d.dataset} split {split!r}, example {position}: label {label} is "
                        f"not one of the {len(self.label_names)} classes"
                        + (" (-1: unlabeled)" if label == NO_LABEL else ""))
      ids.append(label)
    return ids

  def examples(self, split: str) -> list:
    """`{"inputs", "label", "index"}` per example of a labeled split, inputs cut to
    config.data.max_input_length tokens; empty texts (tfds only; files refuse them)
    dropped."""
    split = self.split_name(split)
    if split not in self._examples:
      labels = self.label_ids(split)
      tokens = self.encode_batch(self.rows(split)[0])
      self._examples[split] = self._cut(split, tokens, labels)
    return self._examples[split]

  def _cut(self, split: str, tokens: list, labels: List[int]) -> list:
    length = self.config.data.max_input_length
    out, cut = [], 0
    for i, (x, y) in enumerate(zip(tokens, labels)):
      if not len(x):
        continue
      cut += len(x) > length
      out.append({"inputs": x[:length], "label": np.int32(y), "index": np.int32(i)})
    if not out:
      raise DataError(f"split {split!r} of {self.config.data.dataset} has no text")
    logging.info("split %r: %d examples; %d cut to max_input_length=%d tokens%s", split,
                 len(out), cut, length,
                 f"; {len(tokens) - len(out)} empty texts dropped" if len(out) < len(tokens)
                 else "")
    return out

  def text_of(self, split: str, index: int, tokens) -> str:
    del tokens
    return self.rows(split)[0][index]

  def encode_batch(self, texts: List[str]) -> List[np.ndarray]:
    return self.tokenizer.encode_batch([self.normalize(t) for t in texts])

  def encode(self, text: str) -> np.ndarray:
    return self.tokenizer.encode(self.normalize(text))


# ----------------------------------------------------------------------------- label names


def _as_int(label: str) -> Optional[int]:
  try:
    return int(label)
  except ValueError:
    return None


def label_names_from(labels: List[str], path: str) -> List[str]:
  """The class names of the training labels: sorted, numerically when all are integers
  (then written in canonical form, e.g. "07" -> "7"). DataError when fewer than two."""
  distinct = set(labels)
  numbers = {label: _as_int(label) for label in distinct}
  if all(n is not None for n in numbers.values()):
    names = [str(n) for n in sorted(set(numbers.values()))]
  else:
    names = sorted(distinct)
  if len(names) < 2:
    raise DataError(f"{path}: every training label is {names[0]!r}; classification needs "
                    f"at least two classes")
  return names


# A class this many times smaller than the largest one is named in a warning (a typo such as
# 'positive' among 0/1 that occurs more often than config.data.min_class_examples).
RARE_CLASS_RATIO = 100


def check_class_sizes(ids: List[int], names: List[str], path: str, lines: List[int],
                      minimum: int) -> None:
  """The classes of the training labels (`ids` of `names`, one per row at `lines` of
  `path`): DataError for a class with fewer than `minimum` examples (its label becomes a
  class of the model, whose head then learns it from almost nothing: mostly a typo); a
  warning for a class far rarer than the largest one, for names that differ only in case
  and for names that mix integers and words."""
  counts = np.bincount(np.asarray(ids, np.int64), minlength=len(names))
  classes = ", ".join(f"{n!r}: {c}" for n, c in zip(names[:20], counts.tolist()))
  classes += ", ..." if len(names) > 20 else ""
  for i in np.flatnonzero(counts < minimum).tolist():
    at = [line for line, y in zip(lines, ids) if y == i]
    raise DataError(
        f"{path}: label {names[i]!r} has {counts[i]} training example(s) (line(s) "
        f"{', '.join(map(str, at[:5]))}{', ...' if len(at) > 5 else ''}), fewer than "
        f"config.data.min_class_examples={minimum}: each label of the training file "
        f"becomes a class ({classes}); correct a mistyped label, or lower "
        f"config.data.min_class_examples to keep the class")
  for i in np.flatnonzero(counts * RARE_CLASS_RATIO < counts.max()).tolist():
    logging.warning("%s: label %r has only %d training examples, under 1/%d of the largest "
                    "class (%s); a mistyped label?", path, names[i], counts[i],
                    RARE_CLASS_RATIO, classes)
  folded: Dict[str, List[str]] = {}
  for name in names:
    folded.setdefault(name.casefold(), []).append(name)
  for same in (group for group in folded.values() if len(group) > 1):
    logging.warning("%s: the training labels %s differ only in case, and each is a class "
                    "(%s); a mistyped label?", path, " and ".join(map(repr, same)), classes)
  numbers = [n for n in names if _as_int(n) is not None]
  if numbers and len(numbers) < len(names):
    words = [n for n in names if _as_int(n) is None]
    logging.warning("%s: the training labels mix integers (%s) and words (%s), each a class "
                    "(%s); a mistyped label?", path, ", ".join(numbers[:10]),
                    ", ".join(words[:10]), classes)


def map_labels(labels: List[str], names: List[str], path: str, lines: List[int],
               names_from: str = "") -> List[int]:
  """Class ids of raw label strings (integers compared by value when the names are
  integers); DataError naming the file, line and value of a label that is not a class.
  `names_from`: where the names were read, when not from this run's training file (the
  workdir's labels.json: the data may have been relabelled since)."""
  numeric = all(_as_int(n) is not None for n in names)
  ids = {(_as_int(n) if numeric else n): i for i, n in enumerate(names)}
  out = []
  for line, label in zip(lines, labels):
    key = _as_int(label) if numeric else label
    if key is None or key not in ids:
      kind = ("does not parse as an integer, as the training labels do" if numeric and key is
              None else "is not one of the training labels")
      origin = (f"; the run's classes, saved in {names_from} when it was first trained: "
                f"train a new run to use other labels" if names_from else "")
      raise DataError(f"{path}, line {line}: label {label!r} {kind} "
                      f"({', '.join(names[:20])}{', ...' if len(names) > 20 else ''}{origin})")
    out.append(ids[key])
  return out


def save_labels(path: str, names: List[str]) -> None:
  """Writes the class names (id order) as JSON, atomically."""
  files.write_atomically(path, json.dumps({"labels": names}, ensure_ascii=False, indent=1))


def load_labels(path: str) -> List[str]:
  try:
    with open(path, encoding="utf-8") as f:
      names = json.load(f)["labels"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise DataError(f"{path}: cannot read the label names ({e}); it should be "
                    f'{{"labels": [name, ...]}} as training writes it') from e
  if (not isinstance(names, list) or len(names) < 2 or len(set(names)) != len(names)
      or not all(isinstance(n, str) and n for n in names)):
    raise DataError(f"{path}: 'labels' must list at least two distinct non-empty names")
  return names
