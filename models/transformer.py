"""Encoder and decoder blocks and the three model families built from them.

- `EncoderDecoder`: the paper's translation model (section 3.1, figure 1).
- `DecoderOnly`: a causal language model (the decoder without cross-attention).
- `Classifier`: the encoder with a pooled classification head.

Every family takes int32 token batches (0 = padding) and, for packed batches, per-token
positions and segment ids (0 = padding); masks are built here from those, as
`masks.AttentionMask`s (vectors, never a `[length, length]` matrix unless an attention
path asks for one).

A stack of N identical blocks runs as a Python loop (`block_0` ... `block_{N-1}`) or, with
`scan_layers`, as one `nn.scan` over a single compiled block whose parameters are stacked
on a leading axis of size N (`layers/block/...`); `unstack_layers` and `stack_layers`
convert between the two layouts. `remat` recomputes each block's activations in the
backward pass instead of keeping them (see `REMAT_POLICIES`). `grad_barrier` makes the
loop write each block's input, and its gradient, to memory once (`layers.fusion_barrier`),
where XLA:CPU's fusion would recompute them for every use; a scanned stack needs no
barrier (each layer is one iteration of a loop already), nor does decoding (no gradient).
"""

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import attention, masks
from models import layers
from models import recurrent
from models.layers import Dropout, Embed, FeedForward, PositionalEncoding

Array = jax.Array

NORM_PLACEMENTS = ("post", "pre")
POOLINGS = ("mean", "cls", "attention", "max")
# What the backward pass keeps of each block: everything ("none"), only its input ("full":
# the block is recomputed), or the outputs of its weight matmuls ("matmuls": projections
# and feed-forward layers are kept; attention scores, softmax, norms and activations are
# recomputed).
REMAT_POLICIES = ("none", "full", "matmuls")
# Whether a loop of blocks passes each block's input through layers.fusion_barrier:
# "auto" where the default backend is the CPU (the fusion it undoes is XLA:CPU's).
GRAD_BARRIERS = ("auto", "on", "off")
SCANNED = "layers"  # the module name of a scanned stack of blocks
# The name, in the "perturbations" collection, of the point where an Encoder or Decoder
# adds a perturbation to its embeddings in training (adversarial training:
# training/steps.adversarial_gradient). Without that collection the model ignores it.
EMBEDDING_PERTURBATION = "embeddings"
# Ids that stand for no token of a pretrained vocabulary (padding, unknown) where
# config.mask_special_logits says so (see pretrained/__init__.py).
SPECIAL_IDS = (0, 2)


class InvalidField(ValueError):
  """A TransformerConfig field whose value cannot work: `field`, `value`, `allowed`."""

  def __init__(self, field: str, value: Any, allowed: str):
    super().__init__(f"{field}={value!r} is invalid: {allowed}")
    self.field, self.value, self.allowed = field, value, allowed


# Fields that must be one of a few names.
CHOICES = {"norm_placement": NORM_PLACEMENTS, "positional_encoding": layers.POSITIONAL_ENCODINGS,
           "activation": tuple(layers.ACTIVATIONS) + tuple(layers.GATED_ACTIVATIONS),
           "pooling": POOLINGS, "norm": layers.NORMS, "biases": layers.BIASES,
           "attention_impl": attention.IMPLEMENTATIONS, "remat": REMAT_POLICIES,
           "dropout_rng": layers.DROPOUT_RNGS, "grad_barrier": GRAD_BARRIERS}
