"""On an NVIDIA GPU: the fast attention paths equal the reference in bfloat16.

Skipped unless jax's default backend is "gpu". tests/conftest.py pins JAX_PLATFORMS=cpu
when it is unset, so on a GPU machine run

    JAX_PLATFORMS=cuda python -m pytest -q tests/test_gpu.py

(benchmarks/gpu_check.sh does). Every implementation of models.attention other than the
reference is checked ("fused": cuDNN's flash attention through jax.nn.dot_product_attention
for bfloat16 on GPU; "blockwise" when it is registered).

bfloat16 keeps 8 bits of mantissa, so no fixed tolerance is both tight and safe. Each
check compares against a float32 "truth" (the reference path on the same bfloat16-rounded
inputs, computed in float32 with float32 matmuls) and asks that the fast path be about as
accurate as the reference path is in bfloat16: its relative RMS error at most three times
the reference's (plus 1e-3), and its largest difference from the reference within 3% of the
largest value. A wrong mask or a dropped scale is off by tens of percent.
"""

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import attention, decoding
from models import masks as mask_lib
from models.transformer import DecoderOnly, EncoderDecoder, TransformerConfig

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "gpu",
    reason="needs an NVIDIA GPU as jax's default backend (tests/conftest.py sets "
           "JAX_PLATFORMS=cpu unless it is set: run with JAX_PLATFORMS=cuda)")

FAST = [name for name in attention.IMPLEMENTATIONS if name != "reference"]
BLOCK = 64  # tile length for paths that take one: several tiles at these lengths
TAKES_BLOCK = "block_size" in inspect.signature(attention.dot_product_attention).parameters
RATIO, SLACK, MAX_REL = 3.0, 1e-3, 3e-2
BATCH, HEADS, HEAD_DIM = 2, 4, 64  # cuDNN wants head_dim a multiple of 8, at most 128


# ----------------------------------------------------------------------------- helpers


def rel_rms(x, truth) -> float:
  x, truth = np.asarray(x, np.float64), np.asarray(truth, np.float64)
  return float(np.sqrt(np.mean((x - truth) ** 2)) / np.sqrt(np.mean(truth ** 2)))


def assert_as_accurate(fast, ref, truth, what):
  """`fast` (a bfloat16 path) is about as close to `truth` as `ref` (the bfloat16
  reference) is, and close to `ref` itself (see module docstring)."""
  fast, ref, truth = (np.asarray(jnp.asarray(a, jnp.float32)) for a in (fast, ref, truth))
  assert np.all(np.isfinite(fast)), f"{what}: non-finite values"
  err_fast, err_ref = rel_rms(fast, truth), rel_rms(ref, truth)
  assert err_fast <= RATIO * err_ref + SLACK, (
      f"{what}: relative RMS error {err_fast:.2e} against float32, the bfloat16 reference "
      f"has {err_ref:.2e}")
  worst = float(np.max(np.abs(fast - ref)) / np.max(np.abs(ref)))
  assert worst <= MAX_REL, f"{what}: largest difference {worst:.2e} of the largest value"


