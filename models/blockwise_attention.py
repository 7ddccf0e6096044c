"""Memory-efficient attention: softmax(Q K^T / sqrt(d_k)) V one block at a time.

The reference path materialises the `[batch, heads, q_length, kv_length]` logits, and its
backward pass keeps them, so memory grows with the square of the sequence length. Here the
queries are split into blocks of `block_q` and the keys/values into blocks of `block_k`;
for each query block the keys are visited block by block with an *online softmax*
(Milakov & Gimelshein 2018; the FlashAttention recurrence, Dao et al. 2022):

    m' = max(m, rowmax S_j)              S_j = Q_i K_j^T / sqrt(d_k), masked
    l' = l e^(m - m') + rowsum e^(S_j - m')
    o' = o e^(m - m') + e^(S_j - m') V_j
    output = o / l

so at most one `[block_q, block_k]` tile of logits exists per (batch, head). The backward
pass is written out too (`jax.custom_vjp`): it keeps only the output and the row
statistics m and l (linear in length) and recomputes each tile's probabilities
P = e^(S - m) / l, then

    dV_j += P^T dO_i    dP = dO_i V_j^T    dS = P (dP - rowsum(dO_i * O_i))
    dQ_i += dS K_j / sqrt(d_k)    dK_j += dS^T Q_i / sqrt(d_k)

With a causal mask, tiles that lie entirely above the diagonal are skipped in both passes,
which halves the work at long lengths.

Masked logits get the same finite MASK_VALUE as the reference, so every query with at
least one visible key gets exactly the reference's result, and a query that sees no key
at all gets the reference's uniform average too (keys added to pad the length to whole
tiles get an even lower logit, so they never count). The one difference: with a causal
mask, such a query (a padding position) averages only the tiles it visited. Nothing reads
those positions, and the tests compare every real position and every gradient.
"""

import functools
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from models.masks import MASK_VALUE, AttentionMask, Mask

Array = jax.Array

# The logit of keys added to fill the last tile: below MASK_VALUE, so e^(logit - m) is 0
# even in a row where every real key is masked (m = MASK_VALUE there).
PADDED_KEY_VALUE = 2 * MASK_VALUE


def _pad_axis(x: Array, axis: int, size: int, value=0) -> Array:
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


def _block_mask(mask: Optional[Mask], q_start, block_q: int, k_start,
                block_k: int) -> Optional[Array]:
  """The `[batch, 1 or heads, block_q, block_k]` tile of `mask` (None: no mask)."""
  if mask is None:
    return None
  if isinstance(mask, AttentionMask):
    return mask.block(q_start, block_q, k_start, block_k)
  # A dense mask: slice the query and key axes where they are not broadcast (size 1).
  starts = (0, 0, q_start if mask.shape[2] > 1 else 0, k_start if mask.shape[3] > 1 else 0)
  sizes = mask.shape[:2] + (block_q if mask.shape[2] > 1 else 1,
                            block_k if mask.shape[3] > 1 else 1)
  return jax.lax.dynamic_slice(mask, starts, sizes)


def _pad_mask(mask: Optional[Mask], q_length: int, kv_length: int) -> Optional[Mask]:
  """`mask` over `q_length` x `kv_length` positions (the added keys get
  PADDED_KEY_VALUE in `_logits`, whatever the mask says of them)."""
  if mask is None:
    return None
  if isinstance(mask, AttentionMask):
    segments = lambda x, n: None if x is None else _pad_axis(x, 1, n)  # noqa: E731
    return AttentionMask(_pad_axis(mask.query_valid, 1, q_length, False),
                         _pad_axis(mask.key_valid, 1, kv_length, False),
                         segments(mask.query_segments, q_length),
                         segments(mask.key_segments, kv_length), mask.causal)
  mask = jnp.asarray(mask)
  if mask.shape[2] > 1:
    mask = _pad_axis(mask, 2, q_length, False)
  return _pad_axis(mask, 3, kv_length, False) if mask.shape[3] > 1 else mask


