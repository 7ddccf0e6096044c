"""Layer norm, feed-forward, embeddings and positional encodings against NumPy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import layers
from models.layers import Embed, FeedForward, LayerNorm, PositionalEncoding, sinusoidal_encoding

ATOL = 1e-5


def random_params(module, seed, *args, scale=0.5):
  """Parameters of `module` for `args`, all drawn from N(0, scale^2) (biases included)."""
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), *args)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(scale * rng.normal(size=x.shape), x.dtype), shapes)


def np_layer_norm(x, scale, bias, eps):
  x = np.asarray(x, np.float64)
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * np.asarray(scale) + np.asarray(bias)


# ----------------------------------------------------------------------------- layer norm


def test_layer_norm_matches_numpy():
  x = jnp.asarray(np.random.default_rng(0).normal(2.0, 3.0, size=(2, 5, 16)), jnp.float32)
  ln = LayerNorm(epsilon=1e-6)
  params = random_params(ln, 1, x)
  p = params["params"]
  assert p["scale"].shape == (16,) and p["bias"].shape == (16,)
  np.testing.assert_allclose(ln.apply(params, x), np_layer_norm(x, p["scale"], p["bias"], 1e-6),
                             atol=1e-4)


def test_layer_norm_epsilon_is_added_to_the_variance():
  """sqrt(var + eps), not sqrt(var) + eps: they differ a lot when var ~ eps."""
  x = jnp.asarray(np.random.default_rng(2).normal(0.0, 0.1, size=(2, 5, 16)), jnp.float32)
  ln = LayerNorm(epsilon=1e-2)
  params = random_params(ln, 2, x)
  p = params["params"]
  np.testing.assert_allclose(ln.apply(params, x), np_layer_norm(x, p["scale"], p["bias"], 1e-2),
                             atol=1e-4)
  constant = ln.apply(params, jnp.full((1, 2, 16), 7.0))  # zero variance: finite, = bias
  np.testing.assert_allclose(constant, np.broadcast_to(p["bias"], constant.shape), atol=ATOL)


def test_layer_norm_default_init_is_identity_affine():
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 5, 16)), jnp.float32)
  ln = LayerNorm()
  params = ln.init(jax.random.PRNGKey(0), x)
  np.testing.assert_allclose(ln.apply(params, x), np_layer_norm(x, 1.0, 0.0, 1e-6), atol=1e-4)


def test_layer_norm_bfloat16_keeps_float32_statistics_for_large_mean():
  """bf16 inputs 1000 + N(0, 10^2) (bf16 spacing 4-8) normalise like float64 NumPy.

  Statistics taken in bf16 are off by up to ~0.3 here; float32 statistics stay within bf16
  rounding of the output (~0.01).
  """
  x = jnp.asarray(1000.0 + 10.0 * np.random.default_rng(4).normal(size=(3, 5, 32)),
                  jnp.bfloat16)
  ln = LayerNorm(dtype=jnp.bfloat16)
  params = ln.init(jax.random.PRNGKey(0), x)
  params = jax.tree.map(lambda p: p + 0.1, params)  # a non-trivial scale and bias
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
  out = ln.apply(params, x)
  assert out.dtype == jnp.bfloat16
  expected = np_layer_norm(np.asarray(x, np.float64), 1.1, 0.1, 1e-6)
  np.testing.assert_allclose(np.asarray(out, np.float64), expected, atol=0.03)


# ----------------------------------------------------------------------------- feed-forward


def test_feed_forward_matches_numpy():
  x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 5, 16)), jnp.float32)
  ffn = FeedForward(d_ff=24)
  params = random_params(ffn, 7, x)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  assert p["wi"]["kernel"].shape == (16, 24) and p["wo"]["kernel"].shape == (24, 16)
  hidden = np.maximum(0.0, np.asarray(x, np.float64) @ p["wi"]["kernel"] + p["wi"]["bias"])
  expected = hidden @ p["wo"]["kernel"] + p["wo"]["bias"]
  np.testing.assert_allclose(ffn.apply(params, x), expected, atol=1e-4)


def test_feed_forward_dropout_applies_only_when_not_deterministic():
  x = jnp.asarray(np.random.default_rng(8).normal(size=(2, 5, 16)), jnp.float32)
  ffn = FeedForward(d_ff=24, dropout_rate=0.5)
  params = random_params(ffn, 9, x)
  plain = FeedForward(d_ff=24).apply(params, x)
  np.testing.assert_array_equal(ffn.apply(params, x, deterministic=True), plain)
  dropped = ffn.apply(params, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})
  assert not np.allclose(dropped, plain)


# ----------------------------------------------------------------------------- positions


def np_sinusoids(positions, d):
  """The paper's formula, one entry at a time, in float64."""
  out = np.zeros(positions.shape + (d,))
  for idx in np.ndindex(positions.shape):
    pos = positions[idx]
    for i in range(d // 2):
      angle = pos / 10000 ** (2 * i / d)
      out[idx + (2 * i,)] = np.sin(angle)
      out[idx + (2 * i + 1,)] = np.cos(angle)
  return out


def test_sinusoidal_encoding_matches_paper_formula():
  positions = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 8], [0, 1, 2, 0, 1, 0, 5, 3, 0]])
  enc = sinusoidal_encoding(jnp.asarray(positions), 16)
  assert enc.shape == (2, 9, 16) and enc.dtype == jnp.float32
  np.testing.assert_allclose(enc, np_sinusoids(positions, 16), atol=ATOL)


