"""Attention against the paper's formulas written in NumPy: masks, softmax, heads, fused path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import attention, masks
from models.attention import MultiHeadAttention

ATOL = 1e-5


# ----------------------------------------------------------------------------- helpers


def np_softmax(logits):
  logits = np.asarray(logits, np.float64)
  e = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def np_attention(q, k, v, mask=None):
  """softmax(Q K^T / sqrt(d_k)) V in float64; returns (output, weights)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if mask is not None:
    logits = np.where(np.asarray(mask), logits, attention.MASK_VALUE)
  weights = np_softmax(logits)
  return np.einsum("bhqk,bkhd->bqhd", weights, v), weights


def random_qkv(seed, batch=2, q_len=6, kv_len=7, heads=3, head_dim=5):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(batch, q_len, heads, head_dim)).astype(np.float32)
  k = rng.normal(size=(batch, kv_len, heads, head_dim)).astype(np.float32)
  v = rng.normal(size=(batch, kv_len, heads, head_dim)).astype(np.float32)
  return q, k, v


def random_params(module, seed, *args, scale=0.5):
  """Parameters of `module` for `args`, all drawn from N(0, scale^2) (biases included)."""
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), *args)
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: jnp.asarray(scale * rng.normal(size=x.shape), x.dtype), shapes)


# ----------------------------------------------------------------------------- masks


def test_padding_mask_matches_hand_written():
  q_tokens = jnp.array([[5, 3, 0], [0, 2, 1]])
  k_tokens = jnp.array([[1, 0], [4, 4]])
  expected = np.array([
      [[1, 0], [1, 0], [0, 0]],
      [[0, 0], [1, 1], [1, 1]],
  ], bool)[:, None]
  mask = masks.padding_mask(q_tokens, k_tokens)
  assert mask.shape == (2, 1, 3, 2) and mask.dtype == jnp.bool_
  np.testing.assert_array_equal(mask, expected)


def test_causal_mask_matches_hand_written():
  expected = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], bool)
  mask = masks.causal_mask(4)
  assert mask.shape == (1, 1, 4, 4)
  np.testing.assert_array_equal(mask[0, 0], expected)


def test_segment_mask_matches_hand_written():
  segments = jnp.array([[1, 1, 2, 0]])
  expected = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], bool)
  mask = masks.segment_mask(segments, segments)
  assert mask.shape == (1, 1, 4, 4)
  np.testing.assert_array_equal(mask[0, 0], expected)


def test_combine_masks_is_broadcast_and_skipping_none():
  padding = masks.padding_mask(jnp.array([[1, 1, 0]]), jnp.array([[1, 1, 0]]))
  combined = masks.combine_masks(None, masks.causal_mask(3), padding, None)
  expected = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0]], bool)
  assert combined.shape == (1, 1, 3, 3)
  np.testing.assert_array_equal(combined[0, 0], expected)
  assert masks.combine_masks(None, None) is None
  np.testing.assert_array_equal(masks.combine_masks(padding), padding)


# ----------------------------------------------------------------------------- softmax


def test_attention_weights_match_numpy_with_random_mask():
  q, k, _ = random_qkv(0)
  mask = np.random.default_rng(1).random((2, 3, 6, 7)) < 0.6
  weights = attention.attention_weights(jnp.asarray(q), jnp.asarray(k), jnp.asarray(mask))
  assert weights.shape == (2, 3, 6, 7) and weights.dtype == jnp.float32
  np.testing.assert_allclose(weights, np_attention(q, k, k, mask)[1], atol=ATOL)
  np.testing.assert_allclose(np.sum(weights, axis=-1), 1.0, atol=ATOL)


def test_reference_attention_matches_numpy_with_random_mask():
  q, k, v = random_qkv(2)
  mask = np.random.default_rng(3).random((2, 1, 6, 7)) < 0.6  # broadcast over heads
  out, weights = attention.dot_product_attention(
      jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask), return_weights=True)
  expected_out, expected_weights = np_attention(q, k, v, mask)
  assert out.shape == q.shape
  np.testing.assert_allclose(out, expected_out, atol=ATOL)
  np.testing.assert_allclose(weights, expected_weights, atol=ATOL)


