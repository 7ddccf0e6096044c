"""Properties of the three model families: padding, causality, packing, embeddings, norms."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.layers import sinusoidal_encoding
from models.transformer import (Classifier, DecoderOnly, EncoderDecoder,
                                shift_right)
from tests.model_fixtures import init_params, tiny_model_config

ATOL = 1e-5

# Two source rows and two target rows; the second rows already end in padding. Every test
# reuses these shapes (and the padded / packed length 6 + EXTRA) because on CPU each new
# shape costs fresh compilations of every eager op; test_decoding.py and the attention tests
# cover source and target lengths that differ.
SOURCE = jnp.array([[3, 4, 5, 6, 7, 8], [9, 2, 2, 5, 0, 0]])
TARGET = jnp.array([[5, 6, 7, 8, 9, 4], [1, 2, 3, 0, 0, 0]])
EXTRA = 3  # padding appended in the padding-invariance tests


def dropout_key(seed):
  """An "rbg" key: same dropout semantics, but far cheaper to compile on CPU than threefry."""
  return jax.random.key(seed, impl="rbg")


def pad(tokens, extra):
  return jnp.pad(tokens, ((0, 0), (0, extra)))


def assert_close_where(a, b, where, atol=ATOL):
  """a and b agree at the positions where `where` ([batch, length]) is True."""
  where = np.asarray(where, bool)
  np.testing.assert_allclose(np.asarray(a)[where], np.asarray(b)[where], atol=atol)


def change_token(tokens, t):
  """Replaces column t with a different non-zero token (1..15)."""
  return tokens.at[:, t].set(tokens[:, t] % 15 + 1)


# ----------------------------------------------------------------------------- padding


@pytest.mark.parametrize("norm_placement", ["post", "pre"])
def test_encoder_decoder_padding_does_not_change_real_positions(norm_placement):
  model = EncoderDecoder(tiny_model_config(norm_placement=norm_placement))
  params = init_params(model, SOURCE, TARGET)
  logits = model.apply({"params": params}, SOURCE, TARGET)
  padded = model.apply({"params": params}, pad(SOURCE, EXTRA), pad(TARGET, EXTRA))
  assert logits.shape == (2, 6, 16) and padded.shape == (2, 9, 16)
  assert_close_where(padded[:, :6], logits, TARGET > 0)


def test_decoder_only_padding_does_not_change_real_positions():
  model = DecoderOnly(tiny_model_config())
  params = init_params(model, SOURCE)
  logits = model.apply({"params": params}, SOURCE)
  padded = model.apply({"params": params}, pad(SOURCE, EXTRA))
  assert_close_where(padded[:, :6], logits, SOURCE > 0)


@pytest.mark.parametrize("pooling", ["mean", "cls", "max"])
def test_classifier_padding_does_not_change_logits(pooling):
  model = Classifier(tiny_model_config(pooling=pooling))
  inputs = SOURCE[:, 1:] if pooling == "cls" else SOURCE  # [CLS] + 5 tokens: same shapes
  params = init_params(model, inputs)
  logits = model.apply({"params": params}, inputs)
  assert logits.shape == (2, 3) and logits.dtype == jnp.float32
  np.testing.assert_allclose(model.apply({"params": params}, pad(inputs, EXTRA)), logits,
                             atol=ATOL)
  assert ("cls" in params["encoder"]) == (pooling == "cls")


def test_classifier_rejects_unknown_pooling():
  with pytest.raises(ValueError, match="min"):
    jax.eval_shape(Classifier(tiny_model_config(pooling="min")).init, jax.random.PRNGKey(0), SOURCE)


# ----------------------------------------------------------------------------- causality


def assert_causal(logits_fn, tokens):
  """Changing token t never changes logits at positions <= t, and does change later ones."""
  logits = logits_fn(tokens)
  length = tokens.shape[1]
  for t in range(length):
    changed = logits_fn(change_token(tokens, t))
    np.testing.assert_allclose(changed[:, :t + 1], logits[:, :t + 1], atol=ATOL,
                               err_msg=f"changing token {t} leaked backwards")
    if t + 1 < length:
      assert not np.allclose(changed[:, t + 1], logits[:, t + 1]), f"token {t} unused"


def test_decoder_only_is_causal():
  model = DecoderOnly(tiny_model_config())
  tokens = SOURCE.at[1].set(jnp.array([9, 2, 2, 5, 1, 4]))  # no padding
  params = init_params(model, tokens)
  assert_causal(lambda x: model.apply({"params": params}, x), tokens)


def test_encoder_decoder_decoder_is_causal():
  model = EncoderDecoder(tiny_model_config())
  targets = TARGET.at[1].set(jnp.array([1, 2, 3, 4, 4, 6]))  # no padding
  params = init_params(model, SOURCE, targets)
  assert_causal(lambda y: model.apply({"params": params}, SOURCE, y), targets)


def test_encoder_is_bidirectional():
  """The last source token reaches the first target position (no causal mask in the encoder)."""
  model = EncoderDecoder(tiny_model_config())
  params = init_params(model, SOURCE, TARGET)
  logits = model.apply({"params": params}, SOURCE, TARGET)
  changed = model.apply({"params": params}, change_token(SOURCE, 5), TARGET)
  assert not np.allclose(changed[0, 0], logits[0, 0])


# ----------------------------------------------------------------------------- packing


def pack(first, second, length):
  """(tokens, segmentation, positions) `[length]` for two sequences packed into one row."""
  tokens = list(first) + list(second)
  segments = [1] * len(first) + [2] * len(second)
  positions = list(range(len(first))) + list(range(len(second)))
  fill = [0] * (length - len(tokens))
  return tuple(np.array(a + fill, np.int32) for a in (tokens, segments, positions))


def packed_batch(a, b, length):
  """Row 0 packs (a, b), row 1 packs (b, a); also returns each sequence alone (padded)."""
  rows = [pack(a, b, length), pack(b, a, length)]
  tokens, segments, positions = (jnp.asarray(np.stack(x)) for x in zip(*rows))
  alone = jnp.asarray(np.stack([np.pad(a, (0, length - len(a))),
                                np.pad(b, (0, length - len(b)))]))
  return tokens, segments, positions, alone


def assert_packed_equals_alone(packed, alone, len_a, len_b):
  np.testing.assert_allclose(packed[0, :len_a], alone[0, :len_a], atol=ATOL)
  np.testing.assert_allclose(packed[0, len_a:len_a + len_b], alone[1, :len_b], atol=ATOL)
  np.testing.assert_allclose(packed[1, :len_b], alone[1, :len_b], atol=ATOL)
  np.testing.assert_allclose(packed[1, len_b:len_a + len_b], alone[0, :len_a], atol=ATOL)


@pytest.mark.parametrize("positional_encoding", ["sinusoidal", "learned"])
def test_encoder_decoder_packed_equals_each_sequence_alone(positional_encoding):
  model = EncoderDecoder(tiny_model_config(positional_encoding=positional_encoding))
  src_a, src_b, tgt_a, tgt_b = [3, 4, 5], [8, 9, 2, 4], [6, 7], [5, 3, 2]
  inputs, in_seg, in_pos, src_alone = packed_batch(src_a, src_b, SOURCE.shape[1] + EXTRA)
  targets, tg_seg, tg_pos, tgt_alone = packed_batch(tgt_a, tgt_b, TARGET.shape[1] + EXTRA)
  params = init_params(model, inputs, targets)
  packed = model.apply({"params": params}, inputs, targets, inputs_positions=in_pos,
                       targets_positions=tg_pos, inputs_segmentation=in_seg,
                       targets_segmentation=tg_seg)
  alone = model.apply({"params": params}, src_alone, tgt_alone)
  assert_packed_equals_alone(packed, alone, len(tgt_a), len(tgt_b))


@pytest.mark.parametrize("positional_encoding", ["sinusoidal", "learned"])
def test_decoder_only_packed_equals_each_sequence_alone(positional_encoding):
  model = DecoderOnly(tiny_model_config(positional_encoding=positional_encoding))
  a, b = [3, 4, 5], [8, 9, 2, 4]
  tokens, segments, positions, alone_tokens = packed_batch(a, b, SOURCE.shape[1] + EXTRA)
  params = init_params(model, tokens)
  packed = model.apply({"params": params}, tokens, positions=positions, segmentation=segments)
  alone = model.apply({"params": params}, alone_tokens)
  assert_packed_equals_alone(packed, alone, len(a), len(b))


def test_shift_right_puts_zero_at_every_segment_start():
  tokens = jnp.array([[5, 6, 7, 8, 9, 0], [4, 3, 2, 1, 7, 7]])
  segments = jnp.array([[1, 1, 2, 2, 2, 0], [1, 2, 2, 3, 3, 3]])
  np.testing.assert_array_equal(shift_right(tokens, segments),
                                [[0, 5, 0, 7, 8, 0], [0, 0, 3, 0, 1, 7]])
  np.testing.assert_array_equal(shift_right(tokens), [[0, 5, 6, 7, 8, 9], [0, 4, 3, 2, 1, 7]])


# ----------------------------------------------------------------------------- embeddings


def captured(model, params, *args, **kwargs):
  """Every submodule's output, from `capture_intermediates`."""
  _, state = model.apply({"params": params}, *args, capture_intermediates=True,
                         mutable=["intermediates"], **kwargs)
  return state["intermediates"]


