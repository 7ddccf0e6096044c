"""A tuning split carved from SST-2's training phrases, so that recipe choices are made
without looking at the dev sentences (BENCHMARKS.md, "SST-2, choices made on a split of
train").

    python benchmarks/sst2_tune_split.py --data_dir=../shared/data/sst2 --out=runs/sst2_tune
    python main.py --config=configs/classification.py --workdir=runs/tune_a \\
        --config.data.data_dir=runs/sst2_tune

SST-2's training set holds every labeled sub-phrase of its training sentences, so a random
held-out share of it would mostly be sub-phrases of sentences still trained on. Instead:

- the tune sentences are `--num_tune` training phrases of at least `--min_words` words that
  are maximal (no other training phrase contains them as a run of whole words), picked at
  random with `--seed`: whole sentences, like the dev split's;
- every training phrase that is a run of whole words of a tune sentence (the sentence
  itself included) is removed from the training file written, so no tune sentence or part
  of one is trained on.

Writes `<out>/train.tsv` (the kept phrases, in their order), `<out>/dev.tsv` (the tune
sentences, under the name the classification config reads as its validation split) and a
copy of `test.tsv` when the source has one, then prints the counts. The files are derived
from the data at run time; none is kept in the repository.
"""

import argparse
import csv
import gzip
import os
import random
import shutil
import sys


def read_rows(path: str):
  """[(sentence, label)] of a sentence/label .tsv or .tsv.gz with a header."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8", newline="") as f:
    rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
  header = rows[0]
  try:
    text, label = header.index("sentence"), header.index("label")
  except ValueError:
    sys.exit(f"{path}: expected a header with 'sentence' and 'label' columns, got {header}")
  return [(row[text].strip(), row[label]) for row in rows[1:]]


def train_file(data_dir: str) -> str:
  """`data_dir`'s train.tsv or train.tsv.gz; exits naming the directory when it has none."""
  source = next((os.path.join(data_dir, n) for n in ("train.tsv", "train.tsv.gz")
                 if os.path.exists(os.path.join(data_dir, n))), None)
  if source is None:
    sys.exit(f"{data_dir}: no train.tsv or train.tsv.gz")
  return source


def word_spans(sentence: str):
  """Every run of whole words of `sentence`, itself included."""
  words = sentence.split()
  return {" ".join(words[i:j]) for i in range(len(words)) for j in range(i + 1, len(words) + 1)}


def split(rows, num_tune: int, min_words: int, seed: int):
  """(train rows kept, tune rows): see the module docstring."""
  contained = set()
  for sentence, _ in rows:
    spans = word_spans(sentence)
    spans.discard(sentence)
    contained |= spans
  candidates = [(s, l) for s, l in rows if s not in contained and len(s.split()) >= min_words]
  if len(candidates) < num_tune:
    sys.exit(f"only {len(candidates)} maximal phrases of >= {min_words} words; lower "
             f"--num_tune or --min_words")
  random.Random(seed).shuffle(candidates)
  tune = candidates[:num_tune]
  held = set().union(*(word_spans(s) for s, _ in tune))
  return [(s, l) for s, l in rows if s not in held], tune


def write_rows(path: str, rows) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.write("sentence\tlabel\n")
    f.writelines(f"{s}\t{l}\n" for s, l in rows)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data_dir", required=True, help="SST-2's directory (train.tsv[.gz])")
  parser.add_argument("--out", required=True, help="directory written")
  parser.add_argument("--num_tune", type=int, default=1000)
  parser.add_argument("--min_words", type=int, default=10)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  rows = read_rows(train_file(args.data_dir))
  train, tune = split(rows, args.num_tune, args.min_words, args.seed)
  os.makedirs(args.out, exist_ok=True)
  write_rows(os.path.join(args.out, "train.tsv"), train)
  write_rows(os.path.join(args.out, "dev.tsv"), tune)
  if os.path.exists(os.path.join(args.data_dir, "test.tsv")):
    shutil.copy(os.path.join(args.data_dir, "test.tsv"), args.out)
  print(f"{len(rows)} training phrases: {len(tune)} tune sentences, {len(train)} phrases kept "
        f"for training ({len(rows) - len(train)} removed) in {args.out}")


if __name__ == "__main__":
  main()
