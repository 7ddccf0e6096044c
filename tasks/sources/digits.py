"""Synthetic digit strings (input_pipeline/synthetic.py) as a data source for any family.

Nothing to read or download: examples are generated from (seed, split, index). The
vocabulary is the digits, the separator "|" and EOS; text given to the model (an attention
example) is written as digits. Its targets are exact (a function of the input), so the
families score them by exact match of the tokens rather than with text metrics.
"""

from typing import Dict, List

import numpy as np

from input_pipeline import synthetic
from input_pipeline.local_builders import DataError


class Digits:
  """Examples of one record kind ("seq2seq", "lm" or "classification") of synthetic digits."""

  has_text = False  # no raw text behind the tokens: scored on tokens (exact match)
  vocab_size = synthetic.VOCAB_SIZE
  output_vocab_size = 0  # the same vocabulary on both sides
  eos_id = synthetic.EOS
  label_names = ["minority >= 5", "majority >= 5"]  # classification: label 1 = majority
  kind_label = "digits"

  # The splits a user may name (--split, config.data.eval_split): the training stream and
  # the held-out strings ("eval", the families' own name, stands for config.data.eval_split).
  SPLITS = ("train", "validation")

  def __init__(self, config, kind: str):
    self.config = config
    self.kind = kind

  def examples(self, split: str, size: int = synthetic.TRAIN_SIZE):
    """Random-access example dicts of "train" (`size` of the endless training stream) or of
    "validation" (config.data.num_eval_examples held-out strings); "eval" is
    config.data.eval_split; DataError for any other name."""
    d = self.config.data
    split = d.eval_split if split == "eval" else split
    if split not in self.SPLITS:
      raise DataError(f"split {split!r}: the synthetic digits have the splits "
                      f"{', '.join(self.SPLITS)} (validation: the held-out strings)")
    train = split == "train"
    return synthetic.SyntheticDigits(self.kind, d.synthetic_task, "train" if train else "eval",
                                     size if train else d.num_eval_examples, d.min_digits,
                                     d.max_digits, seed=d.shuffle_seed)

  def eval_examples(self, split: str):
    """The examples one evaluation of `split` scores: config.data.num_eval_examples strings
    (of the training stream too, which is endless)."""
    return self.examples(split, size=self.config.data.num_eval_examples)

  def eval_lengths(self, lengths: Dict[str, int]) -> Dict[str, int]:
    """Evaluation rows are as long as training rows (the strings have one length range)."""
    return lengths

  def decode(self, tokens) -> str:
    """"3 1 4 | 4 1 3": digits and separators up to EOS."""
    return synthetic.decode_tokens(tokens)

  def pieces(self, tokens, field: str = "inputs") -> List[str]:
    """The piece each id stands for (the axes of attention maps)."""
    del field
    names = {synthetic.PAD: "<pad>", synthetic.EOS: "</s>", synthetic.SEP: "|",
             **{synthetic.FIRST_DIGIT + d: str(d) for d in range(10)}}
    return [names.get(t, f"<{t}>") for t in np.asarray(tokens).tolist()]

  def encode(self, text: str) -> np.ndarray:
    """Digits and "|" of `text` (spaces ignored) as ids; DataError for anything else."""
    bad = sorted(set(text) - set("0123456789| \t"))
    if bad:
      raise DataError(f"{text!r}: synthetic data is written as digits (and '|'), not "
                      f"{''.join(bad)!r}")
    return np.array([synthetic.SEP if ch == "|" else synthetic.FIRST_DIGIT + int(ch)
                     for ch in text if not ch.isspace()], np.int32)

  def text_of(self, split: str, index: int, tokens) -> str:
    """The text of example `index` of `split`: its digits."""
    del split, index
    return self.decode(tokens)

  def never_sampled(self):
    """Ids sampling must never pick: padding."""
    return (0,)