def test_sinusoidal_positional_encoding_adds_pe_of_given_positions():
  x = jnp.asarray(np.random.default_rng(10).normal(size=(2, 5, 16)), jnp.float32)
  positions = np.array([[0, 1, 2, 3, 4], [0, 1, 0, 1, 2]])  # restarts as in packing
  pe = PositionalEncoding(kind="sinusoidal")
  out = pe.apply(pe.init(jax.random.PRNGKey(0), x, jnp.asarray(positions)), x,
                 jnp.asarray(positions))
  np.testing.assert_allclose(out, np.asarray(x) + np_sinusoids(positions, 16), atol=ATOL)


def test_learned_positional_encoding_gathers_rows_at_explicit_positions():
  x = jnp.asarray(np.random.default_rng(11).normal(size=(2, 5, 16)), jnp.float32)
  positions = jnp.array([[0, 1, 2, 3, 4], [3, 0, 1, 7, 2]])
  pe = PositionalEncoding(kind="learned", max_length=8)
  params = random_params(pe, 12, x, positions)
  table = np.asarray(params["params"]["table"])
  assert table.shape == (8, 16)
  np.testing.assert_allclose(pe.apply(params, x, positions),
                             np.asarray(x) + table[np.asarray(positions)], atol=ATOL)


def test_unknown_positional_encoding_raises():
  x = jnp.zeros((1, 3, 16))
  with pytest.raises(ValueError, match="rotary"):
    PositionalEncoding(kind="rotary").init(jax.random.PRNGKey(0), x, jnp.zeros((1, 3), int))


# ----------------------------------------------------------------------------- embeddings


def test_embed_looks_up_rows_and_attend_is_x_times_embedding_transposed():
  tokens = jnp.array([[1, 5, 0], [7, 7, 2]])
  embed = Embed(vocab_size=11, features=16)
  params = random_params(embed, 13, tokens)
  table = np.asarray(params["params"]["embedding"], np.float64)
  assert table.shape == (11, 16)
  np.testing.assert_allclose(embed.apply(params, tokens), table[np.asarray(tokens)], atol=ATOL)
  x = jnp.asarray(np.random.default_rng(14).normal(size=(2, 3, 16)), jnp.float32)
  logits = embed.apply(params, x, method=Embed.attend)
  assert logits.shape == (2, 3, 11) and logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, np.asarray(x, np.float64) @ table.T, atol=1e-4)


def test_embed_init_has_stddev_inverse_sqrt_d_model():
  """Initialised so that embedding * sqrt(d_model) has unit variance."""
  embed = Embed(vocab_size=512, features=16)
  table = embed.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), int))["params"]["embedding"]
  assert abs(float(np.std(table)) * np.sqrt(16) - 1.0) < 0.05


