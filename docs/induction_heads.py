"""Induction heads, made with what trains here: the numbers of docs/induction_heads.md.

    python docs/induction_heads.py --workdir=runs/induction            # train, then measure
    python docs/induction_heads.py --workdir=runs/gpt2 --measure_only  # any decoder-only run,
                                                                       # an imported GPT-2 too

Training data: lines of 8 to 16 distinct random letters followed by the same letters again
("qwhzk...qwhzk..."). The first copy cannot be predicted; the second can, by copying. The
span's length varies, so no fixed offset finds the earlier copy: a two-layer model learns
to copy with two heads working together (Olsson et al., 2022):
- a previous-token head in layer 0 writes, at each position, which token came before;
- an induction head in layer 1 then finds the position whose previous token is the
  current token (the token after the current token's previous occurrence) and copies it.

Measured on `--sequences` fresh lines (a seed apart from the training data), per head:
- previous-token score: the mean attention weight from each position to the one before;
- duplicate-token score: the mean weight, from each position of the second copy, on the
  previous occurrence of its own token;
- induction score: the mean weight, from each position of the second copy, to the position
  after the previous occurrence of its token;
- copying loss without the head: the mean loss on the tokens a copier predicts (the second
  copy, its first token left out: nothing predicts it) with that head's output set to zero
  (head ablation).

Writes `<workdir>/induction_heads.json` and the induction head's attention map
`<workdir>/induction_head.png`; prints Markdown tables.
"""

import argparse
import json
import os
import string
import subprocess
import sys
from typing import Dict, List

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SPAN = 16  # the longest span
MIN_SPAN = 8
TRAIN_LINES = 20000


def repeated_spans(count: int, seed: int, span: int = SPAN,
                   min_span: int = MIN_SPAN) -> List[str]:
  """`count` lines of min_span..span distinct random lowercase letters, written twice."""
  rng = np.random.default_rng(seed)
  letters = np.array(list(string.ascii_lowercase))
  lines = []
  for _ in range(count):
    first = "".join(rng.choice(letters, rng.integers(min_span, span + 1), replace=False))
    lines.append(first + first)
  return lines


def previous_token_scores(weights: np.ndarray) -> np.ndarray:
  """`[layers, heads, q, k]` -> `[layers, heads]`: mean weight on key q - 1 (q >= 1)."""
  q = np.arange(1, weights.shape[-2])
  return weights[..., q, q - 1].mean(-1)


def induction_targets(tokens: List[str]) -> Dict[int, int]:
  """{query position: the position after the previous occurrence of its token}, for every
  query whose token occurred before (and not at the position just before it)."""
  targets, last = {}, {}
  for position, token in enumerate(tokens):
    if token in last and last[token] + 1 < position:
      targets[position] = last[token] + 1
    last[token] = position
  return targets


def duplicate_token_scores(weights: np.ndarray, tokens: List[str]) -> np.ndarray:
  """`[layers, heads]` mean weight, from each query whose token occurred before, on that
  previous occurrence itself (a duplicate-token head)."""
  targets = {q: p - 1 for q, p in induction_targets(tokens).items()}
  if not targets:
    return np.zeros(weights.shape[:2])
  q = np.array(list(targets))
  return weights[..., q, np.array([targets[i] for i in q])].mean(-1)


def induction_scores(weights: np.ndarray, tokens: List[str]) -> np.ndarray:
  """`[layers, heads, q, k]` and the query tokens -> `[layers, heads]` mean weight on the
  induction target of each query that has one (0 where none has)."""
  targets = induction_targets(tokens)
  if not targets:
    return np.zeros(weights.shape[:2])
  q = np.array(list(targets))
  return weights[..., q, np.array([targets[i] for i in q])].mean(-1)


def copyable_positions(ids: List[int]) -> List[int]:
  """Positions t whose token a copier predicts: the pair (ids[t-1], ids[t]) came earlier
  (the second copy of a line, its first token left out: nothing predicts it)."""
  seen, out = set(), []
  for t in range(1, len(ids)):
    pair = (ids[t - 1], ids[t])
    if pair in seen:
      out.append(t)
    seen.add(pair)
  return out


def train(workdir: str, steps: int, positions: str) -> None:
  data = os.path.join(workdir, "data")
  os.makedirs(data, exist_ok=True)
  with open(os.path.join(data, "train.txt"), "w", encoding="utf-8") as f:
    f.write("\n".join(repeated_spans(TRAIN_LINES, seed=0)) + "\n")
  args = [sys.executable, os.path.join(ROOT, "main.py"), f"--workdir={workdir}",
          "--config=configs/generation.py:tokenizer=chars",
          f"--config.data.data_dir={data}", "--config.data.file_splits=train=train.txt",
          "--config.data.validation_fraction=0.05", "--config.data.text_documents=line",
          "--config.data.lm_batching=documents", f"--config.data.max_target_length={2 * SPAN + 1}",
          "--config.model.num_decoder_layers=2", "--config.model.d_model=64",
          "--config.model.num_heads=4", "--config.model.d_ff=16",  # nearly attention-only
          "--config.model.norm_placement=pre",
          f"--config.model.positional_encoding={positions}",
          f"--config.train.num_train_steps={steps}", "--config.train.batch_size=32",
          "--config.optim.learning_rate=3e-3", f"--config.optim.warmup_steps={steps // 10}",
          f"--config.eval.eval_every_steps={steps}", "--config.eval.num_print_examples=0",
          "--config.eval.num_attention_images=0", "--config.compute.cpu_devices=1"]
  subprocess.run(args, check=True, cwd=ROOT)


