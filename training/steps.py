"""The pure steps and the state they update, and where they run (pmap over devices).

    TrainState           step, parameters, optimizer state, dropout key
    train_step           one optimizer update on a device's shard (micro-batches, psum)
    sam_gradient         the gradient at the sharpness-aware (SAM) point
    adversarial_gradient the gradient at the inputs and at their worst-case perturbed
                         embeddings (adversarial training)
    train_steps          several updates in one call (lax.scan of train_step over batches)
    eval_step            summed loss metrics of a batch (optionally with heads removed)
    compile_steps        the pmapped train, eval and predict functions: the one place
                         pmap appears, so a jit-with-sharding wrapper could serve them later
    compile_multi_step   the pmapped train_steps (config.train.steps_per_call > 1)
    replicate, prefetch_to_devices, unreplicate_to_host: host <-> device layouts

The steps take the task (tasks.base.Task) and the optimizer as arguments; nothing here
knows a task family or a file.
"""

import collections
import functools
import time
from typing import Any, List, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from training import reporting

AXIS = "devices"  # the pmap axis name, used by every collective


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; checkpoints hold it with host arrays."""
  step: jax.Array  # number of updates applied
  params: Any
  opt_state: Any
  rng: jax.Array  # base key; dropout keys are folded from it per step and device


# ----------------------------------------------------------------------------- steps


def psum_flat(tree: Any, axis_name: str) -> Any:
  """`jax.lax.psum(tree, axis_name)`, as one all-reduce of a flat vector per dtype.

  XLA:CPU reduces each array of a many-array all-reduce on its own: the gradients of a
  52-array model took 3.5 ms a step to sum over two devices, where one vector of the same
  size takes 0.3 ms. Concatenating the leaves costs a copy each way. Elsewhere (GPU, TPU)
  XLA combines the arrays of an all-reduce itself, and this is the plain psum. The train
  step uses it unless config.compute.flat_allreduce is False (docs/performance.md).
  """
  if jax.default_backend() != "cpu":
    return jax.lax.psum(tree, axis_name)
  leaves, treedef = jax.tree.flatten(tree)
  by_dtype = collections.defaultdict(list)  # dtype -> indices of its leaves, in order
  for i, leaf in enumerate(leaves):
    by_dtype[jnp.result_type(leaf)].append(i)
  groups = [jnp.concatenate([jnp.ravel(leaves[i]) for i in indices])
            for indices in by_dtype.values()]
  groups = jax.lax.psum(groups, axis_name)
  out = list(leaves)
  for vector, indices in zip(groups, by_dtype.values()):
    offset = 0
    for i in indices:
      size = int(np.prod(jnp.shape(leaves[i])))
      out[i] = vector[offset:offset + size].reshape(jnp.shape(leaves[i]))
      offset += size
  return jax.tree.unflatten(treedef, out)


def sam_gradient(loss_fn, params, rho: float):
  """`(gradient, aux)` for sharpness-aware minimisation (Foret et al., 2021, "SAM"):
  the gradient of `loss_fn` taken at `params + rho * g / ||g||`, where g is its gradient
  at `params`: the update then descends the worst loss within a ball of radius `rho`
  instead of the loss at one point. `loss_fn(params) -> (loss, aux)`; aux is returned
  from `params` itself (the metrics of the real weights). `rho=0`: the plain gradient,
  one pass. Otherwise two forward and backward passes.
  """
  grads, aux = jax.grad(loss_fn, has_aux=True)(params)
  if not rho:
    return grads, aux
  scale = rho / (optax.tree.norm(grads) + 1e-12)
  ascent = jax.tree.map(lambda p, g: p + (scale * g).astype(p.dtype), params, grads)
  return jax.grad(loss_fn, has_aux=True)(ascent)[0], aux


def adversarial_gradient(loss_fn, params, zeros, epsilon: float):
  """`(gradient, aux)` of adversarial training on the embeddings (Miyato et al., 2017,
  "Adversarial Training Methods for Semi-Supervised Text Classification"): the gradient
  of `(loss(x) + loss(x + r)) / 2`, where x are the embedded inputs and r the
  perturbation of L2 norm `epsilon` per example that increases the loss most to first
  order, r = epsilon * g / ||g|| with g the loss's gradient with respect to x (the norm
  over all of one example's positions and features). r is a constant of the second term.
  The paper sums the two losses; the mean keeps the gradient's scale that of the plain
  loss (equal to it as epsilon -> 0), which matters to SGD, whose step is proportional to
  the gradient (Adam's is not).

  `loss_fn(params, perturbations) -> (loss, aux)`; `zeros`: the perturbations at which
  the first term is taken (tasks.base.Task.embedding_perturbations), each leaf
  `[batch, ...]`. Two forward and backward passes; aux is the first's (the metrics of
  the unperturbed inputs).
  """
  (grads, g), aux = jax.grad(loss_fn, argnums=(0, 1), has_aux=True)(params, zeros)
  per_example = lambda x: jnp.sum(jnp.square(x.astype(jnp.float32)),  # noqa: E731
                                  axis=tuple(range(1, x.ndim)))
  norm = jnp.sqrt(sum(per_example(x) for x in jax.tree.leaves(g)))
  scale = epsilon / (norm + 1e-12)  # an example whose gradient is 0 (padding) gets r = 0
  r = jax.tree.map(lambda x: (x * scale.reshape((-1,) + (1,) * (x.ndim - 1))).astype(x.dtype),
                   g)
  adversarial = jax.grad(loss_fn, has_aux=True)(params, jax.lax.stop_gradient(r))[0]
  return jax.tree.map(lambda a, b: (a + b) / 2, grads, adversarial), aux


def train_step(state: TrainState, batch, *, task, tx, grad_accum_steps: int,
               sam_rho: float = 0.0, adversarial_eps: float = 0.0,
               flat_allreduce: bool = True):
  """One optimizer update on this device's shard of the batch.

  The loss is summed over tokens, the gradient and the token count are summed across
  micro-batches and devices, and the gradient is divided once by the global count.
  An update whose loss or gradient is not finite is not applied. With `sam_rho`
  (config.optim.sam_rho) each micro-batch's gradient is `sam_gradient`'s, its ascent
  step taken from that micro-batch's own gradient on this device (SAM's "m-sharpness":
  no collective, so the perturbation depends on the per-device micro-batch size). With
  `adversarial_eps` (config.optim.adversarial_eps) it is `adversarial_gradient`'s instead,
  each example's perturbation taken from its own gradient.
  """
  step_rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step),
                                jax.lax.axis_index(AXIS))

  def grads_and_sums(micro_batch, rng):
    def loss_fn(params, perturbations=None):
      extra = {} if perturbations is None else {"perturbations": perturbations}
      sums = task.loss(params, micro_batch, rng, train=True, **extra)
      return sums["loss"], sums
    if adversarial_eps:
      return adversarial_gradient(loss_fn, state.params,
                                  task.embedding_perturbations(state.params, micro_batch),
                                  adversarial_eps)
    return sam_gradient(loss_fn, state.params, sam_rho)

  if grad_accum_steps == 1:
    grads, sums = grads_and_sums(batch, step_rng)
  else:
    micro = jax.tree.map(lambda x: x.reshape((grad_accum_steps, -1) + x.shape[1:]), batch)

    def accumulate(carry, xs):
      index, micro_batch = xs
      new = grads_and_sums(micro_batch, jax.random.fold_in(step_rng, index))
      return jax.tree.map(jnp.add, carry, new), None

    zeros = jax.tree.map(jnp.zeros_like,
                         jax.eval_shape(grads_and_sums, jax.tree.map(lambda x: x[0], micro),
                                        step_rng))
    (grads, sums), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum_steps), micro))

  # Throughput counts real tokens of every sequence field (padding excluded).
  sums = {**sums, "tokens": sum(jnp.sum(batch[k] > 0).astype(jnp.float32)
                                for k in ("inputs", "targets") if k in batch)}
  grads, sums = (psum_flat if flat_allreduce else jax.lax.psum)((grads, sums), AXIS)
  grads = jax.tree.map(lambda g: g / jnp.maximum(sums["weight"], 1.0), grads)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(sums["loss"]) & jnp.isfinite(grad_norm)

  def apply_update(_):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return optax.apply_updates(state.params, updates), opt_state

  # A cond, not a select over every parameter: only the taken branch runs.
  params, opt_state = jax.lax.cond(finite, apply_update,
                                   lambda _: (state.params, state.opt_state), None)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  stats = {"grad_norm": grad_norm, "param_norm": optax.tree.norm(params),
           "nonfinite": 1.0 - finite.astype(jnp.float32)}
  return new_state, {**sums, **stats}


def train_steps(state: TrainState, batches, *, task, tx, grad_accum_steps: int,
                sam_rho: float = 0.0, adversarial_eps: float = 0.0,
                flat_allreduce: bool = True):
  """`n` updates in one call: `train_step` scanned over `batches`, whose leaves are
  `[n, ...]` (one batch per update, in order). Returns the state after the last update and
  each update's metrics stacked `[n]`. The same updates as `n` calls of `train_step`; one
  dispatch instead of `n` where the host's per-step overhead matters (short steps)."""
  step = functools.partial(train_step, task=task, tx=tx, grad_accum_steps=grad_accum_steps,
                           sam_rho=sam_rho, adversarial_eps=adversarial_eps,
                           flat_allreduce=flat_allreduce)
  return jax.lax.scan(step, state, batches)


