"""Losses as token-weighted sums, and their normalisation in the pmapped train step: the
update is the gradient of the *global* token-weighted mean whatever the number of devices,
the padding per device or the number of accumulated micro-batches."""

import flax.jax_utils
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tasks
import train
from configs import default, presets
from input_pipeline import synthetic
from models import transformer
from tasks import losses
from training import optimizers, steps

# ----------------------------------------------------------------------------- cross-entropy


def _numpy_sums(logits, targets, weights, eps):
  """Soft-target cross-entropy minus the soft target's entropy, in float64."""
  logits = logits.astype(np.float64)
  vocab = logits.shape[-1]
  log_p = logits - logits.max(-1, keepdims=True)
  log_p = log_p - np.log(np.exp(log_p).sum(-1, keepdims=True))
  onehot = np.eye(vocab)[targets]
  q = onehot * (1 - eps) + (1 - onehot) * eps / (vocab - 1)
  cross = -(q * log_p).sum(-1)
  entropy = -(q * np.log(np.where(q > 0, q, 1.0))).sum(-1)
  nll = -(onehot * log_p).sum(-1)
  return {"loss": ((cross - entropy) * weights).sum(), "nll": (nll * weights).sum(),
          "correct": ((logits.argmax(-1) == targets) * weights).sum(),
          "weight": weights.sum()}


def _random_case(seed=0, shape=(3, 7), vocab=11, scale=3.0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=shape + (vocab,)).astype(np.float32) * scale
  targets = rng.integers(0, vocab, size=shape).astype(np.int32)
  weights = (rng.random(shape) < 0.7).astype(np.float32)
  return logits, targets, weights


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_cross_entropy_matches_numpy(eps):
  logits, targets, weights = _random_case()
  got = losses.cross_entropy_sums(jnp.asarray(logits), jnp.asarray(targets),
                                  jnp.asarray(weights), eps)
  want = _numpy_sums(logits, targets, weights, eps)
  assert set(got) == set(want)
  for key in want:
    np.testing.assert_allclose(float(got[key]), want[key], rtol=1e-5, atol=1e-5, err_msg=key)


def test_nll_ignores_label_smoothing():
  logits, targets, weights = _random_case(seed=1)
  plain = losses.cross_entropy_sums(logits, targets, weights, 0.0)
  smooth = losses.cross_entropy_sums(logits, targets, weights, 0.1)
  assert float(smooth["nll"]) == pytest.approx(float(plain["nll"]), rel=1e-6)
  assert float(plain["loss"]) == pytest.approx(float(plain["nll"]), rel=1e-6)
  assert abs(float(smooth["loss"]) - float(smooth["nll"])) > 1e-2


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_predicting_the_smoothed_target_scores_zero(eps):
  """The minimum of the smoothed loss is 0, reached by predicting the smoothed target;
  a confident one-hot prediction scores worse."""
  vocab = 16
  targets = jnp.array([[1, 5, 9, 15]], jnp.int32)
  onehot = jax.nn.one_hot(targets, vocab)
  q = onehot * (1 - eps) + (1 - onehot) * eps / (vocab - 1)
  weights = jnp.ones(targets.shape)
  best = losses.cross_entropy_sums(jnp.log(q), targets, weights, eps)
  assert abs(float(best["loss"])) < 1e-5
  assert float(best["correct"]) == 4.0
  confident = losses.cross_entropy_sums(onehot * 20.0, targets, weights, eps)
  assert float(confident["loss"]) > 0.1


def test_weights_zero_out_padding():
  logits, targets, weights = _random_case(seed=2)
  base = losses.cross_entropy_sums(logits, targets, weights, 0.1)
  rng = np.random.default_rng(3)
  pad = weights == 0
  logits2 = np.where(pad[..., None], rng.normal(size=logits.shape) * 100, logits)
  targets2 = np.where(pad, rng.integers(0, logits.shape[-1], size=targets.shape), targets)
  other = losses.cross_entropy_sums(logits2.astype(np.float32), targets2.astype(np.int32),
                                    weights, 0.1)
  for key in base:
    assert float(other[key]) == pytest.approx(float(base[key]), rel=1e-6), key
  assert float(base["weight"]) == weights.sum()