MINIMUMS = {"d_model": 1, "d_ff": 1, "num_heads": 1, "head_dim": 0, "num_kv_heads": 0,
            "num_encoder_layers": 0, "num_decoder_layers": 0, "attention_block_size": 1,
            "conv_kernel": 0, "lstm_layers": 1, "head_hidden": 0, "embed_dim": 0,
            "pool_hidden": 0}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyper-parameters of one model. The run config's `config.model` group holds the
  architecture fields under these names (`from_fields`); the task supplies the rest (the
  vocabulary sizes it built, the lengths of its data, the compute settings)."""

  vocab_size: int  # source (or only) vocabulary size
  output_vocab_size: int = 0  # target vocabulary; 0 = same as vocab_size
  num_classes: int = 0  # classifier outputs
  d_model: int = 512
  d_ff: int = 2048
  num_heads: int = 8
  head_dim: int = 64  # per-head size d_k = d_v; 0 = d_model // num_heads
  num_kv_heads: int = 0  # key/value heads (grouped-query attention); 0 = num_heads
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  dropout_rate: float = 0.1  # residual, embedding and feed-forward dropout
  dropout_rng: str = "hash"  # how dropout masks are drawn (layers.keep_mask)
  attention_dropout_rate: float = 0.0
  norm_placement: str = "post"  # "post" (paper): LN(x + f(x)); "pre": x + f(LN(x))
  positional_encoding: str = "sinusoidal"
  max_length: int = 512  # longest position (learned table size, decoding cache length)
  fused_qkv: bool = False
  share_embeddings: bool = True  # one embedding for source and target
  tie_output: bool = True  # logits use the target embedding matrix
  scale_embeddings: bool = True  # multiply embeddings by sqrt(d_model) (paper; GPT-2 does not)
  logits_bias: bool = False  # a learned bias per output id added to the logits (Marian's)
  mask_special_logits: bool = False  # ids 0 (padding) and 2 (unknown) are never predicted
  pooling: str = "mean"
  activation: str = "relu"  # layers.ACTIVATIONS or a gated one (layers.GATED_ACTIVATIONS)
  norm: str = "layer"  # "layer" (paper) or "rms"
  layer_norm_epsilon: float = 1e-6
  qk_norm: bool = False  # normalise each head's queries and keys (with `norm`)
  biases: str = "ffn"  # layers.BIASES: which dense layers have biases
  attention_impl: str = "reference"
  attention_block_size: int = 512  # tile length of the blockwise attention path
  remat: str = "none"  # see REMAT_POLICIES
  scan_layers: bool = False  # nn.scan over the blocks of each stack (parameters stacked)
  grad_barrier: str = "auto"  # GRAD_BARRIERS: each block's input and gradient written once
  dtype: Any = jnp.float32
  decode: bool = False  # incremental decoding with a key/value cache
  conv_kernel: int = 0  # >0: a convolution sublayer of this width in each encoder block
  encoder_lstm: bool = False  # a bidirectional LSTM reads the encoder's embeddings first
  lstm_layers: int = 1  # with encoder_lstm: how many bidirectional LSTMs, each reading the last
  head_hidden: int = 0  # classifier: a tanh layer of this many units before the logits (0: none)
  embed_dim: int = 0  # classifier: embeddings of this width, projected to d_model; 0 = d_model
  pool_hidden: int = 0  # attention pooling: units of its tanh scoring layer; 0 = d_model
  embed_init_std: float = 0.0  # stddev of the embeddings' initial values; 0 = width^-1/2

  def __post_init__(self):
    self.check()
    if not self.head_dim:
      object.__setattr__(self, "head_dim", self.d_model // self.num_heads)

  def check(self) -> None:
    """Raises InvalidField for the first field whose value cannot work."""
    for field, allowed in CHOICES.items():
      if getattr(self, field) not in allowed:
        raise InvalidField(field, getattr(self, field),
                           f"expected one of {', '.join(map(str, allowed))}")
    for field, minimum in MINIMUMS.items():
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidField(field, value, f"expected an integer >= {minimum}")
    for field in ("dropout_rate", "attention_dropout_rate"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise InvalidField(field, value, "expected a number in [0, 1)")
    std = self.embed_init_std
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not 0 <= std < math.inf:
      raise InvalidField("embed_init_std", std, "expected a number >= 0 (0: width^-1/2)")
    epsilon = self.layer_norm_epsilon
    if (isinstance(epsilon, bool) or not isinstance(epsilon, (int, float))
        or not 0 < epsilon < math.inf):
      raise InvalidField("layer_norm_epsilon", epsilon, "expected a number > 0")
    for field in ("scan_layers", "fused_qkv", "share_embeddings", "tie_output", "qk_norm",
                  "scale_embeddings", "logits_bias", "mask_special_logits", "encoder_lstm"):
      if not isinstance(getattr(self, field), bool):
        raise InvalidField(field, getattr(self, field), "expected True or False")
    if self.head_dim == 0 and self.d_model % self.num_heads:
      raise InvalidField("num_heads", self.num_heads,
                         f"it must divide d_model={self.d_model} (or set head_dim explicitly)")
    if self.positional_encoding.startswith("sinusoidal") and self.d_model % 2:
      raise InvalidField("d_model", self.d_model, "sinusoidal positions need an even d_model")
    num_heads = self.num_heads
    head_dim = self.head_dim or self.d_model // num_heads
    if self.num_kv_heads and num_heads % self.num_kv_heads:
      raise InvalidField("num_kv_heads", self.num_kv_heads,
                         f"it must divide num_heads={num_heads} (0 = num_heads)")
    if self.fused_qkv and self.num_kv_heads not in (0, num_heads):
      raise InvalidField("fused_qkv", True, f"one q/k/v projection needs num_kv_heads equal "
                         f"to num_heads={num_heads}; set fused_qkv=False")
    if self.conv_kernel and self.conv_kernel % 2 == 0:
      raise InvalidField("conv_kernel", self.conv_kernel,
                         "expected 0 (no convolution) or an odd width (a centred window)")
    if self.conv_kernel and not self.num_encoder_layers:
      raise InvalidField("conv_kernel", self.conv_kernel,
                         "the convolution sublayer is part of encoder blocks (its window "
                         "looks ahead), and this model has no encoder blocks; set conv_kernel=0")
    if self.encoder_lstm and not (self.num_encoder_layers or self.num_classes):
      raise InvalidField("encoder_lstm", True,
                         "the bidirectional LSTM reads an encoder's embeddings (its backward "
                         "reading looks ahead), and this model has no encoder; set "
                         "encoder_lstm=False")
    if self.lstm_layers != 1 and not self.encoder_lstm:
      raise InvalidField("lstm_layers", self.lstm_layers,
                         "it stacks the LSTMs of encoder_lstm=True, and this model has none; "
                         "set encoder_lstm=True or lstm_layers=1")
    if self.head_hidden and not self.num_classes:
      raise InvalidField("head_hidden", self.head_hidden,
                         "it is a layer of the classifier's head, and this model is not a "
                         "classifier; set head_hidden=0")
    if self.pool_hidden and self.pooling != "attention":
      raise InvalidField("pool_hidden", self.pool_hidden,
                         f"it sizes attention pooling's scoring layer, and pooling="
                         f"{self.pooling!r}; set pool_hidden=0 or pooling='attention'")
    if self.embed_dim and self.embed_dim != self.d_model and not self.num_classes:
      raise InvalidField("embed_dim", self.embed_dim,
                         "embeddings narrower or wider than d_model are implemented for "
                         "encoder-only classifiers (num_classes > 0); set embed_dim=0")
    if self.encoder_lstm and self.d_model % 2:
      raise InvalidField("d_model", self.d_model, "encoder_lstm needs an even d_model (two "
                         "directions of d_model / 2 units)")
    if self.positional_encoding == "rope" and head_dim % 2:
      raise InvalidField("head_dim", head_dim, "rotary positions need an even head_dim")
    if self.attention_impl != "reference" and self.attention_dropout_rate > 0:
      raise InvalidField("attention_impl", self.attention_impl,
                         f"the {self.attention_impl} path has no attention dropout; set "
                         f"attention_dropout_rate=0 or use attention_impl='reference'")

  @classmethod
  def from_fields(cls, fields: Mapping[str, Any], **given: Any) -> "TransformerConfig":
    """The entries of `fields` (e.g. a config group) that name a field here, then `given`,
    which win where both name one."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in fields.items() if k in names}, **given})

  @property
  def target_vocab_size(self) -> int:
    return self.output_vocab_size or self.vocab_size