def test_stable_softmax_on_huge_logits_is_finite_and_exact():
  logits = (np.random.default_rng(4).normal(size=(3, 9)) * 1e4).astype(np.float32)
  logits[0, :] = 1e4  # a tie at the top
  probs = attention.stable_softmax(jnp.asarray(logits))
  assert np.all(np.isfinite(probs))
  np.testing.assert_allclose(probs, np_softmax(logits), atol=1e-6)


def test_mask_value_is_finite_and_negative():
  assert np.isfinite(attention.MASK_VALUE) and attention.MASK_VALUE < -1e4


def test_fully_masked_row_gives_finite_uniform_weights():
  q, k, v = random_qkv(5)
  mask = np.ones((2, 1, 6, 7), bool)
  mask[:, :, 2, :] = False  # query 2 may attend nowhere
  out, weights = attention.dot_product_attention(
      jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask), return_weights=True)
  assert np.all(np.isfinite(out)) and np.all(np.isfinite(weights))
  np.testing.assert_allclose(weights[:, :, 2, :], 1 / 7, atol=ATOL)
  np.testing.assert_allclose(out[:, 2], v.mean(axis=1), atol=ATOL)


# ----------------------------------------------------------------------------- dropout


def dropout_key(seed):
  """An "rbg" key: same dropout semantics, but far cheaper to compile on CPU than threefry."""
  return jax.random.key(seed, impl="rbg")


def one_hot_values(batch, kv_len, heads):
  """Values e_k (head_dim == kv_len) so the attention output *is* the (dropped) weights."""
  eye = np.eye(kv_len, dtype=np.float32)
  return jnp.asarray(np.broadcast_to(eye[None, :, None, :], (batch, kv_len, heads, kv_len)))


def test_attention_dropout_off_when_deterministic():
  q, k, v = map(jnp.asarray, random_qkv(6))
  plain = attention.dot_product_attention(q, k, v)
  dropped = attention.dot_product_attention(
      q, k, v, dropout_rate=0.5, dropout_rng=dropout_key(0), deterministic=True)
  np.testing.assert_array_equal(plain, dropped)


def test_attention_dropout_changes_output_and_depends_on_rng():
  q, k, v = map(jnp.asarray, random_qkv(7))
  plain = attention.dot_product_attention(q, k, v)
  run = lambda seed: attention.dot_product_attention(  # noqa: E731
      q, k, v, dropout_rate=0.3, dropout_rng=dropout_key(seed), deterministic=False)
  assert not np.allclose(run(0), plain)
  assert not np.allclose(run(0), run(1))
  np.testing.assert_array_equal(run(0), run(0))


def test_attention_dropout_zeroes_weights_at_rate_and_rescales_the_rest():
  rate, batch, length, heads = 0.3, 3, 32, 4
  rng = np.random.default_rng(8)
  q = jnp.asarray(rng.normal(size=(batch, length, heads, length)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(batch, length, heads, length)), jnp.float32)
  dropped, weights = attention.dot_product_attention(
      q, k, one_hot_values(batch, length, heads), dropout_rate=rate,
      dropout_rng=dropout_key(1), deterministic=False, return_weights=True)
  dropped = np.moveaxis(np.asarray(dropped), 2, 1)  # [batch, heads, q, kv], like weights
  zeroed = dropped == 0.0
  assert abs(zeroed.mean() - rate) < 0.05
  np.testing.assert_allclose(dropped[~zeroed], np.asarray(weights)[~zeroed] / (1 - rate),
                             rtol=1e-5, atol=1e-7)


