"""Rematerialization policies and scanned layers give the plain model's loss, gradients and
predictions; the two parameter layouts convert exactly; remat under scan saves memory."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tasks
from model_fixtures import init_params, tiny_model_config
from models import transformer
from models.transformer import Classifier, DecoderOnly, EncoderDecoder
from tests.tiny_configs import tiny_config

FAMILIES = {
    "encoder_decoder": (EncoderDecoder, ("inputs", "targets")),
    "decoder_only": (DecoderOnly, ("targets",)),
    "classifier": (Classifier, ("inputs",)),
}
VARIANTS = [
    dict(remat="full"),
    dict(remat="matmuls"),
    dict(scan_layers=True),
    dict(scan_layers=True, remat="full"),
    dict(scan_layers=True, remat="matmuls"),
    dict(scan_layers=True, remat="full", attention_impl="blockwise", attention_block_size=4),
    dict(grad_barrier="off"),  # the plain model has the barriers ("auto": on on the CPU)
    dict(grad_barrier="on", remat="full"),
]
# The components since 2017 (rotary positions, grouped key/value heads, a gated feed-forward,
# RMSNorm, QK-norm, no biases), plain and under scan + remat.
SINCE_2017 = dict(norm="rms", positional_encoding="rope", activation="swiglu", qk_norm=True,
                  biases="none", num_kv_heads=1)


def batch():
  rng = np.random.default_rng(0)
  inputs = rng.integers(1, 16, (2, 10)).astype(np.int32)
  targets = rng.integers(1, 16, (2, 8)).astype(np.int32)
  inputs[1, 6:] = 0
  targets[0, 5:] = 0
  return {"inputs": jnp.asarray(inputs), "targets": jnp.asarray(targets)}


def masked_square_loss(model, args):
  def loss(params):
    out = model.apply({"params": params}, *args)
    if out.ndim == 3:
      out = out * (args[-1] > 0)[..., None]
    return jnp.sum(jnp.square(out))
  return loss


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(
    f"{k}={v[k]}" for k in v if k != "attention_block_size"))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_remat_and_scan_give_the_plain_loss_and_gradients(plain_results, family, variant):
  assert_same_loss_and_gradients(plain_results, family, {}, variant)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_remat_and_scan_with_the_components_since_2017(plain_results, family):
  assert_same_loss_and_gradients(plain_results, family, SINCE_2017,
                                 dict(scan_layers=True, remat="matmuls", **SINCE_2017))


@pytest.mark.parametrize("family", ["encoder_decoder", "classifier"])
def test_remat_and_scan_with_the_convolution_sublayer(plain_results, family):
  assert_same_loss_and_gradients(plain_results, family, dict(conv_kernel=3),
                                 dict(scan_layers=True, remat="full", conv_kernel=3))


@pytest.mark.parametrize("family", ["encoder_decoder", "classifier"])
def test_remat_and_scan_with_the_recurrent_reading(plain_results, family):
  lstm = dict(encoder_lstm=True, pooling="attention")
  assert_same_loss_and_gradients(plain_results, family, lstm,
                                 dict(scan_layers=True, remat="full", **lstm))


@pytest.fixture(scope="module")
def plain_results():
  """{(family, plain model fields): (params, loss, gradients)} of the plain models, each
  computed once: the eight variants of a family compare with the same plain model, and
  only read its results."""
  return {}


def assert_same_loss_and_gradients(plain_results, family, plain_fields, variant):
  cls, fields = FAMILIES[family]
  args = [batch()[f] for f in fields]
  other = cls(tiny_model_config(num_encoder_layers=3, num_decoder_layers=3, **variant))
  key = (family, tuple(sorted(plain_fields.items())))
  if key not in plain_results:
    plain = cls(tiny_model_config(num_encoder_layers=3, num_decoder_layers=3, **plain_fields))
    params = init_params(plain, *args)
    plain_results[key] = (params,) + tuple(
        jax.value_and_grad(masked_square_loss(plain, args))(params))
  params, value, grads = plain_results[key]
  scanned = variant.get("scan_layers", False)
  other_params = transformer.stack_layers(params) if scanned else params
  # The converted parameters have exactly the layout the other model initialises.
  assert (jax.tree.structure(jax.eval_shape(other.init, jax.random.PRNGKey(0), *args))
          == jax.tree.structure({"params": other_params}))
  other_value, other_grads = jax.value_and_grad(masked_square_loss(other, args))(other_params)
  if scanned:
    other_grads = transformer.unstack_layers(other_grads)
  np.testing.assert_allclose(other_value, value, rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(other_grads),
                          jax.tree.leaves(grads)):
    # float32 rounding differs with the order of operations: tolerances relative to the
    # largest entry of each gradient.
    np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, float(np.abs(b).max())),
                               rtol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_stack_and_unstack_layers_are_inverse_and_stack_on_axis_0():
  model = EncoderDecoder(tiny_model_config(num_encoder_layers=3, num_decoder_layers=2))
  b = batch()
  params = init_params(model, b["inputs"], b["targets"])
  stacked = transformer.stack_layers(params)
  kernel = stacked["encoder"]["layers"]["block"]["ffn"]["wi"]["kernel"]
  assert kernel.shape == (3,) + params["encoder"]["block_0"]["ffn"]["wi"]["kernel"].shape
  np.testing.assert_array_equal(kernel[2], params["encoder"]["block_2"]["ffn"]["wi"]["kernel"])
  assert "block_0" not in stacked["decoder"] and "shared_embed" in stacked
  back = transformer.unstack_layers(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for a, b_ in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b_)


def test_stack_layers_rejects_gaps_in_block_numbers():
  with pytest.raises(ValueError, match="numbered"):
    transformer.stack_layers({"block_0": {"w": jnp.ones(2)}, "block_2": {"w": jnp.ones(2)}})


def test_scanned_layers_apply_dropout_from_the_dropout_rng():
  """Under nn.scan dropout still reaches the blocks: two dropout keys give different
  outputs, and deterministic calls ignore the key. (That each layer gets its own key is
  nn.scan's split_rngs; this test does not check it.)"""
  model = DecoderOnly(tiny_model_config(scan_layers=True, dropout_rate=0.3))
  tokens = batch()["targets"]
  params = init_params(DecoderOnly(tiny_model_config()), tokens)
  params = transformer.stack_layers(params)
  run = lambda key, det: model.apply({"params": params}, tokens, deterministic=det,  # noqa: E731
                                     rngs={"dropout": jax.random.PRNGKey(key)})
  assert not np.allclose(run(0, False), run(1, False))
  np.testing.assert_array_equal(run(0, True), run(1, True))


def _temp_bytes(**overrides) -> int:
  cfg = tiny_model_config(num_decoder_layers=8, d_model=64, d_ff=512, head_dim=32,
                          max_length=64, **overrides)
  model = DecoderOnly(cfg)
  tokens = jnp.ones((8, 64), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)["params"]
  grad = jax.jit(jax.grad(lambda p, x: jnp.sum(model.apply({"params": p}, x))))
  return grad.lower(params, tokens).compile().memory_analysis().temp_size_in_bytes


def test_remat_with_scanned_layers_cuts_the_backward_memory():
  """XLA's compiled memory analysis (no timing): keeping only each block's input ("full")
  needs far less temporary memory than keeping everything, and keeping the matmul
  outputs sits in between."""
  keep_all = _temp_bytes(scan_layers=True)
  full = _temp_bytes(scan_layers=True, remat="full")
  matmuls = _temp_bytes(scan_layers=True, remat="matmuls")
  assert full < 0.5 * keep_all, (full, keep_all)
  assert full < matmuls < keep_all, (full, matmuls, keep_all)


# ----------------------------------------------------------------------------- tasks


# The same as a task's model fields (two heads sharing one key/value head), pre-norm and
# untied, with the z-loss: every component since 2017 at once.
SINCE_2017_TASK = dict(model=dict(SINCE_2017, norm_placement="pre", tie_output=False),
                       optim=dict(z_loss=1e-4))


def _task_pair(task_name, model=None, **overrides):
  """The same tiny task with plain and with scanned (and rematerialised) layers; `model`:
  more model fields; `overrides` are grouped (`decode=dict(beam_size=3)`), of groups other
  than model and compute."""
  model = dict(num_encoder_layers=2, num_decoder_layers=2, **(model or {}))
  plain = tasks.get_task(tiny_config(task_name, model=model, **overrides))
  scanned_config = tiny_config(task_name, model=dict(model, scan_layers=True),
                               compute=dict(remat="full"), **overrides)
  return plain, tasks.get_task(scanned_config)


def _eval_batch(task):
  dataset = task.eval_dataset("eval", batch_size=8, num_devices=1)
  return jax.tree.map(lambda x: jnp.asarray(x[0]), dataset[0])


@pytest.mark.parametrize("task_name,overrides", [
    ("translation", dict(decode=dict(beam_size=1))),
    ("translation", dict(decode=dict(beam_size=3))),
    ("generation", dict()),
    ("classification", dict()),
    ("translation", dict(decode=dict(beam_size=3), **SINCE_2017_TASK)),
    ("generation", SINCE_2017_TASK),
    ("classification", SINCE_2017_TASK),
])
def test_scanned_task_predicts_and_scores_like_the_plain_task(task_name, overrides):
  """Decoding (greedy, beam search, sampling through the cache) with a scanned model's
  parameters gives the plain model's tokens, and the eval loss is the same; also with
  every component since 2017."""
  plain, scanned = _task_pair(task_name, **overrides)
  params = plain.init_params(jax.random.PRNGKey(0))
  stacked = transformer.stack_layers(params)
  b = _eval_batch(plain)
  predicted, expected = jax.jit(scanned.predict)(stacked, b), jax.jit(plain.predict)(params, b)
  if jnp.issubdtype(expected.dtype, jnp.integer):  # tokens: exactly the same
    np.testing.assert_array_equal(predicted, expected)
  else:  # class probabilities
    np.testing.assert_allclose(predicted, expected, rtol=1e-5, atol=1e-6)
  loss = lambda task, p: task.loss(p, b, None, False)  # noqa: E731
  for (name, a), expected in zip(sorted(loss(scanned, stacked).items()),
                                 sorted(loss(plain, params).items())):
    np.testing.assert_allclose(a, expected[1], rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("overrides", [{}, SINCE_2017_TASK], ids=["paper", "since_2017"])
def test_head_mask_applies_to_scanned_layers(overrides):
  """Removing a head through the per-block `head_mask` tree changes the scanned model's
  loss exactly as it changes the plain model's."""
  from inspection import attention_maps  # pylint: disable=g-import-not-at-top
  plain, scanned = _task_pair("translation", **overrides)
  params = plain.init_params(jax.random.PRNGKey(1))
  b = _eval_batch(plain)
  masks = {kind: np.ones(shape, np.float32)
           for kind, shape in attention_maps.layout(plain).items()}
  masks["cross"][1, 0] = 0.0
  tree = attention_maps.head_mask_tree(masks)
  plain_loss = plain.loss(params, b, None, False, head_mask=tree)["loss"]
  scanned_loss = scanned.loss(transformer.stack_layers(params), b, None, False,
                              head_mask=tree)["loss"]
  unmasked = plain.loss(params, b, None, False)["loss"]
  assert not np.isclose(plain_loss, unmasked)
  np.testing.assert_allclose(scanned_loss, plain_loss, rtol=1e-5)


@pytest.mark.parametrize("task_name", ["translation", "generation", "classification"])
def test_attention_maps_of_the_components_since_2017_plain_and_scanned(task_name):
  """--mode=attention's maps of a model with every component since 2017 (rotary
  positions, one key/value head for two query heads, QK-norm, ...): every row a
  distribution over the keys, one map per layer and query head, and the scanned model's
  maps the plain model's."""
  from inspection import attention_maps  # pylint: disable=g-import-not-at-top
  plain, scanned = _task_pair(task_name, **SINCE_2017_TASK)
  params = plain.init_params(jax.random.PRNGKey(2))
  source = plain.data_source("eval")
  fields = set(plain.attention_fields.values())
  examples = [{k: np.asarray(v) for k, v in source[i].items() if k in fields}
              for i in range(2)]
  maps = attention_maps.example_maps(plain, params, examples)
  scanned_maps = attention_maps.example_maps(scanned, transformer.stack_layers(params),
                                             examples)
  shapes = attention_maps.layout(plain)
  assert set(maps[0].weights) == set(shapes)
  for kind, (layers, heads) in shapes.items():
    weights = maps[0].weights[kind]
    assert weights.shape[:2] == (layers, heads)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(scanned_maps[0].weights[kind], weights, atol=1e-5)


def largest_fusion(num_layers: int, grad_barrier: str, norm_placement: str) -> int:
  """The most operands of any fusion in the compiled gradient of a decoder-only model of
  `num_layers` blocks (how much of the model one fused kernel recomputes)."""
  model = DecoderOnly(tiny_model_config(num_decoder_layers=num_layers,
                                        norm_placement=norm_placement,
                                        grad_barrier=grad_barrier))
  args = [batch()["targets"]]
  params = init_params(model, *args)
  hlo = jax.jit(jax.grad(masked_square_loss(model, args))).lower(params).compile().as_text()
  counts = [len(operands.split(",")) for operands in re.findall(r" fusion\(([^)]*)\)", hlo)]
  assert counts, "no fusion found in the compiled HLO"
  return max(counts)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's fusion")
@pytest.mark.parametrize("norm_placement", ["pre", "post"])
def test_grad_barrier_keeps_the_fusions_from_growing_with_depth(norm_placement):
  # Without the barriers XLA:CPU recomputes the residual stream's gradient (pre-norm),
  # and the forward pass's layer norms too (post-norm), from one end of the stack, inside
  # each block's fusions: they grow with depth, and the work with its square. If "off"
  # stops growing, XLA no longer duplicates and layers.fusion_barrier may be unnecessary.
  assert largest_fusion(6, "off", norm_placement) > largest_fusion(2, "off", norm_placement) + 10
  assert largest_fusion(6, "on", norm_placement) == largest_fusion(2, "on", norm_placement)
