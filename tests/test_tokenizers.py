"""Tokenizers: lossless round trips, the pad/EOS conventions, deterministic SentencePiece
training of the exact vocabulary size, reuse of a built file without rebuilding, atomic
writes, and errors that name the file or config field."""

import os
import random
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm

from input_pipeline import tokenizers
from input_pipeline.tokenizers import (ByteTokenizer, CharacterTokenizer,
                                       SentencePieceTokenizer, TokenizerError)

_WORDS = ("der die das Mann Frau Kind Hund läuft über Straße schöne grüne Brücke spielt im "
          "Park Mädchen fährt Fahrrad café naïve a the man woman dog runs across street "
          "young girl rides bike while two people sit near water").split()
_UNICODE = ["Grüße aus Köln: Die Straße ist schön, das Mädchen fährt Fahrrad.",
            "naïve café, façade — «Zitat» and “quotes”; ÄÖÜ äöü ß"]
_EMOJI = ["🙂 Hund 🐕 日本語 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "tab\tand\nnewline  two spaces \x00 nul"]


def _corpus(n=300, seed=0):
  """`n` sentences over the real words plus pseudo-words, enough for a 200-piece vocabulary."""
  rng = random.Random(seed)
  letters = "abcdefghijklmnopqrstuvwxyzäöüß"
  words = list(_WORDS) + ["".join(rng.choice(letters) for _ in range(rng.randint(2, 8)))
                          for _ in range(200)]
  return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("sp") / "spm.model")
  tokenizers.train_sentencepiece(_corpus(), 200, path)
  return path


def _tokenizer_and_texts(kind, sp_path):
  """A tokenizer of `kind` and texts it must round-trip exactly."""
  if kind == "bytes":
    return ByteTokenizer(), _UNICODE + _EMOJI
  if kind == "chars":
    return CharacterTokenizer.build(_corpus() + _UNICODE + _EMOJI), _UNICODE + _EMOJI
  # sentencepiece normalizes whitespace and NFKC, so its round trip is checked on text that
  # is already normal: corpus sentences and the German sentence built from corpus letters.
  return tokenizers.load_tokenizer(sp_path), _corpus(20, seed=1) + [" ".join(_WORDS)]


KINDS = ("bytes", "chars", "sentencepiece")


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip(kind, sp_path):
  tokenizer, texts = _tokenizer_and_texts(kind, sp_path)
  assert tokenizer.kind == kind
  for text in texts:
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("kind", KINDS)
def test_real_text_never_encodes_to_pad_or_eos(kind, sp_path):
  tokenizer, texts = _tokenizer_and_texts(kind, sp_path)
  ids = np.concatenate(tokenizer.encode_batch(texts))
  assert ids.size > 0
  assert ids.min() >= 2 and ids.max() < tokenizer.vocab_size
  if kind != "sentencepiece":  # id 2 is sentencepiece's unk; bytes and chars never use it
    assert ids.min() >= 3