def shift_right(tokens: Array, segmentation: Optional[Array] = None) -> Array:
  """Decoder inputs: targets moved one step right, with 0 (the start symbol) in front.

  With packing, each segment starts with 0 so no token leaks from the previous segment.
  `[batch, length]` -> `[batch, length]`.
  """
  shifted = jnp.pad(tokens, ((0, 0), (1, 0)))[:, :-1]
  if segmentation is not None:
    previous = jnp.pad(segmentation, ((0, 0), (1, 0)))[:, :-1]
    shifted = jnp.where(segmentation != previous, 0, shifted)
  return shifted


def embed_width(cfg: TransformerConfig) -> int:
  """The embeddings' width: `embed_dim`, or d_model."""
  return cfg.embed_dim or cfg.d_model


def embed_scale(cfg: TransformerConfig) -> Array:
  """The factor on the embeddings: sqrt(their width; d_model in section 3.4), or 1."""
  return jnp.sqrt(jnp.float32(embed_width(cfg) if cfg.scale_embeddings else 1)).astype(cfg.dtype)


def default_positions(tokens: Array) -> Array:
  return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


def _attention(cfg: TransformerConfig, name: str, decode: bool = False,
               self_attention: bool = True):
  return attention.MultiHeadAttention(
      num_heads=cfg.num_heads, head_dim=cfg.head_dim, num_kv_heads=cfg.num_kv_heads,
      use_bias=cfg.biases == "all", qk_norm=cfg.norm if cfg.qk_norm else "",
      norm_epsilon=cfg.layer_norm_epsilon,
      rope=self_attention and cfg.positional_encoding == "rope", fused_qkv=cfg.fused_qkv,
      dropout_rate=cfg.attention_dropout_rate, implementation=cfg.attention_impl,
      block_size=cfg.attention_block_size, decode=decode, dtype=cfg.dtype, name=name)


