"""Tokenizers shared by every task: raw bytes, characters, or a trained SentencePiece model.

Every tokenizer keeps the same id conventions, so batching, losses and decoding never ask
which one they have: id 0 is padding, id 1 is EOS, and real text never encodes to either.
`encode` returns ids without EOS (the pipeline appends it where a task wants it); `decode`
reads up to the first EOS and skips padding, so a model's padded, EOS-terminated output
decodes as it is.

Built tokenizers are files next to the run (`get_or_build`): a resumed run, evaluation and
decoding load the file instead of rebuilding, and every write is atomic (temp file, then
`os.replace`) so a run killed mid-write never leaves a half-written tokenizer to be reused.
A tokenizer's `fingerprint` (a hash of what maps its ids to text) is saved with every
checkpoint, so a tokenizer rebuilt or replaced since is caught before its ids reach a model
trained on other ones (`check_same_tokenizer`).
"""

import hashlib
import io
import json
import os
import random
import re
import time
from typing import Callable, Iterable, List, Optional

import numpy as np
import sentencepiece as spm
from absl import logging

import files
from configs import default
from errors import UserError

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2  # sentencepiece's unknown piece; reserved (never produced) for bytes and chars
FIRST_ID = 3  # first id of a real byte or character
KINDS = ("bytes", "chars", "sentencepiece")
# sentencepiece's model types: subword "unigram" (lm1b/wmt examples) and "bpe", or "word":
# one piece per whitespace-separated word, the rest unknown (word-level vocabularies).
SENTENCEPIECE_TYPES = ("unigram", "bpe", "word")
_EXTENSIONS = {".model": "sentencepiece", ".json": "chars"}
_CHARS_FORMAT = 1
# The trained pieces and scores change with the trainer's thread count (sentencepiece
# 0.2.3), so it is fixed rather than taken from the machine: every host trains the same model.
_TRAIN_THREADS = 16
# sentencepiece silently skips longer training sentences (its max_sentence_length default).
_MAX_SENTENCE_BYTES = 4192
_REPLACEMENT = "\ufffd"


class TokenizerError(UserError, ValueError):
  """A tokenizer cannot be built, loaded or applied; the message names the file/field and
  what to do."""


# The key of the tokenizer's fingerprint in each checkpoint's saved config.
TOKENIZER_KEY = "tokenizer_fingerprint"
RUN_HINT = ("It was rebuilt or replaced since. Put the run's own tokenizer file back (or "
            "set config.data.tokenizer_path to it), use another --workdir, or add "
            "--config.train.allow_config_change=True to use the checkpoint anyway")


def tokenizer_record(task) -> dict:
  """{TOKENIZER_KEY: fingerprint} of the task's tokenizers, saved in each checkpoint's config;
  empty where there is none to record (digits, a pretrained model's tokenizer)."""
  fingerprint = getattr(task.data, "tokenizer_fingerprint", lambda: None)()
  return {TOKENIZER_KEY: fingerprint} if fingerprint else {}


def check_same_tokenizer(saved: dict, task, config, where: str, hint: str = RUN_HINT) -> None:
  """TokenizerError when the tokenizer the task reads with is not the one the checkpoint
  in `where` was trained with (its config `saved` records the fingerprint): a tokenizer
  file lost and rebuilt from changed data, or replaced, would give ids that mean other
  words to the model. Checkpoints saved before fingerprints were recorded are not checked;
  config.train.allow_config_change skips the check. `hint` says what to do."""
  then = default.group_flat_config(saved).get(TOKENIZER_KEY)
  now = tokenizer_record(task).get(TOKENIZER_KEY)
  if then is None or now is None or then == now or config.train.allow_config_change:
    return
  raise TokenizerError(
      f"the tokenizer this run reads with ({task.data.tokenizer_files()}) is not the one the "
      f"checkpoint in {where} was trained with (fingerprint {now} now, {then} there): its ids "
      f"would mean other text to the model. {hint}")