def test_sums_are_additive_across_batch_splits():
  logits, targets, weights = _random_case(seed=4, shape=(6, 5))
  sums = jax.jit(losses.cross_entropy_sums, static_argnums=3)
  whole = sums(logits, targets, weights, 0.1)
  parts = [sums(logits[i:i + 2], targets[i:i + 2], weights[i:i + 2], 0.1) for i in (0, 2, 4)]
  for key in whole:
    assert sum(float(p[key]) for p in parts) == pytest.approx(float(whole[key]), rel=1e-5)


def test_low_precision_logits_are_scored_in_float32():
  logits, targets, weights = _random_case(seed=5)
  got = losses.cross_entropy_sums(jnp.asarray(logits, jnp.bfloat16), targets, weights, 0.1)
  assert all(v.dtype == jnp.float32 for v in got.values())
  want = _numpy_sums(np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32)),
                     targets, weights, 0.1)
  np.testing.assert_allclose(float(got["loss"]), want["loss"], rtol=1e-5)


# ----------------------------------------------------------------------------- train step

GLOBAL_BATCH = 32
LR = 1.0
EPS = 1.0  # Adam's first update is -lr * g / (|g| + eps): smooth in g, so comparable


def _tiny_config(grad_accum_steps=1):
  c = default.get_config()
  presets.update_groups(c, dict(
      model=dict(d_model=16, d_ff=32, num_heads=2, num_encoder_layers=1,
                 num_decoder_layers=1),
      optim=dict(dropout_rate=0.0, attention_dropout_rate=0.0, label_smoothing=0.1,
                 optimizer="adam", schedule="constant", learning_rate=LR, warmup_steps=0,
                 adam_eps=EPS, max_grad_norm=0.0),
      data=dict(min_digits=1, max_digits=4, max_input_length=6, max_target_length=6),
      train=dict(batch_size=GLOBAL_BATCH, grad_accum_steps=grad_accum_steps)))
  train.validate(c, num_devices=8)
  return c


def _uneven_batch():
  """32 examples in device order (8 devices x 4): devices 0-5 hold 1-digit strings, device 6
  full-length ones, device 7 one full-length example and three all-padding rows (as in a
  zero-filled final batch). Token counts per device: 8, ..., 8, 20, 5."""
  rng = np.random.default_rng(0)
  inputs = np.zeros((GLOBAL_BATCH, 6), np.int32)
  targets = np.zeros((GLOBAL_BATCH, 6), np.int32)
  for i in range(GLOBAL_BATCH):
    device = i // 4
    if device == 7 and i % 4:
      continue  # an all-padding example
    n = 1 if device < 6 else 4
    digits = rng.integers(0, 10, size=n) + synthetic.FIRST_DIGIT
    inputs[i, :n + 1] = np.append(digits, synthetic.EOS)
    targets[i, :n + 1] = np.append(digits[::-1], synthetic.EOS)
  return {"inputs": inputs, "targets": targets}


def _shard(batch, num_devices):
  return {k: v.reshape((num_devices, -1) + v.shape[1:]) for k, v in batch.items()}


def _adam_first_step(params, grads):
  """Adam's first update for gradient g: -lr * g / (|g| + eps) (b1, b2 cancel)."""
  return jax.tree.map(lambda p, g: np.asarray(p, np.float64) - LR * g / (np.abs(g) + EPS),
                      params, grads)


