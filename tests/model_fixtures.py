"""Tiny model configs and random parameters shared by the model tests."""

import jax
import jax.numpy as jnp
import numpy as np

from models.transformer import TransformerConfig


def tiny_model_config(**overrides) -> TransformerConfig:
  base = dict(vocab_size=16, num_classes=3, d_model=16, d_ff=32, num_heads=2, head_dim=8,
              num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.0, max_length=16)
  return TransformerConfig(**{**base, **overrides})


def init_params(model, *args, seed=0):
  """Random parameters of the right shapes: unit-ish layer-norm scales, small non-zero biases,
  N(0, 0.25^2) elsewhere (about d_model^-1/2). Filled with NumPy from `eval_shape`: random
  initialisers would cost a compilation per parameter shape on CPU."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), *args)["params"]
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    noise = rng.normal(size=leaf.shape)
    name = path[-1].key
    value = 1.0 + 0.1 * noise if name == "scale" else (0.1 if name == "bias" else 0.25) * noise
    return jnp.asarray(value, leaf.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)
