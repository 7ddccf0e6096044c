"""Text classification (encoder-only): cross-entropy over classes; accuracy, macro F1 and
the confusion matrix; class probabilities for --mode=predict.

Real data comes from a tfds dataset by name (a text feature and a ClassLabel feature named
by config.data.text_feature and config.data.label_feature: glue/sst2, imdb_reviews, ag_news_subset)
or from local .tsv/.csv files with a header row (columns named by the same fields), read
through the tfds builder in input_pipeline/local_builders.py. Labels map to class ids once:
a ClassLabel's names, or the sorted label strings of the training file (numerically sorted
when all are integers); the names are saved as <workdir>/labels.json and read back by
evaluation and prediction. Text is tokenized (SentencePiece trained on the training text,
or bytes; saved in the workdir) and cut to config.data.max_input_length tokens.
The synthetic default labels a digit string by whether most of its digits are >= 5.
"""

import json
import os
from typing import Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from input_pipeline import local_builders, sources, synthetic, tokenizers
from models import Classifier
from tasks import base, classification_metrics, losses

DataError = local_builders.DataError
LABELS_FILE = "labels.json"
TOKENIZER_FILES = {"sentencepiece": "tokenizer.model",
                   "bytes": "tokenizer.bytes"}  # bytes need no file; the name is unused
NO_LABEL = -1  # tfds ClassLabel value of an unlabeled example (e.g. the GLUE test splits)


