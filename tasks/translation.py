"""Translation (encoder-decoder): teacher-forced cross-entropy; greedy decoding scored by
exact match. The synthetic default "translates" a digit string into its reversal."""

from typing import Dict, List

import jax.numpy as jnp
import numpy as np

from input_pipeline import synthetic
from models import EncoderDecoder, decoding
from tasks import base, losses


class TranslationTask(base.Task):
  name = "translation"
  synthetic_kind = "seq2seq"

  @property
  def lengths(self) -> Dict[str, int]:
    return {"inputs": self.config.max_input_length, "targets": self.config.max_target_length}

  def build_model(self, decode: bool = False):
    return EncoderDecoder(self.model_config(decode))

  def model_inputs(self, batch):
    return {"inputs": batch["inputs"], "targets": batch["targets"]}

  def loss(self, params, batch, dropout_rng, train):
    logits = self.model.apply({"params": params}, **self.model_inputs(batch),
                              deterministic=not train, rngs=base.rngs(dropout_rng, train))
    targets = batch["targets"]
    return losses.cross_entropy_sums(logits, targets, (targets > 0).astype(jnp.float32),
                                     self.config.label_smoothing)

  def predict(self, params, batch):
    """Greedy decoding through the key/value cache: `[batch, max_target_length]` tokens."""
    inputs = batch["inputs"]
    batch_size, max_length = inputs.shape[0], self.lengths["targets"]
    encoded = self.model.apply({"params": params}, inputs, method="encode")
    decoder = self.build_model(decode=True)
    cache = decoding.init_cache(decoder, inputs, jnp.zeros((batch_size, max_length), jnp.int32))

    def step(cache, tokens):
      logits, state = decoder.apply({"params": params, "cache": cache}, encoded, inputs,
                                    tokens, method="decode", mutable=["cache"])
      return logits[:, -1], state["cache"]

    return decoding.greedy_decode(step, cache, batch_size, max_length, self.eos_id)

  def score(self, batch, predictions):
    return base.exact_match_sums(batch["inputs"], predictions, batch["targets"])

  def format_examples(self, batch, predictions, limit) -> List[str]:
    lines = []
    for x, y, p in zip(batch["inputs"], batch["targets"], predictions):
      if len(lines) == limit or not x.any():
        break
      mark = "ok" if np.array_equal(y, p) else "WRONG"
      lines.append(f"input: {synthetic.decode_tokens(x)}  target: {synthetic.decode_tokens(y)}"
                   f"  prediction: {synthetic.decode_tokens(p)}  [{mark}]")
    return lines