class Tokenizer:
  """Base class: text <-> int32 ids with id 0 = padding and id 1 = EOS."""

  kind: str
  vocab_size: int
  pad_id = PAD_ID
  eos_id = EOS_ID

  def fingerprint(self) -> Optional[str]:
    """A short hash of the id <-> text mapping: equal for the same vocabulary, whatever
    file it was read from; None where a tokenizer does not define one."""
    definition = self._definition()
    return None if definition is None else hashlib.sha256(definition).hexdigest()[:16]

  def _definition(self) -> Optional[bytes]:
    return None

  def encode(self, text: str) -> np.ndarray:
    """Text -> int32 ids `[length]`, no EOS appended."""
    raise NotImplementedError

  def decode(self, ids) -> str:
    """Ids `[length]` -> text, reading up to the first EOS (exclusive) and skipping padding.

    Ids that name no token (the reserved id 2 of bytes/chars, or ids >= vocab_size, which a
    model whose embedding is rounded up past the vocabulary can emit) decode to a visible
    replacement instead of raising, so an undertrained model cannot crash an evaluation.
    """
    return self._decode(_content(ids))

  def encode_batch(self, texts: Iterable[str]) -> List[np.ndarray]:
    """Encodes each text; same result as `encode` one by one."""
    return [self.encode(text) for text in texts]

  def text_lengths(self) -> np.ndarray:
    """`[vocab_size]` float: the characters (bytes, for the byte tokenizer) each id stands
    for; EOS counts as one (a document's end), padding as zero. Bits per character are
    summed bits over the summed lengths of the scored tokens."""
    lengths = np.ones(self.vocab_size, np.float32)
    lengths[PAD_ID] = 0.0
    return lengths

  def _decode(self, ids: np.ndarray) -> str:
    raise NotImplementedError

  def pieces(self, ids) -> List[str]:
    """The piece each id stands for, one string per id (padding and EOS included), for
    the axes of attention maps: whitespace made visible, unknown ids as their number."""
    out = []
    for i in np.asarray(ids, np.int64).reshape(-1).tolist():
      special = _SPECIAL_PIECES.get(i) if i < FIRST_ID else None
      piece = special or (self._piece(i) if 0 <= i < self.vocab_size else None)
      out.append(piece if piece is not None else f"<{i}>")
    return out

  def _piece(self, i: int) -> Optional[str]:
    del i
    return None