def eval_step(params, batch, head_mask=None, *, task):
  """Summed loss metrics of one batch, summed over devices; `head_mask`: the heads to
  remove (see inspection.attention_maps.head_mask_tree), None for the whole model."""
  masked = {} if head_mask is None else {"head_mask": head_mask}  # the plain call otherwise
  return jax.lax.psum(task.loss(params, batch, None, train=False, **masked), AXIS)


def step_devices(devices: Sequence[jax.Device]) -> List[jax.Device]:
  """The devices a pmapped step spans: `devices` in one process; with several processes
  (jax.distributed), every process's local devices, process by process. Each process
  then calls the step with its own `[local_devices, ...]` arrays (host-local: its rows of
  the global batch) and gets its devices' outputs back; the collectives (psum) span all.

  (pmap given only this process's devices would run each process on its own, silently:
  no gradient would be summed across processes.)
  """
  if jax.process_count() == 1:
    return list(devices)
  if set(devices) != set(jax.local_devices()):
    raise ValueError(f"with {jax.process_count()} processes every process steps on all its "
                     f"local devices ({len(jax.local_devices())}), not {len(devices)}")
  return [d for p in range(jax.process_count()) for d in jax.local_devices(process_index=p)]


def _step_options(config) -> dict:
  """train_step's (and train_steps') keyword arguments that come from the config."""
  return dict(grad_accum_steps=config.train.grad_accum_steps, sam_rho=config.optim.sam_rho,
              adversarial_eps=config.optim.adversarial_eps,
              flat_allreduce=bool(config.compute.get("flat_allreduce", True)))