@pytest.fixture(scope="module")
def case():
  """State, uneven batch and, computed outside the train step, the per-device loss sums
  and gradients, the update of the global token mean and that of a mean of means."""
  config = _tiny_config()
  task = tasks.get_task(config)
  tx = optimizers.make_optimizer(config)
  state = steps.create_state(task, tx, seed=0)
  # Larger weights make per-token losses differ more between examples, so a mean of
  # per-device means is further from the global mean.
  params = jax.tree.map(lambda p: p * 3.0, state.params)
  state = state.replace(params=params, opt_state=tx.init(params))
  batch = _uneven_batch()
  sharded = _shard(batch, 8)
  shards = [{k: v[d] for k, v in sharded.items()} for d in range(8)]

  def loss_fn(params, shard):
    sums = task.loss(params, shard, None, train=False)
    return sums["loss"], sums

  grad_fn = jax.jit(jax.grad(loss_fn, has_aux=True))
  grads, per_device = zip(*[jax.device_get(grad_fn(params, shard)) for shard in shards])
  grads = [jax.tree.map(lambda g: np.asarray(g, np.float64), g) for g in grads]
  per_device = [jax.tree.map(float, d) for d in per_device]
  sums = {k: sum(d[k] for d in per_device) for k in per_device[0]}
  # The gradient of a sum is the sum of the gradients: the global token-mean gradient.
  global_grads = jax.tree.map(lambda *g: sum(g) / sums["weight"], *grads)
  mean_of_means_grads = jax.tree.map(
      lambda *g: np.mean([gd / d["weight"] for gd, d in zip(g, per_device)], axis=0), *grads)
  return dict(config=config, task=task, tx=tx, state=state, batch=batch, sums=sums,
              per_device=per_device, grads=global_grads,
              expected=_adam_first_step(params, global_grads),
              mean_of_means=_adam_first_step(params, mean_of_means_grads))


def _run_step(case, num_devices, grad_accum_steps=1, sam_rho=0.0, adversarial_eps=0.0):
  config = _tiny_config(grad_accum_steps)
  config.optim.sam_rho = sam_rho
  config.optim.adversarial_eps = adversarial_eps
  devices = jax.local_devices()[:num_devices]
  assert len(devices) == num_devices, "conftest should give 8 CPU devices"
  p_train, _, _ = steps.compile_steps(case["task"], case["tx"], config, devices)
  p_state = flax.jax_utils.replicate(case["state"], devices)
  p_state, metrics = p_train(p_state, _shard(case["batch"], num_devices))
  # Not flax.jax_utils.unreplicate: on 1 of 8 local devices it keeps the leading axis.
  params = jax.tree.map(lambda x: np.asarray(x)[0], p_state.params)
  metrics = jax.device_get(metrics)
  for key, value in metrics.items():  # every device reports the same (reduced) metrics
    np.testing.assert_allclose(value, value[0], rtol=1e-6, err_msg=key)
  return params, {k: float(v[0]) for k, v in metrics.items()}, p_state


def _assert_params_close(got, want, old):
  """Compares the updates `got - old` and `want - old` leaf by leaf, relative to the size
  of the expected update (float32 sums in a different order differ by <1e-4 of it; a
  mean of per-device means is off by >5%)."""
  flat_got = jax.tree_util.tree_leaves_with_path(got)
  flat_want, flat_old = jax.tree.leaves(want), jax.tree.leaves(old)
  assert len(flat_got) == len(flat_want) == len(flat_old)
  for (path, g), w, o in zip(flat_got, flat_want, flat_old):
    o = np.asarray(o, np.float64)
    update_got, update_want = np.asarray(g, np.float64) - o, np.asarray(w, np.float64) - o
    scale = np.abs(update_want).max()
    np.testing.assert_allclose(update_got, update_want, rtol=0, atol=1e-3 * scale + 1e-6,
                               err_msg=jax.tree_util.keystr(path))


def test_batch_is_uneven_enough(case):
  """The premise of the tests below: a mean of per-device means differs from the global
  token-weighted mean by far more than the tolerances, in the loss and in the update."""
  per_device, sums = case["per_device"], case["sums"]
  assert [d["weight"] for d in per_device] == [8.0] * 6 + [20.0, 5.0]
  mean_of_means = np.mean([d["loss"] / d["weight"] for d in per_device])
  global_mean = sums["loss"] / sums["weight"]
  assert abs(mean_of_means - global_mean) > 5e-3 * abs(global_mean)
  with pytest.raises(AssertionError):
    _assert_params_close(case["mean_of_means"], case["expected"], case["state"].params)