def _feed_forward(cfg: TransformerConfig):
  return FeedForward(cfg.d_ff, cfg.dropout_rate, cfg.activation, cfg.dtype,
                     dropout_rng=cfg.dropout_rng, use_bias=cfg.biases != "none", name="ffn")


def _norm(cfg: TransformerConfig, name: str) -> nn.Module:
  return layers.make_norm(cfg.norm, cfg.layer_norm_epsilon, cfg.dtype,
                          use_bias=cfg.biases != "none", name=name)


def _sublayer(cfg: TransformerConfig, x: Array, fn: Callable[[Array], Array], name: str,
              deterministic: bool) -> Array:
  """Residual connection around `fn`, with dropout and layer norm (section 5.4).

  post-norm (paper): LN(x + Dropout(fn(x)));  pre-norm: x + Dropout(fn(LN(x))).
  """
  norm = _norm(cfg, f"{name}_norm")
  pre = cfg.norm_placement == "pre"
  y = fn(norm(x) if pre else x)
  y = Dropout(cfg.dropout_rate, cfg.dropout_rng)(y, deterministic=deterministic)
  return x + y if pre else norm(x + y)


class EncoderBlock(nn.Module):
  """Self-attention then feed-forward, each wrapped in a residual sublayer; with
  `conv_kernel`, a convolution sublayer (layers.ConvModule) before the self-attention."""

  config: TransformerConfig

  @nn.compact
  def __call__(self, x: Array, mask: Optional[masks.Mask], positions: Array,
               deterministic: bool) -> Array:
    """x: `[batch, length, d_model]`; mask: an `AttentionMask` or `[batch, 1, length,
    length]` bool; positions: `[batch, length]` int (for rotary positions)."""
    cfg = self.config
    if cfg.conv_kernel:
      if not isinstance(mask, masks.AttentionMask):
        raise ValueError("a convolution sublayer needs the mask as an AttentionMask")
      conv = layers.ConvModule(cfg.conv_kernel, cfg.dtype, use_bias=cfg.biases != "none",
                               name="conv")
      x = _sublayer(cfg, x, lambda h: conv(h, mask.query_valid, mask.query_segments),
                    "conv", deterministic)
    x = _sublayer(cfg, x, lambda h: _attention(cfg, "self_attention")(
        h, mask=mask, deterministic=deterministic, positions=positions),
                  "self_attention", deterministic)
    return _sublayer(cfg, x, lambda h: _feed_forward(cfg)(h, deterministic=deterministic),
                     "ffn", deterministic)


class DecoderBlock(nn.Module):
  """Masked self-attention, cross-attention over the encoder output (if any), feed-forward."""

  config: TransformerConfig
  cross_attention: bool = True

  @nn.compact
  def __call__(self, y: Array, self_mask: Optional[masks.Mask],
               encoded: Optional[Array], cross_mask: Optional[masks.Mask],
               positions: Array, deterministic: bool) -> Array:
    """y: `[batch, tgt_length, d_model]`; encoded: `[batch, src_length, d_model]`;
    positions: `[batch, tgt_length]` int (for rotary positions)."""
    cfg = self.config
    y = _sublayer(cfg, y, lambda h: _attention(cfg, "self_attention", decode=cfg.decode)(
        h, mask=self_mask, deterministic=deterministic, positions=positions),
                  "self_attention", deterministic)
    if self.cross_attention:
      y = _sublayer(cfg, y, lambda h: _attention(cfg, "cross_attention",
                                                 self_attention=False)(
          h, encoded, mask=cross_mask, deterministic=deterministic),
                    "cross_attention", deterministic)
    return _sublayer(cfg, y, lambda h: _feed_forward(cfg)(h, deterministic=deterministic),
                     "ffn", deterministic)


class _ScanStep(nn.Module):
  """One block in the form nn.scan runs: `(x, *broadcast args) -> (x, None)`."""

  block: Any  # the block class (possibly wrapped by nn.remat)
  config: TransformerConfig
  deterministic: bool
  cross_attention: Optional[bool] = None  # DecoderBlock's attribute, when it is one

  @nn.compact
  def __call__(self, x: Array, *args):
    attrs = {} if self.cross_attention is None else {"cross_attention": self.cross_attention}
    return self.block(self.config, name="block", **attrs)(x, *args, self.deterministic), None


