"""The one generic training loop: state, pmapped steps, evaluation, checkpoints, logs.

    train_and_evaluate(config, workdir)  train (resuming from the newest checkpoint), then
                                         evaluate and print a few examples
    evaluate_checkpoint(config, workdir) restore the newest checkpoint and evaluate it

Everything task-specific goes through the `tasks.base.Task` interface. The steps are pure
functions of (state, batch); pmap and the axis name are applied in one place
(`compile_steps`), so a jit-with-sharding wrapper could serve the same functions later.
"""

import collections
import functools
import json
import os
import shutil
import time
import zlib
from typing import Any, Dict, List, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

import tasks
import validation
from input_pipeline import batching
from tasks import attention_maps
from training import checkpointing, optimizers, preemption, reporting

AXIS = "devices"  # the pmap axis name, used by every collective


class NonFiniteLossError(RuntimeError):
  """The loss or gradients became NaN/inf; the offending update was not applied."""


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; checkpoints hold it with host arrays."""
  step: jax.Array  # number of updates applied
  params: Any
  opt_state: Any
  rng: jax.Array  # base key; dropout keys are folded from it per step and device


# ----------------------------------------------------------------------------- steps


def train_step(state: TrainState, batch, *, task, tx, grad_accum_steps: int):
  """One optimizer update on this device's shard of the batch.

  The loss is summed over tokens, the gradient and the token count are summed across
  micro-batches and devices, and the gradient is divided once by the global count.
  An update whose loss or gradient is not finite is not applied.
  """
  step_rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step),
                                jax.lax.axis_index(AXIS))

  def grads_and_sums(micro_batch, rng):
    def loss_fn(params):
      sums = task.loss(params, micro_batch, rng, train=True)
      return sums["loss"], sums
    return jax.grad(loss_fn, has_aux=True)(state.params)

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
  grads, sums = jax.lax.psum((grads, sums), AXIS)
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


def eval_step(params, batch, head_mask=None, *, task):
  """Summed loss metrics of one batch, summed over devices; `head_mask`: the heads to
  remove (see tasks.attention_maps.head_mask_tree), None for the whole model."""
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


def compile_steps(task, tx, config, devices: Sequence[jax.Device]):
  """The pmapped train, eval and predict functions (the one place pmap appears)."""
  devices = step_devices(devices)
  p_train = jax.pmap(functools.partial(train_step, task=task, tx=tx,
                                       grad_accum_steps=config.train.grad_accum_steps),
                     axis_name=AXIS, devices=devices, donate_argnums=(0,))
  p_eval = jax.pmap(functools.partial(eval_step, task=task), axis_name=AXIS, devices=devices)
  p_predict = jax.pmap(task.predict, axis_name=AXIS, devices=devices)
  return p_train, p_eval, p_predict


def compile_masked_eval(task, devices: Sequence[jax.Device]):
  """The pmapped eval step taking a head mask, the same on every device, as a third
  argument (head importance)."""
  return jax.pmap(functools.partial(eval_step, task=task), axis_name=AXIS,
                  devices=step_devices(devices), in_axes=(0, 0, None))


# ----------------------------------------------------------------------------- state


def create_state(task, tx, seed: int) -> TrainState:
  """A fresh state on the host (device 0 of this process)."""
  params_rng, dropout_rng = jax.random.split(jax.random.PRNGKey(seed))
  params = jax.jit(task.init_params)(params_rng)
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


def prefetch_to_devices(iterator, devices: Sequence[jax.Device], size: int, count: int):
  """Yields `count` pairs (batch, position) from a grain iterator of host batches
  `[local_devices, per_device_batch, ...]`.

  With `size` > 0 each batch is put on `devices` (`device_sharding`) `size` batches before
  it is yielded, so its host-to-device copy (asynchronous) overlaps the steps before it
  instead of starting when its step is called; with 0 the host batches pass through (the
  pmapped step copies them). `position` is the iterator's state just after that batch: a
  checkpoint saved after the batch's step must hold it, not the state after the batches
  already fetched ahead, or a resumed run would skip them. Nothing past `count` is read.
  """
  sharding = device_sharding(devices)
  queue = collections.deque()
  fetched = 0
  for _ in range(count):
    while fetched < count and len(queue) <= size:
      batch = next(iterator)
      position = iterator.get_state()
      queue.append((jax.device_put(batch, sharding) if size else batch, position))
      fetched += 1
    yield queue.popleft()


def unreplicate_to_host(tree):
  """Device 0's copy of a pmapped pytree, as numpy arrays (what checkpoints hold)."""
  return jax.tree.map(
      lambda x: np.asarray(x.addressable_shards[0].data).reshape(x.shape[1:]), tree)


def parameter_table(params, depth: int = 2) -> str:
  """Parameter counts grouped by the first `depth` levels of module names."""
  counts: Dict[str, int] = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    names = [str(getattr(k, "key", k)) for k in path]
    key = "/".join(names[:depth])
    counts[key] = counts.get(key, 0) + int(np.prod(leaf.shape))
  width = max(len(k) for k in counts)
  lines = [f"{'module':<{width}}  {'parameters':>12}"]
  lines += [f"{k:<{width}}  {v:>12,}" for k, v in counts.items()]
  lines.append(f"{'total':<{width}}  {sum(counts.values()):>12,}")
  return "\n".join(lines)