@pytest.mark.parametrize("num_devices", [8, 1])
def test_update_is_gradient_of_global_token_mean(case, num_devices):
  params, metrics, p_state = _run_step(case, num_devices)
  _assert_params_close(params, case["expected"], case["state"].params)
  # Metrics are the global sums; loss / weight is the global token-weighted mean.
  sums = case["sums"]
  assert metrics["weight"] == sums["weight"] == 8 * 6 + 20 + 5
  assert metrics["loss"] == pytest.approx(sums["loss"], rel=1e-5)
  assert metrics["nll"] == pytest.approx(sums["nll"], rel=1e-5)
  assert metrics["correct"] == pytest.approx(sums["correct"], abs=1e-3)
  grad_norm = np.sqrt(sum(np.sum(g**2) for g in jax.tree.leaves(case["grads"])))
  assert metrics["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)
  assert metrics["nonfinite"] == 0.0
  assert int(jax.device_get(p_state.step)[0]) == 1


@pytest.mark.parametrize("num_devices,grad_accum_steps", [(8, 2)])
def test_gradient_accumulation_matches_one_big_batch(case, num_devices, grad_accum_steps):
  """Micro-batches with very different token counts still give the global-mean update."""
  params, metrics, _ = _run_step(case, num_devices, grad_accum_steps)
  _assert_params_close(params, case["expected"], case["state"].params)
  assert metrics["weight"] == case["sums"]["weight"]
  assert metrics["loss"] == pytest.approx(case["sums"]["loss"], rel=1e-5)


def test_eval_step_sums_over_devices_and_ignores_zero_filled_rows(case):
  """The final eval batch is zero-filled: those rows must add nothing (and stay finite)."""
  task, params, batch = case["task"], case["state"].params, case["batch"]
  devices = jax.local_devices()[:8]
  _, p_eval, _ = steps.compile_steps(task, case["tx"], case["config"], devices)
  sums = jax.device_get(p_eval(flax.jax_utils.replicate(params, devices), _shard(batch, 8)))
  real = batch["inputs"].any(axis=-1)
  only_real = jax.jit(lambda p, b: task.loss(p, b, None, train=False))(
      params, {k: v[real] for k, v in batch.items()})
  for key, value in only_real.items():
    assert np.all(np.isfinite(sums[key]))
    np.testing.assert_allclose(sums[key], float(value), rtol=1e-5, err_msg=key)


def test_sam_update_uses_the_gradient_at_the_ascent_point(case):
  """optim.sam_rho: on one device (one micro-batch) the update is Adam's first step for the
  global token-mean gradient taken at params + rho * g / ||g|| (g: the summed-loss gradient
  there), not at params; the metrics stay those of params."""
  rho, task, params = 0.05, case["task"], case["state"].params
  batch = {k: jnp.asarray(v) for k, v in case["batch"].items()}
  loss = lambda p: task.loss(p, batch, None, train=False)["loss"]  # noqa: E731
  g = jax.tree.map(lambda x: np.asarray(x, np.float64), jax.grad(loss)(params))
  norm = np.sqrt(sum(np.sum(x**2) for x in jax.tree.leaves(g)))
  ascent = jax.tree.map(lambda p, x: jnp.asarray(p + rho * x / norm, jnp.float32), params, g)
  sharp = jax.tree.map(lambda x: np.asarray(x, np.float64) / case["sums"]["weight"],
                       jax.grad(loss)(ascent))
  got, metrics, _ = _run_step(case, 1, sam_rho=rho)
  _assert_params_close(got, _adam_first_step(params, sharp), params)
  with pytest.raises(AssertionError):  # the plain update is measurably different
    _assert_params_close(got, case["expected"], params)
  assert metrics["loss"] == pytest.approx(case["sums"]["loss"], rel=1e-5)


def test_sam_gradient_on_a_quadratic():
  """For L(w) = w.A.w / 2: grad L(w + rho * Aw / |Aw|), against NumPy; rho=0 is the plain
  gradient; the auxiliary output comes from w itself."""
  a = np.array([[3.0, 1.0], [1.0, 2.0]])
  w = np.array([0.5, -1.5])
  loss_fn = lambda p: (0.5 * p["w"] @ jnp.asarray(a, jnp.float32) @ p["w"], p["w"])  # noqa: E731
  params = {"w": jnp.asarray(w, jnp.float32)}
  grads, aux = steps.sam_gradient(loss_fn, params, 0.3)
  ascent = w + 0.3 * (a @ w) / np.linalg.norm(a @ w)
  np.testing.assert_allclose(grads["w"], a @ ascent, rtol=1e-5)
  np.testing.assert_array_equal(aux, params["w"])
  plain, _ = steps.sam_gradient(loss_fn, params, 0.0)
  np.testing.assert_allclose(plain["w"], a @ w, rtol=1e-6)


def test_adversarial_gradient_on_a_logistic_model():
  """steps.adversarial_gradient against NumPy for l_b = softplus(-y_b w.sum_t x_bt): the
  gradient of each l_b with respect to x_bt is c_b w (c_b = -y_b sigmoid(-y_b s_b)), so
  r_b = eps * c_b w / ||c_b w broadcast over b's positions||, and the result is the sum
  of the gradients in w at x and at x + r, halved. An example of weight 0 gets r = 0 (no NaN);
  the auxiliary output is that of x."""
  rng = np.random.default_rng(0)
  x, w = rng.normal(size=(3, 4, 5)), rng.normal(size=5)
  y, weight, eps = np.array([1.0, -1.0, 1.0]), np.array([1.0, 1.0, 0.0]), 0.7

  def loss_fn(params, perturbations):
    e = jnp.asarray(x, jnp.float32) + perturbations["embeddings"]
    s = jnp.einsum("btd,d->b", e, params["w"])
    return jnp.sum(weight * jax.nn.softplus(-y * s)), s

  grads, aux = steps.adversarial_gradient(loss_fn, {"w": jnp.asarray(w, jnp.float32)},
                                          {"embeddings": jnp.zeros(x.shape, jnp.float32)},
                                          eps)
  sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
  c = lambda e: -y * sigmoid(-y * np.einsum("btd,d->b", e, w)) * weight  # noqa: E731
  g = c(x)[:, None, None] * np.broadcast_to(w, x.shape)
  norm = np.sqrt(np.sum(g**2, axis=(1, 2)))
  r = np.zeros_like(g)
  r[:2] = eps * g[:2] / norm[:2, None, None]
  want = (np.einsum("b,bd->d", c(x), x.sum(axis=1))
          + np.einsum("b,bd->d", c(x + r), (x + r).sum(axis=1))) / 2
  np.testing.assert_allclose(grads["w"], want, rtol=1e-5)
  np.testing.assert_allclose(aux, np.einsum("btd,d->b", x, w), rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(r[0]), eps)


@pytest.mark.parametrize("num_devices,grad_accum_steps", [(1, 1), (8, 2)])
def test_adversarial_update_adds_the_loss_at_the_worst_embedding_perturbation(
    case, num_devices, grad_accum_steps):
  """optim.adversarial_eps: the update is Adam's first step for the global token mean of
  the summed-loss gradient at the embedded inputs averaged with that at the inputs moved by r
  (each example's r of norm eps along its own gradient, in the encoder's and the
  decoder's embeddings at once); per example, so 8 devices with 2 micro-batches each
  give the update of one device. The metrics stay those of the unperturbed inputs."""
  eps, task, params = 0.5, case["task"], case["state"].params
  batch = {k: jnp.asarray(v) for k, v in case["batch"].items()}
  zeros = task.embedding_perturbations(params, batch)
  assert {k: v["embeddings"].shape for k, v in zeros.items()} == {
      "encoder": (GLOBAL_BATCH, 6, 16), "decoder": (GLOBAL_BATCH, 6, 16)}
  key = jax.random.PRNGKey(0)  # this config has no dropout: the key changes nothing
  loss = lambda p, d: task.loss(p, batch, key, train=True, perturbations=d)["loss"]  # noqa: E731
  clean, g = jax.grad(loss, argnums=(0, 1))(params, zeros)
  g = jax.tree.map(lambda v: np.asarray(v, np.float64), g)
  norm = np.sqrt(sum(np.sum(v**2, axis=(1, 2)) for v in jax.tree.leaves(g)))
  assert np.sum(norm == 0) == 3  # the three all-padding rows
  r = jax.tree.map(lambda v: jnp.asarray(eps * v / np.maximum(norm, 1e-30)[:, None, None],
                                         jnp.float32), g)
  adversarial = jax.grad(loss)(params, r)
  want = jax.tree.map(lambda a, b: (np.asarray(a, np.float64) + np.asarray(b, np.float64))
                      / 2 / case["sums"]["weight"], clean, adversarial)
  got, metrics, _ = _run_step(case, num_devices, grad_accum_steps, adversarial_eps=eps)
  _assert_params_close(got, _adam_first_step(params, want), params)
  with pytest.raises(AssertionError):  # the plain update is measurably different
    _assert_params_close(got, case["expected"], params)
  assert metrics["loss"] == pytest.approx(case["sums"]["loss"], rel=1e-5)


@pytest.mark.parametrize("task_name", ["classification", "generation"])
def test_an_embedding_perturbation_is_a_change_of_the_embedded_tokens(task_name):
  """The perturbation enters exactly at the embeddings: adding d_t at position t (each
  token appearing once) gives the loss of the model whose embedding row of the token
  read there (a decoder reads its targets shifted right, 0 first) moved by d_t / (the
  embedding scale). Evaluation (train=False) ignores it."""
  config = default.get_config(f"task={task_name},size=tiny")
  presets.update_groups(config, dict(  # one block: the perturbation enters before any
      model=dict(tie_output=False, scale_embeddings=True, num_encoder_layers=1,
                 num_decoder_layers=1),
      optim=dict(dropout_rate=0.0, attention_dropout_rate=0.0, token_dropout=0.0)))
  task = tasks.get_task(config)
  params = task.init_params(jax.random.PRNGKey(0))
  tokens = np.arange(5, 13, dtype=np.int32)[None]
  batch = {"inputs": tokens, "targets": tokens, "label": np.array([1], np.int32)}
  batch = {k: jnp.asarray(batch[k]) for k in task.batch_lengths(config)} | (
      {"label": jnp.asarray(batch["label"])} if task_name == "classification" else {})
  delta = jax.tree.map(
      lambda z: jax.random.normal(jax.random.PRNGKey(1), z.shape, z.dtype) * 0.3,
      task.embedding_perturbations(params, batch))
  (stack, leaf), = delta.items()
  key = jax.random.PRNGKey(2)
  perturbed = task.loss(params, batch, key, train=True, perturbations=delta)["loss"]
  embedding = params[stack]["embed"]["embedding"]
  read = np.asarray(transformer.shift_right(tokens) if stack == "decoder" else tokens)[0]
  moved = embedding.at[read].add(leaf["embeddings"][0] / np.sqrt(config.model.d_model))
  moved_params = {**params, stack: {**params[stack],
                                    "embed": {**params[stack]["embed"], "embedding": moved}}}
  want = task.loss(moved_params, batch, key, train=True)["loss"]
  plain = task.loss(params, batch, key, train=True)["loss"]
  assert abs(float(perturbed) - float(plain)) > 1e-3
  np.testing.assert_allclose(perturbed, want, rtol=1e-5)
  np.testing.assert_allclose(task.loss(params, batch, None, train=False, perturbations=delta)
                             ["loss"], task.loss(params, batch, None, train=False)["loss"])


def _numpy_log_softmax(logits):
  z = np.asarray(logits, np.float64)
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def test_symmetric_kl_sum_matches_numpy():
  """R-drop's term: sum over weighted positions of (KL(p||q) + KL(q||p)) / 2, each KL
  written out as sum_j p_j log(p_j / q_j); zero for equal distributions (logits that
  differ by a constant per position)."""
  a, _, weights = _random_case(seed=1)
  b, _, _ = _random_case(seed=2)
  log_p, log_q = _numpy_log_softmax(a), _numpy_log_softmax(b)
  p, q = np.exp(log_p), np.exp(log_q)
  kl_pq = np.sum(p * (log_p - log_q), axis=-1)
  kl_qp = np.sum(q * (log_q - log_p), axis=-1)
  want = np.sum((kl_pq + kl_qp) / 2 * weights)
  assert want > 0.1
  np.testing.assert_allclose(losses.symmetric_kl_sum(a, b, weights), want, rtol=1e-5)
  shifted = a + np.arange(a.shape[1], dtype=np.float32)[None, :, None]
  assert abs(float(losses.symmetric_kl_sum(a, shifted, weights))) < 1e-5
  np.testing.assert_allclose(losses.symmetric_kl_sum(a, b, np.zeros_like(weights)), 0.0)


def _padded_batch(task, task_name):
  """Four rows of digits, 4 to 10 real tokens then padding (labels for a classifier)."""
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(np.where(np.arange(10) < rng.integers(4, 11, (4, 1)),
                                rng.integers(0, 10, (4, 10)) + synthetic.FIRST_DIGIT, 0),
                       jnp.int32)
  batch = {k: tokens for k in task.batch_lengths(task.config)}
  if task_name == "classification":
    batch["label"] = jnp.asarray([0, 1, 1, 0], jnp.int32)
  return batch


def _rdrop_config(task_name, dropout, alpha):
  """The tiny preset with one block a stack (the losses read the logits; depth is not
  their subject)."""
  config = default.get_config(f"task={task_name},size=tiny")
  presets.update_groups(config, dict(model=dict(num_encoder_layers=1, num_decoder_layers=1),
                                     optim=dict(
      dropout_rate=dropout, attention_dropout_rate=0.0, token_dropout=0.0, label_smoothing=0.1,
      rdrop_alpha=alpha)))
  return config


@pytest.mark.parametrize("task_name", ["classification", "generation", "translation"])
def test_rdrop_loss_is_the_mean_of_two_dropout_passes_and_their_kl(task_name):
  """optim.rdrop_alpha: in training, the loss of the batch read twice, under the step's
  dropout key and under that key folded with base.RDROP_STREAM (the plain loss under each
  key, computed with R-drop off), averaged, plus alpha / 2 times the two passes' symmetric
  KL (NumPy from the model's logits); the other metrics the two passes' mean. The passes'
  dropout masks differ (the KL is not 0). Evaluation is the plain loss."""
  alpha = 0.7
  task = tasks.get_task(_rdrop_config(task_name, 0.3, alpha))
  plain = tasks.get_task(_rdrop_config(task_name, 0.3, 0.0))
  params = task.init_params(jax.random.PRNGKey(0))
  batch = _padded_batch(task, task_name)
  key = jax.random.PRNGKey(3)
  keys = (key, jax.random.fold_in(key, tasks.base.RDROP_STREAM))
  passes = [jax.tree.map(float, plain.loss(params, batch, k, train=True)) for k in keys]
  logits = [task.model.apply({"params": params}, **task.model_inputs(batch),
                             deterministic=False, rngs={"dropout": k}) for k in keys]
  log_p, log_q = _numpy_log_softmax(logits[0]), _numpy_log_softmax(logits[1])
  per_position = np.sum((np.exp(log_p) - np.exp(log_q)) * (log_p - log_q), axis=-1) / 2
  _, weights = task.loss_targets(batch)
  kl = np.sum(per_position * np.asarray(weights))
  assert kl > 1e-3
  got = jax.tree.map(float, task.loss(params, batch, key, train=True))
  np.testing.assert_allclose(got["rdrop_kl"], kl, rtol=1e-4)
  np.testing.assert_allclose(
      got["loss"], (passes[0]["loss"] + passes[1]["loss"]) / 2 + alpha / 2 * kl, rtol=1e-5)
  for name in ("nll", "correct"):
    np.testing.assert_allclose(got[name], (passes[0][name] + passes[1][name]) / 2, rtol=1e-5)
  assert got["weight"] == passes[0]["weight"]
  assert jax.tree.map(float, task.loss(params, batch, None, train=False)) == jax.tree.map(
      float, plain.loss(params, batch, None, train=False))


def test_rdrop_in_masked_token_pretraining_and_without_dropout():
  """The masked-token objective reads its masked batch twice the same way; with no
  dropout in the model the two passes agree: the KL is 0 and the loss is the plain one."""
  config = _rdrop_config("classification", 0.3, 1.0)
  config.objective = "mlm"
  task = tasks.get_task(config)
  params = task.init_params(jax.random.PRNGKey(0))
  digits = np.arange(16, dtype=np.int32).reshape(2, 8) % 10 + synthetic.FIRST_DIGIT
  batch = {"inputs": jnp.asarray(digits),
           "label": jnp.zeros((2,), jnp.int32)}
  key = jax.random.PRNGKey(1)
  assert float(task.loss(params, batch, key, train=True)["rdrop_kl"]) > 1e-3
  config.optim.dropout_rate = 0.0
  without_dropout = tasks.get_task(config)
  got = without_dropout.loss(params, batch, key, train=True)
  assert abs(float(got["rdrop_kl"])) < 1e-6
  config.optim.rdrop_alpha = 0.0
  want = tasks.get_task(config).loss(params, batch, key, train=True)
  assert "rdrop_kl" not in want
  np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)


