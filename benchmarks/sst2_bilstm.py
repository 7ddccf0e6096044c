"""The from-scratch baseline issue 18 measures SST-2 against, run on this repository's data:
a bidirectional LSTM with the settings of Flax's SST-2 example (its configs/default.py),
written here, beside the Transformer classifier (BENCHMARKS.md, "Eighth session").

    python -m benchmarks.sst2_bilstm --data_dir=../shared/data/sst2 --split=dev
    python -m benchmarks.sst2_bilstm --data_dir=../shared/data/sst2 --split=tune  # train minus
        # 1,000 held-out sentences and every part of them (benchmarks/sst2_tune_split.py)

The model, as that example describes it: whole words seen at least `--min_count` times in
the training phrases (others are one unknown id), embeddings of 300 drawn from N(0, 0.1),
word dropout (a word becomes the unknown id with probability 0.1), dropout 0.5 on the
embeddings; a forward and a backward LSTM of 256 units each; dropout 0.5; additive
attention pooling scored from the states alone (a tanh layer, then one score per
position, softmax over the real positions); dropout 0.5; a tanh layer of 256 with dropout
0.5; two logits. SGD with momentum 0.9 at a constant 0.1, weight decay 3e-6, batch 64,
8,600 steps (the example's 10 passes over the tune split's 54,934 phrases; 8.2 passes over
the 66,978 distinct phrases of the full training set), evaluated every 860 steps.

This is a benchmark, not a model of the codebase: it has no checkpoints, modes or config
files. It shares its LSTM recurrence (models/recurrent.lstm_scan) with the codebase's own
recurrent reading (`model.encoder_lstm`, trained by configs/classification.py:recipe=lstm).
It prints one line per evaluation and, with --output, writes them as JSON.
"""

import argparse
import collections
import json
import os
import random
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import sst2_tune_split
from models.recurrent import lstm_scan

PAD, UNK = 0, 1


def reverse_real(x, lengths):
  """Each row's first `lengths[row]` positions in reverse order, the padding after them
  left in place: the backward LSTM reads a row from its last real word."""
  position = jnp.arange(x.shape[1])[None]
  index = jnp.where(position < lengths[:, None], lengths[:, None] - 1 - position, position)
  return jnp.take_along_axis(x, index[..., None], axis=1)


class LSTM(nn.Module):
  hidden: int

  @nn.compact
  def __call__(self, x):
    gates_x = nn.Dense(4 * self.hidden, name="input")(x)
    w_h = self.param("recurrent", nn.initializers.orthogonal(), (self.hidden, 4 * self.hidden))
    return lstm_scan(gates_x, w_h)


class BiLSTMClassifier(nn.Module):
  vocab_size: int
  embed: int = 300
  hidden: int = 256
  dropout: float = 0.5
  word_dropout: float = 0.1

  @nn.compact
  def __call__(self, ids, train: bool):
    real = ids != PAD
    lengths = jnp.sum(real, axis=-1)
    if train and self.word_dropout > 0:
      drop = jax.random.bernoulli(self.make_rng("dropout"), self.word_dropout, ids.shape)
      ids = jnp.where(drop & real, UNK, ids)
    drop = nn.Dropout(self.dropout, deterministic=not train)
    x = drop(nn.Embed(self.vocab_size, self.embed,
                      embedding_init=nn.initializers.normal(0.1))(ids))
    forward = LSTM(self.hidden, name="forward")(x)
    backward = reverse_real(LSTM(self.hidden, name="backward")(reverse_real(x, lengths)),
                            lengths)
    states = drop(jnp.concatenate([forward, backward], axis=-1))
    scores = nn.Dense(1, use_bias=False, name="score")(
        jnp.tanh(nn.Dense(self.hidden, use_bias=False, name="score_hidden")(states)))[..., 0]
    weights = jax.nn.softmax(jnp.where(real, scores, -1e9), axis=-1)
    pooled = drop(jnp.einsum("bl,bld->bd", weights, states))
    hidden = drop(jnp.tanh(nn.Dense(self.hidden, name="mlp")(pooled)))
    return nn.Dense(2, use_bias=False, name="logits")(hidden)


def vocabulary(texts, min_count: int):
  counts = collections.Counter(w for t in texts for w in t.split())
  kept = sorted(w for w, c in counts.items() if c >= min_count)
  return {w: i + 2 for i, w in enumerate(kept)}  # 0 padding, 1 unknown


def encode(text, vocab, length):
  return [vocab.get(w, UNK) for w in text.split()][:length]