def count_parameters(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


# ----------------------------------------------------------------------------- evaluation


def _sum_dicts(dicts: List[Dict[str, float]]) -> Dict[str, float]:
  out: Dict[str, float] = {}
  for d in dicts:
    for k, v in d.items():
      out[k] = out.get(k, 0.0) + float(v)
  return out


def _gather_processes(tree):
  """Every process's `[local_devices, ...]` arrays of `tree`, concatenated in process
  order into `[all devices, ...]`: the global batch (and its predictions), the same in
  every process. A collective: every process must call it."""
  gathered = multihost_utils.process_allgather(tree)  # [processes, local_devices, ...]
  return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), gathered)


def evaluate(task, p_eval, p_predict, params, eval_dataset, split: str = "eval",
             num_examples: int = 0, decode_batches: Optional[int] = None,
             loss_batches: Optional[int] = None):
  """Loss metrics over the first `loss_batches` batches of the split (all when None), and
  predictions scored on its first `decode_batches` batches (all when None).

  Returns (metrics from `task.summarize`, example lines, per-example output records).
  With several processes, each scores the whole split: every process calls this with the
  same number of batches (its rows of each global batch) and gets the same results.
  """
  loss_sums, score_sums, records, lines = [], [], [], []
  if not task.scores_predictions and not num_examples:
    decode_batches = 0  # predictions that are neither scored nor shown are not made
  for index, batch in enumerate(batching.iterate(eval_dataset, limit=loss_batches)):
    loss_sums.append(p_eval(params, batch))
    if decode_batches is not None and index >= decode_batches:
      continue
    predictions = np.asarray(p_predict(params, batch))
    if jax.process_count() > 1:
      batch, predictions = _gather_processes((batch, predictions))
    flat_batch = {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}
    flat_predictions = predictions.reshape((-1,) + predictions.shape[2:])
    score_sums.append(task.score(flat_batch, flat_predictions))
    records += task.outputs(flat_batch, flat_predictions, split)
    if len(lines) < num_examples:
      lines += task.format_examples(flat_batch, flat_predictions, num_examples - len(lines),
                                    split=split)
  sums = _sum_dicts([jax.tree.map(lambda x: x[0], s) for s in jax.device_get(loss_sums)])
  sums.update(_sum_dicts(score_sums))
  return task.summarize(sums, records), lines, records


# ----------------------------------------------------------------------------- the loop


def _chief_first(build, barrier: str):
  """`build()` in process 0 first, then in the others (after a barrier named `barrier`):
  what it writes to shared files (a tokenizer or labels in the workdir, prepared tfds
  data) is written by one process, and the others read it. Process 0 reaches the barrier
  even when `build` fails, so the others never wait for it forever."""
  if jax.process_count() == 1:
    return build()
  if jax.process_index() == 0:
    try:
      return build()
    finally:
      multihost_utils.sync_global_devices(barrier)
  multihost_utils.sync_global_devices(barrier)
  return build()


def _setup(config: ml_collections.ConfigDict, workdir: str,
           devices: Optional[Sequence[jax.Device]], training: bool = True,
           split: str = "eval"):
  reporting.quiet_library_logs()
  devices = list(devices or jax.local_devices())
  validation.validate(config, num_devices=len(devices) * jax.process_count())
  logging.info("%d local %s device(s) in process %d of %d", len(devices),
               devices[0].platform, jax.process_index(), jax.process_count())

  def task_and_eval_data():  # opening the eval split may prepare the tfds data
    task = tasks.get_task(config, workdir, training=training)
    return task, task.eval_dataset(split, config.eval.eval_batch_size, len(devices),
                                   jax.process_index(), jax.process_count())

  task, eval_dataset = _chief_first(task_and_eval_data, "task files written")
  tx = optimizers.make_optimizer(config)
  return devices, task, tx, eval_dataset


def _evaluate_and_report(title: str, step: int, task, p_eval, p_predict, params,
                         eval_dataset, writer: Optional[reporting.MetricWriter],
                         num_examples: int = 0, decode_batches: Optional[int] = None,
                         split: str = "eval", prefix: str = "eval",
                         loss_batches: Optional[int] = None,
                         elapsed: Optional[float] = None, attention_examples: int = 0):
  """Evaluates, writes the metrics (and example lines) to `writer` under `prefix/`, and
  logs them. `elapsed`: seconds since the run started, logged beside the metrics.
  `attention_examples`: also the attention maps of that many eval examples (images), the
  per-head statistics (a text table) and their means (scalars and a log table).

  Returns (metrics, output records).
  """
  metrics, lines, records = evaluate(task, p_eval, p_predict, params, eval_dataset, split,
                                     num_examples, decode_batches, loss_batches)
  texts = task.summary_texts(records)
  attention = attention_maps.EvalSummaries({}, {}, {}, "")
  if attention_examples and writer is not None and writer.enabled:
    device_0 = jax.tree.map(lambda x: x.addressable_shards[0].data.reshape(x.shape[1:]),
                            params)
    attention = attention_maps.eval_summaries(task, device_0, attention_examples)
  if writer is not None:
    extra = {} if elapsed is None else {f"{prefix}/elapsed_seconds": elapsed}
    writer.write_scalars(step, {**{f"{prefix}/{k}": v for k, v in metrics.items()},
                                **extra,
                                **{f"{prefix}/{k}": v for k, v in attention.scalars.items()}})
    if lines:
      writer.write_text(step, f"{prefix}/examples", "\n\n".join(lines))
    for name, text in {**texts, **attention.texts}.items():  # rendered as markdown
      writer.write_text(step, f"{prefix}/{name}", "    " + text.replace("\n", "\n    "))
    for name, image in {**task.summary_images(records), **attention.images}.items():
      writer.write_image(step, f"{prefix}/{name}", image)
  logging.info("%s at step %d: %s%s%s%s", title, step,
               "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()),
               "".join(f"\n{name}:\n{text}" for name, text in texts.items()),
               f"\nattention (means over layers and heads):\n{attention.log}"
               if attention.log else "",
               "".join("\n" + line for line in lines))
  return metrics, records


