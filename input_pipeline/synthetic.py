"""Synthetic digit-string tasks: generated on the fly, deterministic, nothing to download.

Each record is produced from `(seed, split, index)` alone, so a source is random-access
(a grain `RandomAccessDataSource`) and any pipeline over it is reproducible and resumable.
Strings have random lengths in [min_digits, max_digits], so batches have real padding.

Held-out examples are truly held out: a string belongs to the eval split when its CRC32
falls in bucket 0 of 10, and training only ever samples strings from buckets 1-9.
"""

import zlib

import numpy as np

PAD, EOS, SEP = 0, 1, 2
FIRST_DIGIT = 3
VOCAB_SIZE = 16  # 3 specials + 10 digits, rounded up to a multiple of 8
SPLITS = ("train", "eval")
SEQ2SEQ_TASKS = ("reverse", "sort", "copy")
CLASSIFICATION_TASKS = ("majority",)
TRAIN_SIZE = 2**31 - 1  # effectively unbounded; records are generated, not stored

_TRANSFORMS = {
    "reverse": lambda d: d[::-1],
    "sort": np.sort,
    "copy": lambda d: d,
}


def decode_tokens(tokens) -> str:
  """Token ids -> readable text, e.g. "3 1 4 | 4 1 3"; stops at EOS, skips padding."""
  out = []
  for t in np.asarray(tokens).tolist():
    if t == EOS:
      break
    if t == SEP:
      out.append("|")
    elif t >= FIRST_DIGIT:
      out.append(str(t - FIRST_DIGIT))
  return " ".join(out)


def _in_split(digits: np.ndarray, split: str) -> bool:
  bucket = zlib.crc32(digits.astype(np.uint8).tobytes()) % 10
  return (bucket == 0) == (split == "eval")


class SyntheticDigits:
  """A random-access source of synthetic examples (dicts of unpadded int32 arrays).

  Records by kind:
    seq2seq:        {"inputs": x EOS, "targets": f(x) EOS}
    lm:             {"inputs": x SEP f(x) EOS}
    classification: {"inputs": x, "label": 1 if most digits are >= 5 else 0}
  """

  def __init__(self, kind: str, task: str, split: str, size: int, min_digits: int,
               max_digits: int, seed: int = 0):
    if kind not in ("seq2seq", "lm", "classification"):
      raise ValueError(f"unknown synthetic kind {kind!r}")
    allowed = CLASSIFICATION_TASKS if kind == "classification" else SEQ2SEQ_TASKS
    if task not in allowed:
      raise ValueError(f"synthetic task {task!r} does not exist for {kind}; "
                       f"expected one of {allowed}")
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    self.kind, self.task, self.split = kind, task, split
    self.size, self.min_digits, self.max_digits, self.seed = size, min_digits, max_digits, seed

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index: int) -> dict:
    rng = np.random.default_rng([self.seed, SPLITS.index(self.split), int(index)])
    while True:  # rejection sampling into this split's hash buckets (~1.1 or ~10 tries)
      length = rng.integers(self.min_digits, self.max_digits + 1)
      digits = rng.integers(0, 10, size=length)
      if _in_split(digits, self.split):
        break
    x = (digits + FIRST_DIGIT).astype(np.int32)
    if self.kind == "classification":
      return {"inputs": x, "label": np.int32(np.sum(digits >= 5) * 2 > length)}
    y = (_TRANSFORMS[self.task](digits) + FIRST_DIGIT).astype(np.int32)
    eos, sep = np.array([EOS], np.int32), np.array([SEP], np.int32)
    if self.kind == "lm":
      return {"inputs": np.concatenate([x, sep, y, eos])}
    return {"inputs": np.concatenate([x, eos]), "targets": np.concatenate([y, eos])}

  def __repr__(self):
    return (f"SyntheticDigits({self.kind}/{self.task}, split={self.split}, size={self.size}, "
            f"digits={self.min_digits}-{self.max_digits}, seed={self.seed})")
