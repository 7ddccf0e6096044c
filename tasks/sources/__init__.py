"""Data sources: what a task family reads, and how it becomes token ids.

    Digits        synthetic digit strings, generated (every family)
    ParallelText  sentence pairs (translation)
    TextCorpus    documents of text (generation)
    LabeledText   texts with class labels (classification)

The text sources read local files (config.data.dataset="files", through the tfds builders
of input_pipeline/local_builders.py) or a tensorflow-datasets dataset by name, and build or
load the tokenizer. Every source offers the same small surface to its family: `examples
(split)`, `eval_lengths`, `vocab_size`/`eos_id`, `decode`/`encode`/`pieces`, and `has_text`
(whether raw text stands behind the tokens: text metrics need it; digits are scored by
exact match). A family names its text source; `open_source` picks digits or that.
"""

import os
import re
from typing import List, Optional

from config_checks import ConfigError, Fields
from input_pipeline import sources as input_sources
from input_pipeline import synthetic, tokenizers
from tasks.sources.digits import Digits

# The longest row a length field may ask for: one row's [length, length] attention scores
# (a head, float32) are 16 GiB there already, and longer asks fail in an allocation.
MAX_LENGTH = 65536
SPLIT_NAME = r"\w[\w.-]*"  # a split name of config.data.file_splits (no path, no '..')


def open_source(config, family, workdir: Optional[str], training: bool):
  """The data source of `config.data.dataset` for `family` (a tasks.base.Task class)."""
  if config.data.dataset == "synthetic":
    return Digits(config, family.digits_kind)
  return family.text_source(config, workdir, training)


class TextSource:
  """What the text sources share: a tfds builder (local files or a dataset by name), its
  splits opened once, and one tokenizer for decoding, encoding and the pieces of ids."""

  has_text = True
  output_vocab_size = 0  # the same vocabulary on both sides unless a source says not
  tokenizer = None
  kind_label = "text"  # what the run's first log line calls the data

  def __init__(self, config):
    self.config = config
    self._builder = self._make_builder()
    self._raw = {}

  def _make_builder(self):
    raise NotImplementedError

  def _open(self, split: str):
    """The raw random-access source of a split, prepared on first use."""
    if split not in self._raw:
      self._raw.update(input_sources.open_splits(
          self._builder, [split], needs_tensorflow=self.config.data.dataset != "files"))
    return self._raw[split]

  def eval_lengths(self, lengths):
    return lengths

  def eval_examples(self, split: str):
    """The examples one evaluation of `split` scores: all of them."""
    return self.examples(split)

  def decode(self, tokens) -> str:
    return self.tokenizer.decode(tokens)

  def pieces(self, tokens, field: str = "inputs") -> List[str]:
    del field
    return self.tokenizer.pieces(tokens)

  def encode(self, text: str):
    return self.tokenizer.encode(text)

  def all_tokenizers(self) -> list:
    """Every tokenizer the source reads with (translation: source and target)."""
    return [self.tokenizer]

  def tokenizer_fingerprint(self) -> Optional[str]:
    """The fingerprints of `all_tokenizers`, joined; None if one has none."""
    prints = [t.fingerprint() for t in self.all_tokenizers()]
    return None if None in prints else "+".join(prints)

  def tokenizer_files(self) -> str:
    """Where the tokenizers are, for messages."""
    return ", ".join(getattr(t, "path", None) or f"({t.kind}, built in memory)"
                     for t in self.all_tokenizers())


def tokenizer_paths(config, workdir: Optional[str], names: List[str],
                    training: bool) -> List[Optional[str]]:
  """The tokenizer files of a run: those of config.data.tokenizer_path, else `names` in the
  workdir (None each when training without a workdir: built in memory). Outside training
  (eval, decode, generate) they must exist already; bytes need no file."""
  spec = config.data.tokenizer_path
  given = [p for p in spec.split(",") if p] if spec else []
  if given and not all(os.path.exists(p) for p in given):
    raise tokenizers.TokenizerError(f"config.data.tokenizer_path={spec!r}: no such file")
  if not given and not workdir and training:
    return [None] * len(names)  # no run directory: built in memory, nothing written
  paths = given or [os.path.join(workdir or "", n) for n in names]
  if config.model.tokenizer != "bytes" and not training and not all(os.path.exists(p)
                                                                     for p in paths):
    raise tokenizers.TokenizerError(
        f"no tokenizer at {', '.join(paths)}: train first with --mode=train in this "
        f"workdir (it saves the tokenizer there) or set config.data.tokenizer_path")
  return paths


