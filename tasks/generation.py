"""Text generation (decoder-only): next-token cross-entropy and perplexity; greedy
continuation of a prompt through the key/value cache. The synthetic default models streams
"x | f(x)": the prompt is "x |", and the continuation is scored by exact match."""

from typing import Dict, List

import jax.numpy as jnp
import numpy as np

from input_pipeline import synthetic
from models import DecoderOnly, decoding
from tasks import base, losses


def prompt_of(tokens, sep_id: int):
  """Keeps tokens up to and including the first separator, zeros after: `[batch, length]`."""
  seen_sep = jnp.cumsum(tokens == sep_id, axis=-1) - (tokens == sep_id)
  return jnp.where(seen_sep > 0, 0, tokens)


class GenerationTask(base.Task):
  name = "generation"
  synthetic_kind = "lm"

  @property
  def lengths(self) -> Dict[str, int]:
    return {"inputs": self.config.max_target_length}

  def build_model(self, decode: bool = False):
    return DecoderOnly(self.model_config(decode))

  def model_inputs(self, batch):
    return {"inputs": batch["inputs"]}

  def loss(self, params, batch, dropout_rng, train):
    logits = self.model.apply({"params": params}, batch["inputs"], deterministic=not train,
                              rngs=base.rngs(dropout_rng, train))
    tokens = batch["inputs"]
    return losses.cross_entropy_sums(logits, tokens, (tokens > 0).astype(jnp.float32),
                                     self.config.label_smoothing)

  def predict(self, params, batch):
    """Greedy continuation of each prompt: `[batch, length]` tokens, prompt included."""
    tokens = batch["inputs"]
    batch_size, max_length = tokens.shape
    decoder = self.build_model(decode=True)
    cache = decoding.init_cache(decoder, tokens)

    def step(cache, token):
      logits, state = decoder.apply({"params": params, "cache": cache}, token,
                                    mutable=["cache"])
      return logits[:, -1], state["cache"]

    return decoding.greedy_decode(step, cache, batch_size, max_length, self.eos_id,
                                  prompt=prompt_of(tokens, synthetic.SEP))

  def score(self, batch, predictions):
    return base.exact_match_sums(batch["inputs"], predictions, batch["inputs"])

  def format_examples(self, batch, predictions, limit, split="eval") -> List[str]:
    lines = []
    for x, p in zip(batch["inputs"], predictions):
      if len(lines) == limit or not x.any():
        break
      mark = "ok" if np.array_equal(x, p) else "WRONG"
      lines.append(f"text: {synthetic.decode_tokens(x)}  generated: "
                   f"{synthetic.decode_tokens(p)}  [{mark}]")
    return lines