def _block_stack(cfg: TransformerConfig, block: Any, num_layers: int, x: Array, *args,
                 deterministic: bool, **attrs) -> Array:
  """Applies `num_layers` blocks `block(cfg, **attrs)(x, *args, deterministic)` to x.

  Called inside a compact method: the blocks become children of the caller, named
  `block_{i}`, or one scanned `layers` module (see the module docstring).
  """
  if cfg.remat not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {cfg.remat!r}; expected one of {REMAT_POLICIES}")
  if not num_layers:  # no blocks (a classifier reading with its LSTM alone): no parameters
    return x
  if cfg.remat != "none":
    policy = (None if cfg.remat == "full"
              else jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    # `deterministic` (a Python bool) is static; its index counts `self` as 0.
    block = nn.remat(block, policy=policy, static_argnums=(len(args) + 2,))
  if not cfg.scan_layers:
    barrier = not cfg.decode and (cfg.grad_barrier == "on" or (
        cfg.grad_barrier == "auto" and jax.default_backend() == "cpu"))
    for i in range(num_layers):
      if barrier:
        x = layers.fusion_barrier(x)
      x = block(cfg, name=f"block_{i}", **attrs)(x, *args, deterministic)
    return x
  scanned = nn.scan(_ScanStep, variable_axes={True: 0}, split_rngs={True: True},
                    in_axes=(nn.broadcast,) * len(args), length=num_layers)
  x, _ = scanned(block, cfg, deterministic, attrs.get("cross_attention"), name=SCANNED)(
      x, *args)
  return x


def unstack_layers(tree: Any) -> Any:
  """Scanned layout -> loop layout: `layers/block/w[N, ...]` becomes `block_{i}/w[...]`.

  Works on any variable tree (params, caches); everything else is left as it is.
  """
  if not isinstance(tree, Mapping):
    return tree
  out = {}
  for name, child in tree.items():
    if name == SCANNED and isinstance(child, Mapping) and set(child) == {"block"}:
      num_layers = jax.tree.leaves(child)[0].shape[0]
      for i in range(num_layers):
        out[f"block_{i}"] = jax.tree.map(lambda x, i=i: x[i], child["block"])
    else:
      out[name] = unstack_layers(child)
  return out


def stack_layers(tree: Any) -> Any:
  """Loop layout -> scanned layout, the inverse of `unstack_layers`."""
  if not isinstance(tree, Mapping):
    return tree
  blocks = sorted((int(k[len("block_"):]), k) for k in tree
                  if k.startswith("block_") and k[len("block_"):].isdigit())
  out = {k: stack_layers(v) for k, v in tree.items() if not k.startswith("block_")}
  if blocks:
    if [i for i, _ in blocks] != list(range(len(blocks))):
      raise ValueError(f"blocks {[k for _, k in blocks]} are not numbered 0..N-1")
    out[SCANNED] = {"block": jax.tree.map(lambda *xs: jnp.stack(xs),
                                          *[tree[k] for _, k in blocks])}
  return out


class Encoder(nn.Module):
  """Embedding * sqrt(d_model) + positions (-> `lstm_layers` bidirectional LSTMs, with
  `encoder_lstm`) -> N encoder blocks.

  Attributes:
    config: model hyper-parameters.
    embed: a shared embedding module, or None to own one.
    cls_token: prepend a learned classification vector at position 0.
  """

  config: TransformerConfig
  embed: Optional[Embed] = None
  cls_token: bool = False

  @nn.compact
  def __call__(self, inputs: Array, positions: Optional[Array] = None,
               segmentation: Optional[Array] = None, deterministic: bool = True) -> Array:
    """inputs: `[batch, length]` int -> `[batch, length (+1 with cls_token), d_model]`."""
    cfg = self.config
    embed = self.embed if self.embed is not None else Embed(
        cfg.vocab_size, embed_width(cfg), cfg.dtype, cfg.embed_init_std, name="embed")
    positions = default_positions(inputs) if positions is None else positions
    x = embed(inputs) * embed_scale(cfg)
    if not deterministic:  # a no-op unless a "perturbations" collection is passed
      x = self.perturb(EMBEDDING_PERTURBATION, x)
    if x.shape[-1] != cfg.d_model and not cfg.encoder_lstm:
      # Embeddings of another width (embed_dim), projected to d_model as ALBERT (Lan et al.
      # 2020) factorises them; an LSTM's input layer reads any width and is that projection.
      x = nn.Dense(cfg.d_model, use_bias=False, dtype=cfg.dtype, param_dtype=jnp.float32,
                   kernel_init=nn.initializers.xavier_uniform(), name="embed_proj")(x)
    valid = inputs > 0
    if self.cls_token:
      cls = self.param("cls", nn.initializers.normal(1.0), (x.shape[-1],), jnp.float32)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), x[:, :1].shape), x], axis=1)
      positions = jnp.pad(positions + 1, ((0, 0), (1, 0)))
      valid = jnp.pad(valid, ((0, 0), (1, 0)), constant_values=True)
      if segmentation is not None:
        raise ValueError("a classification token does not combine with packed inputs")
    x = PositionalEncoding(cfg.positional_encoding, cfg.max_length, cfg.dtype,
                           name="positions")(x, positions)
    x = Dropout(cfg.dropout_rate, cfg.dropout_rng)(x, deterministic=deterministic)
    for i in range(cfg.lstm_layers if cfg.encoder_lstm else 0):
      # A stack of bidirectional LSTMs, each reading the states of the one below (both
      # of its directions), with dropout between them.
      x = recurrent.BiLSTM(cfg.d_model, cfg.dtype, use_bias=cfg.biases != "none",
                           name="lstm" if i == 0 else f"lstm_{i + 1}")(x, valid, segmentation)
      x = Dropout(cfg.dropout_rate, cfg.dropout_rng)(x, deterministic=deterministic)
    mask = masks.AttentionMask(valid, valid, segmentation, segmentation)
    x = _block_stack(cfg, EncoderBlock, cfg.num_encoder_layers, x, mask, positions,
                     deterministic=deterministic)
    if cfg.norm_placement == "pre":
      x = _norm(cfg, "final_norm")(x)
    return x


