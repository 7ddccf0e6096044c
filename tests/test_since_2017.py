"""The components that replaced the paper's since 2017, each against a NumPy statement of its
math: RMSNorm, rotary positions (and their relative-position property, through the cache
too), gated and squared-ReLU feed-forward layers, QK-norm, grouped-query attention, biases,
the z-loss and Muon; and the convolution sublayer (the Conformer's) of encoder blocks."""

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn
import numpy as np
import pytest

from models import attention, layers
from models.transformer import Classifier, DecoderOnly, Encoder, EncoderDecoder, InvalidField
from tasks import losses
from tests.model_fixtures import init_params, tiny_model_config
from tests.tiny_configs import tiny_config
from training import optimizers

RNG = np.random.default_rng(0)


def np_rms_norm(x, scale, eps):
  return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * scale


def np_rotate(x, position, base=1e4):
  """Rotates pair (x_i, x_{i+d/2}) by position * base^(-2i/d) (x: [..., d])."""
  half = x.shape[-1] // 2
  theta = position * base ** (-np.arange(half) / half)
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * np.cos(theta) - x2 * np.sin(theta),
                         x2 * np.cos(theta) + x1 * np.sin(theta)], axis=-1)


def np_silu(x):
  return x / (1 + np.exp(-x))


def np_gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


# ----------------------------------------------------------------------------- norms


def test_rms_norm_matches_numpy_and_has_no_bias():
  x = RNG.normal(3.0, 2.0, (2, 5, 8)).astype(np.float32)
  norm = layers.RMSNorm(epsilon=1e-6)
  params = norm.init(jax.random.PRNGKey(0), x)["params"]
  assert set(params) == {"scale"}
  scale = RNG.normal(1.0, 0.1, 8).astype(np.float32)
  out = norm.apply({"params": {"scale": scale}}, x)
  np.testing.assert_allclose(out, np_rms_norm(x, scale, 1e-6), rtol=1e-5)


def test_layer_norm_without_bias_has_only_a_scale():
  x = RNG.normal(size=(3, 8)).astype(np.float32)
  params = layers.LayerNorm(use_bias=False).init(jax.random.PRNGKey(0), x)["params"]
  assert set(params) == {"scale"}


# ----------------------------------------------------------------------------- feed-forward


@pytest.mark.parametrize("activation,gate", [("swiglu", np_silu), ("geglu", np_gelu_tanh)])
def test_gated_feed_forward_matches_numpy(activation, gate):
  x = RNG.normal(size=(2, 3, 8)).astype(np.float32)
  ffn = layers.FeedForward(d_ff=12, activation=activation, use_bias=False)
  params = init_params(ffn, x)
  assert set(params) == {"wi", "wi_gate", "wo"}
  assert all(set(p) == {"kernel"} for p in params.values())
  w1, wg, w2 = (np.asarray(params[n]["kernel"]) for n in ("wi", "wi_gate", "wo"))
  expected = (gate(x @ wg) * (x @ w1)) @ w2
  np.testing.assert_allclose(ffn.apply({"params": params}, x), expected, rtol=1e-4, atol=1e-5)


def test_squared_relu_feed_forward_matches_numpy():
  x = RNG.normal(size=(2, 3, 8)).astype(np.float32)
  ffn = layers.FeedForward(d_ff=12, activation="relu2")
  params = init_params(ffn, x)
  w1, b1 = np.asarray(params["wi"]["kernel"]), np.asarray(params["wi"]["bias"])
  w2, b2 = np.asarray(params["wo"]["kernel"]), np.asarray(params["wo"]["bias"])
  expected = np.maximum(x @ w1 + b1, 0) ** 2 @ w2 + b2
  np.testing.assert_allclose(ffn.apply({"params": params}, x), expected, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- rotary


def test_rotary_embedding_matches_numpy_and_keeps_norms():
  x = RNG.normal(size=(2, 5, 3, 8)).astype(np.float32)
  positions = RNG.integers(0, 100, (2, 5)).astype(np.int32)
  out = np.asarray(attention.rotary_embedding(jnp.asarray(x), jnp.asarray(positions)))
  expected = np.stack([np.stack([np_rotate(x[b, t], positions[b, t]) for t in range(5)])
                       for b in range(2)])
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1),
                             rtol=1e-5)