def _key_blocks(mask, i: Array, block_q: int, block_k: int, num_k: int):
  """How many key blocks query block i visits: all, or up to the diagonal when causal."""
  if isinstance(mask, AttentionMask) and mask.causal:
    return jnp.minimum(num_k, ((i + 1) * block_q - 1) // block_k + 1)
  return num_k


def _first_query_block(mask, j: Array, block_q: int, block_k: int):
  """The first query block that sees key block j (causal: the block holding query j*bk)."""
  if isinstance(mask, AttentionMask) and mask.causal:
    return (j * block_k) // block_q
  return 0


def _logits(q_i: Array, k_j: Array, mask_ij: Optional[Array], scale: float, k_start,
            kv_length: int) -> Array:
  """Masked float32 logits of one tile: `[batch, heads, block_q, block_k]`; keys at
  `kv_length` and beyond are padding added here."""
  s = jnp.einsum("bqhd,bkhd->bhqk", q_i, k_j, preferred_element_type=jnp.float32) * scale
  if mask_ij is not None:
    s = jnp.where(mask_ij, s, MASK_VALUE)
  if kv_length % k_j.shape[1]:
    s = jnp.where(k_start + jnp.arange(k_j.shape[1]) < kv_length, s, PADDED_KEY_VALUE)
  return s


def _forward(query: Array, key: Array, value: Array, mask: Optional[Mask], block_q: int,
             block_k: int, kv_length: int) -> Tuple[Array, Array, Array]:
  """Output `[batch, q, heads, head_dim]` and the row statistics m, l `[batch, heads, q]`."""
  batch, q_length, heads, head_dim = query.shape
  num_q, num_k = q_length // block_q, key.shape[1] // block_k
  scale = 1.0 / math.sqrt(head_dim)

  def query_block(i):
    q_i = jax.lax.dynamic_slice_in_dim(query, i * block_q, block_q, axis=1)

    def visit(j, carry):
      m, l, o = carry
      k_j = jax.lax.dynamic_slice_in_dim(key, j * block_k, block_k, axis=1)
      v_j = jax.lax.dynamic_slice_in_dim(value, j * block_k, block_k, axis=1)
      s = _logits(q_i, k_j, _block_mask(mask, i * block_q, block_q, j * block_k, block_k),
                  scale, j * block_k, kv_length)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      p = jnp.exp(s - m_new[..., None])
      correction = jnp.exp(m - m_new)
      l = l * correction + jnp.sum(p, axis=-1)
      o = o * correction[..., None] + jnp.einsum(
          "bhqk,bkhd->bhqd", p.astype(value.dtype), v_j, preferred_element_type=jnp.float32)
      return m_new, l, o

    # m starts at MASK_VALUE rather than -inf, so no step computes inf - inf.
    init = (jnp.full((batch, heads, block_q), MASK_VALUE, jnp.float32),
            jnp.zeros((batch, heads, block_q), jnp.float32),
            jnp.zeros((batch, heads, block_q, head_dim), jnp.float32))
    m, l, o = jax.lax.fori_loop(0, _key_blocks(mask, i, block_q, block_k, num_k), visit,
                                init)
    # l >= 1: the largest logit of the row contributes e^0.
    return jnp.einsum("bhqd->bqhd", o / l[..., None]).astype(value.dtype), m, l

  out, m, l = jax.lax.map(query_block, jnp.arange(num_q))
  # [num_q, batch, block_q, ...] -> [batch, num_q * block_q, ...]
  out = jnp.moveaxis(out, 0, 1).reshape(batch, q_length, heads, head_dim)
  stat = lambda x: jnp.moveaxis(x, 0, 2).reshape(batch, heads, q_length)  # noqa: E731
  return out, stat(m), stat(l)


def _backward(query, key, value, mask, out, m, l, d_out, block_q: int, block_k: int,
              kv_length: int):
  """Gradients with respect to query, key and value, tile by tile (module docstring)."""
  batch, q_length, heads, head_dim = query.shape
  num_q, num_k = q_length // block_q, key.shape[1] // block_k
  scale = 1.0 / math.sqrt(head_dim)
  # rowsum(dO * O) = rowsum(dP * P): the softmax Jacobian's correction term, per query.
  delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))
  d_out = d_out.astype(value.dtype)

  def key_block(j, grads):
    d_query, d_key, d_value = grads
    k_j = jax.lax.dynamic_slice_in_dim(key, j * block_k, block_k, axis=1)
    v_j = jax.lax.dynamic_slice_in_dim(value, j * block_k, block_k, axis=1)

    def visit(i, carry):
      d_query, dk_j, dv_j = carry
      rows = lambda x, axis: jax.lax.dynamic_slice_in_dim(  # noqa: E731
          x, i * block_q, block_q, axis=axis)
      q_i, do_i = rows(query, 1), rows(d_out, 1)
      mask_ij = _block_mask(mask, i * block_q, block_q, j * block_k, block_k)
      s = _logits(q_i, k_j, mask_ij, scale, j * block_k, kv_length)
      p = jnp.exp(s - rows(m, 2)[..., None]) / rows(l, 2)[..., None]
      dv_j += jnp.einsum("bhqk,bqhd->bkhd", p.astype(value.dtype), do_i,
                         preferred_element_type=jnp.float32)
      dp = jnp.einsum("bqhd,bkhd->bhqk", do_i, v_j, preferred_element_type=jnp.float32)
      ds = p * (dp - rows(delta, 2)[..., None])
      if mask_ij is not None:  # a masked logit is a constant: no gradient reaches q or k
        ds = jnp.where(mask_ij, ds, 0.0)
      ds = ds.astype(query.dtype)
      dk_j += jnp.einsum("bhqk,bqhd->bkhd", ds, q_i, preferred_element_type=jnp.float32)
      dq_i = jnp.einsum("bhqk,bkhd->bqhd", ds, k_j, preferred_element_type=jnp.float32)
      d_query = jax.lax.dynamic_update_slice_in_dim(
          d_query, rows(d_query, 1) + dq_i * scale, i * block_q, axis=1)
      return d_query, dk_j, dv_j

    tile = jnp.zeros((batch, block_k, heads, head_dim), jnp.float32)
    d_query, dk_j, dv_j = jax.lax.fori_loop(
        _first_query_block(mask, j, block_q, block_k), num_q, visit, (d_query, tile, tile))
    d_key = jax.lax.dynamic_update_slice_in_dim(d_key, dk_j * scale, j * block_k, axis=1)
    d_value = jax.lax.dynamic_update_slice_in_dim(d_value, dv_j, j * block_k, axis=1)
    return d_query, d_key, d_value

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)  # noqa: E731
  d_query, d_key, d_value = jax.lax.fori_loop(
      0, num_k, key_block, (zeros(query), zeros(key), zeros(value)))
  return d_query.astype(query.dtype), d_key.astype(key.dtype), d_value.astype(value.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention(query, key, value, mask, block_q, block_k, kv_length):
  return _forward(query, key, value, mask, block_q, block_k, kv_length)[0]


def _attention_fwd(query, key, value, mask, block_q, block_k, kv_length):
  out, m, l = _forward(query, key, value, mask, block_q, block_k, kv_length)
  return out, (query, key, value, mask, out, m, l)


def _attention_bwd(block_q, block_k, kv_length, residuals, d_out):
  query, key, value, mask, out, m, l = residuals
  grads = _backward(query, key, value, mask, out, m, l, d_out, block_q, block_k, kv_length)
  # The mask is boolean/integer data: its cotangent is empty (float0).
  return grads + (jax.tree.map(
      lambda x: jnp.zeros(x.shape, jax.dtypes.float0), mask),)


_attention.defvjp(_attention_fwd, _attention_bwd)


def blockwise_attention(query: Array, key: Array, value: Array,
                        mask: Optional[Mask] = None, *, block_size: int = 512) -> Array:
  """softmax(Q K^T / sqrt(d_k)) V with memory linear in the sequence length.

  Args:
    query: `[batch, q_length, heads, head_dim]`.
    key, value: `[batch, kv_length, heads, head_dim]`.
    mask: an `AttentionMask` (expanded one tile at a time; causal tiles above the diagonal
      are skipped) or a bool array broadcastable to `[batch, heads, q_length, kv_length]`
      (sliced per tile; the array itself is quadratic in length).
    block_size: queries and keys per tile (shorter sequences use one tile). Lengths that
      are not a multiple are padded with keys nobody sees.

  Returns:
    `[batch, q_length, heads, head_dim]` in the dtype of `value`.
  """
  if mask is not None and not isinstance(mask, AttentionMask):
    mask = jnp.asarray(mask)
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
  q_length, kv_length = query.shape[1], key.shape[1]
  block_q, block_k = min(block_size, q_length), min(block_size, kv_length)
  padded_q = -(-q_length // block_q) * block_q
  padded_k = -(-kv_length // block_k) * block_k
  if (padded_q, padded_k) != (q_length, kv_length):
    mask = _pad_mask(mask, padded_q, padded_k)
    query = _pad_axis(query, 1, padded_q)
    key, value = _pad_axis(key, 1, padded_k), _pad_axis(value, 1, padded_k)
  out = _attention(query, key, value, mask, block_q, block_k, kv_length)
  return out[:, :q_length]
