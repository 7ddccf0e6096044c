"""tensorflow-datasets builders for the user's own text files, so local and public data take
one path: prepared once into array_record files under a data directory, then read by grain
through `builder.as_data_source(split)` like any tfds dataset.

The files are read with plain Python (no TensorFlow) and checked while preparing: a broken
file stops the preparation with a `DataError` that names the file and line, before anything
is written to the prepared directory.
"""

import csv
import dataclasses
import gzip
import hashlib
import io
import os
from typing import Dict, List, Tuple

import numpy as np
import tensorflow_datasets as tfds

from errors import UserError


class DataError(UserError, ValueError):
  """A data file or dataset is missing, malformed or unusable; the message says which."""


def text_file_path(directory: str, stem: str) -> str:
  """`directory/stem`, or `directory/stem.gz` when only the gzipped file exists."""
  plain = os.path.join(directory, stem)
  if os.path.exists(plain) or not os.path.exists(plain + ".gz"):
    return plain
  return plain + ".gz"


def read_text(path: str) -> str:
  """The whole text of a plain or gzipped UTF-8 file, without a leading byte-order mark
  (Windows editors write one; left in, it would become part of the first line's first
  word, or of a table's first column name).

  Raises DataError naming the file (and, for bad UTF-8, the line) when the file is missing,
  unreadable or not UTF-8.
  """
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such file")
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError) as e:
    raise DataError(f"{path}: cannot read it ({e})") from e
  try:
    return raw.decode("utf-8").removeprefix("\ufeff")
  except UnicodeDecodeError as e:
    line = raw[:e.start].count(b"\n") + 1
    raise DataError(f"{path}, line {line}: not valid UTF-8 (byte {raw[e.start]:#04x}); "
                    f"convert the file to UTF-8") from e


def read_lines(path: str, allow_empty: bool = False) -> List[str]:
  """The lines of a plain or gzipped UTF-8 text file, without line ends.

  Raises DataError naming the file (and line) when the file is missing, is not UTF-8,
  has no lines, or (unless `allow_empty`) has an empty line.
  """
  lines = read_text(path).split("\n")
  if lines and lines[-1] == "":
    lines.pop()  # the newline that ends the last line
  lines = [line.rstrip("\r") for line in lines]
  if not lines:
    raise DataError(f"{path}: the file is empty")
  if not allow_empty:
    for number, line in enumerate(lines, 1):
      if not line.strip():
        raise DataError(f"{path}, line {number}: empty line; every line must hold a "
                        f"sentence (remove the line from all parallel files)")
  return lines