_SPECIAL_PIECES = {PAD_ID: "<pad>", EOS_ID: "</s>", UNK_ID: "<unk>"}
_VISIBLE = {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5"}  # space, newline, tab as signs


def _content(ids) -> np.ndarray:
  """Ids before the first EOS, without padding, as a 1-D int64 array."""
  ids = np.asarray(ids, np.int64).reshape(-1)
  eos = np.flatnonzero(ids == EOS_ID)
  if eos.size:
    ids = ids[:eos[0]]
  return ids[ids != PAD_ID]


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes: id = byte + 3; needs no training and covers every text."""

  kind = "bytes"
  vocab_size = 256 + FIRST_ID

  def _definition(self) -> bytes:
    return b"utf-8 bytes + 3"

  def encode(self, text: str) -> np.ndarray:
    try:
      data = text.encode("utf-8")
    except UnicodeEncodeError as e:
      raise TokenizerError(
          f"the text cannot be encoded as UTF-8 ({e}); it holds a lone surrogate, usually "
          "from reading a file with errors='surrogateescape'; read it as UTF-8") from e
    return np.frombuffer(data, np.uint8).astype(np.int32) + FIRST_ID

  def _decode(self, ids: np.ndarray) -> str:
    valid = (ids >= FIRST_ID) & (ids < self.vocab_size)
    if valid.all():
      return (ids - FIRST_ID).astype(np.uint8).tobytes().decode("utf-8", errors="replace")
    # Decode the runs of valid bytes separately, so an invalid id never merges the bytes on
    # either side of it into one character.
    out, start = [], 0
    for i in np.flatnonzero(~valid).tolist() + [ids.size]:
      out.append(self._decode(ids[start:i]) if i > start else "")
      if i < ids.size:
        out.append(_REPLACEMENT)
      start = i + 1
    return "".join(out)

  def _piece(self, i: int) -> Optional[str]:
    byte = i - FIRST_ID  # printable ASCII as itself, other bytes (parts of UTF-8) as hex
    return _VISIBLE.get(chr(byte), chr(byte) if 32 < byte < 127 else f"<0x{byte:02X}>")


class CharacterTokenizer(Tokenizer):
  """One id per character of the training text (sorted, from id 3); saved as JSON."""

  kind = "chars"

  def __init__(self, characters: Iterable[str], path: Optional[str] = None):
    """`characters`: the vocabulary (deduplicated and sorted here); `path`: its file, if any,
    named in errors."""
    characters = list(characters)
    bad = [c for c in characters if not isinstance(c, str) or len(c) != 1]
    if bad:
      raise TokenizerError(f"character vocabulary{_at(path)} has entries that are not single "
                           f"characters: {bad[:5]!r}; rebuild it from text")
    self.characters = sorted(set(characters))
    self.path = path
    self.vocab_size = FIRST_ID + len(self.characters)
    self._ids = {c: i for i, c in enumerate(self.characters, FIRST_ID)}

  def _definition(self) -> bytes:
    return json.dumps(self.characters, ensure_ascii=False).encode("utf-8")

  @classmethod
  def build(cls, texts: Iterable[str]) -> "CharacterTokenizer":
    """The vocabulary of every character in `texts`."""
    characters = set()
    for text in texts:
      characters.update(text)
    if not characters:
      raise TokenizerError("cannot build a character vocabulary: the training text is empty; "
                           "check the dataset the tokenizer is built from")
    return cls(characters)

  def encode(self, text: str) -> np.ndarray:
    ids = self._ids
    try:
      return np.fromiter((ids[c] for c in text), np.int32, count=len(text))
    except KeyError:
      missing = sorted(set(text) - ids.keys())
      shown = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in missing[:10])
      more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
      raise TokenizerError(
          f"the text has characters outside the character vocabulary{_at(self.path)}: "
          f"{shown}{more}; the vocabulary holds only the characters of the text it was "
          "built from, and a model trained with it has no id for others: leave them out of "
          "this text, or train a new run on text that holds them (or with tokenizer kind "
          "'bytes')") from None

  def _decode(self, ids: np.ndarray) -> str:
    chars = self.characters
    return "".join(chars[i - FIRST_ID] if FIRST_ID <= i < self.vocab_size else _REPLACEMENT
                   for i in ids.tolist())

  def _piece(self, i: int) -> Optional[str]:
    char = self.characters[i - FIRST_ID]
    return _VISIBLE.get(char, char)

  def save(self, path: str) -> None:
    """Writes the vocabulary as JSON, atomically."""
    data = {"kind": self.kind, "format": _CHARS_FORMAT, "characters": self.characters}
    files.write_atomically(path, json.dumps(data, ensure_ascii=True, indent=0).encode("ascii"))
    self.path = path

  @classmethod
  def load(cls, path: str) -> "CharacterTokenizer":
    data = _read(path)
    try:
      data = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
      raise TokenizerError(f"the character vocabulary {path} is not valid JSON ({e}); delete "
                           "it to rebuild it") from e
    if (not isinstance(data, dict) or data.get("kind") != cls.kind
        or data.get("format") != _CHARS_FORMAT or not isinstance(data.get("characters"), list)):
      raise TokenizerError(
          f"{path} is not a character vocabulary: expected a JSON object with kind "
          f"{cls.kind!r}, format {_CHARS_FORMAT} and a 'characters' list; delete it to rebuild")
    if len(set(data["characters"])) != len(data["characters"]):
      raise TokenizerError(f"the 'characters' of {path} repeat a character; delete it to "
                           "rebuild it")
    return cls(data["characters"], path)


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model with pad_id=0, eos_id=1, unk_id=2 and no BOS.

  Text passes through the model's normalizer (NFKC, extra whitespace removed, by default),
  so decode(encode(text)) is the normalized text; characters the model never saw encode to
  unk (id 2) and decode as " ⁇ ".
  """

  kind = "sentencepiece"

  def __init__(self, path: str):
    self.path = path
    self._load(_read(path), path)

  @classmethod
  def from_bytes(cls, model: bytes, name: str = "<in-memory model>"):
    """A tokenizer from serialized model bytes; `name` stands for the file in errors."""
    self = cls.__new__(cls)
    self.path = None
    self._load(model, name)
    return self

  def _load(self, model: bytes, name: str) -> None:
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(model)
    except RuntimeError as e:
      raise TokenizerError(f"{name} is not a readable sentencepiece model ({e}); delete it to "
                           "retrain it, or point the config at a valid .model file") from e
    if (self._sp.pad_id(), self._sp.eos_id()) != (PAD_ID, EOS_ID):
      raise TokenizerError(
          f"the sentencepiece model {name} has pad_id={self._sp.pad_id()} and "
          f"eos_id={self._sp.eos_id()}, but this codebase needs pad_id={PAD_ID} and "
          f"eos_id={EOS_ID}; retrain it with train_sentencepiece (delete the file)")
    self.vocab_size = self._sp.vocab_size()

  def _definition(self) -> bytes:
    return self._sp.serialized_model_proto()

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text, out_type=int), np.int32)

  def encode_batch(self, texts: Iterable[str]) -> List[np.ndarray]:
    """Encodes all texts in one multi-threaded sentencepiece call."""
    ids = self._sp.encode(list(texts), out_type=int)
    return [np.asarray(x, np.int32) for x in ids]

  def text_lengths(self) -> np.ndarray:
    lengths = np.array([len(self._sp.id_to_piece(i)) for i in range(self.vocab_size)],
                       np.float32)  # "▁" (a space) is one character, like the space
    lengths[[PAD_ID, EOS_ID, UNK_ID]] = (0.0, 1.0, 1.0)
    return lengths

  def _decode(self, ids: np.ndarray) -> str:
    # sentencepiece raises on ids outside its vocabulary
    ids = np.where((ids >= 0) & (ids < self.vocab_size), ids, UNK_ID)
    return self._sp.decode(ids.tolist())

  def _piece(self, i: int) -> Optional[str]:
    return self._sp.id_to_piece(i)  # "\u2581" marks a word start, as sentencepiece writes it