class ClassificationTask(base.Task):
  name = "classification"
  synthetic_kind = "classification"
  attention_fields = {"encoder": "inputs"}

  # ---- data
  def setup_data(self) -> None:
    c = self.config
    self.real = c.data.dataset != "synthetic"
    self.label_names = ["minority >= 5", "majority >= 5"]  # synthetic: label 1 = majority
    if not self.real:
      return
    self._builder = self._make_builder()
    self._raw: Dict[str, object] = {}
    self._rows: Dict[str, Tuple[list, list, list]] = {}
    self._examples: Dict[str, list] = {}
    names = self._label_names_of_run()  # read and checked before anything is written
    if self.training and self.workdir:
      # So are the eval split's labels: one outside `names` stops the run before the
      # tokenizer and the label names are saved in the workdir.
      self.label_names = names
      self.label_ids("eval")
    paths = base.tokenizer_paths(c, self.workdir, [TOKENIZER_FILES[c.model.tokenizer]],
                                 self.training)
    self.tokenizer = tokenizers.get_or_build(c.model.tokenizer, paths[0], self._tokenizer_texts,
                                             c.model.vocab_size)
    self.vocab_size = self.tokenizer.vocab_size
    self.label_names = names
    if self.training and self.workdir and not os.path.exists(self.labels_path):
      save_labels(self.labels_path, names)
    logging.info("classification on %s: %d classes (%s); %s tokenizer with %d ids",
                 c.data.dataset, len(names), ", ".join(names), self.tokenizer.kind,
                 self.vocab_size)

  @property
  def labels_path(self) -> str:
    return os.path.join(self.workdir or "", LABELS_FILE)

  def _make_builder(self):
    """The tfds builder of config.data.dataset (local labeled files or a tfds name)."""
    c = self.config
    if c.data.dataset == "files":
      return local_builders.labeled_text_builder(
          c.data.data_dir, dict(sources.parse_mapping(c.data.file_splits, "file_splits")),
          c.data.text_feature, c.data.label_feature, sources.default_data_dir(c.data.tfds_data_dir))
    builder = sources.tfds_builder(c.data.dataset, c.data.tfds_data_dir)
    features = builder.info.features
    for field in ("text_feature", "label_feature"):
      if c[field] not in features:
        raise DataError(f"config.{field}={c[field]!r}: dataset {c.data.dataset} has no such "
                        f"feature; it has {', '.join(features.keys())}")
    if not hasattr(features[c.data.label_feature], "names"):
      raise DataError(f"config.data.label_feature={c.data.label_feature!r} of {c.data.dataset} is not a "
                      f"class label (tfds ClassLabel); classification needs one")
    return builder

  def _split_name(self, split: str) -> str:
    c = self.config
    split = {"train": c.data.train_split, "eval": c.data.eval_split}.get(split, split)
    if c.data.dataset == "files" and split not in dict(self._builder.builder_config.splits):
      raise DataError(f"split {split!r} is not in config.data.file_splits={c.data.file_splits!r}")
    return split

  def _file_of(self, split: str) -> str:
    c = self.config
    return local_builders.text_file_path(
        c.data.data_dir, dict(self._builder.builder_config.splits)[split])

  def rows(self, split: str) -> Tuple[list, list, list]:
    """(texts, raw labels, where) of a split in dataset order: labels are strings for
    files ("" = no label column) and ints for tfds (-1 = none); `where` is each row's line
    in its file, or its 0-based position in a tfds split."""
    split = self._split_name(split)
    if split not in self._rows:
      c = self.config
      if split not in self._raw:
        self._raw.update(sources.open_splits(self._builder, [split],
                                             needs_tensorflow=c.data.dataset != "files"))
      files = c.data.dataset == "files"
      text_key, label_key = ("text", "label") if files else (c.data.text_feature, c.data.label_feature)
      records = sources.read_all(
          self._raw[split],
          lambda ex: (sources.as_text(ex[text_key]),
                      sources.as_text(ex[label_key]) if files else int(ex[label_key]),
                      int(ex["line"]) if files else -1))
      where = [r[2] for r in records] if files else list(range(len(records)))
      self._rows[split] = ([r[0] for r in records], [r[1] for r in records], where)
    return self._rows[split]

  def _check_labeled(self, split: str) -> None:
    """DataError when a split used for training or evaluation has no labels."""
    split = self._split_name(split)
    _, labels, _ = self.rows(split)
    c = self.config
    if c.data.dataset == "files" and all(label == "" for label in labels):
      raise DataError(f"split {split!r} has no labels (file {self._file_of(split)} has no "
                      f"column {c.data.label_feature!r}); train and evaluate on labeled splits "
                      f"and use --mode=predict for unlabeled text")
    if c.data.dataset != "files" and all(label == NO_LABEL for label in labels):
      raise DataError(f"split {split!r} of {c.data.dataset} has no labels (every "
                      f"{c.data.label_feature!r} is {NO_LABEL}); evaluate on a labeled split")

  def _label_names_of_run(self) -> List[str]:
    """The class names: from <workdir>/labels.json when it exists (never rebuilt outside
    training), else from the ClassLabel feature or the training file's labels."""
    c = self.config
    if self.workdir and os.path.exists(self.labels_path):
      return load_labels(self.labels_path)
    if not self.training:
      raise DataError(f"no label names at {self.labels_path}: train first with "
                      f"--mode=train in this workdir (it saves them there)")
    if c.data.dataset != "files":
      return list(self._builder.info.features[c.data.label_feature].names)
    self._check_labeled("train")
    return label_names_from(self.rows("train")[1], self._file_of(self._split_name("train")))

  def _tokenizer_texts(self) -> List[str]:
    """An evenly strided sample of at most config.data.tokenizer_max_sentences training texts."""
    texts = self.rows("train")[0]
    stride = -(-len(texts) // self.config.data.tokenizer_max_sentences)
    return texts[::stride]

  def label_ids(self, split: str) -> List[int]:
    """Class ids of a labeled split; DataError naming the file, line and value of a label
    outside the run's classes."""
    c = self.config
    self._check_labeled(split)
    split = self._split_name(split)
    _, labels, where = self.rows(split)
    if c.data.dataset == "files":
      return map_labels(labels, self.label_names, self._file_of(split), where)
    ids = []
    for position, label in zip(where, labels):
      if not 0 <= label < len(self.label_names):
        raise DataError(f"{c.data.dataset} split {split!r}, example {position}: label {label} is "
                        f"not one of the {len(self.label_names)} classes"
                        + (" (-1: unlabeled)" if label == NO_LABEL else ""))
      ids.append(label)
    return ids

  def examples(self, split: str) -> list:
    """`{"inputs", "label", "index"}` per example of a labeled split, inputs cut to
    config.data.max_input_length tokens; empty texts (tfds only; files refuse them) dropped."""
    split = self._split_name(split)
    if split not in self._examples:
      texts = self.rows(split)[0]
      labels = self.label_ids(split)
      tokens = self.tokenizer.encode_batch(texts)
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

  def data_source(self, split: str):
    if not self.real:
      return super().data_source(split)
    return self.examples(split)

  @property
  def num_classes(self) -> int:
    return len(self.label_names)

  @property
  def lengths(self) -> Dict[str, int]:
    return {"inputs": self.config.data.max_input_length}

  # ---- model and loss
  def build_model(self, decode: bool = False):
    return Classifier(self.model_config(decode))

  def model_inputs(self, batch):
    return {"inputs": batch["inputs"]}

  def loss(self, params, batch, dropout_rng, train, head_mask=None):
    variables = base.variables(params, head_mask, self.config.model.scan_layers)
    logits = self.model.apply(variables, batch["inputs"], deterministic=not train,
                              rngs=base.rngs(dropout_rng, train))
    real = batch["inputs"].any(axis=-1).astype(jnp.float32)  # zero-filled examples weigh 0
    return losses.cross_entropy_sums(logits, batch["label"], real,
                                     self.config.optim.label_smoothing)

  def predict(self, params, batch):
    """Class probabilities `[batch, num_classes]` float32; the prediction is their argmax."""
    logits = self.model.apply({"params": params}, batch["inputs"])
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

  # ---- scores
  def score(self, batch, predictions):
    real = batch["inputs"].any(axis=-1)
    return {"examples": float(np.sum(real))}

  def _text(self, split: str, index: int, tokens) -> str:
    if not self.real:
      return synthetic.decode_tokens(tokens)
    return self.rows(split)[0][index]

  def outputs(self, batch, predictions, split: str = "eval") -> List[dict]:
    """index, text, label and predicted class names and the class probabilities of each
    real example."""
    out = []
    names = self.label_names
    indices = batch["index"] if "index" in batch else np.full(len(predictions), -1)
    for x, index, y, p in zip(batch["inputs"], indices, batch["label"], predictions):
      if x.any():
        out.append({"index": int(index), "text": self._text(split, int(index), x),
                    "label": names[int(y)], "predicted": names[int(np.argmax(p))],
                    "probabilities": [float(v) for v in p]})
    return out

  def confusion(self, outputs: List[dict]) -> np.ndarray:
    ids = {name: i for i, name in enumerate(self.label_names)}
    return classification_metrics.confusion_matrix(
        [ids[o["label"]] for o in outputs], [ids[o["predicted"]] for o in outputs],
        self.num_classes)

  def summarize(self, sums, outputs: Optional[List[dict]] = None):
    out = super().summarize(sums, outputs)
    out.pop("perplexity", None)  # perplexity is a sequence-model metric
    if outputs:
      out["macro_f1"] = classification_metrics.scores(self.confusion(outputs))["macro_f1"]
    return out

  def summary_texts(self, outputs):
    if not outputs:
      return {}
    return {"confusion_matrix": classification_metrics.table(self.confusion(outputs),
                                                             self.label_names)}

  def summary_images(self, outputs):
    if not outputs:
      return {}
    return {"confusion_matrix": classification_metrics.image(self.confusion(outputs),
                                                             self.label_names)}

  def eval_report(self, outputs):
    if not outputs:
      return {}
    return {"labels": self.label_names,
            "confusion_matrix": self.confusion(outputs).tolist()}

  def prediction_file(self, outputs):
    """A TSV: index, label, predicted, one probability column per class, text."""
    if not self.real or not outputs:
      return None
    header = ["index", "label", "predicted"] + [f"p({n})" for n in self.label_names]
    lines = ["\t".join(header + ["text"])]
    for o in outputs:
      text = " ".join(o["text"].split())  # tabs and newlines would break the columns
      lines.append("\t".join([str(o["index"]), o["label"], o["predicted"]]
                             + [f"{p:.6f}" for p in o["probabilities"]] + [text]))
    return "predictions", ".predictions.tsv", "\n".join(lines) + "\n"

  def format_examples(self, batch, predictions, limit, split="eval") -> List[str]:
    lines = []
    for o in self.outputs(batch, predictions, split)[:limit]:
      mark = "ok" if o["label"] == o["predicted"] else "WRONG"
      confidence = max(o["probabilities"])
      lines.append(f"text: {o['text']!r}\n  label: {o['label']}  predicted: "
                   f"{o['predicted']} ({confidence:.2f})  [{mark}]")
    return lines

  # ---- predict mode
  def encode_texts(self, texts: List[str]) -> list:
    """Examples for `--mode=predict`, cut to max_input_length tokens like the data."""
    tokens = self.tokenizer.encode_batch(texts)
    length = self.config.data.max_input_length
    return [{"inputs": x[:length] if len(x) else np.array([tokenizers.UNK_ID], np.int32),
             "label": np.int32(0), "index": np.int32(i)} for i, x in enumerate(tokens)]

  def token_pieces(self, tokens, field):
    return self.tokenizer.pieces(tokens) if self.real else super().token_pieces(tokens, field)

  def attention_example(self, text, reference=None):
    if not self.real:
      return super().attention_example(text, reference)
    return {"inputs": self.encode_texts([text])[0]["inputs"]}

  def format_prediction(self, probabilities) -> str:
    """`label<TAB>its probability<TAB>name=p name=p ...` (classes in id order)."""
    best = int(np.argmax(probabilities))
    return (f"{self.label_names[best]}\t{float(probabilities[best]):.4f}\t"
            + " ".join(f"{n}={float(p):.4f}"
                       for n, p in zip(self.label_names, probabilities)))


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


def map_labels(labels: List[str], names: List[str], path: str, lines: List[int]) -> List[int]:
  """Class ids of raw label strings (integers compared by value when the names are
  integers); DataError naming the file, line and value of a label that is not a class."""
  numeric = all(_as_int(n) is not None for n in names)
  ids = {(_as_int(n) if numeric else n): i for i, n in enumerate(names)}
  out = []
  for line, label in zip(lines, labels):
    key = _as_int(label) if numeric else label
    if key is None or key not in ids:
      kind = ("does not parse as an integer, as the training labels do" if numeric and key is
              None else "is not one of the training labels")
      raise DataError(f"{path}, line {line}: label {label!r} {kind} "
                      f"({', '.join(names[:20])}{', ...' if len(names) > 20 else ''})")
    out.append(ids[key])
  return out


def save_labels(path: str, names: List[str]) -> None:
  """Writes the class names (id order) as JSON, atomically."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump({"labels": names}, f, ensure_ascii=False, indent=1)
  os.replace(tmp, path)


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