def check_config(config, family) -> None:
  """The data fields every source reads, and which tokenizers `family` can use."""
  data = Fields(config, "data")
  data.text("dataset", "'synthetic', 'files' or a tensorflow-datasets name")
  for field in ("min_digits", "max_digits", "max_input_length", "max_target_length",
                "num_eval_examples"):
    data.integer(field, 1)
  for field in ("shuffle_seed", "data_threads", "data_prefetch", "device_prefetch",
                "length_bucket"):
    data.integer(field, 0)
  if data["text_normalization"] != "none" and family.digits_kind != "classification":
    data.fail("text_normalization", "only classification normalises its text; leave it "
                                    "'none'")
  if data["length_bucket"] and data["pack_examples"]:
    data.fail("length_bucket", "it cuts padded rows; packed rows (pack_examples) are full")
  data.integer("max_eval_length", 2)
  for field in ("max_input_length", "max_target_length", "max_eval_length"):
    if data[field] > MAX_LENGTH:
      data.fail(field, f"expected at most {MAX_LENGTH} tokens (a row's attention scores grow "
                       f"with its length squared)")
  if data["dataset"] == "synthetic":
    data.choice("eval_split", Digits.SPLITS)
    data.choice("synthetic_task", synthetic.CLASSIFICATION_TASKS
                if family.digits_kind == "classification" else synthetic.SEQ2SEQ_TASKS)
    if data["min_digits"] > data["max_digits"]:
      data.fail("min_digits", f"must be <= max_digits={data['max_digits']}")
    return
  if data["dataset"] == "files" and not data["data_dir"]:
    data.fail("data_dir", "dataset='files' needs the directory of the files")
  if family.digits_kind == "lm":
    data.rate("validation_fraction")
  if data["dataset"] == "files":
    try:  # the one parser of this field; its error names the field already
      stems = dict(input_sources.parse_mapping(data["file_splits"], "data.file_splits"))
    except input_sources.DataError as e:
      raise ConfigError(str(e)) from None
    odd = [name for name in stems if not re.fullmatch(SPLIT_NAME, name)]
    if odd:  # a split's name becomes part of its reports' file names
      data.fail("file_splits", f"split name {odd[0]!r}: expected letters, digits, '_', '-' "
                               f"or '.' (not first)")
    if family.digits_kind == "lm" and data["validation_fraction"] > 0:
      if "train" not in stems or "validation" in stems:
        data.fail("validation_fraction", "it holds out the end of the 'train' split as "
                                         "'validation', so config.data.file_splits needs a "
                                         "train split and no validation split")
      stems["validation"] = "(held out)"
    for field in ("train_split", "eval_split"):
      if data[field] not in stems:
        data.fail(field, f"not a split of config.data.file_splits "
                         f"({', '.join(stems) or 'none'})")
  for field in ("train_split", "eval_split"):
    data.text(field, "a split name such as 'train' or 'validation'")
  model = Fields(config, "model")
  model.choice("tokenizer", family.tokenizers)
  if model["tokenizer"] == "huggingface" and not config.get("init_from"):
    model.fail("tokenizer", "the 'huggingface' tokenizer is a pretrained model's: set "
                            "config.init_from to its folder")
  model.integer("vocab_size", 8)
  if model["tokenizer"] == "sentencepiece":
    model.choice("sentencepiece_type", tokenizers.SENTENCEPIECE_TYPES)
  data.integer("tokenizer_max_sentences", 1)
  paths = [p for p in data["tokenizer_path"].split(",") if p]
  wanted = family.tokenizer_files(config)
  if paths and len(paths) != wanted:
    data.fail("tokenizer_path", "expected one model file" if wanted == 1 else
              f"expected {wanted} model files, separated by a comma")
