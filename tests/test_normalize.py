"""Text normalisation (config.data.text_normalization): the Penn Treebank conventions of
SST-2 applied to raw text, unchanged on SST-2's own text, and used by every path of a
classification run (tokenizer training, the splits, predict mode)."""

import gzip
import json
import os

import numpy as np
import pytest

import tasks
from config_checks import ConfigError
from configs import classification as classification_config
from input_pipeline import tokenizers
from input_pipeline.normalize import NORMALIZATIONS, ptb_lower
from modes import workdir_config
from tests.test_classification import REPO, tiny_config, write_table

SST2 = os.path.join(REPO, "..", "shared", "data", "sst2")

# Raw text -> what ptb_lower makes of it, written by hand from the PTB conventions that
# SST-2's text follows.
CASES = [
    ("It's a charming, often funny film.", "it 's a charming , often funny film ."),
    ("I don't think it can't work; it won't.", "i do n't think it ca n't work ; it wo n't ."),
    ("We're sure they've seen what you'll see, I'd say, and I'm glad.",
     "we 're sure they 've seen what you 'll see , i 'd say , and i 'm glad ."),
    ("Cannot recommend it, gonna skip it!", "can not recommend it , gon na skip it !"),
    ('He said "Mr. Smith" was fine.', "he said `` mr. smith '' was fine ."),
    ("A 'clever' twist", "a ` clever ' twist"),
    ("The U.S. cut runs 1,000 minutes (at 2:30).",
     "the u.s. cut runs 1,000 minutes ( at 2:30 ) ."),
    ("Wait...what?!? No--really", "wait ... what ?!? no -- really"),
    ("Gangster No. 1 is fine. The answer is no.", "gangster no. 1 is fine . the answer is no ."),
    ("Rock 'n' roll, good ol' boys, and 'em.", "rock 'n' roll , good ol' boys , and 'em ."),
    ("The actors' work", "the actors ' work"),
    ("\u201cGreat\u201d \u2014 it\u2019s a film\u2026", "`` great '' -- it 's a film ..."),
    ("The '70s: worth it", "the '70s : worth it"),
]


@pytest.mark.parametrize("raw, expected", CASES)
def test_ptb_lower_splits_as_the_treebank_does(raw, expected):
  assert ptb_lower(raw) == expected


@pytest.mark.parametrize("raw, _", CASES)
def test_ptb_lower_is_idempotent(raw, _):
  once = ptb_lower(raw)
  assert ptb_lower(once) == once


def test_every_normalisation_keeps_plain_lowercase_words():
  for name, normalize in NORMALIZATIONS.items():
    assert normalize("a plain film") == "a plain film", name
  assert NORMALIZATIONS["none"]("It's") == "It's"
  assert NORMALIZATIONS["lower"]("It's") == "it's"


@pytest.mark.skipif(not os.path.isdir(SST2), reason="needs ../shared/data/sst2")
def test_sst2_text_is_already_in_ptb_lower_form():
  """The recipe's figures were measured before normalisation existed: it must leave every
  row of every split as it is (spaces apart, which the tokenizer collapses)."""
  changed, total = [], 0
  for name, opener in (("train.tsv.gz", gzip.open), ("dev.tsv", open), ("test.tsv", open)):
    with opener(os.path.join(SST2, name), "rt", encoding="utf-8") as f:
      header = f.readline().rstrip("\n").split("\t")
      column = header.index("sentence")
      for line in f:
        text = line.rstrip("\n").split("\t")[column]
        total += 1
        if ptb_lower(text) != " ".join(text.split()):
          changed.append((name, text))
  assert total > 60000 and not changed, changed[:5]


def test_a_classification_run_reads_every_text_through_the_normalisation(tmp_path):
  """Training data, the tokenizer's training text and predict input all go through
  config.data.text_normalization: raw input reads as its PTB form does."""
  rows = [["It's GOOD, really.", "positive"], ["Dull; I didn't care.", "negative"]] * 20
  os.makedirs(tmp_path / "corpus")
  for stem in ("train", "dev"):
    write_table(tmp_path / "corpus" / f"{stem}.tsv", ["sentence", "label"], rows)
  write_table(tmp_path / "corpus" / "test.tsv", ["index", "sentence"], [["0", "x"]])
  # Whole words, every training word kept: 11 PTB words or 6 raw ones, and the specials.
  for normalization, vocab_size in (("ptb_lower", 15), ("none", 10)):
    config = tiny_config(tmp_path / "corpus", tmp_path / "tfds",
                         data=dict(text_normalization=normalization),
                         model=dict(sentencepiece_type="word", vocab_size=vocab_size))
    data = tasks.get_task(config, None).data
    pieces = set(data.tokenizer.pieces(np.arange(data.vocab_size)))
    if normalization == "none":  # the raw words, punctuation attached
      assert "\u2581GOOD," in pieces or "GOOD," in pieces, sorted(pieces)
      continue
    assert {"\u2581good", "\u2581's", "\u2581n't", "\u2581,"} <= pieces, sorted(pieces)
    first = data.examples("train")[0]["inputs"]
    np.testing.assert_array_equal(first, data.tokenizer.encode("it 's good , really ."))
    assert tokenizers.UNK_ID not in data.tokenizer.encode("it 's good , really .")
    typed = data.encode_batch(["It's good, really.", "it 's good , really ."])
    np.testing.assert_array_equal(typed[0], typed[1])
    np.testing.assert_array_equal(data.encode("IT'S GOOD, REALLY."), typed[1])


def test_a_workdir_keeps_the_normalisation_it_was_trained_with(tmp_path):
  """An override of it on an existing workdir is refused like a model field; a workdir
  saved before the field existed reads its text as it is."""
  config = classification_config.get_config()
  saved = config.to_dict()
  with open(tmp_path / workdir_config.CONFIG_FILE, "w") as f:
    json.dump(saved, f)
  with pytest.raises(ConfigError, match=r"--config.data.text_normalization=none would change "
                                        r".*text_normalization='ptb_lower'"):
    workdir_config.resolve_config(str(tmp_path), config, {"data.text_normalization": "none"},
                                  explicit_file=False)
  del saved["data"]["text_normalization"]
  with open(tmp_path / workdir_config.CONFIG_FILE, "w") as f:
    json.dump(saved, f)
  old = workdir_config.resolve_config(str(tmp_path), config, {}, explicit_file=False)
  assert old.data.text_normalization == "none"