def compile_steps(task, tx, config, devices: Sequence[jax.Device]):
  """The pmapped train, eval and predict functions (the one place pmap appears)."""
  devices = step_devices(devices)
  p_train = jax.pmap(functools.partial(train_step, task=task, tx=tx, **_step_options(config)),
                     axis_name=AXIS, devices=devices, donate_argnums=(0,))
  p_eval = jax.pmap(functools.partial(eval_step, task=task), axis_name=AXIS, devices=devices)
  p_predict = jax.pmap(task.predict, axis_name=AXIS, devices=devices)
  return (AnnouncedCompile(p_train, "the train step"), AnnouncedCompile(p_eval, "the eval step"),
          AnnouncedCompile(p_predict, "the predict step"))


class AnnouncedCompile:
  """A pmapped step whose compilations are announced and timed. The first call (the one
  that traces and compiles it: a minute or more for a large model on a busy CPU) logs
  "compiling the train step ..." and "compiled the train step in 1m20s". A call whose
  inputs after the first (the batch) have shapes or dtypes not seen before compiles again,
  as with config.data.length_bucket: it is announced the same way, naming the new shapes.
  The seconds of both are kept for `take_compile_seconds` (the loop leaves them out of its
  rate and ETA, as it does evaluations). Everything else (`lower`, ...) is the step's."""

  def __init__(self, fn, name: str):
    self.fn, self.name, self.compiled = fn, name, False
    self._signatures, self._shapes = set(), set()
    self._compile_seconds = 0.0

  def __call__(self, *args):
    leaves = jax.tree.leaves(args[1:])  # (a Python number has no shape: its type stands in)
    signature = tuple((getattr(x, "shape", ()), getattr(x, "dtype", type(x))) for x in leaves)
    if signature in self._signatures:
      return self.fn(*args)
    what, shapes = self.name, {tuple(getattr(x, "shape", ())) for x in leaves}
    if self.compiled:  # the shapes not seen before (all of them if only a dtype is new)
      new = sorted(shapes - self._shapes or shapes)
      what += f" for inputs of new shapes ({', '.join(str(list(s)) for s in new)})"
    logging.info("compiling %s ...", what)
    start = time.perf_counter()
    out = self.fn(*args)  # returns once compiled; the computation itself runs on
    seconds = time.perf_counter() - start
    self._compile_seconds += seconds
    self.compiled = True
    self._signatures.add(signature)
    self._shapes |= shapes
    logging.info("compiled %s in %s", what, f"{seconds:.1f}s" if seconds < 10
                 else reporting.format_duration(seconds))
    return out

  def take_compile_seconds(self) -> float:
    """The seconds spent in calls that compiled, since the last call of this."""
    seconds, self._compile_seconds = self._compile_seconds, 0.0
    return seconds

  def __getattr__(self, name):
    return getattr(self.fn, name)