class BestCheckpoint:
  """Keeps the checkpoint with the best value of `config.eval.best_metric` in <workdir>/best.

  Every process calls `update` (an orbax save involves them all); process 0 (`is_chief`)
  decides and writes the record best.json.
  """

  LOWER_IS_BETTER = ("loss", "perplexity")

  def __init__(self, config, workdir: str, is_chief: bool = True):
    self.metric = config.eval.best_metric
    self.enabled = bool(self.metric)
    self.is_chief = is_chief
    self.record = os.path.join(workdir, "best", "best.json")
    self.best = None
    if self.enabled and os.path.exists(self.record):
      with open(self.record, encoding="utf-8") as f:
        self.best = json.load(f)["value"]
    self.checkpoints = (checkpointing.Checkpointer(workdir, keep=1, subdir="best")
                        if self.enabled else None)

  def update(self, step: int, metrics: Dict[str, float], host_state, config_dict) -> None:
    if not self.enabled or self.metric not in metrics:
      return
    value = metrics[self.metric]
    lower = self.metric in self.LOWER_IS_BETTER
    better = self.best is None or (value < self.best if lower else value > self.best)
    if jax.process_count() > 1:  # all save or none: process 0's decision
      better = bool(multihost_utils.broadcast_one_to_all(np.int32(better)))
    if not better:
      return
    self.best = value
    self.checkpoints.save(step, host_state, config_dict)
    self.checkpoints.wait()  # the record below must never name a checkpoint not on disk
    if self.is_chief:
      write_atomically(self.record, json.dumps(
          {"metric": self.metric, "value": value, "step": step}))
    logging.info("new best %s %.4g at step %d (saved in %s)", self.metric, value, step,
                 self.checkpoints.directory)

  def close(self) -> None:
    if self.checkpoints is not None:
      self.checkpoints.close()


def _prepare_workdir(workdir: str, config, is_chief: bool) -> None:
  """Creates `workdir` and writes its config.json (atomically: a kill never leaves half a
  file). An unwritable workdir stops the run here, before any compute."""
  try:
    os.makedirs(workdir, exist_ok=True)
    if is_chief:
      write_atomically(os.path.join(workdir, "config.json"), config.to_json(indent=2))
  except OSError as e:
    raise checkpointing.CheckpointWriteError(
        f"cannot write to --workdir={workdir} ({e.strerror or e}); give a directory this "
        f"user can create and write") from e


class NonFiniteGuard:
  """Acts on the steps whose loss or gradient was not finite (their update was never
  applied, see train_step): config.train.nonfinite_updates="stop" stops the run at the first,
  "skip" counts them and stops once more than config.train.max_skipped_updates were skipped."""

  def __init__(self, config, directory: str):
    self.skip = config.train.nonfinite_updates == "skip"
    self.limit = config.train.max_skipped_updates
    self.directory = directory
    self.skipped = 0

  def check(self, flags: List[float], done: int, last_saved: Optional[int]) -> None:
    """`flags` are the `nonfinite` metrics of the steps ending at `done`."""
    bad = [done - len(flags) + 1 + i for i, flag in enumerate(flags) if flag]
    if not bad:
      return
    saved = (f"step {last_saved} in {self.directory}" if last_saved is not None
             else f"(none) in {self.directory}")
    if self.skip:
      self.skipped += len(bad)
      logging.warning("non-finite loss or gradient: skipped the update of step(s) %s "
                      "(%d skipped in this run)", ", ".join(map(str, bad)), self.skipped)
      if self.skipped <= self.limit:
        return
      raise NonFiniteLossError(
          f"{self.skipped} updates skipped for a non-finite loss or gradient in this run, "
          f"more than config.train.max_skipped_updates={self.limit} (the last at step {bad[-1]}); "
          f"no checkpoint holds a non-finite value. Last good checkpoint: {saved}. Lower "
          f"config.optim.learning_rate, raise config.optim.warmup_steps or enable config.optim.max_grad_norm.")
    raise NonFiniteLossError(
        f"non-finite loss or gradient at step {bad[0]}; that update was skipped and no "
        f"checkpoint was written after it. Last good checkpoint: {saved}. Lower "
        f"config.optim.learning_rate, raise config.optim.warmup_steps or enable config.optim.max_grad_norm "
        f"(or set config.train.nonfinite_updates='skip' to skip such updates).")


