"""Text for a language model: local text files or a tfds dataset by name with a `text`
feature (tiny_shakespeare, lm1b), read once and tokenized once (characters, bytes or
SentencePiece, saved in the workdir), then cut into windows of one contiguous stream
(input_pipeline/windows.py) or into documents, each its own row (cut at the context).
"""

import os
from typing import Dict, List, Optional

import grain
import numpy as np
from absl import logging

import pretrained
from input_pipeline import local_builders, sources, tokenizers, windows
from input_pipeline.local_builders import DataError
from tasks.sources import TextSource, tokenizer_paths

TOKENIZER_FILES = {"chars": "tokenizer.json", "sentencepiece": "tokenizer.model",
                   "bytes": "tokenizer.bytes"}  # bytes need no file; the name is unused


class TextCorpus(TextSource):
  """The documents of a text dataset, tokenized with one tokenizer."""

  def __init__(self, config, workdir: Optional[str], training: bool):
    super().__init__(config)
    self._documents: Dict[str, List[str]] = {}
    self._tokens: Dict[str, list] = {}
    kind = config.model.tokenizer
    if kind == "huggingface":  # a pretrained model's own tokenizer (config.init_from)
      self.tokenizer = pretrained.tokenizer(config)
      self.vocab_size, self.eos_id = self.tokenizer.vocab_size, self.tokenizer.eos_id
      self.kind_label = f"{config.init_from}'s tokenizer on text"
      return
    paths = tokenizer_paths(config, workdir, [TOKENIZER_FILES[kind]], training)
    if training and kind == "chars" and not (paths[0] and os.path.exists(paths[0])):
      # Checked before the vocabulary is built and saved: a run stopped here leaves none.
      d = config.data
      self._check_characters(d.eval_split, set().union(*self.documents(d.train_split)))
    self.tokenizer = tokenizers.get_or_build(kind, paths[0], self._tokenizer_texts,
                                             config.model.vocab_size, keep_whitespace=True,
                                             model_type=config.model.sentencepiece_type)
    self.vocab_size = self.tokenizer.vocab_size
    self.eos_id = self.tokenizer.eos_id
    self.kind_label = f"{self.tokenizer.kind} text"

  def _make_builder(self):
    """The tfds builder of config.data.dataset (local text files or a tfds name)."""
    d = self.config.data
    if d.dataset == "files":
      splits = {split: [name for name in names.split("+") if name]
                for split, names in sources.parse_mapping(d.file_splits,
                                                          "data.file_splits").items()}
      return local_builders.text_files_builder(
          d.data_dir, splits, d.text_documents, d.validation_fraction,
          sources.default_data_dir(d.tfds_data_dir))
    builder = sources.tfds_builder(d.dataset, d.tfds_data_dir)
    features = list(builder.info.features.keys())
    if "text" not in features:
      raise DataError(f"config.data.dataset={d.dataset!r} has no 'text' feature to model (it "
                      f"has {', '.join(features)}); language models read a 'text' feature")
    return builder

  def documents(self, split: str) -> List[str]:
    """The non-empty texts of a split, in dataset order."""
    if split not in self._documents:
      d = self.config.data
      if d.dataset == "files":
        known = [name for name, _ in self._builder.builder_config.splits]
        known += ["validation"] if d.validation_fraction > 0 else []
        if split not in known:
          raise DataError(f"split {split!r} is not one of the text files' splits "
                          f"({', '.join(known)}; see config.data.file_splits and "
                          f"config.data.validation_fraction)")
      texts = [t for t in sources.read_all(self._open(split),
                                           lambda ex: sources.as_text(ex["text"])) if t]
      if not texts:
        raise DataError(f"split {split!r} of {d.dataset} has no text")
      self._documents[split] = texts
    return self._documents[split]

  def _tokenizer_texts(self) -> List[str]:
    """Lines of the training split (sentencepiece skips texts over 4 KB, so whole books
    are fed a line at a time), an evenly strided sample of at most
    config.data.tokenizer_max_sentences."""
    documents = self.documents(self.config.data.train_split)
    if self.config.model.tokenizer == "chars":
      return documents
    lines = [line for doc in documents for line in doc.split("\n") if line.strip()]
    stride = -(-len(lines) // self.config.data.tokenizer_max_sentences)
    return lines[::stride]

  def tokenized(self, split: str) -> list:
    """The documents of a split as int32 token arrays (no EOS)."""
    if split not in self._tokens:
      if self.tokenizer.kind == "chars":
        self._check_characters(split, set(self.tokenizer.characters), self.tokenizer.path)
      self._tokens[split] = self.tokenizer.encode_batch(self.documents(split))
    return self._tokens[split]

  def _check_characters(self, split: str, known, vocabulary: Optional[str] = None) -> None:
    """DataError naming the characters of `split` outside the character vocabulary `known`
    (that of the file `vocabulary`, or None: the one this run builds from the training
    split), where each first occurs, and what to do."""
    d = self.config.data
    first, documents = {}, self.documents(split)
    for n, document in enumerate(documents, 1):
      for char in set(document) - known - first.keys():
        line = document.count("\n", 0, document.index(char)) + 1
        first[char] = f"line {line}" + (f" of document {n}" if len(documents) > 1 else "")
    if not first:
      return
    chars = sorted(first)
    shown = "; ".join(f"{c!r} (U+{ord(c):04X}) first in {first[c]}" for c in chars[:5])
    shown += f"; and {len(chars) - 5} more" if len(chars) > 5 else ""
    held = (f" (the held-out last {d.validation_fraction:.0%} of the {d.train_split!r} text)"
            if d.dataset == "files" and split == "validation" and d.validation_fraction > 0
            else "")
    if vocabulary is None:
      raise DataError(
          f"split {split!r}{held} has characters that the training split "
          f"{d.train_split!r} lacks: {shown}. The character vocabulary is built from the "
          f"training split alone, so the model would have no id for them: add text holding "
          f"them to the training split, remove or replace them in {split!r}, or set "
          f"config.model.tokenizer='bytes' (every character has an id)")
    raise DataError(
        f"split {split!r}{held} has characters outside the character vocabulary "
        f"{vocabulary}: {shown}. That vocabulary holds the characters of the text it was "
        f"built from (a training run's training split), and a model trained with it has no "
        f"id for others: remove or replace them in {split!r}, or train a new run (another "
        f"--workdir) on text that holds them, or with config.model.tokenizer='bytes'")

  def stream(self, split: str) -> np.ndarray:
    """The split as one token stream, each document followed by EOS."""
    return windows.concatenate(self.tokenized(split), self.eos_id)

  def _document_rows(self, split: str) -> list:
    """Each document + EOS as examples of at most the context length (long ones cut)."""
    length = self.config.data.max_target_length
    rows = []
    for tokens in self.tokenized(split):
      tokens = np.append(tokens, self.eos_id).astype(np.int32)
      rows += [{"inputs": tokens[i:i + length]} for i in range(0, len(tokens), length)]
    return rows

  def examples(self, split: str):
    d = self.config.data
    split = {"train": d.train_split, "eval": d.eval_split}.get(split, split)
    if d.lm_batching == "windows":
      return windows.cut_windows(self.stream(split), d.max_target_length)
    return self._document_rows(split)

  def train_windows(self, batch_size, num_devices, process_index=0, process_count=1):
    """Endless training batches of random windows of the training stream, or None when
    config.data.lm_batching is "documents" (rows batched like any other examples)."""
    d = self.config.data
    if d.lm_batching == "documents":
      return None
    try:
      source = windows.WindowBatches(
          self.stream(d.train_split), d.max_target_length, batch_size=batch_size,
          num_devices=num_devices, seed=d.shuffle_seed, process_index=process_index,
          process_count=process_count)
    except ValueError as e:  # the fields to change, by name
      raise DataError(f"{e} (config.train.batch_size={batch_size}, "
                      f"config.data.max_target_length={d.max_target_length})") from None
    logging.info("training stream: %d tokens, %d windows of %d a epoch (%d batches)",
                 len(source.stream), len(source.stream) // d.max_target_length,
                 d.max_target_length, source.batches_per_epoch)
    return grain.MapDataset.source(source)

  def text_lengths(self) -> np.ndarray:
    """Characters (or bytes) each id stands for: bits per character."""
    return self.tokenizer.text_lengths()

  def never_sampled(self):
    """Ids sampling must never pick: padding, and the unknown piece for characters and
    bytes (they reserve id 2 and never encode to it; an undertrained model sampled hot
    could still pick it)."""
    return (0,) if self.tokenizer.kind == "sentencepiece" else (0, tokenizers.UNK_ID)