def _sample(texts: Iterable[str], max_sentences: int):
  """A uniform sample of at most `max_sentences` non-empty texts (reservoir, fixed seed).

  Sampling here rather than in sentencepiece (input_sentence_size) because its sampler gives
  a different model in each process even after set_random_generator_seed (0.2.x).
  Returns (sample, number of non-empty texts, number longer than sentencepiece accepts).
  """
  rng = random.Random(0)
  sample, seen, too_long = [], 0, 0
  for text in texts:
    if not text:
      continue
    if len(text) * 4 > _MAX_SENTENCE_BYTES and len(text.encode("utf-8")) > _MAX_SENTENCE_BYTES:
      too_long += 1
      continue
    if seen < max_sentences:
      sample.append(text)
    else:
      j = rng.randrange(seen + 1)
      if j < max_sentences:
        sample[j] = text
    seen += 1
  return sample, seen, too_long


def _training_error(e: RuntimeError, vocab_size: int, corpus: str) -> TokenizerError:
  """Turns sentencepiece's vocabulary-size failures into a message that says what to change."""
  message = str(e)
  low = re.search(r"smaller than required_chars\. \d+ vs (\d+)", message)
  if low:
    return TokenizerError(
        f"vocab_size {vocab_size} is too small for {corpus}: it has {low.group(1)} distinct "
        "characters and specials, each of which needs its own piece; raise config field "
        f"`vocab_size` to at least {low.group(1)} (or lower character_coverage)")
  high = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)",
                   message)
  if high:
    return TokenizerError(
        f"vocab_size {vocab_size} is too large for {corpus}: the text yields at most "
        f"{high.group(1)} pieces; lower config field `vocab_size` to at most {high.group(1)} "
        "or train on more text")
  return TokenizerError(f"sentencepiece training on {corpus} with vocab_size {vocab_size} "
                        f"failed: {message}")