def _fingerprint(paths: List[str]) -> str:
  """A short digest of the files' paths, sizes and modification times: editing a file
  gives the prepared data a new name, so stale preparations are never read."""
  digest = hashlib.sha256()
  for path in paths:
    stat = os.stat(path)
    digest.update(f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
  return digest.hexdigest()[:12]


# ----------------------------------------------------------------------------- parallel text


@dataclasses.dataclass
class ParallelTextConfig(tfds.core.BuilderConfig):
  """A directory of `{file_split}.{language}` files, plain or gzipped, a sentence a line.

  splits: tfds split name -> file stem (e.g. {"validation": "val"}).
  """
  directory: str = ""
  languages: Tuple[str, str] = ("de", "en")
  splits: Tuple[Tuple[str, str], ...] = ()


class ParallelTextFiles(tfds.core.GeneratorBasedBuilder):
  """Sentence-aligned parallel text: features `{language: text}` and `line` (1-based)."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [ParallelTextConfig(name="default")]

  def _info(self):
    features = {lang: tfds.features.Text() for lang in self.builder_config.languages}
    features["line"] = tfds.features.Scalar(dtype=np.int32)
    # File order is kept, so hypotheses files line up with the references.
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features),
                                 disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    # Every file is read and checked before the first example is written.
    return {split: self._generate_examples(read_parallel(cfg.directory, stem, cfg.languages))
            for split, stem in cfg.splits}

  def _generate_examples(self, columns: Dict[str, List[str]]):
    langs = list(columns)
    for i, row in enumerate(zip(*columns.values())):
      yield i, {**dict(zip(langs, row)), "line": i + 1}


def read_parallel(directory: str, stem: str, languages) -> Dict[str, List[str]]:
  """`{language: lines}` of one split, checked to be line-aligned."""
  columns = {}
  for lang in languages:
    path = text_file_path(directory, f"{stem}.{lang}")
    if not os.path.exists(path):
      raise DataError(_missing(path, _present_files(directory, stem)))
    columns[lang] = read_lines(path)
  counts = {text_file_path(directory, f"{stem}.{lang}"): len(lines)
            for lang, lines in columns.items()}
  if len(set(counts.values())) > 1:
    raise DataError("parallel files of different lengths: " +
                    ", ".join(f"{p} has {n} lines" for p, n in counts.items()) +
                    "; line i of each file must translate line i of the other")
  return columns


def _missing(path: str, present: str) -> str:
  """The error for a split file that is not there: what is, and the two ways out."""
  return (f"{path}: no such file; {present}. Put the file there, or leave its split out "
          f"of config.data.file_splits")


def _present_files(directory: str, stem: str) -> str:
  if not os.path.isdir(directory):
    return f"the directory {directory} does not exist"
  present = sorted(f for f in os.listdir(directory) if f.startswith(stem + "."))
  if not present:
    return f"{directory} has no {stem}.* files"
  return f"{directory} has {', '.join(present)}"


def parallel_text_builder(directory: str, languages: Tuple[str, str],
                          splits: Dict[str, str], data_dir: str) -> ParallelTextFiles:
  """The builder for a directory of parallel files (not prepared yet; see `sources`).

  Missing directories or split files raise DataError here, before anything is prepared.
  """
  if not os.path.isdir(directory):
    raise DataError(f"{directory}: no such data directory (config.data.data_dir)")
  paths = []
  for stem in splits.values():
    for lang in languages:
      path = text_file_path(directory, f"{stem}.{lang}")
      if not os.path.exists(path):
        raise DataError(_missing(path, _present_files(directory, stem)))
      paths.append(path)
  name = "-".join(languages) + "-" + _fingerprint(paths)
  config = ParallelTextConfig(name=name, directory=os.path.abspath(directory),
                              languages=tuple(languages), splits=tuple(splits.items()))
  return ParallelTextFiles(config=config, data_dir=data_dir, file_format="array_record")


# ----------------------------------------------------------------------------- plain text


DOCUMENT_UNITS = ("file", "line")


@dataclasses.dataclass
class TextFilesConfig(tfds.core.BuilderConfig):
  """Plain or gzipped UTF-8 text files for language modelling.

  splits: tfds split name -> file names in `directory` (read in this order).
  documents: "file" (each file is one document, e.g. a book) or "line" (each non-empty
    line is one document, e.g. one sentence a line as in lm1b).
  validation_fraction: when > 0, the last share of the "train" split's text becomes the
    "validation" split (cut at a character for "file", at a line for "line"), as nanoGPT
    holds out the last 10% of tiny Shakespeare.
  """
  directory: str = ""
  splits: Tuple[Tuple[str, Tuple[str, ...]], ...] = ()
  documents: str = "file"
  validation_fraction: float = 0.0


class TextFiles(tfds.core.GeneratorBasedBuilder):
  """Documents of text: features `text` and `document` (0-based, in file order)."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [TextFilesConfig(name="default")]

  def _info(self):
    features = {"text": tfds.features.Text(),
                "document": tfds.features.Scalar(dtype=np.int32)}
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features),
                                 disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    return {split: self._generate_examples(documents)
            for split, documents in read_text_splits(cfg).items()}

  def _generate_examples(self, documents: List[str]):
    for i, text in enumerate(documents):
      yield i, {"text": text, "document": i}


def _documents(path: str, unit: str) -> List[str]:
  """The documents of one file: the whole text, or its non-empty lines."""
  text = read_text(path)
  if not text.strip():
    raise DataError(f"{path}: the file is empty (or only whitespace); give it text or "
                    f"remove it from config.data.file_splits")
  if unit == "file":
    return [text]
  return [line.rstrip("\r") for line in text.split("\n") if line.strip()]


