"""Scaled dot-product attention and multi-head attention.

Section 3.2 of "Attention Is All You Need":

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V

Shapes follow the Flax convention: queries, keys and values are
`[batch, length, heads, head_dim]`; masks are boolean `[batch, heads or 1, q_length,
kv_length]` with True where attention is allowed.

The reference path (`implementation="reference"`) is written out here and is the one that
exposes attention weights (sown into the `intermediates` collection). The fused path
(`implementation="fused"`) calls `jax.nn.dot_product_attention`, which uses cuDNN's
flash attention on GPU where shapes and dtypes allow. The blockwise path
(`implementation="blockwise"`, models/blockwise_attention.py) never holds a `[q, kv]`
matrix: memory grows linearly with the sequence length, in the forward and the backward
pass. Tests check that both fast paths equal the reference.

A mask is either a boolean array or an `AttentionMask` (models/masks.py).

Heads can be switched off at apply time (head ablation, inspection/attention_maps.py): a
`[heads]` float vector passed in the `head_mask` collection under a module's path scales
each head's output before W^O. Without that collection nothing is added to the program.
"""

from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import blockwise_attention
from models.masks import MASK_VALUE, Mask, combine_masks, dense_mask

Array = jax.Array

IMPLEMENTATIONS = ("reference", "fused", "blockwise")
HEAD_MASK = "head_mask"  # the variable collection of per-head output scales (1 keep, 0 drop)


# ------------------------------------------------------------------- dot-product attention


def stable_softmax(logits: Array, axis: int = -1) -> Array:
  """softmax(x) = exp(x - max x) / sum exp(x - max x): subtracting the max avoids overflow."""
  shifted = logits - jax.lax.stop_gradient(jnp.max(logits, axis=axis, keepdims=True))
  unnormalized = jnp.exp(shifted)
  return unnormalized / jnp.sum(unnormalized, axis=axis, keepdims=True)


def attention_weights(query: Array, key: Array, mask: Optional[Array] = None) -> Array:
  """softmax(Q K^T / sqrt(d_k)) in float32.

  Args:
    query: `[batch, q_length, heads, head_dim]`.
    key: `[batch, kv_length, heads, head_dim]`.
    mask: bool, broadcastable to `[batch, heads, q_length, kv_length]`.

  Returns:
    `[batch, heads, q_length, kv_length]` float32 weights; each row sums to 1.
  """
  depth = query.shape[-1]
  logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32)
  logits = logits / jnp.sqrt(jnp.float32(depth))
  if mask is not None:
    logits = jnp.where(mask, logits, MASK_VALUE)
  return stable_softmax(logits, axis=-1)


def fused_backend(dtype) -> str:
  """cuDNN's flash attention on NVIDIA GPUs for 16-bit inputs; XLA's fused op otherwise."""
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  return "cudnn" if half and jax.default_backend() == "gpu" else "xla"


def dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    mask: Optional[Mask] = None,
    *,
    implementation: str = "reference",
    dropout_rate: float = 0.0,
    dropout_rng: Optional[Array] = None,
    deterministic: bool = True,
    return_weights: bool = False,
    block_size: int = 512,
):
  """Scaled dot-product attention.

  Args:
    query: `[batch, q_length, heads, head_dim]`.
    key, value: `[batch, kv_length, heads, head_dim]`.
    mask: bool, broadcastable to `[batch, heads, q_length, kv_length]` (True = attend), or
      an `AttentionMask`.
    implementation: "reference" (written here), "fused" (jax.nn.dot_product_attention,
      through cuDNN on GPU for bfloat16/float16, see `fused_backend`) or "blockwise"
      (online softmax over blocks of `block_size` queries and keys, linear memory).
    dropout_rate: dropout on the attention weights (reference path only).
    dropout_rng: PRNG key for that dropout.
    deterministic: disables dropout.
    return_weights: also return the `[batch, heads, q, kv]` float32 weights (reference only).

  Returns:
    `[batch, q_length, heads, head_dim]` in the dtype of `value`, and the weights if asked.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {implementation!r}; "
                     f"expected one of {IMPLEMENTATIONS}")
  if implementation != "reference":
    if return_weights:
      raise ValueError(f"the {implementation} attention path does not expose weights; "
                       f"use 'reference'")
    if dropout_rate > 0.0 and not deterministic:
      raise ValueError(f"the {implementation} attention path has no attention dropout; "
                       f"use 'reference'")
  if implementation == "blockwise":
    return blockwise_attention.blockwise_attention(query, key, value, mask,
                                                   block_size=block_size)
  mask = dense_mask(mask)
  if implementation == "fused":
    return jax.nn.dot_product_attention(query, key, value, mask=mask,
                                        implementation=fused_backend(query.dtype))

  weights = attention_weights(query, key, mask)
  probs = weights
  if dropout_rate > 0.0 and not deterministic:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
  out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(value.dtype), value)
  return (out, weights) if return_weights else out


# ------------------------------------------------------------------- multi-head attention


class MultiHeadAttention(nn.Module):
  """Multi-head attention (section 3.2.2): h parallel heads of size d_k, then W^O.

  Attributes:
    num_heads: h.
    head_dim: d_k = d_v, the size of each head (need not equal d_model / h).
    fused_qkv: one [d_model, 3, h, d_k] projection for self-attention (one [d_model, 2, h,
      d_k] for keys and values in cross-attention) instead of separate W^Q, W^K, W^V.
    dropout_rate: dropout on the attention weights.
    implementation: "reference", "fused" or "blockwise" (see `dot_product_attention`).
    block_size: queries and keys per tile of the blockwise path.
    decode: keep a key/value cache for incremental (one token at a time) decoding.
    dtype: compute dtype; parameters are always float32.
  """

  num_heads: int
  head_dim: int
  fused_qkv: bool = False
  dropout_rate: float = 0.0
  implementation: str = "reference"
  block_size: int = 512
  decode: bool = False
  dtype: jnp.dtype = jnp.float32
  kernel_init: Callable = nn.initializers.xavier_uniform()

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Optional[Array] = None,
               mask: Optional[Mask] = None, deterministic: bool = True) -> Array:
    """Args:
      inputs_q: `[batch, q_length, d_model]`.
      inputs_kv: `[batch, kv_length, d_model]`, or None for self-attention.
      mask: bool `[batch, 1 or heads, q_length, kv_length]` or an `AttentionMask`.
      deterministic: disables dropout.

    Returns:
      `[batch, q_length, d_model]`.
    """
    self_attention = inputs_kv is None
    if self_attention:
      inputs_kv = inputs_q
    d_model = inputs_q.shape[-1]
    # No biases, as in the paper's W^Q, W^K, W^V, W^O. A key bias would be worse than
    # useless: softmax ignores it (it adds the same q.b to every logit of a row), so its
    # gradient is rounding noise that Adam would scale up into random updates.
    dense = lambda features, name: nn.DenseGeneral(  # noqa: E731
        features, axis=-1, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=self.kernel_init, name=name)
    heads = (self.num_heads, self.head_dim)
    if self.fused_qkv and self_attention:
      query, key, value = jnp.moveaxis(dense((3,) + heads, "qkv")(inputs_q), -3, 0)
    elif self.fused_qkv:
      query = dense(heads, "query")(inputs_q)
      key, value = jnp.moveaxis(dense((2,) + heads, "kv")(inputs_kv), -3, 0)
    else:
      query = dense(heads, "query")(inputs_q)
      key = dense(heads, "key")(inputs_kv)
      value = dense(heads, "value")(inputs_kv)

    if self.decode and self_attention:
      key, value, mask = self._update_cache(key, value, mask)

    dropout_rng = None
    if self.dropout_rate > 0.0 and not deterministic:
      dropout_rng = self.make_rng("dropout")
    use_reference = self.implementation == "reference"
    result = dot_product_attention(
        query, key, value, mask, implementation=self.implementation,
        dropout_rate=self.dropout_rate, dropout_rng=dropout_rng,
        deterministic=deterministic, return_weights=use_reference,
        block_size=self.block_size)
    if use_reference:
      out, weights = result
      # Available through apply(..., mutable=["intermediates"]) for inspection.
      self.sow("intermediates", "attention_weights", weights)
    else:
      out = result
    if self.has_variable(HEAD_MASK, "heads"):  # `[heads]`: 0 removes a head's contribution
      scales = self.get_variable(HEAD_MASK, "heads")
      out = out * jnp.asarray(scales, out.dtype)[:, None]
    return nn.DenseGeneral(d_model, axis=(-2, -1), use_bias=False, dtype=self.dtype,
                           param_dtype=jnp.float32, kernel_init=self.kernel_init,
                           name="out")(out)

  def _update_cache(self, key: Array, value: Array, mask: Optional[Mask]):
    """Writes this step's key/value at the cache index and masks the unwritten slots.

    The cache is created (zeros, full length) when the module is initialised with a
    full-length input and `decode=True`; every later call must pass one position.
    """
    initialized = self.has_variable("cache", "cached_key")
    cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
    cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if not initialized:
      return key, value, mask
    batch, max_length, num_heads, head_dim = cached_key.value.shape
    if key.shape != (batch, 1, num_heads, head_dim):
      raise ValueError(f"incremental decoding takes one position at a time; got keys of "
                       f"shape {key.shape}, cache of shape {cached_key.value.shape}")
    index = cache_index.value
    cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key, (0, index, 0, 0))
    cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, value,
                                                      (0, index, 0, 0))
    cache_index.value = index + 1
    # The query at position `index` may see cache slots 0..index (causality comes free).
    written = (jnp.arange(max_length) <= index)[None, None, None, :]
    return cached_key.value, cached_value.value, combine_masks(dense_mask(mask), written)
