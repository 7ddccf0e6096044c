"""The small pieces of the Transformer: layer norm, feed-forward, embeddings, positions."""

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# "sinusoidal_halves": the same sinusoids with every sin before every cos (tensor2tensor's and
# Marian's layout); rope: models/attention.py.
POSITIONAL_ENCODINGS = ("sinusoidal", "learned", "rope", "sinusoidal_halves", "none")
NORMS = ("layer", "rms")
# Biases of the dense layers: "ffn" (as the paper: feed-forward and layer norm only), "all"
# (attention projections too, as GPT-2), "none" (no bias anywhere, as PaLM and LLaMA).
BIASES = ("ffn", "all", "none")


def relu_squared(x: Array) -> Array:
  """max(0, x)^2 (So et al., 2021, "Primer")."""
  return jnp.square(nn.relu(x))


def gelu_exact(x: Array) -> Array:
  """x * Phi(x) with the normal CDF written with erf (PyTorch's default GELU)."""
  return nn.gelu(x, approximate=False)


# The feed-forward non-linearity. "gelu" is GELU's tanh approximation (as in BERT and
# GPT-2); the gated ones multiply act(x W_gate) by x W1 (Shazeer, 2020, "GLU Variants").
ACTIVATIONS = {"relu": nn.relu, "gelu": nn.gelu, "gelu_exact": gelu_exact, "silu": nn.silu,
               "relu2": relu_squared}
GATED_ACTIVATIONS = {"swiglu": nn.silu, "geglu": nn.gelu}
DROPOUT_RNGS = ("hash", "threefry")


