"""The tokenizers of pretrained folders, with ids in this codebase's order.

- GPT-2: byte-level BPE from the folder's `tokenizer.json`, run by the `tokenizers` library
  (the one `transformers` uses).
- Marian: SentencePiece models `source.spm` and `target.spm` cut text into pieces, and
  `vocab.json` maps pieces to ids (one vocabulary for both languages), as MarianTokenizer
  does; a piece missing from vocab.json is the unknown id.

Both then map ids through the model's `VocabularyMap`, so EOS is 1 and padding 0 here as
for every tokenizer (input_pipeline/tokenizers.py). `tests/test_pretrained.py` checks the
ids against `transformers`' own tokenizers on lines of the local corpora.
"""

import json
import os
from typing import List, Optional

import numpy as np

from input_pipeline import tokenizers as base
from pretrained import PretrainedError, VocabularyMap, download_hint


def _need(folder: str, name: str) -> str:
  path = os.path.join(folder, name)
  if not os.path.exists(path):
    raise PretrainedError(f"{path}: no such file; the model's tokenizer files are part of the "
                          f"folder ({download_hint(folder)})")
  return path


class PretrainedTokenizer(base.Tokenizer):
  """Text <-> our ids through a pretrained tokenizer's ids (`original` = VocabularyMap)."""

  kind = "huggingface"

  def __init__(self, vocab: VocabularyMap, folder: str):
    self.vocab = vocab
    self.vocab_size = vocab.size
    self.path = folder
    self._to_ours = vocab.to_ours()
    self._lengths: Optional[np.ndarray] = None

  # The original tokenizer's ids of a text, and its text of original ids.
  def _encode_original(self, text: str) -> List[int]:
    raise NotImplementedError

  def _decode_original(self, ids: List[int]) -> str:
    raise NotImplementedError

  def encode(self, text: str) -> np.ndarray:
    """Our ids; an original id the model has no row for (a token added to the tokenizer
    after the model was saved) becomes the unknown id, never an index past the table."""
    original = np.asarray(self._encode_original(text), np.int64)
    known = (original >= 0) & (original < len(self._to_ours))
    ours = np.where(known, self._to_ours[np.where(known, original, 0)], -1)
    return np.where(ours < 0, base.UNK_ID, ours).astype(np.int32)

  def original_ids(self, ids) -> List[int]:
    """Our ids -> the original's (ids with no original token dropped)."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    ids = ids[(ids >= 0) & (ids < self.vocab_size)]
    original = self.vocab.original[ids]
    return original[original >= 0].tolist()

  def _decode(self, ids: np.ndarray) -> str:
    return self._decode_original(self.original_ids(ids))

  def _piece(self, i: int) -> Optional[str]:
    original = self.original_ids([i])
    if not original:
      return None
    text = self._decode_original(original)
    return "".join(base._VISIBLE.get(c, c) for c in text)  # pylint: disable=protected-access

  def text_lengths(self) -> np.ndarray:
    if self._lengths is None:
      lengths = np.array([len(self._decode_original(self.original_ids([i])))
                          for i in range(self.vocab_size)], np.float32)
      lengths[base.PAD_ID] = 0.0
      lengths[base.EOS_ID] = 1.0
      self._lengths = lengths
    return self._lengths


class ByteLevelBPE(PretrainedTokenizer):
  """GPT-2's tokenizer, from `tokenizer.json`."""

  def __init__(self, vocab: VocabularyMap, folder: str):
    super().__init__(vocab, folder)
    import tokenizers  # pylint: disable=g-import-not-at-top
    path = _need(folder, "tokenizer.json")
    try:
      self._tokenizer = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # pylint: disable=broad-except  # the library raises its own types
      raise PretrainedError(f"{path} cannot be read as a tokenizers file ({e})") from None

  def _encode_original(self, text: str) -> List[int]:
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def _decode_original(self, ids: List[int]) -> str:
    return self._tokenizer.decode(ids, skip_special_tokens=False)


class MarianPieces(PretrainedTokenizer):
  """A Marian model's tokenizer for one side ("source" or "target")."""

  def __init__(self, vocab: VocabularyMap, folder: str, side: str):
    super().__init__(vocab, folder)
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    self._spm = spm.SentencePieceProcessor(model_file=_need(folder, f"{side}.spm"))
    with open(_need(folder, "vocab.json"), encoding="utf-8") as f:
      self._ids = json.load(f)
    self._pieces = {i: p for p, i in self._ids.items()}
    self._unk = self._ids.get("<unk>", 1)
    self._special = {self._ids.get(p) for p in ("</s>", "<pad>", "<unk>")}

  def _encode_original(self, text: str) -> List[int]:
    return [self._ids.get(p, self._unk) for p in self._spm.encode(text, out_type=str)]

  def _decode_original(self, ids: List[int]) -> str:
    pieces = [self._pieces[i] for i in ids if i in self._pieces and i not in self._special]
    return self._spm.decode_pieces(pieces)