def pad(rows, multiple: int = 16):
  """`[len(rows), longest rounded up to `multiple`]` int32, zero-padded."""
  width = -(-max(1, max(len(r) for r in rows)) // multiple) * multiple
  out = np.zeros((len(rows), width), np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out


def batches(order, examples, batch_size, rng):
  """Batches of similar lengths: the shuffled examples in windows of 50 batches, each
  window sorted by length and cut into batches, the batches shuffled."""
  out = []
  for start in range(0, len(order), batch_size * 50):
    window = sorted(order[start:start + batch_size * 50], key=lambda i: len(examples[i][0]))
    out += [window[k:k + batch_size] for k in range(0, len(window), batch_size)]
  rng.shuffle(out)
  return out


def load(args):
  """(training examples, evaluation examples, vocabulary): (ids, label) pairs of the
  distinct training phrases and of the dev (or tune) sentences."""
  source = sst2_tune_split.train_file(args.data_dir)
  rows = sst2_tune_split.read_rows(source)
  if args.split == "tune":
    train_rows, eval_rows = sst2_tune_split.split(rows, 1000, 10, 0)
  else:
    train_rows = rows
    eval_rows = sst2_tune_split.read_rows(os.path.join(args.data_dir, "dev.tsv"))
  names = sorted({label for _, label in train_rows})  # SST-2's "0" and "1"
  if len(names) != 2:
    sys.exit(f"{source}: expected two labels, found {names}")
  labels = {}
  for text, label in train_rows:  # a phrase listed twice is one example
    labels[text] = names.index(label)
  vocab = vocabulary([t for t, _ in train_rows], args.min_count)
  train = [(encode(t, vocab, args.max_length), y) for t, y in labels.items()]
  evaluation = [(encode(t, vocab, args.max_length), names.index(y)) for t, y in eval_rows]
  return train, evaluation, vocab


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--split", choices=("dev", "tune"), default="dev")
  parser.add_argument("--steps", type=int, default=8600)
  parser.add_argument("--eval_every", type=int, default=860)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--learning_rate", type=float, default=0.1)
  parser.add_argument("--decay_steps", type=int, default=0,
                      help="0: the example's constant rate; otherwise a cosine decay to 0 "
                      "at this step (configs/classification.py:recipe=lstm decays at 3,440)")
  parser.add_argument("--weight_decay", type=float, default=3e-6)
  parser.add_argument("--min_count", type=int, default=3)
  parser.add_argument("--max_length", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--output", default="")
  args = parser.parse_args(argv)

  train, evaluation, vocab = load(args)
  model = BiLSTMClassifier(vocab_size=len(vocab) + 2)
  params = model.init(jax.random.PRNGKey(args.seed), pad([[2]]), False)["params"]
  tx = optax.chain(optax.add_decayed_weights(args.weight_decay),
                   optax.sgd(optax.cosine_decay_schedule(args.learning_rate, args.decay_steps)
                             if args.decay_steps else args.learning_rate, momentum=0.9))
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, opt_state, ids, y, key):
    def loss_fn(p):
      logits = model.apply({"params": p}, ids, True, rngs={"dropout": key})
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def predict(params, ids):
    return jnp.argmax(model.apply({"params": params}, ids, False), axis=-1)

  def accuracy(params):
    correct = 0
    for k in range(0, len(evaluation), 128):
      chunk = evaluation[k:k + 128]
      guess = np.asarray(predict(params, pad([x or [UNK] for x, _ in chunk])))
      correct += int(np.sum(guess == np.array([y for _, y in chunk])))
    return correct / len(evaluation)

  print(f"{len(train)} training phrases, {len(evaluation)} {args.split} sentences, "
        f"{len(vocab) + 2} ids", flush=True)
  rng, key, start, records = random.Random(args.seed), jax.random.PRNGKey(args.seed + 1), \
      time.time(), []
  queue = []
  for step in range(1, args.steps + 1):
    if not queue:  # a new pass over the training phrases
      order = list(range(len(train)))
      rng.shuffle(order)
      queue = batches(order, train, args.batch_size, rng)
    batch = queue.pop()
    ids = pad([train[i][0] or [UNK] for i in batch])
    y = np.array([train[i][1] for i in batch], np.int32)
    params, opt_state, loss = train_step(params, opt_state, ids, y,
                                         jax.random.fold_in(key, step))
    if step % args.eval_every == 0 or step == args.steps:
      record = {"step": step, "loss": float(loss), "accuracy": accuracy(params),
                "seconds": time.time() - start}
      records.append(record)
      print(f"step {step} train loss {record['loss']:.3f} {args.split} accuracy "
            f"{record['accuracy']:.4f} at {record['seconds']:.0f} s", flush=True)
  best = max(records, key=lambda r: r["accuracy"])
  print(f"best {best['accuracy']:.4f} (step {best['step']}); last "
        f"{records[-1]['accuracy']:.4f}")
  if args.output:
    with open(args.output, "w", encoding="utf-8") as f:
      json.dump({"args": vars(args), "evaluations": records}, f, indent=1)


if __name__ == "__main__":
  main()