@pytest.mark.parametrize("task_name", ["classification", "generation", "translation"])
def test_the_z_loss_reaches_training_and_only_training(task_name):
  """optim.z_loss through each task's loss (tasks/base.py), not only losses.py: the
  training loss is the evaluation loss plus z_loss times the sum over real positions of
  (log Z)^2, NumPy from the model's logits (no dropout, so both read the same logits);
  evaluation scores the cross-entropy alone, and a zero z-loss adds nothing."""
  z = 1e-2
  config = _rdrop_config(task_name, 0.0, 0.0)
  config.optim.z_loss = z
  task = tasks.get_task(config)
  params = task.init_params(jax.random.PRNGKey(0))
  batch = _padded_batch(task, task_name)
  key = jax.random.PRNGKey(3)
  trained = jax.tree.map(float, task.loss(params, batch, key, train=True))
  evaluated = jax.tree.map(float, task.loss(params, batch, key, train=False))
  logits = np.asarray(task.model.apply({"params": params}, **task.model_inputs(batch),
                                       deterministic=True), np.float64)
  _, weights = task.loss_targets(batch)
  log_z = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
  squares = np.sum(log_z**2 * np.asarray(weights))
  assert squares > 1e-2 and "log_z_squared" not in evaluated
  np.testing.assert_allclose(trained["log_z_squared"], squares, rtol=1e-4)
  np.testing.assert_allclose(trained["loss"], evaluated["loss"] + z * squares, rtol=1e-5)
  np.testing.assert_allclose(trained["nll"], evaluated["nll"], rtol=1e-6)
  config.optim.z_loss = 0.0
  plain = jax.tree.map(float, tasks.get_task(config).loss(params, batch, key, train=True))
  np.testing.assert_allclose(plain["loss"], evaluated["loss"], rtol=1e-6)