def test_embeddings_are_scaled_by_sqrt_d_model_before_adding_positions():
  cfg = tiny_model_config()
  model = EncoderDecoder(cfg)
  params = init_params(model, SOURCE, TARGET)
  table = np.asarray(params["shared_embed"]["embedding"])
  acts = captured(model, params, SOURCE, TARGET)
  sqrt_d = np.sqrt(cfg.d_model)
  np.testing.assert_allclose(
      acts["encoder"]["positions"]["__call__"][0],
      table[np.asarray(SOURCE)] * sqrt_d + sinusoidal_encoding(jnp.arange(6)[None], 16),
      atol=ATOL)
  np.testing.assert_allclose(
      acts["decoder"]["positions"]["__call__"][0],
      table[np.asarray(shift_right(TARGET))] * sqrt_d
      + sinusoidal_encoding(jnp.arange(6)[None], 16), atol=ATOL)


def test_cls_vector_takes_position_zero_and_tokens_shift_by_one():
  cfg = tiny_model_config(pooling="cls")
  model = Classifier(cfg)
  inputs = SOURCE[:, 1:]
  params = init_params(model, inputs)
  encoder = params["encoder"]
  table = np.asarray(encoder["embed"]["embedding"])
  first = captured(model, params, inputs)["encoder"]["positions"]["__call__"][0]
  pe = np.asarray(sinusoidal_encoding(jnp.arange(6)[None], 16))
  np.testing.assert_allclose(first[:, 0], np.broadcast_to(encoder["cls"] + pe[:, 0], (2, 16)),
                             atol=ATOL)
  np.testing.assert_allclose(first[:, 1:], table[np.asarray(inputs)] * np.sqrt(cfg.d_model)
                             + pe[:, 1:], atol=ATOL)


