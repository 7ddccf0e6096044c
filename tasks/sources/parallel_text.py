"""Parallel text for translation: local files (one sentence a line per language) or a tfds
translation dataset by name, read once, tokenized once (SentencePiece trained on the
training split, or bytes; saved in the workdir), filtered to the training lengths (what is
dropped is counted) and cut to the evaluation length.
"""

from typing import Dict, List, Optional

import numpy as np
from absl import logging

from input_pipeline import local_builders, sources, tokenizers
from input_pipeline.local_builders import DataError
import pretrained
from tasks.sources import TextSource, tokenizer_paths


class ParallelText(TextSource):
  """Sentence pairs of config.data.language_pair (source-target), tokenized."""

  def __init__(self, config, workdir: Optional[str], training: bool):
    self.source_lang, self.target_lang = config.data.language_pair.split("-")
    self.kind_label = f"{self.source_lang}-{self.target_lang}"
    super().__init__(config)
    self._examples: Dict[str, list] = {}
    self._texts: Dict[str, tuple] = {}
    self.source_tokenizer, self.target_tokenizer = self._tokenizers(workdir, training)
    self.vocab_size = self.source_tokenizer.vocab_size
    self.output_vocab_size = self.target_tokenizer.vocab_size
    self.eos_id = self.target_tokenizer.eos_id

  def _make_builder(self):
    """The tfds builder of config.data.dataset (local parallel files or a tfds name)."""
    d = self.config.data
    languages = (self.source_lang, self.target_lang)
    if d.dataset == "files":
      file_splits = dict(sources.parse_mapping(d.file_splits, "data.file_splits"))
      return local_builders.parallel_text_builder(
          d.data_dir, languages, file_splits, sources.default_data_dir(d.tfds_data_dir))
    builder = sources.tfds_builder(d.dataset, d.tfds_data_dir)
    features = list(builder.info.features.keys())
    missing = [lang for lang in languages if lang not in features]
    if missing:
      raise DataError(f"config.data.language_pair={d.language_pair!r}: dataset {d.dataset} "
                      f"has no language {', '.join(missing)}; it has {', '.join(features)}")
    return builder

  def _split_source(self, split: str):
    d = self.config.data
    if d.dataset == "files" and split not in dict(self._builder.builder_config.splits):
      raise DataError(f"split {split!r} is not in config.data.file_splits={d.file_splits!r}")
    return self._open(split)

  def texts(self, split: str):
    """(sources, references) of a split as lists of str, in dataset order."""
    if split not in self._texts:
      pairs = sources.read_all(
          self._split_source(split), lambda ex: (sources.as_text(ex[self.source_lang]),
                                                 sources.as_text(ex[self.target_lang])))
      self._texts[split] = ([p[0] for p in pairs], [p[1] for p in pairs])
    return self._texts[split]

  def all_tokenizers(self) -> list:
    return [self.source_tokenizer, self.target_tokenizer]

  def _tokenizers(self, workdir: Optional[str], training: bool):
    """(source, target) tokenizers: loaded from config.data.tokenizer_path or the workdir,
    or trained on the training split and saved in the workdir (which the write creates,
    after the data has been read and checked: bad data leaves no trace in it)."""
    c = self.config
    kind, size = c.model.tokenizer, c.model.vocab_size
    if kind == "huggingface":  # a pretrained model's own (config.init_from), one vocabulary
      return pretrained.tokenizer(c, "source"), pretrained.tokenizer(c, "target")
    names = (["tokenizer.model"] if c.model.shared_vocab else
             [f"tokenizer_{self.source_lang}.model", f"tokenizer_{self.target_lang}.model"])
    paths = tokenizer_paths(c, workdir, names, training)

    def corpus(which):
      def sentences():
        src, tgt = self.texts(c.data.train_split)
        texts = {"source": src, "target": tgt, "both": src + tgt}[which]
        # An evenly strided sample: large corpora are often concatenations of sources.
        stride = -(-len(texts) // c.data.tokenizer_max_sentences)
        return texts[::stride]
      return sentences

    pieces = c.model.sentencepiece_type
    if c.model.shared_vocab:
      shared = tokenizers.get_or_build(kind, paths[0], corpus("both"), size, model_type=pieces)
      return shared, shared
    return (tokenizers.get_or_build(kind, paths[0], corpus("source"), size, model_type=pieces),
            tokenizers.get_or_build(kind, paths[1], corpus("target"), size, model_type=pieces))

  def _tokenized(self, split: str) -> list:
    """Examples `{"inputs", "targets", "index"}` with EOS appended, unfiltered."""
    if split not in self._examples:
      src, tgt = self.texts(split)
      eos = np.array([self.eos_id], np.int32)
      inputs = self.source_tokenizer.encode_batch(src)
      targets = self.target_tokenizer.encode_batch(tgt)
      self._examples[split] = [
          {"inputs": np.concatenate([x, eos]), "targets": np.concatenate([y, eos]),
           "index": np.int32(i)} for i, (x, y) in enumerate(zip(inputs, targets))]
    return self._examples[split]

  def split_name(self, split: str) -> str:
    return self.config.data.eval_split if split == "eval" else split

  def examples(self, split: str) -> list:
    """Training pairs that fit the training lengths, or every pair of an evaluation split
    (the rare one longer than max_eval_length cut, ending in EOS; its text stays whole)."""
    d = self.config.data
    if split == "train":
      examples = self._tokenized(d.train_split)
      kept = [e for e in examples if len(e["inputs"]) <= d.max_input_length
              and len(e["targets"]) <= d.max_target_length]
      logging.info("training split %r: %d examples, %d dropped for being longer than "
                   "max_input_length=%d or max_target_length=%d tokens (EOS included)",
                   d.train_split, len(kept), len(examples) - len(kept), d.max_input_length,
                   d.max_target_length)
      if not kept:
        raise DataError(f"no training example fits config.data.max_input_length="
                        f"{d.max_input_length} and max_target_length={d.max_target_length}; "
                        f"raise them")
      return kept
    split = self.split_name(split)
    length = d.max_eval_length
    out, cut = [], 0
    for e in self._tokenized(split):
      if len(e["inputs"]) > length or len(e["targets"]) > length:
        cut += 1
        e = {"inputs": np.append(e["inputs"][:length - 1], self.eos_id),
             "targets": np.append(e["targets"][:length - 1], self.eos_id), "index": e["index"]}
      out.append(e)
    if cut:
      logging.warning("split %r: %d examples longer than max_eval_length=%d were truncated",
                      split, cut, length)
    return out

  def eval_lengths(self, lengths: Dict[str, int]) -> Dict[str, int]:
    del lengths
    length = self.config.data.max_eval_length
    return {"inputs": length, "targets": length}

  def decode(self, tokens) -> str:
    return self.target_tokenizer.decode(tokens)

  def pieces(self, tokens, field: str = "inputs") -> List[str]:
    tokenizer = self.source_tokenizer if field == "inputs" else self.target_tokenizer
    return tokenizer.pieces(tokens)

  def encode(self, text: str, field: str = "inputs") -> np.ndarray:
    tokenizer = self.source_tokenizer if field == "inputs" else self.target_tokenizer
    return tokenizer.encode(text)

  def encode_sources(self, lines: List[str]) -> List[np.ndarray]:
    """Source-side ids of each line, cut to max_eval_length with EOS last."""
    length = self.config.data.max_eval_length
    eos = np.array([self.eos_id], np.int32)
    return [np.concatenate([x[:length - 1], eos])
            for x in self.source_tokenizer.encode_batch(lines)]
