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

Since 2017 (each a field of `TransformerConfig`): rotary positions (`rotary_embedding`),
a norm on queries and keys (`qk_norm`), fewer key/value heads than query heads (grouped-query
and multi-query attention, `num_kv_heads`) and biases on the projections (`use_bias`).

Heads can be switched off at apply time (head ablation, inspection/attention_maps.py): a
`[heads]` float vector passed in the `head_mask` collection under a module's path scales
each head's output before W^O. Without that collection nothing is added to the program.
"""

from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import blockwise_attention
from models.layers import make_norm
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


def rotary_embedding(x: Array, positions: Array, max_timescale: float = 1e4) -> Array:
  """Rotary position embedding, RoPE (Su et al., 2021, "RoFormer").

  Feature i of a head is paired with feature i + d/2 and the pair is rotated by the angle
  position * 10000^(-2i/d). A rotation by m*theta of q and by n*theta of k leaves
  q . k depending on m - n only, so attention scores see relative positions, through the
  cache too (keys are cached already rotated). The half-split pairing is GPT-NeoX's and
  LLaMA's; the paper pairs neighbours, which is the same up to a permutation of features.

  Args:
    x: `[batch, length, heads, head_dim]` queries or keys (head_dim even).
    positions: `[batch, length]` int.

  Returns:
    `[batch, length, heads, head_dim]` in x's dtype (rotated in float32).
  """
  half = x.shape[-1] // 2
  inv_timescale = jnp.asarray(max_timescale ** (-np.arange(half, dtype=np.float32) / half))
  angles = positions.astype(jnp.float32)[..., None, None] * inv_timescale  # [b, l, 1, d/2]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def repeat_kv_heads(x: Array, num_heads: int) -> Array:
  """`[batch, length, kv_heads, d]` -> `[batch, length, num_heads, d]`: each key/value
  head serves num_heads / kv_heads consecutive query heads (grouped-query attention)."""
  return jnp.repeat(x, num_heads // x.shape[-2], axis=-2) if x.shape[-2] != num_heads else x


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
      an `AttentionMask`. Keys and values may have fewer heads than queries (a divisor of
      theirs: grouped-query attention).
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
  mask = dense_mask(mask) if implementation != "blockwise" else mask
  if implementation == "fused":  # takes fewer key/value heads as they are
    return jax.nn.dot_product_attention(query, key, value, mask=mask,
                                        implementation=fused_backend(query.dtype))
  key, value = (repeat_kv_heads(t, query.shape[-2]) for t in (key, value))
  if implementation == "blockwise":
    return blockwise_attention.blockwise_attention(query, key, value, mask,
                                                   block_size=block_size)

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
    num_kv_heads: key/value heads, a divisor of num_heads (1: multi-query attention, Shazeer
      2019; between: grouped-query attention, Ainslie et al. 2023); 0 = num_heads. The
      decoding cache holds only these.
    use_bias: biases on the four projections (GPT-2 has them; the paper does not).
    qk_norm: "" or a norm kind ("layer", "rms") applied to each head's queries and keys
      before the dot product (Dehghani et al., 2023): bounds the logits' growth.
    norm_epsilon: that norm's epsilon.
    rope: rotate queries and keys by their positions (`rotary_embedding`); self-attention
      only, and `positions` must be given.
  """

  num_heads: int
  head_dim: int
  num_kv_heads: int = 0
  use_bias: bool = False
  qk_norm: str = ""
  norm_epsilon: float = 1e-6
  rope: bool = False
  fused_qkv: bool = False
  dropout_rate: float = 0.0
  implementation: str = "reference"
  block_size: int = 512
  decode: bool = False
  dtype: jnp.dtype = jnp.float32
  kernel_init: Callable = nn.initializers.xavier_uniform()

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Optional[Array] = None,
               mask: Optional[Mask] = None, deterministic: bool = True,
               positions: Optional[Array] = None) -> Array:
    """Args:
      inputs_q: `[batch, q_length, d_model]`.
      inputs_kv: `[batch, kv_length, d_model]`, or None for self-attention.
      mask: bool `[batch, 1 or heads, q_length, kv_length]` or an `AttentionMask`.
      deterministic: disables dropout.
      positions: `[batch, q_length]` int positions of the queries (= of the keys in
        self-attention); used by rotary positions only.

    Returns:
      `[batch, q_length, d_model]`.
    """
    self_attention = inputs_kv is None
    if self_attention:
      inputs_kv = inputs_q
    d_model = inputs_q.shape[-1]
    # No biases by default, as in the paper's W^Q, W^K, W^V, W^O. A key bias is worse than
    # useless: softmax ignores it (it adds the same q.b to every logit of a row), so its
    # gradient is rounding noise that Adam would scale up into random updates. GPT-2 has
    # them (use_bias), so its weights load as they are.
    dense = lambda features, name: nn.DenseGeneral(  # noqa: E731
        features, axis=-1, use_bias=self.use_bias, dtype=self.dtype,
        param_dtype=jnp.float32, kernel_init=self.kernel_init, name=name)
    heads = (self.num_heads, self.head_dim)
    kv_heads = (self.num_kv_heads or self.num_heads, self.head_dim)
    if self.fused_qkv and kv_heads != heads:
      raise ValueError("fused_qkv needs as many key/value heads as query heads")
    if self.fused_qkv and self_attention:
      query, key, value = jnp.moveaxis(dense((3,) + heads, "qkv")(inputs_q), -3, 0)
    elif self.fused_qkv:
      query = dense(heads, "query")(inputs_q)
      key, value = jnp.moveaxis(dense((2,) + heads, "kv")(inputs_kv), -3, 0)
    else:
      query = dense(heads, "query")(inputs_q)
      key = dense(kv_heads, "key")(inputs_kv)
      value = dense(kv_heads, "value")(inputs_kv)
    if self.qk_norm:
      query = make_norm(self.qk_norm, self.norm_epsilon, self.dtype, False, "query_norm")(query)
      key = make_norm(self.qk_norm, self.norm_epsilon, self.dtype, False, "key_norm")(key)
    if self.rope and self_attention:
      if positions is None:
        raise ValueError("rotary positions need the query positions")
      query, key = rotary_embedding(query, positions), rotary_embedding(key, positions)

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
    return nn.DenseGeneral(d_model, axis=(-2, -1), use_bias=self.use_bias, dtype=self.dtype,
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