def hold_out(documents: List[str], fraction: float, unit: str) -> Tuple[List[str], List[str]]:
  """(kept, held out): the last `fraction` of the text, cut at a character ("file") or at
  a document boundary ("line"). Both parts are non-empty."""
  if unit == "line":
    held = max(1, int(round(len(documents) * fraction)))
    if held >= len(documents):
      raise DataError(f"validation_fraction={fraction} of {len(documents)} lines leaves no "
                      f"training text; lower it or give a validation file")
    return documents[:-held], documents[-held:]
  total = sum(len(d) for d in documents)
  cut = int(total * (1.0 - fraction))  # as nanoGPT: train = text[:int(n * 0.9)]
  if cut <= 0 or cut >= total:
    raise DataError(f"validation_fraction={fraction} of {total} characters leaves one part "
                    f"empty; choose a value that leaves text on both sides")
  kept, held, seen = [], [], 0
  for document in documents:
    if seen + len(document) <= cut:
      kept.append(document)
    elif seen >= cut:
      held.append(document)
    else:  # the document the cut falls in is split in two
      kept.append(document[:cut - seen])
      held.append(document[cut - seen:])
    seen += len(document)
  return kept, held


def read_text_splits(cfg: TextFilesConfig) -> Dict[str, List[str]]:
  """`{split: documents}` of a TextFilesConfig, every file read and checked."""
  out = {}
  for split, names in cfg.splits:
    documents = []
    for name in names:
      documents += _documents(text_file_path(cfg.directory, name), cfg.documents)
    out[split] = documents
  if cfg.validation_fraction > 0:
    out["train"], out["validation"] = hold_out(out["train"], cfg.validation_fraction,
                                               cfg.documents)
  return out


def _existing_file(directory: str, name: str) -> str:
  """The path of `name` in `directory` (see text_file_path); DataError listing the
  directory's files when it does not exist."""
  path = text_file_path(directory, name)
  if not os.path.exists(path):
    present = sorted(os.listdir(directory))
    raise DataError(_missing(path, f"{directory} has {', '.join(present[:20]) or 'no files'}"))
  return path


def text_files_builder(directory: str, splits: Dict[str, List[str]], documents: str,
                       validation_fraction: float, data_dir: str) -> TextFiles:
  """The builder for a directory of text files (not prepared yet; see `sources`).

  Missing directories or files raise DataError here, before anything is prepared.
  """
  if not os.path.isdir(directory):
    raise DataError(f"{directory}: no such data directory (config.data.data_dir)")
  if validation_fraction > 0 and ("train" not in splits or "validation" in splits):
    raise DataError("config.data.validation_fraction holds out part of the 'train' split as "
                    "'validation': config.data.file_splits needs a train split and no validation "
                    "split (or set validation_fraction=0)")
  paths = [_existing_file(directory, name) for names in splits.values() for name in names]
  layout = hashlib.sha256(repr(sorted(splits.items())).encode()).hexdigest()[:6]
  name = (f"{documents}-{validation_fraction:g}-{layout}-{_fingerprint(paths)}"
          .replace(".", "_"))
  config = TextFilesConfig(name=name, directory=os.path.abspath(directory),
                           splits=tuple((k, tuple(v)) for k, v in splits.items()),
                           documents=documents, validation_fraction=float(validation_fraction))
  return TextFiles(config=config, data_dir=data_dir, file_format="array_record")


# ----------------------------------------------------------------------------- labeled text


DELIMITERS = {".tsv": "\t", ".csv": ","}


@dataclasses.dataclass
class LabeledTextConfig(tfds.core.BuilderConfig):
  """Tables of labeled text (classification): a header row, then a row per example.

  splits: tfds split name -> file name in `directory` (.tsv, .csv, optionally .gz; the
    plain file wins when both exist).
  text_column, label_column: header names of the text and label columns. A file without
    the label column (e.g. an unlabeled test set) is read with label "" everywhere.
  """
  directory: str = ""
  splits: Tuple[Tuple[str, str], ...] = ()
  text_column: str = "sentence"
  label_column: str = "label"