class Decoder(nn.Module):
  """Embedding + positions -> N decoder blocks -> float32 logits over the target vocabulary.

  In decode mode (`config.decode`) it takes one token per call and keeps the position and
  every layer's keys/values in the "cache" collection.
  """

  config: TransformerConfig
  embed: Optional[Embed] = None
  cross_attention: bool = True

  @nn.compact
  def __call__(self, decoder_inputs: Array, self_mask: Optional[Array],
               encoded: Optional[Array] = None, cross_mask: Optional[Array] = None,
               positions: Optional[Array] = None, deterministic: bool = True) -> Array:
    """decoder_inputs: `[batch, length]` int (length 1 when decoding) ->
    `[batch, length, target_vocab_size]` float32 logits."""
    cfg = self.config
    embed = self.embed if self.embed is not None else Embed(
        cfg.target_vocab_size, cfg.d_model, cfg.dtype, cfg.embed_init_std, name="embed")
    if cfg.decode:
      is_init = not self.has_variable("cache", "position")
      position = self.variable("cache", "position", lambda: jnp.array(0, jnp.int32))
      if positions is None:
        positions = jnp.broadcast_to(position.value, decoder_inputs.shape)
        if is_init:  # initialising the cache with a full-length input
          positions = default_positions(decoder_inputs)
      if not is_init:
        position.value = position.value + 1
    elif positions is None:
      positions = default_positions(decoder_inputs)
    y = embed(decoder_inputs) * embed_scale(cfg)
    if not deterministic:
      y = self.perturb(EMBEDDING_PERTURBATION, y)
    y = PositionalEncoding(cfg.positional_encoding, cfg.max_length, cfg.dtype,
                           name="positions")(y, positions)
    y = Dropout(cfg.dropout_rate, cfg.dropout_rng)(y, deterministic=deterministic)
    y = _block_stack(cfg, DecoderBlock, cfg.num_decoder_layers, y, self_mask, encoded,
                     cross_mask, positions, deterministic=deterministic,
                     cross_attention=self.cross_attention)
    if cfg.norm_placement == "pre":
      y = _norm(cfg, "final_norm")(y)
    if cfg.tie_output:
      logits = embed.attend(y)
    else:
      logits = nn.Dense(cfg.target_vocab_size, use_bias=cfg.biases != "none",
                        dtype=jnp.float32, param_dtype=jnp.float32,
                        kernel_init=nn.initializers.xavier_uniform(), name="logits")(
                            y.astype(jnp.float32))
    if cfg.logits_bias:
      logits = logits + self.param("logits_bias", nn.initializers.zeros,
                                   (cfg.target_vocab_size,), jnp.float32)
    if cfg.mask_special_logits:  # a constant, not a parameter: training cannot move it
      special = jnp.isin(jnp.arange(cfg.target_vocab_size), jnp.array(SPECIAL_IDS))
      logits = jnp.where(special, masks.MASK_VALUE, logits)
    return logits


