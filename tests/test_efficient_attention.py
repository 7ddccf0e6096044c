"""The blockwise (memory-efficient) attention path against the reference: values and
gradients for the three mask kinds, tile sizes that do and do not divide the lengths,
whole models, bfloat16, and memory that grows linearly with the sequence length."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_fixtures import init_params, tiny_model_config
from models import attention, blockwise_attention
from models import masks as mask_lib
from models.masks import AttentionMask
from models.transformer import Classifier, DecoderOnly, EncoderDecoder

TOL = dict(atol=2e-5, rtol=2e-5)


def random_qkv(seed, batch=2, q_len=13, kv_len=13, heads=3, head_dim=8):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=(batch, n, heads, head_dim)), jnp.float32)
               for n in (q_len, kv_len, kv_len))


def masks(length=13):
  """The three mask kinds (and their combinations) of a [2, length] batch: row 0 holds
  two packed segments and no padding, row 1 two segments and 4 padding positions."""
  valid = np.ones((2, length), bool)
  valid[1, -4:] = False
  segments = np.ones((2, length), np.int32)
  segments[0, 5:] = 2
  segments[1, 3:-4] = 2
  segments[1, -4:] = 0
  valid, segments = jnp.asarray(valid), jnp.asarray(segments)
  everything = jnp.ones((2, length), bool)
  return {
      "padding": AttentionMask(valid, valid),
      "causal": AttentionMask(everything, everything, causal=True),
      "segment": AttentionMask(everything, everything, segments, segments),
      "padding_causal": AttentionMask(valid, valid, causal=True),
      "padding_causal_segment": AttentionMask(valid, valid, segments, segments, causal=True),
  }


def real_queries(mask):
  """`[batch, q, 1, 1]` True at queries that see at least one key."""
  return np.asarray(mask.dense().any(axis=-1))[:, 0, :, None, None]


def test_attention_mask_dense_equals_the_mask_functions():
  valid, segments = jnp.array([[1, 1, 1, 0]]) > 0, jnp.array([[1, 2, 2, 0]])
  mask = AttentionMask(valid, valid, segments, segments, causal=True)
  expected = mask_lib.combine_masks(mask_lib.padding_mask(valid, valid),
                                     mask_lib.causal_mask(4),
                                     mask_lib.segment_mask(segments, segments))
  np.testing.assert_array_equal(mask.dense(), expected)
  assert mask.shape == (1, 1, 4, 4) and mask.dtype == expected.dtype  # stands in for it
  # A tile is the same slice of the dense mask.
  np.testing.assert_array_equal(mask.block(1, 2, 2, 2), expected[:, :, 1:3, 2:4])


@pytest.mark.parametrize("block_size", [4, 5, 13, 512])
@pytest.mark.parametrize("mask_name", list(masks()))
def test_blockwise_values_and_gradients_equal_reference(mask_name, block_size):
  """Every query that sees a key gets the reference's output, and the gradients with
  respect to q, k and v are the reference's (padding queries get a zero cotangent, as
  they do through any loss that ignores padding)."""
  mask = masks()[mask_name]
  q, k, v = random_qkv(0)
  real = real_queries(mask)
  cotangent = jnp.asarray(np.random.default_rng(1).normal(size=q.shape) * real, jnp.float32)

  def loss(impl):
    return lambda q, k, v: jnp.sum(cotangent * attention.dot_product_attention(
        q, k, v, mask, implementation=impl, block_size=block_size))

  reference = attention.dot_product_attention(q, k, v, mask)
  blockwise = attention.dot_product_attention(q, k, v, mask, implementation="blockwise",
                                              block_size=block_size)
  assert blockwise.shape == reference.shape and blockwise.dtype == reference.dtype
  np.testing.assert_allclose(np.where(real, blockwise, 0), np.where(real, reference, 0),
                             **TOL)
  assert np.isfinite(np.asarray(blockwise)).all()  # padding queries included
  grads_ref = jax.grad(loss("reference"), argnums=(0, 1, 2))(q, k, v)
  grads_blk = jax.grad(loss("blockwise"), argnums=(0, 1, 2))(q, k, v)
  for name, a, b in zip("qkv", grads_blk, grads_ref):
    np.testing.assert_allclose(a, b, err_msg=f"d{name}", **TOL)


def test_blockwise_without_mask_and_with_a_dense_mask_equals_reference():
  q, k, v = random_qkv(2, q_len=9, kv_len=11)
  np.testing.assert_allclose(blockwise_attention.blockwise_attention(q, k, v, block_size=4),
                             attention.dot_product_attention(q, k, v), **TOL)
  dense = jnp.asarray(np.random.default_rng(3).random((2, 1, 9, 11)) < 0.7).at[..., 0].set(
      True)  # every query sees key 0
  np.testing.assert_allclose(
      blockwise_attention.blockwise_attention(q, k, v, dense, block_size=4),
      attention.dot_product_attention(q, k, v, dense), **TOL)
  grads = [jax.grad(lambda q: jnp.sum(jnp.sin(f(q))))(q) for f in (
      lambda q: blockwise_attention.blockwise_attention(q, k, v, dense, block_size=4),
      lambda q: attention.dot_product_attention(q, k, v, dense))]
  np.testing.assert_allclose(grads[0], grads[1], **TOL)


def test_blockwise_cross_attention_lengths_differ():
  q, k, v = random_qkv(4, q_len=6, kv_len=10)
  valid_q, valid_k = jnp.ones((2, 6), bool), jnp.arange(10)[None, :].repeat(2, 0) < 8
  mask = AttentionMask(valid_q, valid_k)
  np.testing.assert_allclose(
      attention.dot_product_attention(q, k, v, mask, implementation="blockwise",
                                      block_size=4),
      attention.dot_product_attention(q, k, v, mask), **TOL)


def test_causal_blockwise_skips_tiles_above_the_diagonal():
  """Changing keys that a causal tile-skip never visits for query block 0 leaves block 0's
  outputs unchanged (they are masked for it) and the result still equals the reference."""
  q, k, v = random_qkv(5, q_len=16, kv_len=16)
  mask = AttentionMask(jnp.ones((2, 16), bool), jnp.ones((2, 16), bool), causal=True)
  out = attention.dot_product_attention(q, k, v, mask, implementation="blockwise",
                                        block_size=4)
  k2 = k.at[:, 4:].set(jnp.nan)  # NaN would poison block 0 if its tile were computed
  v2 = v.at[:, 4:].set(jnp.nan)
  out2 = attention.dot_product_attention(q, k2, v2, mask, implementation="blockwise",
                                         block_size=4)
  np.testing.assert_array_equal(out2[:, :4], out[:, :4])
  np.testing.assert_allclose(out, attention.dot_product_attention(q, k, v, mask), **TOL)


def test_blockwise_bfloat16_is_close_to_float32_reference():
  q, k, v = random_qkv(6, q_len=32, kv_len=32)
  mask = masks(32)["padding_causal_segment"]
  real = real_queries(mask)
  ref = attention.dot_product_attention(q, k, v, mask)
  out = attention.dot_product_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), mask,
                                        implementation="blockwise", block_size=8)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.where(real, out.astype(jnp.float32), 0),
                             np.where(real, ref, 0), atol=3e-2, rtol=3e-2)


def test_blockwise_refuses_weights_and_dropout():
  q, k, v = random_qkv(7)
  with pytest.raises(ValueError, match="weights"):
    attention.dot_product_attention(q, k, v, implementation="blockwise", return_weights=True)
  with pytest.raises(ValueError, match="dropout"):
    attention.dot_product_attention(q, k, v, implementation="blockwise", dropout_rate=0.1,
                                    dropout_rng=jax.random.PRNGKey(0), deterministic=False)


FAMILIES = {
    "encoder_decoder": (EncoderDecoder, ("inputs", "targets")),
    "decoder_only": (DecoderOnly, ("targets",)),
    "classifier": (Classifier, ("inputs",)),
}


def family_batch(packed: bool):
  rng = np.random.default_rng(8)
  inputs = rng.integers(1, 16, (2, 11)).astype(np.int32)
  targets = rng.integers(1, 16, (2, 9)).astype(np.int32)
  inputs[1, 7:] = 0
  targets[0, 6:] = 0
  batch = {"inputs": jnp.asarray(inputs), "targets": jnp.asarray(targets)}
  if packed:
    seg_in = np.where(inputs > 0, 1, 0)
    seg_in[0, 5:] = 2
    seg_tgt = np.where(targets > 0, 1, 0)
    seg_tgt[0, 3:6] = 2
    seg_tgt[1, 4:] = 2
    batch["inputs_segmentation"] = jnp.asarray(seg_in)
    batch["targets_segmentation"] = jnp.asarray(seg_tgt)
  return batch


@pytest.mark.parametrize("family,packed", [  # the classifier takes no packed rows
    (family, packed) for family in FAMILIES for packed in (False, True)
    if not (packed and family == "classifier")])
def test_models_with_blockwise_attention_equal_reference(family, packed):
  """Loss over the real positions and every parameter gradient, blockwise vs reference,
  with padding, the decoder's causal mask and (packed) segments."""
  cls, fields = FAMILIES[family]
  batch = family_batch(packed)
  args = [batch[f] for f in fields]
  kwargs = {}
  if packed and family == "encoder_decoder":
    kwargs = dict(inputs_segmentation=batch["inputs_segmentation"],
                  targets_segmentation=batch["targets_segmentation"])
  elif packed:
    kwargs = dict(segmentation=batch["targets_segmentation"])
  reference = cls(tiny_model_config())
  blockwise = cls(tiny_model_config(attention_impl="blockwise", attention_block_size=4))
  params = init_params(reference, *args)

  def loss(model):
    def f(params):
      out = model.apply({"params": params}, *args, **kwargs)
      if out.ndim == 3:  # token logits: only real positions count
        out = out * (args[-1] > 0)[..., None]
      return jnp.sum(jnp.square(out))
    return f

  value_ref, grads_ref = jax.value_and_grad(loss(reference))(params)
  value_blk, grads_blk = jax.value_and_grad(loss(blockwise))(params)
  np.testing.assert_allclose(value_blk, value_ref, rtol=2e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads_blk),
                          jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(a, b, atol=5e-5, rtol=5e-4,
                               err_msg=jax.tree_util.keystr(path))