def compile_multi_step(task, tx, config, devices: Sequence[jax.Device]):
  """The pmapped `train_steps`: its batches are `[devices, n, per_device_batch, ...]` (see
  `prefetch_to_devices`' `sizes`), its metrics `[devices, n]`. One compilation per `n`
  (the loop uses only config.train.steps_per_call)."""
  return AnnouncedCompile(
      jax.pmap(functools.partial(train_steps, task=task, tx=tx, **_step_options(config)),
               axis_name=AXIS, devices=step_devices(devices), donate_argnums=(0,)),
      f"the train step x {config.train.steps_per_call} (steps_per_call)")


def compile_masked_eval(task, devices: Sequence[jax.Device]):
  """The pmapped eval step taking a head mask, the same on every device, as a third
  argument (head importance)."""
  return AnnouncedCompile(jax.pmap(functools.partial(eval_step, task=task), axis_name=AXIS,
                                   devices=step_devices(devices), in_axes=(0, 0, None)),
                          "the head-masked eval step")


# ----------------------------------------------------------------------------- state


def create_state(task, tx, seed: int) -> TrainState:
  """A fresh state on the host (device 0 of this process)."""
  params_rng, dropout_rng = jax.random.split(jax.random.PRNGKey(seed))
  params = task.initial_params(params_rng)
  return TrainState(step=jnp.array(0, jnp.int32), params=params, opt_state=tx.init(params),
                    rng=dropout_rng)


def replicate(tree, devices: Sequence[jax.Device]):
  """One copy of `tree` per device, laid out as the pmapped step returns its outputs.

  (flax.jax_utils.replicate uses another mesh axis name, so the step's second call would
  see a different input sharding and compile again.) `devices` are this process's: with
  several processes, pmap takes and returns such host-local arrays, each process's share
  of a global array over every process's devices (see `step_devices`).
  """
  sharding = device_sharding(devices)
  return jax.tree.map(
      lambda x: jax.device_put(np.stack([np.asarray(x)] * len(devices)), sharding), tree)


def device_sharding(devices: Sequence[jax.Device]) -> jax.sharding.NamedSharding:
  """Row i of a `[len(devices), ...]` array on `devices[i]`: the layout in which the
  pmapped steps take their inputs (this process's devices, see `replicate`)."""
  return jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), (AXIS,)),
                                    jax.sharding.PartitionSpec(AXIS))


def prefetch_to_devices(iterator, devices: Sequence[jax.Device], size: int, count: int,
                        sizes: Optional[Sequence[int]] = None):
  """Yields pairs (batch, position) from a grain iterator of host batches
  `[local_devices, per_device_batch, ...]`: `count` of them, one per step, or with `sizes`
  one per entry of `sizes`, whose batch is that many consecutive host batches stacked
  `[local_devices, n, per_device_batch, ...]` when n > 1 (the input of
  `compile_multi_step`'s function) and a plain batch when n = 1.

  With `size` > 0 each item is put on `devices` (`device_sharding`) `size` items before
  it is yielded, so its host-to-device copy (asynchronous) overlaps the steps before it
  instead of starting when its step is called; with 0 the host batches pass through (the
  pmapped step copies them). `position` is the iterator's state just after the item's
  last batch: a checkpoint saved after the item's steps must hold it, not the state after
  the batches already fetched ahead, or a resumed run would skip them. Nothing past the
  items asked for is read.
  """
  sharding = device_sharding(devices)
  sizes = [1] * count if sizes is None else list(sizes)
  queue = collections.deque()
  fetched = 0
  for _ in range(len(sizes)):
    while fetched < len(sizes) and len(queue) <= size:
      group = [next(iterator) for _ in range(sizes[fetched])]
      position = iterator.get_state()
      batch = group[0] if len(group) == 1 else jax.tree.map(stack_padded, *group)
      queue.append((jax.device_put(batch, sharding) if size else batch, position))
      fetched += 1
    yield queue.popleft()


def stack_padded(*arrays: np.ndarray) -> np.ndarray:
  """Host batch arrays `[local_devices, ...]` of one call, stacked `[local_devices, n, ...]`;
  arrays of different shapes (config.data.length_bucket cuts each batch to its own length)
  are first padded with 0, the padding id, to the largest along each axis."""
  shape = np.max([a.shape for a in arrays], axis=0)
  padded = [np.pad(a, [(0, int(m) - n) for n, m in zip(a.shape, shape)]) for a in arrays]
  return np.stack(padded, axis=1)


def unreplicate_to_host(tree):
  """Device 0's copy of a pmapped pytree, as numpy arrays (what checkpoints hold)."""
  return jax.tree.map(
      lambda x: np.asarray(x.addressable_shards[0].data).reshape(x.shape[1:]), tree)