def measure(workdir: str, sequences: int, seed: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import api  # pylint: disable=g-import-not-at-top
  from inspection import attention_maps  # pylint: disable=g-import-not-at-top

  model = api.load(workdir)
  task, params = model.task, model.params
  lines = repeated_spans(sequences, seed)
  prev, duplicate, induction = [], [], []
  for line in lines:
    maps = model.attention(line)
    weights, queries = maps.weights["decoder_self"], maps.queries["decoder_self"]
    prev.append(previous_token_scores(weights))
    duplicate.append(duplicate_token_scores(weights, queries))
    induction.append(induction_scores(weights, queries))
  prev, duplicate, induction = (np.mean(x, 0) for x in (prev, duplicate, induction))

  encoded = [task.data.encode(line) for line in lines]
  tokens = np.zeros((len(lines), max(map(len, encoded))), np.int32)
  copyable = np.zeros(tokens.shape, np.float32)
  for row, ids in enumerate(encoded):
    tokens[row, :len(ids)] = ids
    copyable[row, copyable_positions(list(ids))] = 1.0

  @jax.jit
  def copying_loss(head_mask):  # the head_mask collection, per block
    variables = task.variables(params, head_mask)
    logits = task.model.apply(variables, jnp.asarray(tokens))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, jnp.asarray(tokens)[..., None], -1)[..., 0]
    return jnp.sum(nll * copyable) / jnp.sum(copyable)

  layers, heads = prev.shape
  baseline, increase = attention_maps.head_importance(
      {"decoder_self": (layers, heads)},
      lambda masks: float(copying_loss(attention_maps.head_mask_tree(masks))))
  # Heads of one kind can stand in for each other: each kind removed at once too.
  together = {}
  for name, scores in (("induction", induction), ("previous-token", prev),
                       ("duplicate-token", duplicate)):
    chosen = scores > 0.5
    if chosen.any():
      mask = np.where(chosen, 0.0, 1.0).astype(np.float32)
      together[name] = {
          "heads": [[int(a), int(b)] for a, b in zip(*np.nonzero(chosen))],
          "copying_loss": float(copying_loss(attention_maps.head_mask_tree(
              {"decoder_self": mask})))}
  ranked = np.unravel_index(np.argmax(induction), induction.shape)
  example = model.attention(lines[0])
  png = attention_maps.head_png(example, "decoder_self", int(ranked[0]), int(ranked[1]))
  with open(os.path.join(workdir, "induction_head.png"), "wb") as f:
    f.write(png)
  return {"sequences": sequences, "copyable_tokens": int(copyable.sum()),
          "copying_loss": baseline, "chance_loss": float(np.log(26)),
          "previous_token_score": prev.tolist(), "duplicate_token_score": duplicate.tolist(),
          "induction_score": induction.tolist(),
          "copying_loss_increase": increase["decoder_self"].tolist(),
          "removed_together": together,
          "induction_head": [int(ranked[0]), int(ranked[1])]}


def tables(result: dict) -> str:
  prev = np.asarray(result["previous_token_score"])
  induction = np.asarray(result["induction_score"])
  duplicate = np.asarray(result["duplicate_token_score"])
  increase = np.asarray(result["copying_loss_increase"])
  lines = [f"copying loss (second copy, nats per letter): {result['copying_loss']:.3f} "
           f"(chance: ln 26 = {result['chance_loss']:.3f})", "",
           "| layer | head | previous-token score | duplicate-token score | induction score | "
           "copying loss without it | increase |", "|---:|---:|---:|---:|---:|---:|---:|"]
  for layer in range(prev.shape[0]):
    for head in range(prev.shape[1]):
      lines.append(f"| {layer} | {head} | {prev[layer, head]:.3f} | "
                   f"{duplicate[layer, head]:.3f} | {induction[layer, head]:.3f} | "
                   f"{result['copying_loss'] + increase[layer, head]:.3f} | "
                   f"{increase[layer, head]:+.3f} |")
  lines += ["", "| heads removed together (score > 0.5) | heads (layer, head) | copying loss |",
            "|---|---|---:|"]
  for name, group in result["removed_together"].items():
    heads = ", ".join(f"({a}, {b})" for a, b in group["heads"])
    lines.append(f"| {name} | {heads} | {group['copying_loss']:.3f} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--sequences", type=int, default=200)
  parser.add_argument("--seed", type=int, default=1, help="of the measured lines")
  parser.add_argument("--measure_only", action="store_true")
  parser.add_argument("--positions", default="rope", help="config.model.positional_encoding")
  args = parser.parse_args(argv)
  if not args.measure_only:
    train(args.workdir, args.steps, args.positions)
  result = measure(args.workdir, args.sequences, args.seed)
  with open(os.path.join(args.workdir, "induction_heads.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  print(tables(result), end="")


if __name__ == "__main__":
  main()