def _temp_bytes(length: int, impl: str) -> int:
  """XLA's temporary memory for the gradient of a 1-layer decoder at `length` tokens."""
  cfg = tiny_model_config(num_decoder_layers=1, max_length=length, attention_impl=impl,
                          attention_block_size=64)
  model = DecoderOnly(cfg)
  tokens = jnp.ones((1, length), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)["params"]
  grad = jax.jit(jax.grad(lambda p, x: jnp.sum(model.apply({"params": p}, x))))
  return grad.lower(params, tokens).compile().memory_analysis().temp_size_in_bytes


def test_blockwise_memory_grows_linearly_and_reference_quadratically():
  """From compiled memory analysis (no timing): 4x the length costs the blockwise
  gradient about 4x the temporary memory; the reference's grows about 16x."""
  blockwise = _temp_bytes(1024, "blockwise") / _temp_bytes(256, "blockwise")
  reference = _temp_bytes(1024, "reference") / _temp_bytes(256, "reference")
  assert blockwise < 6, blockwise
  assert reference > 10, reference


def test_model_config_dataclass_defaults_to_reference():
  cfg = tiny_model_config()
  assert cfg.attention_impl == "reference" and cfg.attention_block_size == 512
  assert dataclasses.replace(cfg, attention_impl="blockwise").attention_impl == "blockwise"


@pytest.mark.parametrize("task_name", ["translation", "generation"])
def test_decoding_through_the_blockwise_path_gives_the_reference_tokens(task_name):
  """Cached decoding (one query a step against the cache, masked by a dense array) and
  the evaluation loss of a blockwise model equal the reference model's."""
  import tasks  # pylint: disable=g-import-not-at-top
  from tests.tiny_configs import tiny_config  # pylint: disable=g-import-not-at-top
  reference = tasks.get_task(tiny_config(task_name, decode=dict(beam_size=2)))
  blockwise = tasks.get_task(tiny_config(task_name, decode=dict(beam_size=2),
                                         compute=dict(attention_impl="blockwise",
                                                      attention_block_size=4)))
  params = reference.init_params(jax.random.PRNGKey(0))
  batch = jax.tree.map(lambda x: jnp.asarray(x[0]),
                       reference.eval_dataset("eval", batch_size=8, num_devices=1)[0])
  np.testing.assert_array_equal(jax.jit(blockwise.predict)(params, batch),
                                jax.jit(reference.predict)(params, batch))
  np.testing.assert_allclose(blockwise.loss(params, batch, None, False)["loss"],
                             reference.loss(params, batch, None, False)["loss"], rtol=1e-5)