class StepTrace:
  """A jax.profiler trace (config.train.profile_steps) of the `count` steps after a run's first
  (which compiles), written under `directory` (TensorBoard's profile plugin or XProf
  reads it: `<directory>/plugins/profile/<time>/<host>.xplane.pb`).

  The device is waited for at both ends, so the trace holds exactly those steps, their
  input pipeline and their host-to-device copies, not the compilation before them.
  """

  def __init__(self, directory: str, first: int, count: int):
    """first: the run's first step (0-based: the number of updates applied before it)."""
    self.directory, self.start, self.count = directory, first + 1, count
    self.active = False
    self.done = first

  def before(self, step: int, state) -> None:
    """Call before step `step` (0-based) is dispatched, with the state it will update."""
    if self.count and step == self.start:
      jax.block_until_ready(state)
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after(self, done: int, state) -> None:
    """Call after the step that leaves `done` updates applied, with its output state."""
    self.done = done
    if self.active and done == self.start + self.count:
      self.close(state)

  def close(self, state=None) -> None:
    """Ends the trace if one is running (also when the run ends or fails early)."""
    if not self.active:
      return
    self.active = False
    if state is not None:
      jax.block_until_ready(state)
    jax.profiler.stop_trace()
    logging.info("profiler trace of steps %d to %d written to %s", self.start + 1,
                 self.done, self.directory)


def _stop_signal(stop: preemption.StopRequest, step: int, every: int) -> int:
  """The signal that asks this run to stop after `step` (0: none), the same on every
  process: they must all stop after the same step, or the others would wait forever in
  the next one. With several processes that agreement is a blocking collective, made
  only every `every` steps."""
  if jax.process_count() == 1:
    return stop.signum or 0
  if step % every:
    return 0
  return int(np.max(multihost_utils.process_allgather(np.int32(stop.signum or 0))))


