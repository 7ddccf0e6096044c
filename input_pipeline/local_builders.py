"""tensorflow-datasets builders for the user's own text files, so local and public data take
one path: prepared once into array_record files under a data directory, then read by grain
through `builder.as_data_source(split)` like any tfds dataset.

The files are read with plain Python (no TensorFlow) and checked while preparing: a broken
file stops the preparation with a `DataError` that names the file and line, before anything
is written to the prepared directory.
"""

import dataclasses
import gzip
import hashlib
import os
from typing import Dict, List, Tuple

import numpy as np
import tensorflow_datasets as tfds


class DataError(ValueError):
  """A data file or dataset is missing, malformed or unusable; the message says which."""


def text_file_path(directory: str, stem: str) -> str:
  """`directory/stem`, or `directory/stem.gz` when only the gzipped file exists."""
  plain = os.path.join(directory, stem)
  if os.path.exists(plain) or not os.path.exists(plain + ".gz"):
    return plain
  return plain + ".gz"


def read_text(path: str) -> str:
  """The whole text of a plain or gzipped UTF-8 file.

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
    return raw.decode("utf-8")
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
      raise DataError(f"{path}: no such file; {_present_files(directory, stem)}")
    columns[lang] = read_lines(path)
  counts = {text_file_path(directory, f"{stem}.{lang}"): len(lines)
            for lang, lines in columns.items()}
  if len(set(counts.values())) > 1:
    raise DataError("parallel files of different lengths: " +
                    ", ".join(f"{p} has {n} lines" for p, n in counts.items()) +
                    "; line i of each file must translate line i of the other")
  return columns


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
    raise DataError(f"{directory}: no such data directory (config.data_dir)")
  paths = []
  for stem in splits.values():
    for lang in languages:
      path = text_file_path(directory, f"{stem}.{lang}")
      if not os.path.exists(path):
        raise DataError(f"{path}: no such file; {_present_files(directory, stem)}")
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
                    f"remove it from config.file_splits")
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


def text_files_builder(directory: str, splits: Dict[str, List[str]], documents: str,
                       validation_fraction: float, data_dir: str) -> TextFiles:
  """The builder for a directory of text files (not prepared yet; see `sources`).

  Missing directories or files raise DataError here, before anything is prepared.
  """
  if not os.path.isdir(directory):
    raise DataError(f"{directory}: no such data directory (config.data_dir)")
  if validation_fraction > 0 and ("train" not in splits or "validation" in splits):
    raise DataError("config.validation_fraction holds out part of the 'train' split as "
                    "'validation': config.file_splits needs a train split and no validation "
                    "split (or set validation_fraction=0)")
  paths = []
  for names in splits.values():
    for name in names:
      path = text_file_path(directory, name)
      if not os.path.exists(path):
        present = sorted(os.listdir(directory))
        raise DataError(f"{path}: no such file; {directory} has "
                        f"{', '.join(present[:20]) or 'no files'}")
      paths.append(path)
  layout = hashlib.sha256(repr(sorted(splits.items())).encode()).hexdigest()[:6]
  name = (f"{documents}-{validation_fraction:g}-{layout}-{_fingerprint(paths)}"
          .replace(".", "_"))
  config = TextFilesConfig(name=name, directory=os.path.abspath(directory),
                           splits=tuple((k, tuple(v)) for k, v in splits.items()),
                           documents=documents, validation_fraction=float(validation_fraction))
  return TextFiles(config=config, data_dir=data_dir, file_format="array_record")
