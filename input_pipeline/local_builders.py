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


def read_lines(path: str, allow_empty: bool = False) -> List[str]:
  """The lines of a plain or gzipped UTF-8 text file, without line ends.

  Raises DataError naming the file (and line) when the file is missing, is not UTF-8,
  has no lines, or (unless `allow_empty`) has an empty line.
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
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    line = raw[:e.start].count(b"\n") + 1
    raise DataError(f"{path}, line {line}: not valid UTF-8 (byte {raw[e.start]:#04x}); "
                    f"convert the file to UTF-8") from e
  lines = text.split("\n")
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
