"""Masked-language-model pre-training of the classification family's encoder, and its use.

BERT (Devlin et al. 2019, section 3.1) trains an encoder alone to recover tokens hidden in
its input: 15% of the tokens are chosen; a chosen token becomes [MASK] 80% of the time, a
random token 10% of the time and stays as it is 10% of the time; the loss scores the
chosen positions only, through the embedding matrix transposed (models.Classifier with
`token_logits`). It needs nothing but text, so a classifier can first learn its words
from its own training sentences (config.objective="mlm", labels unused: the task is
`classification.MaskedLMTask`), then start from that encoder (config.init_encoder_from)
with a fresh classification head.

[MASK] is the unknown id (2): the tokenizers reserve 0 (padding), 1 (end) and 2, and the
unknown id is rare in text (sentencepiece covers 99.95% of the characters it was trained
on; bytes and characters never produce it), so no id has to be added to a vocabulary the
classifier shares. Token dropout (config.optim.token_dropout) replaces tokens by the same
id while a classifier trains: the words it hides are the ones pre-training taught the
encoder to guess.
"""

import json
import os
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

import files
from configs import default
from errors import UserError
from input_pipeline import tokenizers
from training import checkpointing, optimizers, steps

Array = jax.Array
MASK_ID = tokenizers.UNK_ID
OBJECTIVES = ("", "mlm")  # config.objective: the family's own, or masked-token pre-training
MASKED, RANDOM = 0.8, 0.1  # shares of the chosen tokens made [MASK] and a random id (BERT)


class EncoderInitError(UserError, ValueError):
  """config.init_encoder_from names no run whose encoder fits this one."""


# ----------------------------------------------------------------------------- corruption


def mask_tokens(rng: Array, inputs: Array, rate: float,
                vocab_size: int) -> Tuple[Array, Array]:
  """BERT's masking of `[batch, length]` int inputs (0 = padding).

  Each real token is chosen with probability `rate`; a chosen token becomes MASK_ID with
  probability 0.8, a uniformly drawn real id (tokenizers.FIRST_ID .. vocab_size - 1) with
  0.1, and stays itself with 0.1.

  Returns:
    (the corrupted inputs `[batch, length]` int, float weights `[batch, length]`: 1 at the
    chosen positions, the only ones the loss scores; 0 elsewhere and on padding).
  """
  choose_rng, how_rng, random_rng = jax.random.split(rng, 3)
  chosen = (inputs > 0) & jax.random.bernoulli(choose_rng, rate, inputs.shape)
  how = jax.random.uniform(how_rng, inputs.shape)
  random_ids = jax.random.randint(random_rng, inputs.shape, tokenizers.FIRST_ID, vocab_size,
                                  dtype=inputs.dtype)
  corrupted = jnp.where(chosen & (how < MASKED), MASK_ID,
                        jnp.where(chosen & (how >= MASKED + RANDOM), random_ids, inputs))
  return corrupted, chosen.astype(jnp.float32)


def drop_tokens(rng: Array, inputs: Array, rate: float) -> Array:
  """Token dropout: each real token of `[batch, length]` inputs becomes MASK_ID with
  probability `rate` (padding stays padding, so the example keeps its length)."""
  dropped = (inputs > 0) & jax.random.bernoulli(rng, rate, inputs.shape)
  return jnp.where(dropped, MASK_ID, inputs)


def eval_mask_key(inputs: Array) -> Array:
  """The masking key of an evaluation batch: fixed by its tokens, so every evaluation of a
  split hides the same tokens and its scores compare across steps."""
  return jax.random.fold_in(jax.random.PRNGKey(0), jnp.sum(inputs).astype(jnp.uint32))


# ----------------------------------------------------------------------------- the encoder


def _source_run(config) -> Tuple[str, Dict[str, Any]]:
  """(workdir, saved config) of config.init_encoder_from, checked: a classification run
  whose config.model equals this run's."""
  source = config.init_encoder_from
  where = f"config.init_encoder_from={source}"
  path = os.path.join(source, "config.json")
  if not os.path.isfile(path):
    raise EncoderInitError(
        f"{where}: no run there (no {path}); pre-train one first with --workdir={source} "
        f"--config.objective=mlm")
  with open(path, encoding="utf-8") as f:
    saved = default.group_flat_config(json.load(f))
  if saved.get("task") != "classification":
    raise EncoderInitError(f"{where} holds a {saved.get('task')!r} run; the encoder must come "
                           f"from a classification run (e.g. one with config.objective=mlm)")
  model = saved.get("model", {})
  differ = [f"model.{k}: {model.get(k)!r} there, {v!r} here" for k, v in config.model.items()
            if model.get(k) != v]
  if differ:
    raise EncoderInitError(
        f"{where} was trained with another model ({'; '.join(differ[:4])}); set the same "
        f"config.model fields (its config.json has them)")
  return source, saved


def source_tokenizer(config, path: Optional[str], name: str) -> Optional[str]:
  """The tokenizer file a training run reads: with config.init_encoder_from (and no
  config.data.tokenizer_path), that run's, copied to `path` in this workdir (so eval and
  predict find it here); the ids must be those the encoder learned. Otherwise `path`."""
  if not config.get("init_encoder_from") or config.data.tokenizer_path:
    return path
  source, _ = _source_run(config)
  origin = os.path.join(source, name)
  if config.model.tokenizer == "bytes":  # nothing to copy: bytes need no file
    return path
  if not os.path.isfile(origin):
    raise EncoderInitError(f"config.init_encoder_from={source}: no tokenizer at {origin}; "
                           f"was that run's training started?")
  if path is None:  # no workdir: read it where it is
    return origin
  if not os.path.exists(path):
    with open(origin, "rb") as f:
      files.write_atomically(path, f.read())
  return path


def load_encoder(config, params: Any, task) -> Any:
  """The encoder parameters of the newest checkpoint of config.init_encoder_from, shaped
  like `params["encoder"]` (`params`: this run's fresh parameters), after checking that
  `task` reads its text with the tokenizer that checkpoint was trained with: the embedding
  rows are the source's ids."""
  source, saved = _source_run(config)
  directory = checkpointing.checkpoint_directory(source)
  if not os.path.isdir(directory):
    raise EncoderInitError(f"config.init_encoder_from={source}: no checkpoints in "
                           f"{directory}; let that run save one first")
  checkpoints = checkpointing.Checkpointer.for_reading(source)
  try:
    step = checkpoints.latest_step()
    if step is None:
      raise EncoderInitError(f"config.init_encoder_from={source}: no checkpoint in "
                             f"{directory}; let that run save one first")
    tokenizers.check_same_tokenizer(
        checkpoints.restore_config(step) or {}, task, config,
        f"config.init_encoder_from={source}",
        hint=f"Start this run in a new --workdir without config.data.tokenizer_path: it then "
             f"reads with a copy of {source}'s own tokenizer (if that file was replaced "
             f"since, put the original back first)")
    tx = optimizers.make_optimizer(ml_collections.ConfigDict(saved))
    template = jax.eval_shape(lambda: steps.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
        rng=jax.random.PRNGKey(0)))
    state = checkpoints.restore(template, step)
  finally:
    checkpoints.close()
  logging.info("the encoder starts from step %d of %s (objective %r); the head is fresh",
               step, source, saved.get("objective", ""))
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), state.params["encoder"])