def test_mha_attention_dropout_applies_only_when_not_deterministic():
  x = jnp.asarray(np.random.default_rng(9).normal(size=(2, 6, 12)), jnp.float32)
  mha = MultiHeadAttention(num_heads=3, head_dim=5, dropout_rate=0.5)
  params = random_params(mha, 8, x)
  plain = MultiHeadAttention(num_heads=3, head_dim=5).apply(params, x)
  np.testing.assert_array_equal(mha.apply(params, x, deterministic=True), plain)
  dropped = mha.apply(params, x, deterministic=False, rngs={"dropout": dropout_key(1)})
  assert not np.allclose(plain, dropped)


# ----------------------------------------------------------------------------- fused path


def packed_masks():
  """Padding, causal and segment masks for a [2, 6] batch with two packed rows."""
  tokens = jnp.array([[3, 4, 5, 6, 7, 0], [2, 2, 2, 0, 0, 0]])
  segments = jnp.array([[1, 1, 2, 2, 2, 0], [1, 1, 1, 0, 0, 0]])
  padding = masks.padding_mask(tokens, tokens)
  causal = masks.causal_mask(6)
  segment = masks.segment_mask(segments, segments)
  return {
      "none": None,
      "padding": padding,
      "causal": causal,
      "segment": segment,
      "padding_causal": masks.combine_masks(padding, causal),
      "padding_causal_segment": masks.combine_masks(padding, causal, segment),
  }


@pytest.mark.parametrize("mask_name", list(packed_masks()))
def test_fused_attention_equals_reference(mask_name):
  mask = packed_masks()[mask_name]
  q, k, v = map(jnp.asarray, random_qkv(10, q_len=6, kv_len=6))
  reference = attention.dot_product_attention(q, k, v, mask, implementation="reference")
  fused = attention.dot_product_attention(q, k, v, mask, implementation="fused")
  np.testing.assert_allclose(fused, reference, atol=ATOL)


def test_fused_attention_refuses_weights_and_dropout_and_unknown_names():
  q, k, v = map(jnp.asarray, random_qkv(11))
  with pytest.raises(ValueError, match="weights"):
    attention.dot_product_attention(q, k, v, implementation="fused", return_weights=True)
  with pytest.raises(ValueError, match="dropout"):
    attention.dot_product_attention(q, k, v, implementation="fused", dropout_rate=0.1,
                                    dropout_rng=dropout_key(0), deterministic=False)
  with pytest.raises(ValueError, match="flash"):
    attention.dot_product_attention(q, k, v, implementation="flash")


def test_mha_fused_implementation_equals_reference_with_same_params():
  x = jnp.asarray(np.random.default_rng(12).normal(size=(2, 6, 12)), jnp.float32)
  mask = packed_masks()["padding_causal_segment"]
  reference = MultiHeadAttention(num_heads=3, head_dim=5)
  fused = MultiHeadAttention(num_heads=3, head_dim=5, implementation="fused")
  params = random_params(reference, 1, x)
  np.testing.assert_allclose(fused.apply(params, x, mask=mask),
                             reference.apply(params, x, mask=mask), atol=ATOL)


def fuse(p, names):
  """The separate projections' params in the fused layout: kernels `[d_model, n, heads,
  head_dim]` and, where the module has them, biases `[n, heads, head_dim]`."""
  return {leaf: jnp.stack([p[n][leaf] for n in names], axis=1 if leaf == "kernel" else 0)
          for leaf in p[names[0]]}


def test_fused_qkv_projection_equals_separate_projections():
  """Stacking separate W^Q, W^K, W^V kernels into the fused [d, 3, h, d_k] layout is exact."""
  x = jnp.asarray(np.random.default_rng(13).normal(size=(2, 6, 12)), jnp.float32)
  mask = masks.causal_mask(6)
  separate = MultiHeadAttention(num_heads=3, head_dim=5)
  fused = MultiHeadAttention(num_heads=3, head_dim=5, fused_qkv=True)
  p = random_params(separate, 2, x)["params"]
  fused_params = jax.eval_shape(fused.init, jax.random.PRNGKey(0), x)["params"]
  assert fused_params["qkv"]["kernel"].shape == (12, 3, 3, 5)
  stacked = {"qkv": fuse(p, ("query", "key", "value")), "out": p["out"]}
  assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(jnp.shape, fused_params)
  np.testing.assert_allclose(fused.apply({"params": stacked}, x, mask=mask),
                             separate.apply({"params": p}, x, mask=mask), atol=ATOL)