def test_rotary_scores_depend_only_on_the_offset():
  q, k = (jnp.asarray(RNG.normal(size=(1, 1, 1, 16)), jnp.float32) for _ in range(2))

  def score(m, n):
    rq = attention.rotary_embedding(q, jnp.array([[m]]))
    rk = attention.rotary_embedding(k, jnp.array([[n]]))
    return float(jnp.sum(rq * rk))
  for m, n in [(0, 0), (5, 2), (2, 5), (40, 1)]:
    for shift in (1, 17, 300):
      assert score(m + shift, n + shift) == pytest.approx(score(m, n), abs=1e-4)
  assert abs(score(5, 2) - score(2, 5)) > 1e-3  # and on the offset's sign: not symmetric


ROPE_LM = dict(positional_encoding="rope", norm_placement="pre", num_decoder_layers=1,
               max_length=64)


def test_rotary_language_model_sees_only_relative_positions():
  """Shifting every position by the same amount changes nothing with rotary positions, and
  does change the logits with sinusoidal ones (so the check can fail)."""
  tokens = jnp.array([[3, 4, 5, 6, 7], [9, 2, 2, 5, 1]])
  positions = jnp.broadcast_to(jnp.arange(5), tokens.shape)
  for fields, same in ((ROPE_LM, True), ({**ROPE_LM, "positional_encoding": "sinusoidal"},
                                         False)):
    model = DecoderOnly(tiny_model_config(**fields))
    params = init_params(model, tokens)
    a = model.apply({"params": params}, tokens, positions)
    b = model.apply({"params": params}, tokens, positions + 23)
    assert np.allclose(a, b, atol=1e-4) == same, fields["positional_encoding"]


def test_rotary_relative_positions_hold_through_the_cache():
  """Cached decoding from position 23 on gives the logits of decoding from position 0 with
  rotary positions, and not with sinusoidal ones (so the check can fail)."""
  tokens = jnp.array([[3, 4, 5, 6, 7], [9, 2, 2, 5, 1]])

  def cached_logits(cfg, params, offset):
    decoder = DecoderOnly(dataclasses.replace(cfg, decode=True))
    cache = jax.eval_shape(decoder.init, jax.random.PRNGKey(0), tokens)["cache"]
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache)
    out = []
    for t in range(tokens.shape[1]):
      logits, v = decoder.apply({"params": params, "cache": cache}, tokens[:, t:t + 1],
                                jnp.full((2, 1), t + offset), mutable=["cache"])
      cache = v["cache"]
      out.append(logits[:, 0])
    return jnp.stack(out, 1)
  # (cached == full forward with rotary positions: tests/test_decoding.py, "since_2017")
  for kind, same in (("rope", True), ("sinusoidal", False)):
    cfg = tiny_model_config(**{**ROPE_LM, "positional_encoding": kind})
    params = init_params(DecoderOnly(cfg), tokens)
    assert np.allclose(cached_logits(cfg, params, 23), cached_logits(cfg, params, 0),
                       atol=1e-4) == same, kind


# ----------------------------------------------------------------------------- attention


def mha_params(module, x):
  return init_params(module, x)


def np_attention(q, k, v, wo):
  """q: [l, h, d]; k, v: [l, h, d] -> [l, d_model], unmasked."""
  d = q.shape[-1]
  s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("hqk,khd->qhd", p, v).reshape(q.shape[0], -1) @ wo.reshape(-1, wo.shape[-1])


