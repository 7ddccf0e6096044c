"""Learning-rate schedules against their formulas (the paper's rsqrt above all) and the
optimizer's hyper-parameters, clipping and weight-decay mask against hand computations."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import default, presets
from training import optimizers

COUNTS = np.arange(0, 20001)


def _values(schedule, counts=COUNTS):
  return np.asarray(jax.jit(schedule)(jnp.asarray(counts)), np.float64)


@pytest.mark.parametrize("d_model,warmup", [(512, 4000), (1024, 4000), (64, 200), (256, 1)])
def test_rsqrt_is_the_papers_formula(d_model, warmup):
  """lrate = d_model^-0.5 * min(step^-0.5, step * warmup^-1.5), step = count + 1."""
  peak = d_model**-0.5 * warmup**-0.5
  schedule = optimizers.learning_rate_schedule("rsqrt", peak, warmup, total_steps=100000)
  step = COUNTS.astype(np.float64) + 1
  paper = d_model**-0.5 * np.minimum(step**-0.5, step * warmup**-1.5)
  np.testing.assert_allclose(_values(schedule), paper, rtol=1e-5)
  assert np.all(_values(schedule) > 0)  # the first update does not use a zero rate


@pytest.mark.parametrize("name", optimizers.SCHEDULES)
@pytest.mark.parametrize("warmup", [1, 10, 100])
def test_warmup_is_linear_and_reaches_peak(name, warmup):
  peak, total = 0.02, 1000
  schedule = optimizers.learning_rate_schedule(name, peak, warmup, total)
  everything = _values(schedule, np.arange(total))
  values, after = everything[:warmup], everything[warmup:]
  # Update k (count k-1) of the warmup uses peak * k / warmup: linear, peak exactly at the end.
  np.testing.assert_allclose(values, peak * np.arange(1, warmup + 1) / warmup, rtol=1e-6)
  assert values[-1] == pytest.approx(peak, rel=1e-7)
  assert np.all(after <= peak * (1 + 1e-7))  # never above the peak afterwards


def test_cosine_decays_to_zero_at_the_last_step():
  peak, warmup, total = 0.5, 100, 1000
  schedule = optimizers.learning_rate_schedule("cosine", peak, warmup, total)
  counts = np.arange(warmup - 1, total + 50)
  step = counts + 1.0
  progress = np.clip((step - warmup) / (total - warmup), 0, 1)
  expected = peak * 0.5 * (1 + np.cos(np.pi * progress))
  np.testing.assert_allclose(_values(schedule, counts), expected, rtol=1e-5, atol=1e-7)
  assert _values(schedule, [total - 1])[0] == pytest.approx(0.0, abs=1e-7)  # step total
  assert _values(schedule, [total + 10])[0] == pytest.approx(0.0, abs=1e-7)  # stays there
  mid = _values(schedule, [warmup - 1 + (total - warmup) // 2])[0]
  assert mid == pytest.approx(peak / 2, rel=1e-5)


def test_linear_decays_linearly_to_zero():
  peak, warmup, total = 0.5, 100, 1000
  schedule = optimizers.learning_rate_schedule("linear", peak, warmup, total)
  counts = np.arange(warmup - 1, total)
  values = _values(schedule, counts)
  np.testing.assert_allclose(values, peak * (total - (counts + 1)) / (total - warmup),
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.diff(values), -peak / (total - warmup), rtol=1e-3)
  assert values[-1] == pytest.approx(0.0, abs=1e-7)
  assert _values(schedule, [total + 10])[0] == pytest.approx(0.0, abs=1e-7)


def test_constant_stays_at_peak():
  schedule = optimizers.learning_rate_schedule("constant", 0.25, 10, 100)
  np.testing.assert_allclose(_values(schedule, np.arange(9, 5000)), 0.25, rtol=1e-7)


def test_unknown_schedule_and_optimizer_raise():
  with pytest.raises(ValueError, match="'step'"):
    optimizers.learning_rate_schedule("step", 1.0, 10, 100)
  with pytest.raises(ValueError, match="'lamb'"):
    optimizers.make_optimizer(_config(optimizer="lamb"))
  with pytest.raises(ValueError, match="'step'"):
    optimizers.make_optimizer(_config(schedule="step"))


def _config(**optim):
  """The config groups make_optimizer reads; `optim` overrides config.optim fields."""
  c = ml_collections.ConfigDict(dict(
      optim=dict(optimizer="adam", schedule="constant", learning_rate=0.1, warmup_steps=0,
                 adam_b1=0.9, adam_b2=0.98, adam_eps=1e-9, weight_decay=0.0, sgd_momentum=0.9,
                 max_grad_norm=0.0),
      train=dict(num_train_steps=100)))
  presets.update_groups(c, dict(optim=optim))
  return c


def _updates(tx, params, grads_list):
  """The updates of `tx` for a sequence of gradients (one compiled program)."""

  @jax.jit
  def run(params, grads_list):
    state = tx.init(params)
    out = []
    for grads in grads_list:
      updates, state = tx.update(grads, state, params)
      out.append(updates)
      params = optax.apply_updates(params, updates)
    return out

  return jax.tree.map(np.asarray, run(params, grads_list))


def test_adam_uses_the_configured_betas_and_epsilon():
  """Two Adam updates of one parameter against a hand computation. The first update alone
  does not depend on b1, b2 (bias correction cancels them), so the second one checks them."""
  lr, b1, b2, eps = 0.1, 0.5, 0.7, 0.3
  tx = optimizers.make_optimizer(_config(learning_rate=lr, adam_b1=b1, adam_b2=b2,
                                         adam_eps=eps))
  g1, g2 = np.float32([0.4, -2.0]), np.float32([1.5, 0.1])
  params = {"w": jnp.zeros(2)}
  u1, u2 = _updates(tx, params, [{"w": jnp.asarray(g1)}, {"w": jnp.asarray(g2)}])
  np.testing.assert_allclose(u1["w"], -lr * g1 / (np.abs(g1) + eps), rtol=1e-6)
  m = b1 * (1 - b1) * g1 + (1 - b1) * g2
  v = b2 * (1 - b2) * g1**2 + (1 - b2) * g2**2
  m_hat, v_hat = m / (1 - b1**2), v / (1 - b2**2)
  np.testing.assert_allclose(u2["w"], -lr * m_hat / (np.sqrt(v_hat) + eps), rtol=1e-5)


def test_paper_adam_defaults_in_default_config():
  config = default.get_config()
  assert (config.optim.adam_b1, config.optim.adam_b2, config.optim.adam_eps) == (
      0.9, 0.98, 1e-9)


def test_global_norm_clipping_clips():
  """A gradient of global norm 100 with max_grad_norm=1 updates like the gradient / 100.
  eps is large so that Adam's first update depends on the gradient's scale."""
  grads = {"a": jnp.float32([60.0]), "b": jnp.float32([[0.0, 80.0]])}  # global norm 100
  params = jax.tree.map(jnp.zeros_like, grads)
  clipped = jax.tree.map(lambda g: g / 100.0, grads)
  common = dict(learning_rate=0.1, adam_eps=1.0)
  with_clip = _updates(optimizers.make_optimizer(_config(max_grad_norm=1.0, **common)),
                       params, [grads])[0]
  reference = _updates(optimizers.make_optimizer(_config(**common)), params, [clipped])[0]
  no_clip = _updates(optimizers.make_optimizer(_config(**common)), params, [grads])[0]
  for key in grads:
    np.testing.assert_allclose(with_clip[key], reference[key], rtol=1e-6)
  np.testing.assert_allclose(with_clip["a"], -0.1 * 0.6 / 1.6, rtol=1e-6)
  assert not np.allclose(no_clip["a"], with_clip["a"])
  # A gradient already below the threshold is left alone.
  small = jax.tree.map(lambda g: g / 1000.0, grads)
  np.testing.assert_allclose(
      _updates(optimizers.make_optimizer(_config(max_grad_norm=1.0, **common)),
               params, [small])[0]["a"],
      _updates(optimizers.make_optimizer(_config(**common)), params, [small])[0]["a"],
      rtol=1e-6)


PARAMS = {
    "embed": {"embedding": jnp.ones((16, 8))},
    "dense": {"kernel": jnp.ones((8, 4)), "bias": jnp.ones((4,))},
    "attention": {"query": {"kernel": jnp.ones((8, 2, 4)), "bias": jnp.ones((2, 4))}},
    "norm": {"scale": jnp.ones((8,)), "bias": jnp.zeros((8,))},
}


def test_decay_mask_skips_biases_and_vectors():
  mask = optimizers.decay_mask(PARAMS)
  assert mask == {
      "embed": {"embedding": True},
      "dense": {"kernel": True, "bias": False},
      # A per-head bias is 2-D; this documents that ndim decides, not the name.
      "attention": {"query": {"kernel": True, "bias": True}},
      "norm": {"scale": False, "bias": False},
  }


def test_adamw_decays_weight_matrices_only():
  lr, wd = 0.1, 0.5
  tx = optimizers.make_optimizer(_config(optimizer="adamw", learning_rate=lr,
                                         weight_decay=wd))
  zero = jax.tree.map(jnp.zeros_like, PARAMS)
  updates = _updates(tx, PARAMS, [zero])[0]
  # Decoupled decay: update = -lr * wd * param for decayed leaves, 0 otherwise.
  np.testing.assert_allclose(updates["dense"]["kernel"], -lr * wd, rtol=1e-6)
  np.testing.assert_allclose(updates["embed"]["embedding"], -lr * wd, rtol=1e-6)
  np.testing.assert_array_equal(updates["dense"]["bias"], 0.0)
  np.testing.assert_array_equal(updates["norm"]["scale"], 0.0)
  # Plain adam never decays.
  plain = _updates(optimizers.make_optimizer(_config(learning_rate=lr)), PARAMS, [zero])[0]
  for leaf in jax.tree.leaves(plain):
    np.testing.assert_array_equal(leaf, 0.0)


def test_sgd_is_heavy_ball_momentum_on_the_gradient_plus_l2():
  """optimizer="sgd": v_t = momentum * v_{t-1} + (g_t + wd * w_{t-1}), w_t = w_{t-1} - lr * v_t,
  for every parameter (biases and norms decayed too), by hand over three steps."""
  lr, wd, momentum = 0.1, 0.01, 0.9
  tx = optimizers.make_optimizer(_config(optimizer="sgd", learning_rate=lr, weight_decay=wd,
                                         sgd_momentum=momentum))
  grads = [jax.tree.map(lambda p, k=k: jnp.full_like(p, k + 1.0), PARAMS) for k in range(3)]
  got = _updates(tx, PARAMS, grads)
  for path in (("dense", "kernel"), ("norm", "bias"), ("norm", "scale")):
    w = np.asarray(PARAMS[path[0]][path[1]], np.float64)
    v = np.zeros_like(w)
    for step in range(3):
      v = momentum * v + (step + 1.0) + wd * w
      update = -lr * v
      np.testing.assert_allclose(got[step][path[0]][path[1]], update, rtol=1e-5, atol=1e-7)
      w = w + update
  # Without momentum: plain gradient descent.
  plain = optimizers.make_optimizer(_config(optimizer="sgd", learning_rate=lr,
                                            sgd_momentum=0.0))
  second = _updates(plain, PARAMS, grads[:2])[1]
  np.testing.assert_allclose(second["dense"]["kernel"], -lr * 2.0, rtol=1e-6)


def test_schedule_drives_the_optimizer():
  """The configured schedule is what scales the updates (warmup: first update tiny)."""
  config = _config(schedule="rsqrt", learning_rate=1.0, warmup_steps=10, adam_eps=1e-12)
  tx = optimizers.make_optimizer(config)
  params = {"w": jnp.zeros(())}
  g = {"w": jnp.float32(1.0)}
  updates = _updates(tx, params, [g] * 12)
  sizes = np.array([-u["w"] for u in updates])
  # With a constant gradient Adam's normalised step is 1, so the update is the rate.
  np.testing.assert_allclose(sizes, [min((k + 1) / 10, np.sqrt(10 / (k + 1)))
                                     for k in range(12)], rtol=1e-5)