class LabeledTextFiles(tfds.core.GeneratorBasedBuilder):
  """Labeled text: features `text`, `label` (the raw label string, "" when the split's file
  has no label column) and `line` (1-based line of the row in its file)."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [LabeledTextConfig(name="default")]

  def _info(self):
    features = {"text": tfds.features.Text(), "label": tfds.features.Text(),
                "line": tfds.features.Scalar(dtype=np.int32)}
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features),
                                 disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    # Every file is read and checked before the first example is written.
    rows = {split: read_labeled_rows(text_file_path(cfg.directory, name), cfg.text_column,
                                     cfg.label_column)
            for split, name in cfg.splits}
    return {split: self._generate_examples(r) for split, r in rows.items()}

  def _generate_examples(self, rows):
    for i, (line, text, label) in enumerate(rows):
      yield i, {"text": text, "label": label, "line": line}


def delimiter_of(path: str) -> str:
  """The column delimiter from the file's extension (.tsv tab, .csv comma; .gz ignored)."""
  stem = path[:-3] if path.endswith(".gz") else path
  extension = os.path.splitext(stem)[1].lower()
  if extension not in DELIMITERS:
    raise DataError(f"{path}: cannot tell the column delimiter from the extension "
                    f"{extension or '(none)'!r}; name the file .tsv or .csv (optionally .gz)")
  return DELIMITERS[extension]


def read_labeled_rows(path: str, text_column: str,
                      label_column: str) -> List[Tuple[int, str, str]]:
  """`[(line, text, label)]` of a .tsv/.csv file with a header row; label is "" for every
  row when the header has no `label_column`.

  TSV is split at every tab (no quoting, as GLUE writes it); CSV follows the csv module's
  quoting (a quoted field may hold commas and newlines). Blank lines are skipped. Raises
  DataError naming the file, line and field for: a missing or empty file, an unknown text
  column, a row whose field count differs from the header's, empty text, an empty label.
  """
  delimiter = delimiter_of(path)
  text = read_text(path)
  quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
  reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting,
                      strict=True)
  rows, header, header_line = [], None, 0
  while True:
    start = reader.line_num + 1
    try:
      fields = next(reader)
    except StopIteration:
      break
    except csv.Error as e:
      raise DataError(f"{path}, line {start}: cannot parse the row ({e})") from None
    if not fields or (len(fields) == 1 and not fields[0].strip()):
      continue  # a blank line
    if header is None:
      header, header_line = [f.strip() for f in fields], start
      if text_column not in header:
        raise DataError(f"{path}, line {start} (header): no column {text_column!r} for the "
                        f"text; the columns are {', '.join(map(repr, header))} (set "
                        f"config.data.text_feature)")
      continue
    if len(fields) != len(header):
      raise DataError(f"{path}, line {start}: the row has {len(fields)} fields but the "
                      f"header (line {header_line}) has {len(header)} "
                      f"({', '.join(map(repr, header))}); a stray "
                      f"{'tab' if delimiter == chr(9) else 'comma or quote'} in the text?")
    row = dict(zip(header, fields))
    sentence = row[text_column]
    if not sentence.strip():
      raise DataError(f"{path}, line {start}: empty text in column {text_column!r}")
    label = ""
    if label_column in row:
      label = row[label_column].strip()
      if not label:
        raise DataError(f"{path}, line {start}: empty label in column {label_column!r}")
    rows.append((start, sentence, label))
  if header is None:
    raise DataError(f"{path}: the file is empty; it needs a header row naming the columns "
                    f"({text_column!r}, {label_column!r}) and a row per example")
  if not rows:
    raise DataError(f"{path}: the file has a header (line {header_line}) but no rows")
  return rows


def labeled_text_builder(directory: str, splits: Dict[str, str], text_column: str,
                         label_column: str, data_dir: str) -> LabeledTextFiles:
  """The builder for a directory of labeled .tsv/.csv files (not prepared yet; see
  `sources`). Missing directories or files, or an unknown extension, raise DataError here,
  before anything is prepared."""
  if not os.path.isdir(directory):
    raise DataError(f"{directory}: no such data directory (config.data.data_dir)")
  paths = [_existing_file(directory, name) for name in splits.values()]
  for path in paths:
    delimiter_of(path)
  layout = hashlib.sha256(repr((sorted(splits.items()), text_column, label_column))
                          .encode()).hexdigest()[:6]
  name = f"labeled-{layout}-{_fingerprint(paths)}"
  config = LabeledTextConfig(name=name, directory=os.path.abspath(directory),
                             splits=tuple(splits.items()), text_column=text_column,
                             label_column=label_column)
  return LabeledTextFiles(config=config, data_dir=data_dir, file_format="array_record")