def train_sentencepiece(texts: Iterable[str], vocab_size: int, path: str, *,
                        model_type: str = "unigram", character_coverage: float = 1.0,
                        max_sentences: int = 1_000_000,
                        seed_sentencepiece_size: int = 1_000_000,
                        keep_whitespace: bool = False) -> SentencePieceTokenizer:
  """Trains a SentencePiece model in-process and writes it to `path` atomically.

  Args:
    texts: training sentences (or lines); sentencepiece skips any longer than 4192 bytes.
    vocab_size: the exact number of pieces, specials included. The limit is hard (the
      sentencepiece default): a soft limit would quietly give a smaller vocabulary than the
      config says, and a corpus too small for the configured size is better reported.
    path: where the `.model` file goes.
    model_type: one of SENTENCEPIECE_TYPES.
    character_coverage: the share of characters that get their own piece; rarer ones
      become unk. 1.0 suits alphabetic languages; ~0.9995 suits CJK.
    max_sentences: at most this many texts (a fixed-seed uniform sample) are trained on.
    seed_sentencepiece_size: the unigram trainer's initial seed vocabulary size.
    keep_whitespace: keep runs of spaces, give the newline a piece of its own and add no
      hidden leading space, so decode(encode(text)) == text for multi-line text and the
      pieces' lengths add up to the text's (language models); by default whitespace is
      normalised, as translation wants.

  The same texts always give the same model bytes.
  """
  model = _train(texts, vocab_size, path, model_type=model_type,
                 character_coverage=character_coverage, max_sentences=max_sentences,
                 seed_sentencepiece_size=seed_sentencepiece_size,
                 keep_whitespace=keep_whitespace)
  tokenizer = SentencePieceTokenizer.from_bytes(model, path)
  files.write_atomically(path, model)
  tokenizer.path = path
  return tokenizer


def _train(texts: Iterable[str], vocab_size: int, name: str, *, model_type: str = "unigram",
           character_coverage: float = 1.0, max_sentences: int = 1_000_000,
           seed_sentencepiece_size: int = 1_000_000, keep_whitespace: bool = False) -> bytes:
  """The serialized model trained on `texts`; `name` stands for its file in errors."""
  if model_type not in SENTENCEPIECE_TYPES:
    raise TokenizerError(f"sentencepiece model_type {model_type!r} is not supported; use one "
                         f"of {SENTENCEPIECE_TYPES} (tokenizer kind 'chars' covers characters)")
  if not isinstance(vocab_size, int) or vocab_size <= FIRST_ID:
    raise TokenizerError(f"config field `vocab_size` is {vocab_size!r}; a sentencepiece "
                         f"vocabulary needs an integer above {FIRST_ID} (its 3 specials)")
  sample, seen, too_long = _sample(texts, max_sentences)
  if not sample:
    raise TokenizerError(
        f"cannot train the sentencepiece model {name}: the training text is empty"
        + (f" ({too_long} texts are longer than {_MAX_SENTENCE_BYTES} bytes, which "
           "sentencepiece skips; split them into lines)" if too_long else "")
        + "; check the dataset the tokenizer is built from")
  corpus = f"the training text ({seen} sentences" + (
      f", {len(sample)} sampled" if seen > len(sample) else "") + ")"
  model = io.BytesIO()
  # One call into sentencepiece, with no progress to report: announced and timed instead
  # (seconds for Multi30k, minutes for a large corpus).
  logging.info("training a %d-piece sentencepiece tokenizer on %s ...", vocab_size, corpus)
  start = time.perf_counter()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sample), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, character_coverage=character_coverage,
        seed_sentencepiece_size=seed_sentencepiece_size, input_sentence_size=0,
        shuffle_input_sentence=False, num_threads=_TRAIN_THREADS,
        max_sentence_length=_MAX_SENTENCE_BYTES, pad_id=PAD_ID, eos_id=EOS_ID,
        unk_id=UNK_ID, bos_id=-1, minloglevel=2,
        **(dict(user_defined_symbols=["\n"], remove_extra_whitespaces=False,
                add_dummy_prefix=False) if keep_whitespace else {}))
  except RuntimeError as e:
    raise _training_error(e, vocab_size, corpus) from e
  logging.info("trained the sentencepiece tokenizer in %.1fs", time.perf_counter() - start)
  return model.getvalue()


