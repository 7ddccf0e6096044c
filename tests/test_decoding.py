"""Incremental decoding with the key/value cache equals the full forward pass; greedy search."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import attention, decoding, masks
from models.transformer import DecoderOnly, EncoderDecoder, TransformerConfig, shift_right
from tests.model_fixtures import init_params, tiny_model_config

ATOL = 1e-5

# A source longer than the target (so the cache length cannot be confused with the source
# length), with padding; shapes shared with test_transformer.py to save CPU compilations.
SOURCE = jnp.array([[3, 4, 5, 6, 7, 8, 2, 9, 0], [9, 2, 2, 5, 0, 0, 0, 0, 0]])
TARGET = jnp.array([[5, 6, 7, 8, 9, 4], [1, 2, 3, 4, 4, 6]])
TOKENS = jnp.array([[3, 4, 5, 6, 7, 8], [9, 2, 2, 5, 1, 4]])  # decoder-only

ONE_LAYER = dict(num_encoder_layers=1, num_decoder_layers=1)  # a faster compile per variant
VARIANTS = {
    "paper": {},
    "fused_qkv_pre_norm_learned": dict(fused_qkv=True, norm_placement="pre",
                                       positional_encoding="learned", **ONE_LAYER),
    "fused_attention": dict(attention_impl="fused", **ONE_LAYER),
    # The components since 2017 together (rotary positions through the cache, grouped
    # key/value heads in a smaller cache), and attention biases.
    "since_2017": dict(norm="rms", positional_encoding="rope", activation="swiglu",
                       qk_norm=True, biases="none", num_kv_heads=1, tie_output=False,
                       norm_placement="pre", **ONE_LAYER),
    "attention_biases_gqa": dict(biases="all", num_kv_heads=1, num_heads=2, **ONE_LAYER),
    "encoder_convolution": dict(conv_kernel=3, **ONE_LAYER),  # encoder-decoder only
    "encoder_lstm": dict(encoder_lstm=True, **ONE_LAYER),  # encoder-decoder only
}


def without_padding_token(logits):
  """A random model may predict token 0 (padding), which the full forward pass would then
  mask; both decoders under test exclude it so they stay comparable."""
  return logits.at[..., 0].set(-jnp.inf)


# ----------------------------------------------------------------------------- set-ups


@dataclasses.dataclass(frozen=True)
class Setup:
  """A model, its params and its cached decoding, built once per config (compiles are slow)."""
  model: object
  params: dict
  step_fn: object  # jitted (cache, tokens[batch, 1]) -> (logits[batch, vocab], cache)
  cache: dict  # from decoding.init_cache
  greedy_fn: object  # jitted greedy_decode(step_fn, cache, ...)(eos_id, prompt)
  full_fn: object  # teacher-forced logits of targets [batch, length]
  targets: jax.Array  # example targets, also the decoding length


def masked_greedy(step_fn, cache, targets):
  """greedy_decode over `without_padding_token(step_fn)`; eos_id and prompt are traced."""
  def step(c, tokens):
    logits, c = step_fn(c, tokens)
    return without_padding_token(logits), c

  @jax.jit
  def run(eos_id, prompt):
    return decoding.greedy_decode(step, cache, targets.shape[0], targets.shape[1], eos_id,
                                  prompt)
  return run


@functools.lru_cache(maxsize=None)
def encoder_decoder_setup(cfg: TransformerConfig) -> Setup:
  model = EncoderDecoder(cfg)
  params = init_params(model, SOURCE, TARGET)
  decode_model = EncoderDecoder(dataclasses.replace(cfg, decode=True))
  encoded = model.apply({"params": params}, SOURCE, method=EncoderDecoder.encode)

  @jax.jit
  def step_fn(cache, tokens):
    logits, variables = decode_model.apply(
        {"params": params, "cache": cache}, encoded, SOURCE, tokens,
        method=EncoderDecoder.decode, mutable=["cache"])
    return logits[:, 0], variables["cache"]

  cache = decoding.init_cache(decode_model, SOURCE, TARGET)
  return Setup(model, params, step_fn, cache, masked_greedy(step_fn, cache, TARGET),
               lambda y: model.apply({"params": params}, SOURCE, y), TARGET)


@functools.lru_cache(maxsize=None)
def decoder_only_setup(cfg: TransformerConfig) -> Setup:
  model = DecoderOnly(cfg)
  params = init_params(model, TOKENS)
  decode_model = DecoderOnly(dataclasses.replace(cfg, decode=True))

  @jax.jit
  def step_fn(cache, tokens):
    logits, variables = decode_model.apply({"params": params, "cache": cache}, tokens,
                                           mutable=["cache"])
    return logits[:, 0], variables["cache"]

  cache = decoding.init_cache(decode_model, TOKENS)
  return Setup(model, params, step_fn, cache, masked_greedy(step_fn, cache, TOKENS),
               lambda y: model.apply({"params": params}, y), TOKENS)


SETUPS = {"encoder_decoder": encoder_decoder_setup, "decoder_only": decoder_only_setup}


def assert_cached_steps_match(setup: Setup):
  """Feeding shift_right(targets) one token at a time reproduces the full forward pass."""
  full_logits = setup.full_fn(setup.targets)
  decoder_inputs = shift_right(setup.targets)
  cache = setup.cache
  for t in range(setup.targets.shape[1]):
    logits, cache = setup.step_fn(cache, decoder_inputs[:, t:t + 1])
    np.testing.assert_allclose(logits, full_logits[:, t], atol=ATOL,
                               err_msg=f"position {t}")


# ----------------------------------------------------------------------------- cache


def test_init_cache_is_zeros_with_one_slot_per_position():
  cache = encoder_decoder_setup(tiny_model_config()).cache
  self_attention = cache["decoder"]["block_0"]["self_attention"]
  assert self_attention["cached_key"].shape == (2, 6, 2, 8)  # [batch, length, heads, head_dim]
  assert "cross_attention" not in cache["decoder"]["block_0"]  # the encoding is not cached
  assert all(not np.any(leaf) for leaf in jax.tree.leaves(cache))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_encoder_decoder_cached_decoding_equals_full_forward(variant):
  assert_cached_steps_match(encoder_decoder_setup(tiny_model_config(**VARIANTS[variant])))


@pytest.mark.parametrize("variant", ["paper", "fused_qkv_pre_norm_learned", "since_2017"])
def test_decoder_only_cached_decoding_equals_full_forward(variant):
  assert_cached_steps_match(decoder_only_setup(tiny_model_config(**VARIANTS[variant])))


def test_attention_cache_equals_causal_self_attention():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 16)), jnp.float32)
  full_mha = attention.MultiHeadAttention(num_heads=2, head_dim=8)
  cached_mha = attention.MultiHeadAttention(num_heads=2, head_dim=8, decode=True)
  params = init_params(full_mha, x)
  full = full_mha.apply({"params": params}, x, mask=masks.causal_mask(6))
  step = jax.jit(lambda cache, x_t: cached_mha.apply({"params": params, "cache": cache}, x_t,
                                                     mutable=["cache"]))
  cache = decoding.init_cache(cached_mha, x)
  for t in range(6):
    out, variables = step(cache, x[:, t:t + 1])
    cache = variables["cache"]
    np.testing.assert_allclose(out[:, 0], full[:, t], atol=ATOL)
  assert int(cache["cache_index"]) == 6
  with pytest.raises(ValueError, match="one position at a time"):
    cached_mha.apply({"params": params, "cache": cache}, x[:, :2], mutable=["cache"])


# ----------------------------------------------------------------------------- greedy search


def naive_greedy(logits_fn, batch, length, eos_id, prompt=None):
  """Greedy search recomputing the full (uncached) forward pass for every new token.

  `logits_fn(targets[batch, length])` gives teacher-forced logits; position i depends only
  on tokens < i, so the not-yet-generated token i is a non-padding placeholder.
  """
  prompt = np.zeros((batch, length), np.int32) if prompt is None else np.asarray(prompt)
  out = np.zeros((batch, length), np.int32)
  done = np.zeros(batch, bool)
  for i in range(length):
    targets = out.copy()
    targets[:, i] = 1
    logits = np.asarray(without_padding_token(logits_fn(jnp.asarray(targets))[:, i]))
    forced = prompt[:, i]
    chosen = np.where(forced > 0, forced, logits.argmax(-1))
    chosen = np.where(done, 0, chosen)
    out[:, i] = chosen
    done |= (chosen == eos_id) & (forced == 0)
  return out


def greedy(setup: Setup, eos_id, prompt=None):
  batch, length = setup.targets.shape
  prompt = np.zeros((batch, length), np.int32) if prompt is None else prompt
  out = setup.greedy_fn(jnp.int32(eos_id), jnp.asarray(prompt, jnp.int32))
  assert out.shape == (batch, length) and out.dtype == jnp.int32
  return np.asarray(out)


def naive(setup: Setup, eos_id, prompt=None):
  return naive_greedy(setup.full_fn, *setup.targets.shape, eos_id, prompt)


def truncated_after_eos(tokens, eos_id):
  out = np.array(tokens)
  for row in out:
    hits = np.flatnonzero(row == eos_id)
    if hits.size:
      row[hits[0] + 1:] = 0
  return out


NO_EOS = -1  # never produced: every sequence runs to the full length


@pytest.mark.parametrize("family", list(SETUPS))
def test_greedy_decode_equals_naive_full_recompute(family):
  setup = SETUPS[family](tiny_model_config())
  np.testing.assert_array_equal(greedy(setup, NO_EOS), naive(setup, NO_EOS))


@pytest.mark.parametrize("family", list(SETUPS))
def test_greedy_decode_stops_at_eos_and_pads_with_zeros(family):
  setup = SETUPS[family](tiny_model_config())
  free_run = greedy(setup, NO_EOS)
  eos_id = int(free_run[0, 1])  # row 0 emits it at position 0 or 1
  expected = truncated_after_eos(free_run, eos_id)
  assert expected[0, -1] == 0  # the test does exercise padding after EOS
  np.testing.assert_array_equal(greedy(setup, eos_id), expected)
  np.testing.assert_array_equal(naive(setup, eos_id), expected)


@pytest.mark.parametrize("family", list(SETUPS))
def test_greedy_decode_forces_prompt_tokens(family):
  """Prompt tokens are emitted as given (a prompted EOS does not stop); the rest is greedy."""
  setup = SETUPS[family](tiny_model_config())
  prompt = np.zeros(setup.targets.shape, np.int32)
  prompt[0, :2] = [4, 9]
  prompt[1, :1] = [7]
  eos_id = 4  # prompted at position 0 of row 0
  out = greedy(setup, eos_id, prompt)
  np.testing.assert_array_equal(out[prompt > 0], prompt[prompt > 0])
  assert out[0, 2] != 0  # row 0 went on after its prompted EOS
  np.testing.assert_array_equal(out, naive(setup, eos_id, prompt))