def _decoder_self_mask(cfg: TransformerConfig, targets: Array,
                       segmentation: Optional[Array]) -> Optional[masks.AttentionMask]:
  """Causal & target padding & same segment; None when decoding (the cache masks)."""
  if cfg.decode:
    return None
  valid = targets > 0
  return masks.AttentionMask(valid, valid, segmentation, segmentation, causal=True)


class EncoderDecoder(nn.Module):
  """The translation Transformer: encode the source once, decode the target."""

  config: TransformerConfig

  def setup(self):
    cfg = self.config
    if cfg.share_embeddings and cfg.target_vocab_size != cfg.vocab_size:
      raise ValueError(f"shared embeddings need one vocabulary; got vocab_size="
                       f"{cfg.vocab_size}, output_vocab_size={cfg.output_vocab_size}")
    shared = (Embed(cfg.vocab_size, cfg.d_model, cfg.dtype, cfg.embed_init_std,
                    name="shared_embed")
              if cfg.share_embeddings else None)
    self.encoder = Encoder(cfg, embed=shared)
    self.decoder = Decoder(cfg, embed=shared, cross_attention=True)

  def encode(self, inputs: Array, inputs_positions: Optional[Array] = None,
             inputs_segmentation: Optional[Array] = None,
             deterministic: bool = True) -> Array:
    """`[batch, src_length]` -> `[batch, src_length, d_model]`."""
    return self.encoder(inputs, inputs_positions, inputs_segmentation, deterministic)

  def decode(self, encoded: Array, inputs: Array, targets: Array,
             targets_positions: Optional[Array] = None,
             inputs_segmentation: Optional[Array] = None,
             targets_segmentation: Optional[Array] = None,
             deterministic: bool = True) -> Array:
    """Logits for `targets` given the encoding of `inputs`.

    Training: `targets` `[batch, tgt_length]` are shifted right here (teacher forcing).
    Decoding: `targets` is the previous token `[batch, 1]`, fed as is.
    Returns `[batch, tgt_length, target_vocab_size]` float32.
    """
    cfg = self.config
    if cfg.decode:
      decoder_inputs = targets
      cross_mask = masks.AttentionMask(jnp.ones(targets.shape, bool), inputs > 0)
    else:
      decoder_inputs = shift_right(targets, targets_segmentation)
      cross_mask = masks.AttentionMask(targets > 0, inputs > 0, targets_segmentation,
                                           inputs_segmentation)
    self_mask = _decoder_self_mask(cfg, targets, targets_segmentation)
    return self.decoder(decoder_inputs, self_mask, encoded, cross_mask, targets_positions,
                        deterministic)

  def __call__(self, inputs: Array, targets: Array,
               inputs_positions: Optional[Array] = None,
               targets_positions: Optional[Array] = None,
               inputs_segmentation: Optional[Array] = None,
               targets_segmentation: Optional[Array] = None,
               deterministic: bool = True) -> Array:
    """Teacher-forced logits `[batch, tgt_length, target_vocab_size]` float32."""
    encoded = self.encode(inputs, inputs_positions, inputs_segmentation, deterministic)
    return self.decode(encoded, inputs, targets, targets_positions, inputs_segmentation,
                       targets_segmentation, deterministic)


class DecoderOnly(nn.Module):
  """A causal language model: logits at position t predict token t from tokens < t."""

  config: TransformerConfig

  @nn.compact
  def __call__(self, inputs: Array, positions: Optional[Array] = None,
               segmentation: Optional[Array] = None, deterministic: bool = True) -> Array:
    """inputs: `[batch, length]` (one token when decoding) ->
    `[batch, length, vocab_size]` float32 logits."""
    cfg = self.config
    decoder_inputs = inputs if cfg.decode else shift_right(inputs, segmentation)
    self_mask = _decoder_self_mask(cfg, inputs, segmentation)
    return Decoder(cfg, cross_attention=False, name="decoder")(
        decoder_inputs, self_mask, positions=positions, deterministic=deterministic)