@pytest.mark.parametrize("rng", layers.DROPOUT_RNGS)
def test_keep_mask_keeps_each_entry_independently_with_probability_one_minus_rate(rng):
  """Over 1M entries: the kept fraction is 1 - rate (to 5 standard deviations), two keys
  agree as often as independent masks would (keep^2 + rate^2), and neighbouring entries
  are uncorrelated; the same key gives the same mask."""
  rate, shape = 0.1, (16, 256, 256)
  a = np.asarray(layers.keep_mask(jax.random.PRNGKey(0), shape, rate, rng))
  b = np.asarray(layers.keep_mask(jax.random.PRNGKey(1), shape, rate, rng))
  n, keep = a.size, 1.0 - rate
  sd = (keep * rate / n) ** 0.5
  assert abs(a.mean() - keep) < 5 * sd and abs(b.mean() - keep) < 5 * sd
  agree = keep ** 2 + rate ** 2
  assert abs((a == b).mean() - agree) < 5 * (agree * (1 - agree) / n) ** 0.5
  flat = a.reshape(-1).astype(np.float64)
  for shift in (1, 2, 256, 65536):  # next entry, next row, next matrix
    corr = np.corrcoef(flat[:-shift], flat[shift:])[0, 1]
    assert abs(corr) < 5 / n ** 0.5, (shift, corr)
  np.testing.assert_array_equal(layers.keep_mask(jax.random.PRNGKey(0), shape, rate, rng), a)


def test_dropout_scales_kept_entries_and_threefry_matches_flax():
  x = jnp.ones((4, 1000))
  key = jax.random.PRNGKey(2)
  for rng in layers.DROPOUT_RNGS:
    y = layers.Dropout(0.25, rng).apply({}, x, deterministic=False, rngs={"dropout": key})
    np.testing.assert_allclose(np.unique(np.asarray(y)), [0.0, 1.0 / 0.75], rtol=1e-6)
    np.testing.assert_array_equal(
        layers.Dropout(0.25, rng).apply({}, x, deterministic=True), x)
  # "threefry" draws exactly the masks of flax's nn.Dropout (earlier runs reproduce).
  ours = layers.Dropout(0.25, "threefry").apply({}, x, deterministic=False,
                                                 rngs={"dropout": key})
  flax_dropout = nn.Dropout(0.25).apply({}, x, deterministic=False, rngs={"dropout": key})
  np.testing.assert_array_equal(ours, flax_dropout)


# ----------------------------------------------------------------------------- barrier


@pytest.mark.parametrize("jit", [False, True])
def test_fusion_barrier_is_the_identity_forward_and_backward(jit):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 5, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 5, 4)), jnp.float32)
  plain = lambda x: jnp.sum(jnp.sin(x) * w)  # noqa: E731
  barred = lambda x: plain(layers.fusion_barrier(x))  # noqa: E731
  grad = jax.jit(jax.grad(barred)) if jit else jax.grad(barred)
  np.testing.assert_array_equal(layers.fusion_barrier(x), x)
  np.testing.assert_array_equal(grad(x), jax.grad(plain)(x))
  np.testing.assert_allclose(grad(x), np.cos(np.asarray(x)) * np.asarray(w), rtol=1e-6)


def test_fusion_barrier_passes_non_finite_values_unchanged():
  # Its loop runs once, or not at all when the first entry is NaN: both return x as it is,
  # forward and backward.
  for first in (np.nan, np.inf, -2.5):
    g = np.array([[first, 1.0, -np.inf], [np.nan, 0.5, 3e38]], np.float32)
    np.testing.assert_array_equal(jax.jit(layers.fusion_barrier)(g), g)
    _, vjp = jax.vjp(layers.fusion_barrier, jnp.zeros((2, 3), jnp.float32))
    (out,) = jax.jit(vjp)(jnp.asarray(g))
    np.testing.assert_array_equal(out, g)
  _, vjp = jax.vjp(layers.fusion_barrier, jnp.zeros((2, 3), jnp.bfloat16))
  (out,) = vjp(jnp.ones((2, 3), jnp.bfloat16) * 3)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(out, np.full((2, 3), 3.0))