def test_qk_norm_and_biases_match_numpy():
  x = RNG.normal(size=(1, 5, 8)).astype(np.float32)
  mha = attention.MultiHeadAttention(num_heads=2, head_dim=4, qk_norm="rms", use_bias=True)
  p = mha_params(mha, x)
  assert {"bias", "kernel"} <= set(p["query"]) and "bias" in p["out"]
  proj = {n: np.einsum("ld,dhk->lhk", x[0], np.asarray(p[n]["kernel"])) + np.asarray(p[n]["bias"])
          for n in ("query", "key", "value")}
  q = np_rms_norm(proj["query"], np.asarray(p["query_norm"]["scale"]), 1e-6)
  k = np_rms_norm(proj["key"], np.asarray(p["key_norm"]["scale"]), 1e-6)
  expected = np_attention(q, k, proj["value"], np.asarray(p["out"]["kernel"]))
  expected = expected + np.asarray(p["out"]["bias"])
  np.testing.assert_allclose(mha.apply({"params": p}, x)[0], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("implementation", ["reference", "fused", "blockwise"])
def test_grouped_query_attention_is_multi_head_attention_with_shared_key_value_heads(
    implementation):
  """num_kv_heads=2 of 4 heads equals 4-head attention whose heads 2i and 2i+1 use the same
  key/value projection; num_kv_heads=num_heads is plain multi-head attention."""
  x = RNG.normal(size=(2, 6, 8)).astype(np.float32)
  gqa = attention.MultiHeadAttention(num_heads=4, head_dim=4, num_kv_heads=2,
                                     implementation=implementation, block_size=2)
  p = mha_params(gqa, x)
  assert p["key"]["kernel"].shape == (8, 2, 4) and p["query"]["kernel"].shape == (8, 4, 4)
  mha = attention.MultiHeadAttention(num_heads=4, head_dim=4)
  repeated = {**p, **{n: {"kernel": jnp.repeat(p[n]["kernel"], 2, axis=1)}
                      for n in ("key", "value")}}
  np.testing.assert_allclose(gqa.apply({"params": p}, x), mha.apply({"params": repeated}, x),
                             rtol=1e-5, atol=1e-5)
  same = attention.MultiHeadAttention(num_heads=4, head_dim=4, num_kv_heads=4)
  np.testing.assert_allclose(same.apply({"params": repeated}, x),
                             mha.apply({"params": repeated}, x), rtol=0, atol=0)


def test_grouped_query_decoding_cache_holds_only_the_key_value_heads():
  tokens = jnp.zeros((2, 10), jnp.int32)

  def cache_bytes(kv_heads):
    cfg = tiny_model_config(num_heads=4, head_dim=4, num_kv_heads=kv_heads, decode=True)
    cache = jax.eval_shape(DecoderOnly(cfg).init, jax.random.PRNGKey(0), tokens)["cache"]
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)
               if x.ndim == 4)
  assert cache_bytes(1) * 4 == cache_bytes(0) == cache_bytes(4)
  assert cache_bytes(2) * 2 == cache_bytes(0)


def test_no_biases_anywhere_and_attention_biases():
  src, tgt = jnp.ones((1, 4), jnp.int32), jnp.ones((1, 3), jnp.int32)

  def bias_paths(**fields):
    shapes = jax.eval_shape(EncoderDecoder(tiny_model_config(tie_output=False, **fields)).init,
                            jax.random.PRNGKey(0), src, tgt)["params"]
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(shapes)
            if p[-1].key == "bias"]
  assert bias_paths(biases="none") == []
  paper = bias_paths()
  assert paper and not any("attention']['query" in p for p in paper)
  assert any("self_attention']['query" in p for p in bias_paths(biases="all"))


@pytest.mark.parametrize("fields,field", [
    (dict(num_heads=4, head_dim=4, num_kv_heads=3), "num_kv_heads"),
    (dict(num_kv_heads=1, fused_qkv=True), "fused_qkv"),
    (dict(positional_encoding="rope", num_heads=2, head_dim=5), "head_dim"),
    (dict(norm="batch"), "norm"),
    (dict(biases="some"), "biases"),
    (dict(activation="swish"), "activation"),
    (dict(conv_kernel=4), "conv_kernel"),  # a centred window has an odd width
    (dict(conv_kernel=3, num_encoder_layers=0), "conv_kernel"),  # no encoder to put it in
])
def test_impossible_combinations_name_the_field(fields, field):
  with pytest.raises(InvalidField) as error:
    tiny_model_config(**fields)
  assert error.value.field == field