def masks(q_length, kv_length):
  """The masks a model builds, `[batch, 1, q, kv]` bool: padding (the second row ends in
  padding on both sides), causal, and packed rows of three segments then padding, causal
  (decoder) or not (encoder). Causal kinds need q_length == kv_length."""
  q_valid = np.arange(q_length)[None] < np.array([q_length, q_length * 5 // 8])[:, None]
  kv_valid = np.arange(kv_length)[None] < np.array([kv_length, kv_length * 3 // 4])[:, None]
  out = {"padding": mask_lib.padding_mask(jnp.asarray(q_valid), jnp.asarray(kv_valid))}
  if q_length != kv_length:
    return out
  n = q_length
  # Segments 1, 2, 3 of unequal lengths, then padding (segment 0), in each row.
  bounds = np.array([[n // 5, n // 2, n * 7 // 8], [n // 3, n // 2, n * 5 // 8]])
  segments = (np.arange(n)[None, :, None] >= np.pad(bounds, ((0, 0), (1, 0)))[:, None, :]
              ).sum(-1) * (np.arange(n)[None] < bounds[:, -1:])
  segments = jnp.asarray(segments, jnp.int32)
  real = segments > 0
  padding = mask_lib.padding_mask(real, real)
  segment = mask_lib.combine_masks(padding, mask_lib.segment_mask(segments, segments))
  causal = mask_lib.causal_mask(n)
  out.update({
      "causal": jnp.broadcast_to(causal, (BATCH, 1, n, n)),
      "packed_encoder": segment,
      "packed_decoder": mask_lib.combine_masks(segment, causal),
  })
  return out


MASK_CASES = [("padding", 256, 256), ("causal", 256, 256), ("packed_encoder", 256, 256),
              ("packed_decoder", 256, 256), ("padding", 128, 256)]  # the last: cross-attention


def attend(implementation, q, k, v, mask):
  kwargs = {"block_size": BLOCK} if TAKES_BLOCK and implementation != "reference" else {}
  return attention.dot_product_attention(q, k, v, mask, implementation=implementation,
                                         **kwargs)


def loss_and_grads(implementation, q, k, v, mask, cotangent, rows):
  """Output and d(sum(out * cotangent) over real query rows)/d(q, k, v), jitted.

  Query rows that see no key (padding) are left out: their output is arbitrary (finite).
  """
  def loss(q, k, v):
    out = attend(implementation, q, k, v, mask)
    return jnp.sum(out.astype(jnp.float32) * cotangent * rows[:, :, None, None]), out
  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


def qkv(seed, q_length, kv_length):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(keys[0], (BATCH, q_length, HEADS, HEAD_DIM), jnp.bfloat16)
  k = jax.random.normal(keys[1], (BATCH, kv_length, HEADS, HEAD_DIM), jnp.bfloat16)
  v = jax.random.normal(keys[2], (BATCH, kv_length, HEADS, HEAD_DIM), jnp.bfloat16)
  cotangent = jax.random.normal(keys[3], (BATCH, q_length, HEADS, HEAD_DIM), jnp.float32)
  return q, k, v, cotangent


# ----------------------------------------------------------------------------- kernels


def test_fused_path_runs_cudnn_forward_and_backward():
  """Else the equality tests below would compare XLA with itself."""
  assert attention.fused_backend(jnp.bfloat16) == "cudnn"
  q, k, v, cotangent = qkv(0, 256, 256)
  mask = masks(256, 256)["packed_decoder"]

  def loss(q, k, v):
    return jnp.sum(attend("fused", q, k, v, mask).astype(jnp.float32) * cotangent)
  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).as_text()
  assert "__cudnn$fmha" in text, "the fused path did not lower to cuDNN attention"
  assert "Backward" in text.split("__cudnn$fmha", 1)[1], "no cuDNN attention backward"


@pytest.mark.parametrize("implementation", FAST)
@pytest.mark.parametrize("mask_name,q_length,kv_length", MASK_CASES)
def test_attention_equals_reference_in_bfloat16(implementation, mask_name, q_length,
                                                kv_length):
  q, k, v, cotangent = qkv(1, q_length, kv_length)
  mask = masks(q_length, kv_length)[mask_name]
  rows = jnp.any(mask, axis=(1, 3)).astype(jnp.float32)  # [batch, q]: sees some key
  assert 0 < float(rows.mean()), "every query row is masked"
  out_fast, grads_fast = loss_and_grads(implementation, q, k, v, mask, cotangent, rows)
  out_ref, grads_ref = loss_and_grads("reference", q, k, v, mask, cotangent, rows)
  with jax.default_matmul_precision("float32"):
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    out_true, grads_true = loss_and_grads("reference", *f32, mask, cotangent, rows)

  assert np.all(np.isfinite(np.asarray(out_fast, np.float32))), "padding rows not finite"
  real = np.asarray(rows, bool)
  assert_as_accurate(np.asarray(out_fast, np.float32)[real],
                     np.asarray(out_ref, np.float32)[real], np.asarray(out_true)[real],
                     f"{implementation} {mask_name} output")
  for name, fast, ref, true in zip("qkv", grads_fast, grads_ref, grads_true):
    assert fast.dtype == jnp.bfloat16
    assert_as_accurate(fast, ref, true, f"{implementation} {mask_name} d{name}")


# ----------------------------------------------------------------------------- models


def model_config(implementation, dtype, **overrides) -> TransformerConfig:
  fields = {f.name for f in dataclasses.fields(TransformerConfig)}
  extra = {"attention_block_size": BLOCK} if "attention_block_size" in fields else {}
  base = dict(vocab_size=512, d_model=256, d_ff=1024, num_heads=HEADS, head_dim=HEAD_DIM,
              num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.0, max_length=256,
              attention_impl=implementation, dtype=jnp.dtype(dtype))
  return TransformerConfig(**{**base, **extra, **overrides})


def random_tokens(seed, lengths, length):
  """`[batch, length]` tokens in 1..511 with row b real up to lengths[b], then padding."""
  tokens = np.random.default_rng(seed).integers(1, 512, (len(lengths), length))
  return jnp.asarray(tokens * (np.arange(length)[None] < np.array(lengths)[:, None]),
                     jnp.int32)


def packed_lm_batch():
  """Two packed rows of 256: segments with restarting positions, then padding."""
  bounds = [[0, 60, 150, 230], [0, 100, 180]]
  segmentation = np.zeros((2, 256), np.int32)
  positions = np.zeros((2, 256), np.int32)
  for row, b in enumerate(bounds):
    for s, (start, end) in enumerate(zip(b[:-1], b[1:]), 1):
      segmentation[row, start:end] = s
      positions[row, start:end] = np.arange(end - start)
  tokens = random_tokens(3, [256, 256], 256) * (segmentation > 0)
  return {"inputs": tokens, "positions": jnp.asarray(positions),
          "segmentation": jnp.asarray(segmentation)}


def model_logits(family, implementation, dtype, params, batch):
  model = family(model_config(implementation, dtype))
  return jax.jit(lambda p: model.apply({"params": p}, **batch))(params)


def check_model(family, implementation, batch, real):
  """Logits of `family` with `implementation` in bfloat16 against the reference (same
  params) at the real positions `real` ([batch, length] bool)."""
  params = jax.jit(family(model_config("reference", "float32")).init)(
      jax.random.PRNGKey(0), **batch)["params"]
  fast = model_logits(family, implementation, "bfloat16", params, batch)
  ref = model_logits(family, "reference", "bfloat16", params, batch)
  with jax.default_matmul_precision("float32"):
    true = model_logits(family, "reference", "float32", params, batch)
  assert fast.dtype == jnp.float32  # logits stay float32 (DESIGN.md numerics)
  assert np.all(np.isfinite(np.asarray(fast))), "non-finite logits (padding included)"
  real = np.asarray(real, bool)
  assert_as_accurate(np.asarray(fast)[real], np.asarray(ref)[real], np.asarray(true)[real],
                     f"{family.__name__} {implementation} logits")


@pytest.mark.parametrize("implementation", FAST)
def test_decoder_only_packed_bfloat16_logits_equal_reference(implementation):
  batch = packed_lm_batch()
  check_model(DecoderOnly, implementation, batch, batch["segmentation"] > 0)


@pytest.mark.parametrize("implementation", FAST)
def test_encoder_decoder_padded_bfloat16_logits_equal_reference(implementation):
  batch = {"inputs": random_tokens(4, [256, 190], 256),
           "targets": random_tokens(5, [256, 140], 256)}
  check_model(EncoderDecoder, implementation, batch, batch["targets"] > 0)


@pytest.mark.parametrize("implementation", FAST)
def test_cached_decoding_bfloat16_equals_reference(implementation):
  """The decode step (one query against the key/value cache) through the fast path gives
  the reference's logits, step after step."""
  length, steps = 128, 8
  tokens = random_tokens(6, [length, length], length)
  params = jax.jit(DecoderOnly(model_config("reference", "float32")).init)(
      jax.random.PRNGKey(1), tokens)["params"]

  def decode_logits(impl, dtype):
    model = DecoderOnly(dataclasses.replace(model_config(impl, dtype), decode=True))
    cache = decoding.init_cache(model, tokens)
    step = jax.jit(lambda c, t: model.apply({"params": params, "cache": c}, t,
                                            mutable=["cache"]))
    out, previous = [], jnp.zeros((2, 1), jnp.int32)
    for i in range(steps):  # teacher-forced: feed the given tokens, one a call
      logits, state = step(cache, previous)
      cache = state["cache"]
      out.append(logits[:, -1])
      previous = tokens[:, i:i + 1]
    return jnp.stack(out, axis=1)

  fast = decode_logits(implementation, "bfloat16")
  ref = decode_logits("reference", "bfloat16")
  with jax.default_matmul_precision("float32"):
    true = decode_logits("reference", "float32")
  assert_as_accurate(fast, ref, true, f"cached decoding {implementation} logits")
