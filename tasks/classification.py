"""Text classification (encoder-only): cross-entropy over classes, accuracy. The synthetic
default labels a digit string by whether most of its digits are >= 5."""

from typing import Dict, List

import jax.numpy as jnp
import numpy as np

from input_pipeline import synthetic
from models import Classifier
from tasks import base, losses


class ClassificationTask(base.Task):
  name = "classification"
  synthetic_kind = "classification"

  @property
  def num_classes(self) -> int:
    return 2

  @property
  def lengths(self) -> Dict[str, int]:
    return {"inputs": self.config.max_input_length}

  def build_model(self, decode: bool = False):
    return Classifier(self.model_config(decode))

  def model_inputs(self, batch):
    return {"inputs": batch["inputs"]}

  def loss(self, params, batch, dropout_rng, train):
    logits = self.model.apply({"params": params}, batch["inputs"], deterministic=not train,
                              rngs=base.rngs(dropout_rng, train))
    real = batch["inputs"].any(axis=-1).astype(jnp.float32)  # zero-filled examples weigh 0
    return losses.cross_entropy_sums(logits, batch["label"], real,
                                     self.config.label_smoothing)

  def predict(self, params, batch):
    logits = self.model.apply({"params": params}, batch["inputs"])
    return jnp.argmax(logits, axis=-1)

  def score(self, batch, predictions):
    real = batch["inputs"].any(axis=-1)
    return {"examples": float(np.sum(real))}

  def summarize(self, sums, outputs=None):
    out = super().summarize(sums, outputs)
    out.pop("perplexity", None)  # perplexity is a sequence-model metric
    return out

  def format_examples(self, batch, predictions, limit, split="eval") -> List[str]:
    lines = []
    for x, y, p in zip(batch["inputs"], batch["label"], predictions):
      if len(lines) == limit or not x.any():
        break
      mark = "ok" if y == p else "WRONG"
      lines.append(f"input: {synthetic.decode_tokens(x)}  label: {y}  predicted: {p}  [{mark}]")
    return lines