# ----------------------------------------------------------------------------- convolution


def np_sigmoid(x):
  return 1 / (1 + np.exp(-x))


def np_conv_module(x, valid, segments, p, k):
  """The convolution sublayer, one output at a time: GLU, a centred depthwise k-tap window
  over real tokens of the same segment, GELU (tanh form), the output projection."""
  d = x.shape[-1]
  ab = x @ np.asarray(p["wi"]["kernel"]) + np.asarray(p["wi"]["bias"])
  h = ab[..., :d] * np_sigmoid(ab[..., d:]) * valid[..., None]
  w = np.asarray(p["depthwise"])
  out = np.zeros_like(h)
  for b in range(x.shape[0]):
    for t in range(x.shape[1]):
      for o in range(-(k // 2), k // 2 + 1):
        s = t + o
        if 0 <= s < x.shape[1] and segments[b, s] == segments[b, t]:
          out[b, t] += w[o + k // 2] * h[b, s]
  return np_gelu_tanh(out) @ np.asarray(p["wo"]["kernel"]) + np.asarray(p["wo"]["bias"])


@pytest.mark.parametrize("k", [3, 5])
def test_convolution_sublayer_matches_numpy(k):
  x = RNG.normal(size=(2, 7, 8)).astype(np.float32)
  valid = np.array([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0, 0]], bool)
  segments = np.array([[1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 0, 0, 0]], np.int32)
  conv = layers.ConvModule(kernel_size=k)
  p = init_params(conv, x, valid, segments)
  assert p["depthwise"].shape == (k, 8) and p["wi"]["kernel"].shape == (8, 16)
  got = conv.apply({"params": p}, x, valid, segments)
  np.testing.assert_allclose(got, np_conv_module(x, valid, segments, p, k), rtol=1e-4,
                             atol=1e-5)
  # Without segments, a row is one sequence (compared at its real tokens).
  one = np.ones_like(segments)
  np.testing.assert_allclose(conv.apply({"params": p}, x, valid)[valid],
                             np_conv_module(x, valid, one, p, k)[valid], rtol=1e-4, atol=1e-5)


def test_encoder_with_convolutions_gives_packed_rows_their_separate_outputs():
  """Two sequences packed into one row (segments, positions restarting) get the outputs
  they get alone, each padded: neither the convolution's window nor attention crosses a
  segment or reads padding."""
  model = Encoder(tiny_model_config(conv_kernel=5))
  a, b = [3, 4, 5], [6, 7, 8, 9]
  alone = jnp.array([a + [0] * 5, b + [0] * 4])
  packed = jnp.array([a + b + [0]])
  positions = jnp.array([[0, 1, 2, 0, 1, 2, 3, 0]])
  segments = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0]])
  params = init_params(model, alone)
  assert "conv" in params["block_0"] and "conv_norm" in params["block_0"]
  out_alone = model.apply({"params": params}, alone)
  out_packed = model.apply({"params": params}, packed, positions, segments)
  np.testing.assert_allclose(out_packed[0, :3], out_alone[0, :3], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out_packed[0, 3:7], out_alone[1, :4], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- loss, optimizer


def test_z_loss_adds_the_squared_log_normaliser():
  logits = jnp.asarray(RNG.normal(2.0, 3.0, (2, 5, 7)), jnp.float32)
  targets = jnp.asarray(RNG.integers(0, 7, (2, 5)))
  weights = jnp.asarray(RNG.integers(0, 2, (2, 5)), jnp.float32)
  plain = losses.cross_entropy_sums(logits, targets, weights)
  with_z = losses.cross_entropy_sums(logits, targets, weights, z_loss=1e-2)
  lse = np.log(np.sum(np.exp(np.asarray(logits, np.float64)), -1))
  np.testing.assert_allclose(with_z["log_z_squared"], np.sum(lse**2 * weights), rtol=1e-5)
  np.testing.assert_allclose(with_z["loss"], plain["loss"] + 1e-2 * np.sum(lse**2 * weights),
                             rtol=1e-5)
  assert float(with_z["nll"]) == float(plain["nll"])


def test_muon_orthogonalises_hidden_matrices_and_leaves_the_rest_to_adam():
  config = tiny_config("generation")
  config.optim.optimizer = "muon"
  config.optim.max_grad_norm = 0.0
  config.optim.warmup_steps = 0
  config.optim.schedule = "constant"
  params = {"decoder": {"embed": {"embedding": jnp.ones((16, 8))},
                        "block_0": {"self_attention": {"query": {"kernel": jnp.ones((8, 2, 4))},
                                                       "out": {"kernel": jnp.ones((2, 4, 8))}},
                                    "ffn": {"wi": {"kernel": jnp.ones((8, 12)),
                                                   "bias": jnp.ones(12)}}}}}
  specs = optimizers.muon_dimension_numbers(params)
  assert specs["decoder"]["embed"]["embedding"] is None
  assert specs["decoder"]["block_0"]["ffn"]["wi"]["bias"] is None
  assert specs["decoder"]["block_0"]["self_attention"]["out"]["kernel"].output_axis == -1
  tx = optimizers.make_optimizer(config)
  # Gradients of a known spread of singular values (largest / smallest = 50), from an RNG
  # of this test's own: a Gaussian matrix drawn from the module's shared RNG depended on
  # the tests run before it in the same worker and could be so ill-conditioned that five
  # Newton-Schulz steps leave its smallest direction short (a ratio of 2.2 was seen).
  rng = np.random.default_rng(3)

  def conditioned(shape):
    rows, cols = shape[0], int(np.prod(shape[1:]))
    k = min(rows, cols)
    u, _ = np.linalg.qr(rng.normal(size=(rows, k)))
    v, _ = np.linalg.qr(rng.normal(size=(cols, k)))
    return jnp.asarray((u * np.geomspace(1.0, 0.02, k)) @ v.T, jnp.float32).reshape(shape)

  grads = jax.tree.map(lambda p: conditioned(p.shape) if p.ndim > 1
                       else jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  w = np.asarray(updates["decoder"]["block_0"]["ffn"]["wi"]["kernel"])
  singular = np.linalg.svd(w, compute_uv=False)
  assert singular.max() / singular.min() < 2.0  # Newton-Schulz: near-equal singular values
  g = np.asarray(grads["decoder"]["block_0"]["ffn"]["wi"]["kernel"])
  s = np.linalg.svd(g, compute_uv=False)
  assert s.max() / s.min() > singular.max() / singular.min()
  # The embedding takes Adam, with Nesterov momentum as optax.contrib.muon runs it: its first
  # step is -lr * (1 + b1 / (1 + b1)) * sign(g), whatever the gradient's size.
  emb = np.asarray(updates["decoder"]["embed"]["embedding"])
  b1 = config.optim.adam_b1
  np.testing.assert_allclose(-emb, config.optim.learning_rate * (1 + b1 / (1 + b1))
                             * np.sign(grads["decoder"]["embed"]["embedding"]), rtol=1e-3)
  q = np.asarray(updates["decoder"]["block_0"]["self_attention"]["query"]["kernel"])
  sq = np.linalg.svd(q.reshape(8, 8), compute_uv=False)  # d_model x (heads * head_dim)
  assert sq.max() / sq.min() < 2.0


def test_muon_updates_scanned_layers_as_it_updates_separate_ones():
  """With scan_layers the blocks' kernels are stacked on a leading axis: Muon must still
  orthogonalise each block's matrix alone (not the stack as one matrix), so the update of
  the stacked parameters, unstacked, is the update of the separate blocks."""
  import tasks  # pylint: disable=import-outside-toplevel
  from models import transformer  # pylint: disable=import-outside-toplevel
  config = tiny_config("generation", model=dict(num_decoder_layers=3, num_kv_heads=1,
                                                activation="swiglu", qk_norm=True),
                       optim=dict(optimizer="muon", warmup_steps=0, schedule="constant",
                                  max_grad_norm=0.0))
  task = tasks.get_task(config)
  params = task.init_params(jax.random.PRNGKey(0))
  batch = jax.tree.map(lambda x: jnp.asarray(x[0]),
                       task.eval_dataset("eval", batch_size=8, num_devices=1)[0])
  grads = jax.jit(jax.grad(lambda p: task.loss(p, batch, None, False)["loss"]))(params)
  tx = optimizers.make_optimizer(config)
  update = jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])  # one compile per layout
  separate = update(grads, params)
  stacked_params = transformer.stack_layers(params)
  stacked = update(transformer.stack_layers(grads), stacked_params)
  assert jax.tree.structure(stacked_params) != jax.tree.structure(params)
  kernel = stacked_params["decoder"]["layers"]["block"]["ffn"]["wi"]["kernel"]
  assert kernel.shape[0] == 3  # the blocks, stacked
  for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(separate),
                               jax.tree.leaves(transformer.unstack_layers(stacked))):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))