def test_fused_kv_projection_equals_separate_in_cross_attention():
  rng = np.random.default_rng(14)
  x = jnp.asarray(rng.normal(size=(2, 6, 12)), jnp.float32)
  memory = jnp.asarray(rng.normal(size=(2, 7, 12)), jnp.float32)
  separate = MultiHeadAttention(num_heads=3, head_dim=5)
  fused = MultiHeadAttention(num_heads=3, head_dim=5, fused_qkv=True)
  p = random_params(separate, 3, x, memory)["params"]
  stacked = {"query": p["query"], "kv": fuse(p, ("key", "value")), "out": p["out"]}
  fused_params = jax.eval_shape(fused.init, jax.random.PRNGKey(0), x, memory)["params"]
  assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(jnp.shape, fused_params)
  np.testing.assert_allclose(fused.apply({"params": stacked}, x, memory),
                             separate.apply({"params": p}, x, memory), atol=ATOL)


# ----------------------------------------------------------------------------- multi-head


def np_multi_head_attention(p, x_q, x_kv, mask):
  """Section 3.2.2 by hand: per-head projections, attention, concat, W^O (float64).

  Biases are added where the module has them (the paper's projections have none).
  """
  x_q, x_kv = np.asarray(x_q, np.float64), np.asarray(x_kv, np.float64)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  bias = lambda name: p[name].get("bias", 0.0)  # noqa: E731
  proj = lambda x, name: np.einsum("bld,dhk->blhk", x, p[name]["kernel"]) + bias(name)  # noqa
  heads, _ = np_attention(proj(x_q, "query"), proj(x_kv, "key"), proj(x_kv, "value"), mask)
  return np.einsum("blhk,hkd->bld", heads, p["out"]["kernel"]) + bias("out")


def test_mha_self_attention_matches_numpy_with_head_dim_not_d_model_over_heads():
  x = jnp.asarray(np.random.default_rng(15).normal(size=(2, 6, 12)), jnp.float32)
  mask = packed_masks()["padding_causal_segment"]
  mha = MultiHeadAttention(num_heads=3, head_dim=5)  # 3 * 5 != 12
  params = random_params(mha, 4, x)
  p = params["params"]
  assert p["query"]["kernel"].shape == (12, 3, 5) and p["out"]["kernel"].shape == (3, 5, 12)
  out = mha.apply(params, x, mask=mask)
  np.testing.assert_allclose(out, np_multi_head_attention(p, x, x, mask), atol=1e-4)


def test_mha_cross_attention_matches_numpy():
  rng = np.random.default_rng(16)
  x = jnp.asarray(rng.normal(size=(2, 6, 12)), jnp.float32)
  memory = jnp.asarray(rng.normal(size=(2, 7, 12)), jnp.float32)
  mask = masks.padding_mask(jnp.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]),
                                jnp.array([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]]))
  mha = MultiHeadAttention(num_heads=3, head_dim=5)
  params = random_params(mha, 5, x, memory)
  out = mha.apply(params, x, memory, mask=mask)
  assert out.shape == (2, 6, 12)
  np.testing.assert_allclose(out, np_multi_head_attention(params["params"], x, memory, mask),
                             atol=1e-4)


def test_mha_sows_reference_attention_weights():
  x = jnp.asarray(np.random.default_rng(17).normal(size=(2, 6, 12)), jnp.float32)
  mha = MultiHeadAttention(num_heads=3, head_dim=5)
  params = random_params(mha, 7, x)
  _, state = mha.apply(params, x, mask=masks.causal_mask(6), mutable=["intermediates"])
  (weights,) = state["intermediates"]["attention_weights"]
  assert weights.shape == (2, 3, 6, 6)
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=ATOL)
  np.testing.assert_array_equal(np.triu(np.asarray(weights), k=1), 0.0)