def load_tokenizer(path: str) -> Tokenizer:
  """Loads a tokenizer file by extension: `.model` (sentencepiece) or `.json` (chars)."""
  kind = _EXTENSIONS.get(os.path.splitext(path)[1])
  if kind is None:
    raise TokenizerError(f"cannot tell the tokenizer kind of {path}: its extension must be "
                         f"one of {sorted(_EXTENSIONS)}")
  if kind == "sentencepiece":
    return SentencePieceTokenizer(path)
  return CharacterTokenizer.load(path)


def get_or_build(kind: str, path: Optional[str], texts: Callable[[], Iterable[str]],
                 vocab_size: int, keep_whitespace: bool = False,
                 model_type: str = "unigram") -> Tokenizer:
  """The tokenizer of a run: loaded from `path` when it exists, else built and saved there.

  Args:
    kind: "bytes" (needs no file), "chars" (a `.json` path) or "sentencepiece" (`.model`).
    path: the tokenizer file; None builds in memory without saving (building is
      deterministic, so the same texts rebuild the same tokenizer).
    texts: returns the training texts; only called when the tokenizer is built.
    vocab_size: the model's vocabulary size (config field `vocab_size`). A sentencepiece
      model must have exactly this many pieces; bytes and chars must fit in it, because a
      model's embedding lookup does not fail on an id past its end.
    keep_whitespace, model_type: sentencepiece only, see `train_sentencepiece`. A saved
      model is loaded whatever its type.
  """
  if kind not in KINDS:
    raise TokenizerError(f"unknown tokenizer kind {kind!r}; use one of {KINDS}")
  if kind == "bytes":
    tokenizer = ByteTokenizer()
  else:
    if path is not None and _EXTENSIONS.get(os.path.splitext(path)[1]) != kind:
      wanted = next(ext for ext, k in _EXTENSIONS.items() if k == kind)
      raise TokenizerError(f"a {kind} tokenizer is saved as a {wanted} file, but its path is "
                           f"{path}; change the path's extension to {wanted}")
    if path is not None and os.path.exists(path):
      tokenizer = load_tokenizer(path)
    elif kind == "chars":
      tokenizer = CharacterTokenizer.build(texts())
      _check_fits(tokenizer, vocab_size)  # before saving, so a misfit is not reused
      if path is not None:
        tokenizer.save(path)
    elif path is not None:
      tokenizer = train_sentencepiece(texts(), vocab_size, path, model_type=model_type,
                                      keep_whitespace=keep_whitespace)
    else:
      tokenizer = SentencePieceTokenizer.from_bytes(
          _train(texts(), vocab_size, "in memory", model_type=model_type,
                 keep_whitespace=keep_whitespace))
  _check_fits(tokenizer, vocab_size)
  return tokenizer


def _check_fits(tokenizer: Tokenizer, vocab_size: int) -> None:
  where = _at(getattr(tokenizer, "path", None))
  if tokenizer.kind == "sentencepiece" and tokenizer.vocab_size != vocab_size:
    raise TokenizerError(
        f"the sentencepiece model{where} has {tokenizer.vocab_size} pieces but config field "
        f"`vocab_size` is {vocab_size}; it was built for another config: set `vocab_size` to "
        f"{tokenizer.vocab_size}, or delete the file to retrain it")
  if tokenizer.vocab_size > vocab_size:
    raise TokenizerError(
        f"the {tokenizer.kind} tokenizer{where} needs {tokenizer.vocab_size} ids but config "
        f"field `vocab_size` is {vocab_size}; raise `vocab_size` to at least "
        f"{tokenizer.vocab_size}")


def _at(path: Optional[str]) -> str:
  return f" at {path}" if path else ""


def _read(path: str) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read()
  except FileNotFoundError:
    raise TokenizerError(f"no tokenizer at {path}; build it first (a training run builds it "
                         "in its workdir) or fix the tokenizer path in the config") from None
  except OSError as e:
    raise TokenizerError(f"cannot read the tokenizer file {path}: {e}") from e