# ----------------------------------------------------------------------------- the models


def _calls(model, params, *args):
  """(module, output) of every norm, attention and feed-forward call in one forward pass."""
  seen = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and isinstance(
        context.module, (layers.LayerNorm, layers.RMSNorm, attention.MultiHeadAttention,
                         layers.FeedForward)):
      seen.append((context.module, args, out))
    return out
  with nn.intercept_methods(record):
    model.apply({"params": params}, *args)
  return seen


@pytest.mark.parametrize("family", ["encoder_decoder", "decoder_only", "classifier"])
@pytest.mark.parametrize("activation", ["swiglu", "geglu", "relu2"])
def test_every_layer_of_each_model_is_the_kind_its_config_names(family, activation):
  """norm, qk_norm and activation reach every layer of all three models (the NumPy tests
  above check each layer alone): every norm is an RMSNorm computing np_rms_norm of its
  input, every attention (self and cross) normalises its queries and keys, every
  feed-forward uses the configured activation; and the paper's settings give none of it."""
  src, tgt = jnp.asarray(RNG.integers(1, 16, (2, 5))), jnp.asarray(RNG.integers(1, 16, (2, 4)))
  model_class, args = {"encoder_decoder": (EncoderDecoder, (src, tgt)),
                       "decoder_only": (DecoderOnly, (tgt,)),
                       "classifier": (Classifier, (src,))}[family]
  modern = dict(norm="rms", qk_norm=True, activation=activation, norm_placement="pre")
  cfg = tiny_model_config(**modern)
  model = model_class(cfg)
  params = init_params(model, *args)
  calls = _calls(model, params, *args)
  norms = [(m, a, o) for m, a, o in calls if isinstance(m, (layers.LayerNorm, layers.RMSNorm))]
  blocks = cfg.num_encoder_layers * (family != "decoder_only") + cfg.num_decoder_layers * (
      family != "classifier")
  assert len(norms) >= 2 * blocks and all(isinstance(m, layers.RMSNorm) for m, _, _ in norms)
  for module, (x,), out in norms:
    scale = np.asarray(module.variables["params"]["scale"])
    np.testing.assert_allclose(out, np_rms_norm(np.asarray(x, np.float64), scale, 1e-6),
                               rtol=1e-4, atol=1e-5)
  attentions = [m for m, _, _ in calls if isinstance(m, attention.MultiHeadAttention)]
  feed_forwards = [m for m, _, _ in calls if isinstance(m, layers.FeedForward)]
  assert len(attentions) >= blocks and len(feed_forwards) == blocks
  assert {m.qk_norm for m in attentions} == {"rms"}
  assert {m.activation for m in feed_forwards} == {activation}
  paper = model_class(tiny_model_config())
  calls = _calls(paper, init_params(paper, *args), *args)
  assert not any(isinstance(m, layers.RMSNorm) for m, _, _ in calls)
  assert {m.qk_norm for m, _, _ in calls if isinstance(m, attention.MultiHeadAttention)} == {""}
  assert {m.activation for m, _, _ in calls if isinstance(m, layers.FeedForward)} == {"relu"}