def _close_all(*closables) -> None:
  """Closes each (waiting for pending checkpoint writes) even if an earlier one fails."""
  for item in closables:
    try:
      item.close()
    except Exception as e:  # pylint: disable=broad-except  # do not hide the first error
      logging.error("while closing %s: %s", type(item).__name__, e)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       devices: Optional[Sequence[jax.Device]] = None,
                       final_evaluation: bool = True) -> Dict[str, float]:
  """Trains `config` in `workdir`, resuming from its newest checkpoint; returns the final
  evaluation metrics (empty without `final_evaluation`, which benchmarks skip). `devices`
  defaults to all local devices.

  SIGTERM or SIGINT stop it after the current step with a complete checkpoint
  (preemption.Preempted is raised); a resumed run continues from that checkpoint's
  parameters, optimizer state and data position exactly.
  """
  run_start = time.perf_counter()
  fresh = not os.path.exists(workdir)
  try:  # the training data is checked before anything is written into the workdir
    devices, task, tx, eval_dataset = _setup(config, workdir, devices)
    train_dataset = task.train_dataset(config.train.batch_size, len(devices),
                                       jax.process_index(), jax.process_count())
  except Exception:
    if fresh and jax.process_index() == 0:  # e.g. a tokenizer trained on unusable data
      shutil.rmtree(workdir, ignore_errors=True)
    raise
  is_chief = jax.process_index() == 0
  checkpoints = checkpointing.Checkpointer(workdir, keep=config.train.keep_checkpoints)
  start_step = checkpoints.latest_step()
  state = create_state(task, tx, config.seed)
  data_state = None
  try:
    if start_step is not None:  # checked before config.json is replaced by this config
      validation.check_same_model(checkpoints.restore_config(start_step) or {}, config,
                                  checkpoints.directory)
    _prepare_workdir(workdir, config, is_chief)
    logging.info("config:\n%s", config)
    logging.info("parameters:\n%s", parameter_table(state.params))
    if start_step is not None:
      state = checkpoints.restore(jax.device_get(state), start_step)
      data_state = checkpoints.restore_data_state(start_step)
      logging.info("resumed from the checkpoint at step %d in %s", int(state.step),
                   checkpoints.directory)
  except BaseException:
    _close_all(checkpoints)
    raise
  start = int(state.step)
  total = config.train.num_train_steps
  schedule = optimizers.learning_rate_schedule(config.optim.schedule, config.optim.learning_rate,
                                               config.optim.warmup_steps, total)
  p_train, p_eval, p_predict = compile_steps(task, tx, config, devices)
  p_state = replicate(state, devices)
  del state

  train_iter = batching.iterate(train_dataset, num_threads=config.data.data_threads,
                                prefetch=config.data.data_prefetch)
  if data_state is None and start:
    logging.warning("the checkpoint of step %d holds no data iterator state (it predates "
                    "them or another process count wrote it); continuing at batch %d",
                    start, start)
    data_state = {"next_index": start}
  if data_state is not None:
    train_iter.set_state(data_state)
  batches = prefetch_to_devices(train_iter, devices, config.data.device_prefetch,
                                max(total - start, 0))
  trace = StepTrace(os.path.join(workdir, "profile", *(
      [f"process_{jax.process_index()}"] if jax.process_count() > 1 else [])),
                    start, config.train.profile_steps)
  writer = reporting.MetricWriter(workdir, enabled=is_chief)
  best = BestCheckpoint(config, workdir, is_chief=is_chief)
  progress = reporting.Progress(start, total)
  history: List[Dict[str, jax.Array]] = []
  config_dict = json.loads(config.to_json())
  last_saved = checkpoints.latest_step()
  guard = NonFiniteGuard(config, checkpoints.directory)
  decode_batches = config.eval.num_decode_batches or None

  if start >= total:
    logging.info("training already finished (step %d of %d)", start, total)
  try:
    with preemption.StopRequest() as stop:
      for step in range(start, total):
        trace.before(step, p_state)
        batch, position = next(batches)
        with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):
          p_state, metrics = p_train(p_state, batch)
        history.append(metrics)
        done = step + 1
        trace.after(done, p_state)
        stopping = _stop_signal(stop, done, config.train.signal_check_every_steps)

        if done % config.train.log_every_steps == 0 or done == total or stopping:
          fetched = [jax.tree.map(lambda x: float(x[0]), m) for m in jax.device_get(history)]
          guard.check([m["nonfinite"] for m in fetched], done, last_saved)
          sums = _sum_dicts(fetched)
          speed = progress.update(done, sums["tokens"])
          train_metrics = {
              "loss": sums["loss"] / max(sums["weight"], 1.0),
              "accuracy": sums["correct"] / max(sums["weight"], 1.0),
              "learning_rate": float(schedule(done - 1)),
              "grad_norm": sums["grad_norm"] / len(fetched),
              "param_norm": fetched[-1]["param_norm"],
              "tokens_per_sec": speed["tokens_per_sec"],
              "steps_per_sec": speed["steps_per_sec"],
          }
          if guard.skip:
            train_metrics["skipped_updates"] = guard.skipped
          writer.write_scalars(done, {f"train/{k}": v for k, v in train_metrics.items()})
          eta = reporting.format_duration(speed["eta_seconds"])
          logging.info(
              "step %d/%d  loss %.4f  acc %.4f  lr %.3g  |g| %.3g  %s tok/s  %.1f steps/s  "
              "ETA %s%s", done, total, train_metrics["loss"], train_metrics["accuracy"],
              train_metrics["learning_rate"], train_metrics["grad_norm"],
              f"{speed['tokens_per_sec']:,.0f}", speed["steps_per_sec"], eta,
              " (includes compilation)" if speed["includes_compile"] else "")
          history = []

        # Periodic evaluations ("eval/" in the logs) decode the same `num_decode_batches`
        # batches every time, so their scores compare (the best checkpoint relies on that);
        # the final evaluation below decodes the whole split ("final/").
        if done % config.eval.eval_every_steps == 0 and not stopping:
          t0 = time.perf_counter()
          metrics, _ = _evaluate_and_report(
              "eval", done, task, p_eval, p_predict, p_state.params, eval_dataset, writer,
              num_examples=config.eval.num_print_examples if task.prints_samples else 0,
              decode_batches=decode_batches, loss_batches=config.eval.num_eval_batches or None,
              elapsed=t0 - run_start, attention_examples=config.eval.num_attention_images)
          best.update(done, metrics, unreplicate_to_host(p_state), config_dict)
          progress.exclude(time.perf_counter() - t0)

        if done % config.train.checkpoint_every_steps == 0 or done == total or stopping:
          t0 = time.perf_counter()
          if not guard.skip:
            guard.check([float(m["nonfinite"][0]) for m in history], done, last_saved)
          # The position after this step's batch (the iterator itself has read ahead).
          checkpoints.save(done, unreplicate_to_host(p_state), config_dict,
                           data_state=position)
          last_saved = done
          progress.exclude(time.perf_counter() - t0)

        if stopping:
          checkpoints.wait()
          logging.warning("stopped by signal %d after step %d; checkpoint complete in %s",
                          stopping, done, checkpoints.directory)
          raise preemption.Preempted(done, stopping, checkpoints.directory)
    trace.close(p_state)  # a run shorter than the trace: what ran, without the evaluation
    checkpoints.wait()
    if not final_evaluation:
      return {}
    eval_metrics, _ = _evaluate_and_report(
        "final evaluation", max(start, total), task, p_eval, p_predict, p_state.params,
        eval_dataset, writer, num_examples=config.eval.num_print_examples, prefix="final",
        decode_batches=_final_decode_batches(task, config),
        elapsed=time.perf_counter() - run_start, attention_examples=config.eval.num_attention_images)
    return eval_metrics
  finally:
    _close_all(trace, best, checkpoints, writer)


def _final_decode_batches(task, config) -> Optional[int]:
  """Batches a whole-split evaluation predicts: all of them where predictions are scored,
  else only the num_decode_batches shown as samples."""
  return None if task.scores_predictions else (config.eval.num_decode_batches or None)


CHECKPOINT_KINDS = {"latest": "checkpoints", "best": "best", "averaged": "averaged"}