def attention_pooling_weights(cfg: TransformerConfig, x: Array, valid: Array) -> Array:
  """`[batch, length]` float32 weights of "attention" pooling, summing to 1 over each
  row's real tokens (0 at padding). x: `[batch, length, d_model]` float32. Called inside
  the Classifier (its parameters "pool_hidden", "pool_score")."""
  hidden = nn.Dense(cfg.pool_hidden or cfg.d_model, use_bias=cfg.biases != "none",
                    dtype=jnp.float32, param_dtype=jnp.float32,
                    kernel_init=nn.initializers.xavier_uniform(), name="pool_hidden")(x)
  scores = nn.Dense(1, use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32,
                    kernel_init=nn.initializers.xavier_uniform(), name="pool_score")(
                        jnp.tanh(hidden))[..., 0]
  return jax.nn.softmax(jnp.where(valid, scores, masks.MASK_VALUE), axis=-1)


class Classifier(nn.Module):
  """Encoder, then pooling, then the head: with `head_hidden`, a tanh layer of that many
  units and dropout (Flax's SST-2 example has one), then the logits. Pooling: the mean
  over real tokens, a learned [CLS] vector, "attention" (additive attention over the
  positions, Bahdanau et al. 2015 as Lin et al. 2017 pool with it: one score per position
  from a tanh layer of `pool_hidden` units, softmax over the real tokens, the weighted
  sum), or "max" (each feature's maximum over the real tokens, Collobert & Weston 2008;
  Conneau et al. 2017's best BiLSTM pooling)."""

  config: TransformerConfig

  @nn.compact
  def __call__(self, inputs: Array, positions: Optional[Array] = None,
               deterministic: bool = True, token_logits: bool = False,
               at: Optional[Array] = None) -> Array:
    """inputs: `[batch, length]` -> `[batch, num_classes]` float32 logits.

    With `token_logits`, `[batch, length, vocab_size]` float32 logits of the token at each
    position instead, through the encoder's embedding transposed (masked-token
    pre-training: the parameters stay those of the classifier, the head unused); with
    `at` (`[batch, k]` int positions) only those, `[batch, k, vocab_size]`.
    """
    cfg = self.config
    use_cls = cfg.pooling == "cls"
    encoder = Encoder(cfg, cls_token=use_cls, name="encoder")
    x = encoder(inputs, positions, None, deterministic)
    if token_logits:
      x = x[:, 1:] if use_cls else x
      if at is not None:
        x = jnp.take_along_axis(x, at[..., None], axis=1)
      embedding = encoder.variables["params"]["embed"]["embedding"]
      if embedding.shape[-1] != x.shape[-1]:  # embed_dim: back to the embeddings' width
        x = nn.Dense(embedding.shape[-1], use_bias=False, dtype=x.dtype,
                     param_dtype=jnp.float32, kernel_init=nn.initializers.xavier_uniform(),
                     name="token_proj")(x)
      return jnp.einsum("bld,vd->blv", x, embedding.astype(x.dtype),
                        preferred_element_type=jnp.float32)
    x = x.astype(jnp.float32)
    if use_cls:
      pooled = x[:, 0]
    elif cfg.pooling == "mean":
      weights = (inputs > 0).astype(jnp.float32)[..., None]
      pooled = jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
    elif cfg.pooling == "attention":
      pooled = jnp.einsum("bl,bld->bd", attention_pooling_weights(cfg, x, inputs > 0), x)
    elif cfg.pooling == "max":  # each feature's largest value over the real tokens
      real = (inputs > 0)[..., None]
      pooled = jnp.max(jnp.where(real, x, -jnp.inf), axis=1)
      pooled = jnp.where(jnp.any(real, axis=1), pooled, 0.0)  # an empty row pools to 0
    else:
      raise ValueError(f"unknown pooling {cfg.pooling!r}; expected one of {POOLINGS}")
    pooled = Dropout(cfg.dropout_rate, cfg.dropout_rng)(pooled, deterministic=deterministic)
    if cfg.head_hidden:
      pooled = jnp.tanh(nn.Dense(cfg.head_hidden, use_bias=cfg.biases != "none",
                                 dtype=jnp.float32, param_dtype=jnp.float32,
                                 kernel_init=nn.initializers.xavier_uniform(),
                                 name="head_hidden")(pooled))
      pooled = Dropout(cfg.dropout_rate, cfg.dropout_rng)(pooled, deterministic=deterministic)
    return nn.Dense(cfg.num_classes, use_bias=cfg.biases != "none",
                    dtype=jnp.float32, param_dtype=jnp.float32,
                    kernel_init=nn.initializers.xavier_uniform(), name="head")(pooled)