@pytest.mark.parametrize("kind", KINDS)
def test_decode_stops_at_eos_and_skips_padding(kind, sp_path):
  tokenizer, texts = _tokenizer_and_texts(kind, sp_path)
  first, second = tokenizer.encode(texts[0]), tokenizer.encode(texts[1])
  # Padding in the middle too: packed or left-padded rows are not only right-padded.
  padded = np.insert(first, len(first) // 2, [0, 0])
  ids = np.concatenate([[0], padded, [1], second, [1], [0, 0, 0]])
  assert tokenizer.decode(ids) == texts[0]
  assert tokenizer.decode(ids.tolist()) == texts[0]
  assert tokenizer.decode([1] + first.tolist()) == ""
  assert tokenizer.decode(np.zeros(5, np.int32)) == ""


@pytest.mark.parametrize("kind", KINDS)
def test_ids_past_the_vocabulary_decode_without_raising(kind, sp_path):
  # A model whose embedding is rounded up past the vocabulary can emit such ids.
  tokenizer, texts = _tokenizer_and_texts(kind, sp_path)
  ids = tokenizer.encode(texts[0])
  out = tokenizer.decode(np.concatenate([ids, [tokenizer.vocab_size + 5], ids]))
  assert out.startswith(texts[0]) and out.endswith(texts[0]) and len(out) > 2 * len(texts[0])


def test_byte_ids():
  tokenizer = ByteTokenizer()
  assert tokenizer.vocab_size == 259
  np.testing.assert_array_equal(tokenizer.encode("A\x00é"), [65 + 3, 0 + 3, 0xC3 + 3, 0xA9 + 3])
  # A sequence cut inside a multi-byte character (as at a max length) still decodes.
  assert tokenizer.decode(tokenizer.encode("aé")[:-1]) == "a\ufffd"


def test_sentencepiece_encode_batch_matches_encode(sp_path):
  tokenizer = tokenizers.load_tokenizer(sp_path)
  texts = _corpus(30, seed=2)
  for batched, text in zip(tokenizer.encode_batch(texts), texts):
    assert batched.dtype == np.int32
    np.testing.assert_array_equal(batched, tokenizer.encode(text))


@pytest.mark.parametrize("vocab_size,model_type", [(64, "unigram"), (200, "unigram"),
                                                   (150, "bpe"), (120, "word")])
def test_sentencepiece_training_is_deterministic_and_exact(tmp_path, vocab_size, model_type):
  paths = [str(tmp_path / f"{i}.model") for i in range(2)]
  trained = [tokenizers.train_sentencepiece(_corpus(), vocab_size, p, model_type=model_type)
             for p in paths]
  assert open(paths[0], "rb").read() == open(paths[1], "rb").read()
  assert all(t.vocab_size == vocab_size for t in trained)
  loaded = tokenizers.load_tokenizer(paths[0])
  assert loaded.vocab_size == vocab_size
  assert (loaded._sp.pad_id(), loaded._sp.eos_id(), loaded._sp.unk_id(),
          loaded._sp.bos_id()) == (0, 1, 2, -1)


def test_word_pieces_are_the_most_frequent_whole_words_and_the_rest_unknown(tmp_path):
  """model_type="word" (through get_or_build, as config.model.sentencepiece_type passes it):
  one id per known word, the vocabulary's words are the corpus's most frequent ones, and a
  word outside it (or an unseen one) is the unknown id, never split into pieces."""
  corpus = _corpus()
  counts = {}
  for line in corpus:
    for word in line.split():
      counts[word] = counts.get(word, 0) + 1
  tokenizer = tokenizers.get_or_build("sentencepiece", str(tmp_path / "w.model"),
                                      lambda: corpus, 60, model_type="word")
  pieces = [tokenizer._sp.id_to_piece(i) for i in range(tokenizers.FIRST_ID, 60)]
  words = {p.lstrip("\u2581") for p in pieces}
  assert len(words) == 60 - tokenizers.FIRST_ID
  # Every word in the vocabulary is at least as frequent as every word left out.
  assert min(counts[w] for w in words) >= max(c for w, c in counts.items() if w not in words)
  known = sorted(words)[:3]
  left_out = next(w for w in counts if w not in words)
  ids = tokenizer.encode(" ".join(known + [left_out, known[0], "zzzunseen"]))
  known_ids = [tokenizer._sp.piece_to_id("\u2581" + w) for w in known]
  assert list(ids) == known_ids + [tokenizers.UNK_ID, known_ids[0], tokenizers.UNK_ID]
  # sentencepiece merges adjacent unknown words into one unknown id.
  assert list(tokenizer.encode(f"{left_out} zzzunseen")) == [tokenizers.UNK_ID]
  with pytest.raises(TokenizerError, match="model_type 'char' is not supported"):
    tokenizers.get_or_build("sentencepiece", None, lambda: corpus, 60, model_type="char")


def test_sentencepiece_sampling_is_deterministic_across_processes(tmp_path):
  # sentencepiece's own sampler (input_sentence_size) differs between processes even with
  # a seed; only a fresh process shows it, as a resumed or multi-host run would be.
  script = ("import sys; from input_pipeline import tokenizers; from tests.test_tokenizers "
            "import _corpus; tokenizers.train_sentencepiece(_corpus(), 150, sys.argv[1], "
            "max_sentences=150)")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  paths = [str(tmp_path / f"{i}.model") for i in range(2)]
  for path in paths:
    subprocess.run([sys.executable, "-c", script, path], cwd=root, check=True)
  assert open(paths[0], "rb").read() == open(paths[1], "rb").read()


def test_sentencepiece_vocab_too_small_or_too_large(tmp_path):
  path = str(tmp_path / "spm.model")
  with pytest.raises(TokenizerError, match=r"vocab_size 10 is too small.*`vocab_size`"):
    tokenizers.train_sentencepiece(_corpus(), 10, path)
  with pytest.raises(TokenizerError, match=r"vocab_size 5000 is too large.*`vocab_size` to "
                                           r"at most \d+"):
    tokenizers.train_sentencepiece(_corpus(), 5000, path)
  assert os.listdir(tmp_path) == []


def test_empty_corpus(tmp_path):
  path = str(tmp_path / "spm.model")
  with pytest.raises(TokenizerError, match=f"{path}.*empty"):
    tokenizers.train_sentencepiece(["", ""], 100, path)
  with pytest.raises(TokenizerError, match="empty"):
    tokenizers.get_or_build("chars", str(tmp_path / "c.json"), lambda: [], 100)
  assert os.listdir(tmp_path) == []


def _must_not_build():
  raise AssertionError("get_or_build rebuilt a tokenizer that already exists")


@pytest.mark.parametrize("kind,name,vocab_size", [("sentencepiece", "spm.model", 120),
                                                  ("chars", "chars.json", 100)])
def test_get_or_build_reuses_existing_file(tmp_path, kind, name, vocab_size):
  path = str(tmp_path / "sub" / name)
  built = tokenizers.get_or_build(kind, path, _corpus, vocab_size)
  assert os.listdir(tmp_path / "sub") == [name]  # no temp file left behind
  before = open(path, "rb").read(), os.stat(path).st_mtime_ns
  reused = tokenizers.get_or_build(kind, path, _must_not_build, vocab_size)
  assert (open(path, "rb").read(), os.stat(path).st_mtime_ns) == before
  assert reused.kind == kind and reused.vocab_size == built.vocab_size
  text = _corpus(1, seed=3)[0]
  np.testing.assert_array_equal(reused.encode(text), built.encode(text))


def test_get_or_build_bytes_and_in_memory(tmp_path):
  assert isinstance(tokenizers.get_or_build("bytes", None, _must_not_build, 300), ByteTokenizer)
  sp = tokenizers.get_or_build("sentencepiece", None, _corpus, 100)
  assert isinstance(sp, SentencePieceTokenizer) and sp.vocab_size == 100
  assert os.listdir(tmp_path) == []


def test_get_or_build_rejects_a_tokenizer_that_does_not_fit_vocab_size(tmp_path, sp_path):
  with pytest.raises(TokenizerError, match=r"`vocab_size` is 100.*set `vocab_size` to 200"):
    tokenizers.get_or_build("sentencepiece", sp_path, _must_not_build, 100)
  path = str(tmp_path / "chars.json")
  with pytest.raises(TokenizerError, match=r"needs \d+ ids.*`vocab_size` is 10"):
    tokenizers.get_or_build("chars", path, _corpus, 10)
  assert not os.path.exists(path)  # a misfit is not saved to be reused
  with pytest.raises(TokenizerError, match="`vocab_size` is 200"):
    tokenizers.get_or_build("bytes", None, _must_not_build, 200)


def test_get_or_build_bad_kind_or_extension(tmp_path):
  with pytest.raises(TokenizerError, match="unknown tokenizer kind 'words'"):
    tokenizers.get_or_build("words", None, _must_not_build, 100)
  with pytest.raises(TokenizerError, match=r"\.model"):
    tokenizers.get_or_build("sentencepiece", str(tmp_path / "x.json"), _must_not_build, 100)


def test_failed_write_leaves_no_partial_file_and_keeps_the_old_one(tmp_path, monkeypatch):
  path = str(tmp_path / "spm.model")
  tokenizers.train_sentencepiece(_corpus(), 100, path)
  old = open(path, "rb").read()

  def killed(src, dst):
    raise KeyboardInterrupt  # the run is killed between writing the temp file and renaming

  monkeypatch.setattr(tokenizers.os, "replace", killed)
  with pytest.raises(KeyboardInterrupt):
    tokenizers.train_sentencepiece(_corpus(), 120, path)
  assert os.listdir(tmp_path) == ["spm.model"]
  assert open(path, "rb").read() == old
  with pytest.raises(KeyboardInterrupt):
    tokenizers.get_or_build("sentencepiece", str(tmp_path / "new.model"), _corpus, 100)
  assert os.listdir(tmp_path) == ["spm.model"]


def test_missing_file(tmp_path):
  for name in ("spm.model", "chars.json"):
    path = str(tmp_path / name)
    with pytest.raises(TokenizerError, match=f"no tokenizer at {path}"):
      tokenizers.load_tokenizer(path)
  with pytest.raises(TokenizerError, match="extension"):
    tokenizers.load_tokenizer(str(tmp_path / "vocab.txt"))


@pytest.mark.parametrize("name,data", [
    ("spm.model", b""), ("spm.model", b"not a model"),
    ("chars.json", b"{not json"), ("chars.json", b"\xff\xfe"),
    ("chars.json", b'{"kind": "chars", "format": 1, "characters": ["ab"]}'),
    ("chars.json", b'{"kind": "chars", "format": 1, "characters": ["a", "a"]}'),
    ("chars.json", b'["a", "b"]')])
def test_corrupt_file(tmp_path, name, data):
  path = tmp_path / name
  path.write_bytes(data)
  with pytest.raises(TokenizerError, match=str(path)):
    tokenizers.load_tokenizer(str(path))
  # Reuse must not silently retrain over a file someone may need to inspect.
  kind = "sentencepiece" if name.endswith(".model") else "chars"
  with pytest.raises(TokenizerError, match=str(path)):
    tokenizers.get_or_build(kind, str(path), _must_not_build, 300)
  assert path.read_bytes() == data


def test_truncated_sentencepiece_model(tmp_path, sp_path):
  path = tmp_path / "spm.model"
  path.write_bytes(open(sp_path, "rb").read()[:1000])
  with pytest.raises(TokenizerError, match=str(path)):
    tokenizers.load_tokenizer(str(path))


def test_sentencepiece_model_with_other_special_ids_is_rejected(tmp_path):
  path = str(tmp_path / "spm.model")
  # sentencepiece's defaults: unk=0, bos=1, eos=2, no pad; id 0 would not be padding.
  spm.SentencePieceTrainer.train(sentence_iterator=iter(_corpus()), model_prefix=path[:-6],
                                 vocab_size=100, minloglevel=2)
  with pytest.raises(TokenizerError, match=f"{path} has pad_id=-1 and eos_id=2"):
    tokenizers.load_tokenizer(path)


def test_character_vocabulary(tmp_path):
  tokenizer = CharacterTokenizer.build(["bca", "ab"])
  assert tokenizer.characters == ["a", "b", "c"] and tokenizer.vocab_size == 6
  np.testing.assert_array_equal(tokenizer.encode("cab"), [5, 3, 4])
  path = str(tmp_path / "chars.json")
  tokenizer.save(path)
  loaded = CharacterTokenizer.load(path)
  assert loaded.characters == tokenizer.characters and loaded.path == path
  assert os.listdir(tmp_path) == ["chars.json"]


def test_character_unknown_characters_are_named(tmp_path):
  path = str(tmp_path / "chars.json")
  tokenizers.get_or_build("chars", path, lambda: ["Strasse"], 100)
  tokenizer = tokenizers.load_tokenizer(path)
  with pytest.raises(TokenizerError) as error:
    tokenizer.encode("Straße café")
  message = str(error.value)
  assert "'ß' (U+00DF)" in message and "'é' (U+00E9)" in message and "' ' (U+0020)" in message
  assert path in message and "'a'" not in message


# ----------------------------------------------------------------------------- fingerprints


def test_fingerprint_follows_the_vocabulary_not_the_file(tmp_path, sp_path):
  """The same vocabulary read from a file or bytes has one fingerprint; another vocabulary
  (other text, or another size) has another; each kind defines one."""
  with open(sp_path, "rb") as f:
    model = f.read()
  loaded = SentencePieceTokenizer(sp_path)
  assert loaded.fingerprint() == SentencePieceTokenizer.from_bytes(model).fingerprint()
  assert len(loaded.fingerprint()) == 16
  other_text = str(tmp_path / "other.model")
  tokenizers.train_sentencepiece(_corpus(seed=1), 200, other_text)
  other_size = str(tmp_path / "size.model")
  tokenizers.train_sentencepiece(_corpus(), 150, other_size)
  prints = {loaded.fingerprint(), SentencePieceTokenizer(other_text).fingerprint(),
            SentencePieceTokenizer(other_size).fingerprint()}
  assert len(prints) == 3
  chars = CharacterTokenizer.build(["abc"])
  chars.save(str(tmp_path / "c.json"))
  assert CharacterTokenizer.load(str(tmp_path / "c.json")).fingerprint() == chars.fingerprint()
  assert CharacterTokenizer.build(["abd"]).fingerprint() != chars.fingerprint()
  assert ByteTokenizer().fingerprint() == ByteTokenizer().fingerprint() not in prints