def test_tied_output_uses_the_embedding_matrix():
  model = EncoderDecoder(tiny_model_config(tie_output=True))
  params = init_params(model, SOURCE, TARGET)
  assert "logits" not in params["decoder"]
  acts = captured(model, params, SOURCE, TARGET)
  hidden = np.asarray(acts["decoder"]["block_1"]["__call__"][0])  # post-norm: no final norm
  table = np.asarray(params["shared_embed"]["embedding"])
  np.testing.assert_allclose(acts["__call__"][0], hidden @ table.T, atol=1e-4)


def test_untied_output_has_its_own_projection():
  model = EncoderDecoder(tiny_model_config(tie_output=False))
  params = init_params(model, SOURCE, TARGET)
  kernel, bias = params["decoder"]["logits"]["kernel"], params["decoder"]["logits"]["bias"]
  assert kernel.shape == (16, 16)
  acts = captured(model, params, SOURCE, TARGET)
  hidden = np.asarray(acts["decoder"]["block_1"]["__call__"][0])
  np.testing.assert_allclose(acts["__call__"][0], hidden @ np.asarray(kernel) + bias,
                             atol=1e-4)


def test_shared_embeddings_are_one_matrix():
  params = init_params(EncoderDecoder(tiny_model_config(share_embeddings=True)), SOURCE, TARGET)
  assert params["shared_embed"]["embedding"].shape == (16, 16)
  assert "embed" not in params["encoder"] and "embed" not in params["decoder"]


def test_separate_embeddings_allow_a_different_target_vocabulary():
  model = EncoderDecoder(tiny_model_config(share_embeddings=False, output_vocab_size=11))
  params = init_params(model, SOURCE, TARGET)
  assert "shared_embed" not in params
  assert params["encoder"]["embed"]["embedding"].shape == (16, 16)
  assert params["decoder"]["embed"]["embedding"].shape == (11, 16)
  assert model.apply({"params": params}, SOURCE, TARGET).shape == (2, 6, 11)


# ----------------------------------------------------------------------------- norms, dtypes


