"""Attention masks: which keys each query may see (padding, causal, packed segments).

A mask is either a boolean array `[batch, heads or 1, q_length, kv_length]` (True where
attention is allowed) or an `AttentionMask`: the same masks described by per-position
vectors, which the blockwise path expands one block at a time and the other paths expand
in full (`AttentionMask.dense`). models/attention.py and models/blockwise_attention.py
both build on this module; it imports neither.
"""

from typing import Optional, Union

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array

# Masked logits get this large *finite* value instead of -inf: a row whose keys are all
# masked (a padding query) then gets a uniform distribution instead of NaN, and padding
# positions stay finite through every layer.
MASK_VALUE = -1e10


def padding_mask(query_tokens: Array, key_tokens: Array) -> Array:
  """Allows attention only between non-padding positions (token id 0 is padding).

  Args:
    query_tokens: `[batch, q_length]` int tokens (or any array where 0 marks padding).
    key_tokens: `[batch, kv_length]`.

  Returns:
    `[batch, 1, q_length, kv_length]` bool.
  """
  return (query_tokens > 0)[:, None, :, None] & (key_tokens > 0)[:, None, None, :]


def causal_mask(length: int) -> Array:
  """Position i may attend to positions j <= i. Returns `[1, 1, length, length]` bool."""
  idx = jnp.arange(length)
  return (idx[:, None] >= idx[None, :])[None, None]


def segment_mask(query_segments: Array, key_segments: Array) -> Array:
  """Packed sequences: attend only within the same segment id. `[batch, 1, q, kv]` bool."""
  return query_segments[:, None, :, None] == key_segments[:, None, None, :]


def combine_masks(*masks: Optional[Array]) -> Optional[Array]:
  """Logical AND of the given masks (broadcasting); None entries are skipped."""
  masks = [m for m in masks if m is not None]
  if not masks:
    return None
  out = masks[0]
  for m in masks[1:]:
    out = jnp.logical_and(out, m)
  return out


@flax.struct.dataclass
class AttentionMask:
  """Padding, segment and causal masks as vectors, so no `[q, kv]` matrix need exist.

  Query i may attend to key j when both are real tokens, they are in the same segment
  (when segments are given) and, for a causal mask, j <= i.

  Attributes:
    query_valid: `[batch, q_length]` bool, False at padding.
    key_valid: `[batch, kv_length]` bool.
    query_segments: `[batch, q_length]` int segment ids of packed rows, or None.
    key_segments: `[batch, kv_length]` int, or None.
    causal: key j is visible to query i only if j <= i (a static flag).
  """

  query_valid: Array
  key_valid: Array
  query_segments: Optional[Array] = None
  key_segments: Optional[Array] = None
  causal: bool = flax.struct.field(pytree_node=False, default=False)

  @property
  def shape(self):
    """The shape of the dense mask: `(batch, 1, q_length, kv_length)`."""
    return (self.query_valid.shape[0], 1, self.query_valid.shape[1],
            self.key_valid.shape[1])

  @property
  def dtype(self):
    """The dtype of the dense mask (bool)."""
    return jnp.dtype(bool)

  def block(self, q_start, q_size: int, k_start, k_size: int) -> Array:
    """The dense mask of queries [q_start, q_start + q_size) and keys [k_start, k_start +
    k_size): `[batch, 1, q_size, k_size]` bool. Starts may be traced values."""
    take = lambda x, start, size: jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)  # noqa: E731
    mask = (take(self.query_valid, q_start, q_size)[:, None, :, None]
            & take(self.key_valid, k_start, k_size)[:, None, None, :])
    if self.query_segments is not None:
      mask &= segment_mask(take(self.query_segments, q_start, q_size),
                           take(self.key_segments, k_start, k_size))
    if self.causal:
      q_index = q_start + jnp.arange(q_size)
      k_index = k_start + jnp.arange(k_size)
      mask &= (q_index[:, None] >= k_index[None, :])[None, None]
    return mask

  def dense(self) -> Array:
    """`[batch, 1, q_length, kv_length]` bool, equal to combining the mask functions above."""
    _, _, q_length, kv_length = self.shape
    return self.block(0, q_length, 0, kv_length)


Mask = Union[Array, AttentionMask]


def dense_mask(mask: Optional[Mask]) -> Optional[Array]:
  """A boolean mask array from either form (None stays None)."""
  return mask.dense() if isinstance(mask, AttentionMask) else mask