def _restore_params(task, tx, config, workdir: str, checkpoint: str = "latest",
                    step: Optional[int] = None):
  """(step, host params) of a checkpoint of `workdir`: the newest (or `step`'s) regular
  one, the best one or the averaged one; never creates anything in the workdir."""
  subdir = CHECKPOINT_KINDS[checkpoint]
  directory = checkpointing.checkpoint_directory(workdir, subdir)
  hint = {"latest": "train first with --mode=train and the same --workdir",
          "best": "set config.eval.best_metric when training to keep the best checkpoint",
          "averaged": "create it with --mode=average"}[checkpoint]
  if not os.path.isdir(directory):  # checked first: reading must not create the workdir
    raise checkpointing.CheckpointError(f"no {checkpoint} checkpoint in {directory}; {hint}")
  checkpoints = checkpointing.Checkpointer(workdir, keep=config.train.keep_checkpoints,
                                           subdir=subdir)
  try:
    if checkpoints.latest_step() is None:
      raise checkpointing.CheckpointError(f"no {checkpoint} checkpoint in {directory}; {hint}")
    if step is not None and step not in checkpoints.all_steps():
      raise checkpointing.CheckpointError(
          f"no checkpoint of step {step} in {directory}; it has steps "
          f"{', '.join(map(str, checkpoints.all_steps()))}")
    wanted = checkpoints.latest_step() if step is None else step
    validation.check_same_model(checkpoints.restore_config(wanted) or {}, config, directory)
    template = jax.eval_shape(lambda: create_state(task, tx, config.seed))
    state = checkpoints.restore(template, wanted)
  finally:
    checkpoints.close()
  return int(state.step), state.params


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        devices: Optional[Sequence[jax.Device]] = None,
                        step: Optional[int] = None, split: Optional[str] = None,
                        checkpoint: str = "latest") -> Dict[str, float]:
  """Restores a checkpoint of `workdir` (see `_restore_params`), decodes and scores the
  whole `split` (default config.data.eval_split), writes the scores (JSON) and, for tasks that
  produce text, the predictions (one per line, in dataset order) under <workdir>/eval/,
  and prints a table. Returns the metrics."""
  split = split or config.data.eval_split
  devices, task, tx, eval_dataset = _setup(config, workdir, devices, training=False,
                                           split=split)
  step, params = _restore_params(task, tx, config, workdir, checkpoint, step)
  _, p_eval, p_predict = compile_steps(task, tx, config, devices)
  start = time.perf_counter()
  metrics, records = _evaluate_and_report(
      f"evaluation of the {checkpoint} checkpoint on {split}", step, task, p_eval, p_predict,
      replicate(params, devices), eval_dataset, writer=None,
      num_examples=config.eval.num_print_examples, split=split,
      decode_batches=_final_decode_batches(task, config))
  seconds = time.perf_counter() - start
  if jax.process_index() == 0:
    out_dir = os.path.join(workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{split}-{checkpoint}-step{step}")
    report = {"split": split, "checkpoint": checkpoint, "step": step,
              "examples": len(records), "seconds": seconds, "metrics": metrics,
              "beam_size": config.decode.beam_size, "length_penalty": config.decode.length_penalty,
              **task.score_details(), **task.eval_report(records)}
    records.sort(key=lambda r: r["index"])
    predictions = task.prediction_file(records)
    if predictions:
      key, suffix, text = predictions
      write_atomically(stem + suffix, text)
      report[key] = stem + suffix
    write_atomically(stem + ".json", json.dumps(report, indent=2) + "\n")
    width = max(len(k) for k in metrics)
    print(f"{split} ({checkpoint} checkpoint, step {step}, {len(records) or ''} examples)")
    for k, v in metrics.items():
      print(f"  {k:<{width}}  {v:10.4f}")
    for name, signature in task.score_details().get("signatures", {}).items():
      print(f"  {name} signature: {signature}")
    for name, text in task.summary_texts(records).items():
      print(f"{name}:\n{text}")
    print(f"scores: {stem}.json" +
          (f"  {predictions[0]}: {stem}{predictions[1]}" if predictions else ""))
  return metrics


def write_atomically(path: str, data) -> None:
  """Writes `data` (str or bytes) to `path` whole or not at all (a kill leaves the old
  file); a directory that cannot be written is a CheckpointWriteError (a user error)."""
  tmp = path + ".tmp"
  try:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(tmp, "wb" if isinstance(data, bytes) else "w",
              **({} if isinstance(data, bytes) else {"encoding": "utf-8", "newline": ""})) as f:
      f.write(data)
    os.replace(tmp, path)
  except OSError as e:
    raise checkpointing.CheckpointWriteError(
        f"cannot write {path} ({e.strerror or e}); give a --workdir this user can create "
        f"and write") from e


def _lines_through_predict(config: ml_collections.ConfigDict, workdir: str,
                           lines: List[str], encode: str, render: str,
                           devices: Optional[Sequence[jax.Device]], checkpoint: str,
                           step: Optional[int]) -> List[str]:
  """Runs the pmapped `task.predict` of a checkpoint of `workdir` on `lines`: examples
  from `task.<encode>(texts)`, one output line per input line from `task.<render>(output)`
  (an empty input line gives an empty output line)."""
  reporting.quiet_library_logs()
  devices = list(devices or jax.local_devices())
  validation.validate(config, num_devices=len(devices))
  task = tasks.get_task(config, workdir, training=False)
  tx = optimizers.make_optimizer(config)
  _, params = _restore_params(task, tx, config, workdir, checkpoint, step)
  _, _, p_predict = compile_steps(task, tx, config, devices)
  params = replicate(params, devices)
  wanted = [i for i, line in enumerate(lines) if line.strip()]
  examples = getattr(task, encode)([lines[i] for i in wanted])
  outputs = [""] * len(lines)
  if examples:
    dataset = batching.batched_dataset(examples, batch_size=config.eval.eval_batch_size,
                                       num_devices=len(devices), lengths=task.eval_lengths,
                                       shuffle=False)
    for batch in batching.iterate(dataset):
      predictions = np.asarray(p_predict(params, batch))
      flat_inputs = batch["inputs"].reshape((-1, batch["inputs"].shape[-1]))
      flat_index = batch["index"].reshape(-1)
      flat_predictions = predictions.reshape((-1,) + predictions.shape[2:])
      for x, index, output in zip(flat_inputs, flat_index, flat_predictions):
        if x.any():
          outputs[wanted[int(index)]] = getattr(task, render)(output)
  return outputs


def decode_lines(config: ml_collections.ConfigDict, workdir: str, lines: List[str],
                 devices: Optional[Sequence[jax.Device]] = None,
                 checkpoint: str = "latest", step: Optional[int] = None) -> List[str]:
  """Translates `lines` with a checkpoint of `workdir`: one output line per input line
  (an empty input line gives an empty output line)."""
  return _lines_through_predict(config, workdir, lines, "encode_sources", "detokenize",
                                devices, checkpoint, step)


def predict_lines(config: ml_collections.ConfigDict, workdir: str, lines: List[str],
                  devices: Optional[Sequence[jax.Device]] = None,
                  checkpoint: str = "latest", step: Optional[int] = None) -> List[str]:
  """Classifies `lines` with a checkpoint of `workdir`: one output line per input line,
  the predicted class and the class probabilities as `task.format_prediction` writes them
  (an empty input line gives an empty output line)."""
  return _lines_through_predict(config, workdir, lines, "encode_texts", "format_prediction",
                                devices, checkpoint, step)


def average_checkpoints(config: ml_collections.ConfigDict, workdir: str,
                        num_checkpoints: int, last_step: Optional[int] = None) -> int:
  """Averages the parameters of the newest `num_checkpoints` checkpoints of `workdir` (up to
  `last_step` if given) into <workdir>/averaged (as the paper does for its base models);
  returns the newest averaged step. Evaluate it with `--mode=eval --checkpoint=averaged`."""
  reporting.quiet_library_logs()
  validation.validate(config)
  task = tasks.get_task(config, workdir, training=False)
  tx = optimizers.make_optimizer(config)
  directory = checkpointing.checkpoint_directory(workdir)
  if not os.path.isdir(directory):
    raise checkpointing.CheckpointError(f"no checkpoints in {directory}; train first")
  checkpoints = checkpointing.Checkpointer(workdir, keep=config.train.keep_checkpoints)
  steps = sorted(s for s in checkpoints.all_steps()
                 if last_step is None or s <= last_step)[-num_checkpoints:]
  if len(steps) < num_checkpoints:
    checkpoints.close()
    raise checkpointing.CheckpointError(
        f"{directory} has {len(steps)} checkpoint(s) ({', '.join(map(str, steps))}), fewer "
        f"than the {num_checkpoints} to average; lower --num_average or keep more "
        f"(config.train.keep_checkpoints)")
  template = jax.eval_shape(lambda: create_state(task, tx, config.seed))
  total, state = None, None
  for step in steps:
    state = checkpoints.restore(template, step)
    params = jax.tree.map(lambda x: np.asarray(x, np.float64), state.params)
    total = params if total is None else jax.tree.map(np.add, total, params)
  checkpoints.close()
  averaged = jax.tree.map(lambda t, x: (t / len(steps)).astype(x.dtype), total, state.params)
  # Written beside the old average and swapped in whole: a failed run leaves the old one.
  final = checkpointing.checkpoint_directory(workdir, "averaged")
  partial = checkpointing.checkpoint_directory(workdir, "averaged.partial")
  shutil.rmtree(partial, ignore_errors=True)
  out = checkpointing.Checkpointer(workdir, keep=1, subdir="averaged.partial",
                                   async_save=False)
  out.save(steps[-1], state.replace(params=averaged),
           {**json.loads(config.to_json()), "averaged_steps": steps})
  out.close()
  if os.path.isdir(final):
    shutil.rmtree(final)
  os.replace(partial, final)
  logging.info("averaged the parameters of steps %s into %s", steps, final)
  return steps[-1]


def generate_text(config: ml_collections.ConfigDict, workdir: str, prompts: List[str],
                  checkpoint: str = "latest", step: Optional[int] = None) -> List[List[str]]:
  """Continues each prompt config.decode.num_samples times with a checkpoint of `workdir` (a
  language model on real text), sampling as the config says (temperature, top_k, top_p,
  greedy, max_new_tokens, stop_text, sample_seed). Returns, per prompt, its samples as
  text (the prompt included). One jitted call per batch of config.eval.eval_batch_size rows."""
  reporting.quiet_library_logs()
  validation.validate(config)
  task = tasks.get_task(config, workdir, training=False)
  tx = optimizers.make_optimizer(config)
  _, params = _restore_params(task, tx, config, workdir, checkpoint, step)
  encoded = task.encode_prompts(prompts)
  stop_id = task.stop_id()
  context = config.data.max_target_length
  longest = max(len(p) for p in encoded)
  length = min(context, longest + config.decode.max_new_tokens)
  if longest + config.decode.max_new_tokens > context:
    logging.warning("generating at most %d tokens in all (the model's context, "
                    "config.data.max_target_length); fewer than prompt + max_new_tokens=%d", context,
                    config.decode.max_new_tokens)
  rows = [p for p in encoded for _ in range(config.decode.num_samples)]
  prompt = np.zeros((len(rows), length), np.int32)
  for r, tokens in enumerate(rows):
    prompt[r, :len(tokens)] = tokens
  limits = np.array([min(len(t) + config.decode.max_new_tokens, length) for t in rows], np.int32)

  @jax.jit
  def run(params, prompt, rng, limits):
    return task.generate(params, prompt, rng, limits, stop_id=stop_id)

  # A key per (prompt text, sample number): a prompt's samples do not depend on the other
  # prompts of the call or on the batching.
  seed = jax.random.PRNGKey(config.decode.sample_seed)
  keys = jnp.stack([jax.random.fold_in(jax.random.fold_in(seed, zlib.crc32(p.encode())), j)
                    for p in prompts for j in range(config.decode.num_samples)])
  size = config.eval.eval_batch_size
  outputs = []
  for start in range(0, len(rows), size):
    tokens = run(params, prompt[start:start + size], keys[start:start + size],
                 limits[start:start + size])
    outputs += [task.detokenize(t) for t in np.asarray(tokens)]
  n = config.decode.num_samples
  return [outputs[i * n:(i + 1) * n] for i in range(len(prompts))]


# ----------------------------------------------------------------------------- attention


def attention_report(config: ml_collections.ConfigDict, workdir: str,
                     text: Optional[str] = None, reference: Optional[str] = None,
                     example: Optional[int] = None, heads: Sequence[str] = (),
                     checkpoint: str = "latest", step: Optional[int] = None):
  """Draws the attention of a checkpoint of `workdir` on one input: `text` (for
  translation with the target `reference`, or else the model's own translation) or
  example number `example` of the eval split. Writes into <workdir>/attention/<checkpoint>-
  step<N>-<name>/ an overview, a grid of the heads of every layer of every kind, a
  full-size map for each of `heads` ('LAYER:HEAD' or 'KIND:LAYER:HEAD') and the per-head
  statistics (stats.txt, stats.json). Returns (the paths written, the statistics table)."""
  reporting.quiet_library_logs()
  validation.validate(config)
  task = tasks.get_task(config, workdir, training=False)
  tx = optimizers.make_optimizer(config)
  single = [h for spec in heads for h in attention_maps.parse_head(spec,
                                                                   attention_maps.layout(task))]
  step, params = _restore_params(task, tx, config, workdir, checkpoint, step)
  if example is not None:
    source = task.data_source("eval")
    if not 0 <= example < len(source):
      raise attention_maps.DataError(
          f"--example={example}: the eval split ({config.data.eval_split}) has examples 0 to "
          f"{len(source) - 1}")
    fields = set(task.attention_fields.values())
    chosen = {f: np.asarray(v) for f, v in source[example].items() if f in fields}
    name = f"example{example}"
  else:
    chosen = task.attention_example(text or "", reference)
    name = attention_maps.directory_name(text or "")
  if not np.asarray(chosen["inputs"]).any():
    raise attention_maps.DataError("nothing to draw: the input has no tokens")
  maps = attention_maps.example_maps(task, params, [chosen])[0]
  directory = os.path.join(workdir, "attention", f"{checkpoint}-step{step}-{name}")
  about = {"checkpoint": checkpoint, "step": step, "text": text, "reference": reference,
           "example": example}
  paths = attention_maps.write_maps(maps, directory, single, about)
  return paths, attention_maps.stats_table(maps.stats())


def head_importance(config: ml_collections.ConfigDict, workdir: str,
                    devices: Optional[Sequence[jax.Device]] = None,
                    checkpoint: str = "latest", step: Optional[int] = None,
                    split: Optional[str] = None):
  """Removes each attention head of a checkpoint of `workdir` in turn (its output zeroed
  before W^O) and scores the loss (the unsmoothed negative log-likelihood per token) on
  the first config.eval.head_importance_batches batches of `split` (0 = all; default
  config.data.eval_split). Writes <workdir>/attention/head_importance-<split>-<checkpoint>-
  step<N>.md (heads sorted by the loss increase), .csv, .json and .png (layers x heads).
  Returns (loss with every head, {kind: [layers, heads] increase}, the paths)."""
  split = split or config.data.eval_split
  devices, task, tx, eval_dataset = _setup(config, workdir, devices, training=False,
                                           split=split)
  step, params = _restore_params(task, tx, config, workdir, checkpoint, step)
  p_masked = compile_masked_eval(task, devices)
  params = replicate(params, devices)
  batches = list(batching.iterate(eval_dataset,
                                  limit=config.eval.head_importance_batches or None))

  def loss_of(masks):
    tree = attention_maps.head_mask_tree(masks)
    sums = _sum_dicts([jax.tree.map(lambda x: x[0], s) for s in
                       jax.device_get([p_masked(params, b, tree) for b in batches])])
    return sums["nll"] / max(sums["weight"], 1.0)

  start = time.perf_counter()
  baseline, increase = attention_maps.head_importance(attention_maps.layout(task), loss_of)
  logging.info("head importance: %d heads removed one at a time over %d batches in %.1fs",
               sum(v.size for v in increase.values()), len(batches),
               time.perf_counter() - start)
  about = {"split": split, "checkpoint": checkpoint, "step": step, "batches": len(batches)}
  paths = attention_maps.write_importance(
      os.path.join(workdir, "attention"), f"head_importance-{split}-{checkpoint}-step{step}",
      baseline, increase, about)
  return baseline, increase, paths