def _fmix32(h: Array) -> Array:
  """MurmurHash3's 32-bit finalizer: a bijection on uint32 in which every input bit
  flips each output bit with probability about 1/2."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def keep_mask(key: Array, shape, rate: float, rng: str = "hash") -> Array:
  """Bool `shape`, each entry True with probability 1 - rate, independently.

  "threefry" draws one uniform per entry from JAX's threefry generator. "hash" draws two
  32-bit seeds from `key` and hashes each entry's index with them: fmix32(fmix32(i ^ s0)
  + s1). XLA:CPU computes threefry at about 20 ns per number, which made the dropout
  masks 13% of a base model's train step; the hash costs about 0.5 ns (BENCHMARKS.md,
  "Dropout masks"). Both are pure functions of the key: runs stay reproducible.
  """
  if rng == "threefry":
    return jax.random.bernoulli(key, 1.0 - rate, shape)
  if rng != "hash":
    raise ValueError(f"unknown dropout rng {rng!r}; expected one of {DROPOUT_RNGS}")
  size = int(np.prod(shape))
  if size >= 2**32:
    raise ValueError(f"a dropout mask of {size} entries is too large for 32-bit indices")
  seeds = jax.random.bits(key, (2,), jnp.uint32)
  index = jax.lax.iota(jnp.uint32, size).reshape(shape)
  bits = _fmix32(_fmix32(index ^ seeds[0]) + seeds[1])
  return bits >= jnp.uint32(min(round(rate * 2**32), 2**32 - 1))


class Dropout(nn.Module):
  """Inverted dropout (Srivastava et al., 2014): zero each entry with probability `rate`
  and scale the rest by 1 / (1 - rate), so the expected activation is unchanged. Masks
  come from `keep_mask` with the "dropout" rng."""

  rate: float
  rng: str = "hash"

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    if deterministic or self.rate == 0.0:
      return x
    keep = keep_mask(self.make_rng("dropout"), x.shape, self.rate, self.rng)
    return jnp.where(keep, x / (1.0 - self.rate), 0.0).astype(x.dtype)


def _materialize(x: Array) -> Array:
  """x, passed through a loop XLA can neither unroll nor fuse across: one array in memory
  that the ops after it read, instead of each recomputing the elementwise ops before it.
  The trip count comes from x itself (1, or 0 where its first entry is NaN) so that XLA
  cannot unroll the loop; both counts return x unchanged."""
  trips = 1 - jnp.isnan(x.reshape(-1)[0]).astype(jnp.int32)
  # The body must use x, or JAX hoists the unchanged carry out of the loop: `+ float(i) * 0`
  # (XLA does not fold x * 0 for floats) leaves every value as it is (-0 becomes +0).
  x, _ = jax.lax.while_loop(lambda c: c[1] < trips,
                            lambda c: (c[0] + c[1].astype(c[0].dtype) * 0, c[1] + 1),
                            (x, jnp.int32(0)))
  return x


@jax.custom_vjp
def fusion_barrier(x: Array) -> Array:
  """The identity, which XLA computes once, forward and backward, for all its users.

  In a residual stack each block's input is an elementwise expression of the blocks
  below it (post-norm: the layer norms of their sums), and its gradient one of the
  blocks above (the layer norms' backward and the residual sums). XLA:CPU's fusion
  duplicates cheap elementwise producers into every consumer instead of writing them to
  memory, and here it recomputes those chains inside each block's fusions: in a 6-block
  pre-norm model the weight-gradient operands read 9, 18, ... arrays, 9 more a block, and
  the work grows with the square of the depth. A loop between the blocks, in the forward
  and the backward pass, stops it (`_materialize`). It costs a loop each way per call:
  for the CPU, where fusion duplicates; on a GPU a loop's predicate goes to the host.
  """
  return _materialize(x)


def _barrier_forward(x: Array):
  return _materialize(x), None


def _barrier_backward(_, g: Array):
  return (_materialize(g),)


fusion_barrier.defvjp(_barrier_forward, _barrier_backward)


class LayerNorm(nn.Module):
  """Layer normalization (Ba et al., 2016): (x - mean) / sqrt(var + eps) * scale + bias.

  Statistics are computed in float32 whatever the compute dtype, because bfloat16's 8-bit
  mantissa loses the variance of activations with a large mean.
  """

  epsilon: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """`[..., features]` -> `[..., features]`."""
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    return y.astype(self.dtype)


class RMSNorm(nn.Module):
  """Root-mean-square normalization (Zhang & Sennrich, 2019): x / sqrt(mean(x^2) + eps) *
  scale. Layer norm without the mean subtraction and the bias: one statistic instead of
  two, and in their experiments the centring made no difference. Float32 statistics, as
  in LayerNorm."""

  epsilon: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """`[..., features]` -> `[..., features]`."""
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    ms = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    return (x32 * jax.lax.rsqrt(ms + self.epsilon) * scale).astype(self.dtype)


def make_norm(kind: str, epsilon: float, dtype, use_bias: bool = True, name=None) -> nn.Module:
  """The normalization layer `kind` ("layer" or "rms"; RMSNorm never has a bias)."""
  if kind == "layer":
    return LayerNorm(epsilon, dtype, use_bias, name=name)
  if kind == "rms":
    return RMSNorm(epsilon, dtype, name=name)
  raise ValueError(f"unknown norm {kind!r}; expected one of {NORMS}")


class FeedForward(nn.Module):
  """Position-wise feed-forward network (section 3.3): FFN(x) = max(0, x W1 + b1) W2 + b2.

  With a gated activation ("swiglu", "geglu"): FFN(x) = (act(x W_gate) * x W1) W2, a third
  `[d_model, d_ff]` matrix (`wi_gate`); keep parameters equal by using 2/3 of the d_ff.
  """

  d_ff: int
  dropout_rate: float = 0.0
  activation: str = "relu"
  dtype: jnp.dtype = jnp.float32
  kernel_init: Callable = nn.initializers.xavier_uniform()
  dropout_rng: str = "hash"  # see keep_mask
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    """`[batch, length, d_model]` -> `[batch, length, d_model]`."""
    dense = lambda features, name: nn.Dense(  # noqa: E731
        features, use_bias=self.use_bias, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=self.kernel_init, bias_init=nn.initializers.zeros, name=name)
    h = dense(self.d_ff, "wi")(x)
    if self.activation in GATED_ACTIVATIONS:
      h = GATED_ACTIVATIONS[self.activation](dense(self.d_ff, "wi_gate")(x)) * h
    else:
      h = ACTIVATIONS[self.activation](h)
    # Dropout on the hidden activations, as in tensor2tensor's "relu_dropout".
    h = Dropout(self.dropout_rate, self.dropout_rng)(h, deterministic=deterministic)
    return dense(x.shape[-1], "wo")(h)


class ConvModule(nn.Module):
  """A convolution sublayer over positions (the Conformer's, Gulati et al., 2020, without
  its batch norm; GELU where it has Swish):

      h = (x W_a) * sigmoid(x W_b)               pointwise, gated (GLU)
      c_t = sum_{|o| <= k//2} w_o * h_{t+o}       depthwise: one k-tap filter per channel
      y = GELU(c) W_out                           pointwise

  The window is centred (it sees k//2 positions either side), so it suits encoders only.
  Padding (`valid` False) and positions of another packed segment (`segments`) contribute
  nothing: a row's output does not depend on what it is packed or padded with. It gives
  each position an ordered view of its neighbours, which attention must otherwise learn
  from positional encodings (BENCHMARKS.md, "SST-2").
  """

  kernel_size: int
  dtype: jnp.dtype = jnp.float32
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: Array, valid: Array, segments=None) -> Array:
    """x: `[batch, length, d_model]`; valid: `[batch, length]` bool; segments: `[batch,
    length]` int packed-segment ids, or None. Returns `[batch, length, d_model]`."""
    d_model, k = x.shape[-1], self.kernel_size
    dense = lambda features, name: nn.Dense(  # noqa: E731
        features, use_bias=self.use_bias, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=nn.initializers.xavier_uniform(), bias_init=nn.initializers.zeros,
        name=name)
    a, b = jnp.split(dense(2 * d_model, "wi")(x), 2, axis=-1)
    h = a * jax.nn.sigmoid(b) * valid[..., None].astype(x.dtype)
    kernel = self.param("depthwise", nn.initializers.normal(1.0 / k), (k, d_model), jnp.float32)
    kernel = kernel.astype(self.dtype)
    half, length = k // 2, x.shape[1]
    padded = jnp.pad(h, ((0, 0), (half, half), (0, 0)))
    if segments is not None:
      padded_segments = jnp.pad(segments, ((0, 0), (half, half)), constant_values=-1)
    out = jnp.zeros_like(h)
    for tap in range(k):  # tap o = tap - half reads position t + o
      neighbour = jax.lax.slice_in_dim(padded, tap, tap + length, axis=1)
      if segments is not None:
        same = jax.lax.slice_in_dim(padded_segments, tap, tap + length, axis=1) == segments
        neighbour = neighbour * same[..., None].astype(x.dtype)
      out = out + kernel[tap] * neighbour
    return dense(d_model, "wo")(nn.gelu(out))


class Embed(nn.Module):
  """Token embedding; `attend` reuses the same matrix as the output projection (tying).

  Initialised with stddev d_model^-1/2 so that, after the paper's multiplication by
  sqrt(d_model), embeddings have unit variance, and tied logits start at a sane scale;
  `init_std` > 0 sets another stddev (Flax's SST-2 example draws from N(0, 0.1)).
  """

  vocab_size: int
  features: int
  dtype: jnp.dtype = jnp.float32
  init_std: float = 0.0

  def setup(self):
    self.embedding = self.param(
        "embedding", nn.initializers.normal(stddev=self.init_std or self.features**-0.5),
        (self.vocab_size, self.features), jnp.float32)

  def __call__(self, tokens: Array) -> Array:
    """`[batch, length]` int -> `[batch, length, features]`."""
    return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

  def attend(self, x: Array) -> Array:
    """`[batch, length, features]` -> float32 logits `[batch, length, vocab_size]`."""
    return jnp.einsum("bld,vd->blv", x, self.embedding.astype(x.dtype),
                      preferred_element_type=jnp.float32)


def sinusoidal_encoding(positions: Array, features: int, max_timescale: float = 1e4,
                        halves: bool = False) -> Array:
  """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)).

  Args:
    positions: `[batch, length]` int positions (they restart at 0 in each packed segment).
    features: d_model (even).
    halves: put all the sines first, then all the cosines (feature i and d/2 + i).

  Returns:
    `[batch, length, features]` float32, sin and cos interleaved as in the paper.
  """
  i = np.arange(features // 2, dtype=np.float32)
  inv_timescale = jnp.asarray(max_timescale ** (-2.0 * i / features))
  angles = positions.astype(jnp.float32)[..., None] * inv_timescale
  enc = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-2 if halves else -1)
  return enc.reshape(positions.shape + (features,))


class PositionalEncoding(nn.Module):
  """Adds position information (section 3.5): fixed sinusoids or a learned table."""

  kind: str = "sinusoidal"
  max_length: int = 512
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, positions: Array) -> Array:
    """x: `[batch, length, d]`; positions: `[batch, length]` int -> x + PE(positions)."""
    features = x.shape[-1]
    if self.kind in ("sinusoidal", "sinusoidal_halves"):
      enc = sinusoidal_encoding(positions, features, halves=self.kind == "sinusoidal_halves")
    elif self.kind in ("rope", "none"):  # rope acts inside attention, on queries and keys;
      return x  # "none": order only from what reads in order (model.encoder_lstm, causality)
    elif self.kind == "learned":
      # At the scale of the sinusoids (variance 1/2) and of the embeddings they are added
      # to (unit variance after the sqrt(d_model) factor). A GPT-style 0.02 would leave
      # the positions invisible next to the tokens for hundreds of steps.
      table = self.param("table", nn.initializers.normal(stddev=0.5**0.5),
                         (self.max_length, features), jnp.float32)
      enc = jnp.take(table, positions, axis=0)
    else:
      raise ValueError(f"unknown positional encoding {self.kind!r}; "
                       f"expected one of {POSITIONAL_ENCODINGS}")
    return x + enc.astype(x.dtype)
