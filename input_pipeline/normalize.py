"""Text normalisation before tokenization (config.data.text_normalization).

A corpus that was tokenized before release (the Penn Treebank's conventions, lowercased, as
in SST-2: "it 's a charming , often funny film .") trains a whole-word vocabulary whose
words are those tokens. Raw text typed at predict time ("It's a charming, often funny
film.") would then reach the model as unknown words ("it's", "charming,", "film."). A run
that normalises with the corpus's own conventions reads both the same way. Every text of
the run goes through it: the tokenizer's training text, the training and evaluation data,
and the lines of --mode=predict, so a normalisation that leaves the corpus unchanged (this
module's tests check SST-2's splits where the data is present) changes nothing but the
predict input.

    none       the text as it is
    lower      lowercased
    ptb_lower  Penn Treebank tokenization, then lowercased: punctuation and the clitics
               's n't 're 've 'll 'd 'm split off words, double quotes as `` and '',
               "can't" as "ca n't", "cannot" as "can not"; a word's final period is kept
               on abbreviations ("mr.", "u.s.", "j.") and split off elsewhere, and
               single quotes around a word written ` and ' ("rock 'n' roll" stays)
"""

import re
import unicodedata
from typing import Callable, Dict

# Words whose final period ends an abbreviation, not a sentence (SST-2's text has them).
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr vs etc al bros pa wash calif inc ltd co vol mt ft jan feb mar apr "
    "jun jul aug sep sept oct nov dec prof gen sen rep gov lt col sgt capt rev".split())
_SPLIT_ALWAYS = ";()[]{}"  # split off wherever they stand, as are runs of ?! ("?!?")
# Words whose apostrophe marks letters left out, not a quotation: 'em, rock 'n' roll, ol'.
_ELIDED_START = frozenset(["em", "n", "til", "tis", "twas", "cause", "bout"])
_ELIDED_END = frozenset(["ol", "o"])
_UNICODE = {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2014": " -- ",
            "\u2013": " -- ", "\u2026": " ... ", "\u00a0": " "}
_CLITIC = re.compile(r"(?<=\w)('s|'re|'ve|'ll|'d|'m)$")
_NOT = re.compile(r"(?<=\w)(n't)$")
_WHOLE = {"cannot": "can not", "gonna": "gon na", "wanna": "wan na", "gotta": "got ta"}
_NUMBER_PUNCT = re.compile(r"(?<=\d)[,:](?=\d)")


def _quotes(text: str) -> str:
  """Double quotes as PTB writes them: `` opens (at a start, after a space or bracket),
  '' closes."""
  text = re.sub(r'(^|(?<=[\s(\[{]))"', " `` ", text)
  return text.replace('"', " '' ")


def _split_punct(text: str) -> str:
  """Spaces around punctuation that is never part of a word: ;()[]{}, runs of ?!, "--",
  "...", and commas and colons except between digits ("1,000", "2:30")."""
  text = re.sub(r"\.\.\.+", " ... ", text)
  text = re.sub(r"--+", " -- ", text)
  text = re.sub(r"[?!]+", r" \g<0> ", text)
  text = text.translate({ord(c): f" {c} " for c in _SPLIT_ALWAYS})
  protected = _NUMBER_PUNCT.sub(lambda m: {",": "\x00", ":": "\x01"}[m.group()], text)
  protected = re.sub(r"([,:])", r" \1 ", protected)
  return protected.replace("\x00", ",").replace("\x01", ":")


def _word(token: str, following: str) -> list:
  """One whitespace-separated token, split into PTB tokens; `following` is the next one."""
  if token in ("``", "''", "...", "--") or not token:
    return [token]
  after = []
  # A final period stays on abbreviations, single letters and dotted words (PTB writes
  # "etc. ." at a sentence's end); elsewhere it is split off.
  if token.endswith(".") and token != ".":
    stem = token[:-1].lower()
    keep = ("." in stem or (len(stem) == 1 and stem.isalpha()) or stem in _ABBREVIATIONS
            or stem == "no" and following[:1].isdigit())  # "no. 1"; else "the answer is no."
    if not keep:
      token, after = token[:-1], ["."]
  # Single quotes around a word: ` before it, ' after it; elisions ('em, ol') keep theirs.
  before = []
  lower = token.lower()
  if (re.match(r"'[^\W\d_]", token) and not _CLITIC.search("x" + lower)
      and lower.strip("'") not in _ELIDED_START):
    before, token, lower = ["`"], token[1:], lower[1:]
  if (len(token) > 1 and token.endswith("'") and token != "''"
      and lower[:-1] not in _ELIDED_END and not lower.endswith("in'")
      and lower.strip("'") not in _ELIDED_START):
    token, lower, after = token[:-1], lower[:-1], ["'"] + after
  if lower in _WHOLE:
    return before + _WHOLE[lower].split() + after
  m = _NOT.search(lower) or _CLITIC.search(lower)
  if m:
    return before + [token[:m.start()], token[m.start():]] + after
  return before + [token] + after


def ptb_lower(text: str) -> str:
  """`text` in the Penn Treebank's tokens, lowercased (the module's docstring)."""
  text = unicodedata.normalize("NFC", text)
  text = "".join(_UNICODE.get(c, c) for c in text)
  text = _split_punct(_quotes(text))
  tokens = text.split()
  out = []
  for token, following in zip(tokens, tokens[1:] + [""]):
    out.extend(_word(token, following))
  return " ".join(t for t in out if t).lower()


NORMALIZATIONS: Dict[str, Callable[[str], str]] = {
    "none": lambda text: text,
    "lower": str.lower,
    "ptb_lower": ptb_lower,
}