def test_pre_norm_differs_from_post_norm_and_adds_final_norms():
  post = EncoderDecoder(tiny_model_config(norm_placement="post"))
  pre = EncoderDecoder(tiny_model_config(norm_placement="pre"))
  post_params = init_params(post, SOURCE, TARGET)
  pre_params = init_params(pre, SOURCE, TARGET)
  assert "final_norm" in pre_params["encoder"] and "final_norm" in pre_params["decoder"]
  assert "final_norm" not in post_params["encoder"]
  assert "final_norm" not in post_params["decoder"]
  # Same weights everywhere except the extra final norms: the placement alone changes outputs.
  shared = {**post_params, **{
      stack: {**post_params[stack], "final_norm": pre_params[stack]["final_norm"]}
      for stack in ("encoder", "decoder")}}
  assert not np.allclose(pre.apply({"params": shared}, SOURCE, TARGET),
                         post.apply({"params": post_params}, SOURCE, TARGET), atol=1e-3)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  cfg = tiny_model_config()
  for tie_output in (True, False):  # shapes and dtypes only: no compilation
    model = EncoderDecoder(dataclasses.replace(cfg, dtype=jnp.bfloat16, tie_output=tie_output))
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), SOURCE, TARGET)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
    assert jax.eval_shape(model.apply, variables, SOURCE, TARGET).dtype == jnp.float32
  model_32 = DecoderOnly(cfg)
  model_16 = DecoderOnly(dataclasses.replace(cfg, dtype=jnp.bfloat16))
  params = init_params(model_32, SOURCE)
  logits_16 = jax.jit(model_16.apply)({"params": params}, SOURCE)  # one compile, not ~200
  logits_32 = model_32.apply({"params": params}, SOURCE)
  assert logits_16.dtype == jnp.float32
  assert not np.array_equal(logits_16, logits_32)  # bf16 really was used
  assert_close_where(logits_16, logits_32, SOURCE > 0, atol=0.1 * np.abs(logits_32).max())


def test_fused_attention_model_equals_reference_model():
  cfg = tiny_model_config()
  reference = EncoderDecoder(cfg)
  fused = EncoderDecoder(dataclasses.replace(cfg, attention_impl="fused"))
  params = init_params(reference, SOURCE, TARGET)
  assert_close_where(fused.apply({"params": params}, SOURCE, TARGET),
                     reference.apply({"params": params}, SOURCE, TARGET), TARGET > 0)


# ----------------------------------------------------------------------------- inspection


def test_attention_weights_are_exposed_as_normalised_intermediates():
  model = EncoderDecoder(tiny_model_config())
  inputs = pad(SOURCE, EXTRA)  # a source longer than the target: [.., 6, 9] cross weights
  params = init_params(model, inputs, TARGET)
  _, state = model.apply({"params": params}, inputs, TARGET, mutable=["intermediates"])
  sown = state["intermediates"]
  expected_shapes = {  # [batch, heads, q_length, kv_length]
      ("encoder", "self_attention"): (2, 2, 9, 9),
      ("decoder", "self_attention"): (2, 2, 6, 6),
      ("decoder", "cross_attention"): (2, 2, 6, 9),
  }
  for (stack, layer), shape in expected_shapes.items():
    for block in ("block_0", "block_1"):
      (weights,) = sown[stack][block][layer]["attention_weights"]
      assert weights.shape == shape
      np.testing.assert_allclose(weights.sum(-1), 1.0, atol=ATOL)
  real_queries = np.asarray(TARGET > 0)[:, None, :, None]  # padding queries attend uniformly
  decoder_self = np.asarray(sown["decoder"]["block_0"]["self_attention"]["attention_weights"][0])
  np.testing.assert_array_equal(np.triu(decoder_self, k=1) * real_queries, 0.0)  # causal
  cross = np.asarray(sown["decoder"]["block_0"]["cross_attention"]["attention_weights"][0])
  padding_keys = np.asarray(inputs == 0)[:, None, None, :]
  np.testing.assert_array_equal(cross * real_queries * padding_keys, 0.0)


def test_dropout_only_when_not_deterministic_and_depends_on_rng():
  model = DecoderOnly(tiny_model_config(dropout_rate=0.1, attention_dropout_rate=0.1))
  params = init_params(model, SOURCE)
  plain = DecoderOnly(tiny_model_config()).apply({"params": params}, SOURCE)
  np.testing.assert_array_equal(model.apply({"params": params}, SOURCE, deterministic=True),
                                plain)

  def dropped(seed):
    return model.apply({"params": params}, SOURCE, deterministic=False,
                       rngs={"dropout": dropout_key(seed)})

  assert not np.allclose(dropped(1), plain)
  assert not np.allclose(dropped(1), dropped(2))
