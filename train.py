"""The training loop: train (resuming from the newest checkpoint), evaluate on a schedule,
save checkpoints, report progress; then evaluate the whole split.

    train_and_evaluate(config, workdir)   the loop (run by --mode=train)
    validate(config)                      every config check, before any compute
    open_task(config, workdir, ...)       the one way a run opens its task and eval data
    Evaluator                             evaluation with metrics written and logged

Everything task-specific goes through `tasks.base.Task`; the pure steps and their pmap are
in training/steps.py, what watches the loop (non-finite guard, profiler trace, best
checkpoint) in training/monitors.py. The other modes (eval, decode, generate, ...) are in
modes/ and use `open_task`, `Evaluator` and `check_same_model` from here.
"""

import collections
import dataclasses
import json
import os
import shutil
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

import files
import tasks
from config_checks import ConfigError, Fields
from configs import default, presets
from input_pipeline import batching, synthetic, tokenizers
from inspection import attention_maps
from training import (checkpointing, memory, monitors, optimizers, preemption, reporting,
                      steps, workdir_lock)

NonFiniteLossError = monitors.NonFiniteLossError
MAX_ATTENTION_IMAGES = 16
# Evaluation steps dispatched ahead of the host's wait for their results. Unbounded, a long
# split queued the steps of all its batches at once (their buffers held, no stop between
# them), and on a loaded CPU XLA's collective timeout aborted the process (main.py also
# makes that timeout generous).
EVAL_IN_FLIGHT = 2

# ----------------------------------------------------------------------------- config


def validate(config: ml_collections.ConfigDict, num_devices: int = 1) -> None:
  """Raises ConfigError for the first field of `config` that cannot work: the presets'
  names, the task, model and data (tasks.check_config), the optimizer, then the loop."""
  top = Fields(config)
  top.choice("size", tuple(presets.SIZES))
  top.choice("accel", tuple(presets.ACCELERATORS))
  top.integer("seed", 0)
  tasks.check_config(config)
  if config.data.get("length_bucket") and jax.process_count() > 1:
    Fields(config, "data").fail(
        "length_bucket", f"batches of similar lengths are made by one process, and this run "
                         f"has {jax.process_count()}; set it to 0 (padded batches)")
  optimizers.check_config(config)
  check_loop_config(config, num_devices)


def check_loop_config(config: ml_collections.ConfigDict, num_devices: int = 1) -> None:
  """The config.train and config.eval fields (this module and the modes read them)."""
  loop, evaluation = Fields(config, "train"), Fields(config, "eval")
  for field in ("batch_size", "log_every_steps", "checkpoint_every_steps",
                "keep_checkpoints", "grad_accum_steps", "signal_check_every_steps",
                "steps_per_call"):
    loop.integer(field, 1)
  # 0 steps: a pretrained model (config.init_from) saved as step 0 and evaluated as it is.
  loop.integer("num_train_steps", 0 if config.get("init_from") else 1)
  for field in ("max_skipped_updates", "profile_steps"):
    loop.integer(field, 0)
  loop.choice("nonfinite_updates", monitors.NONFINITE_UPDATES)
  loop.rate("max_skipped_fraction", upper_inclusive=True)
  loop.boolean("allow_config_change")
  for field in ("eval_batch_size", "eval_every_steps"):
    evaluation.integer(field, 1)
  for field in ("num_print_examples", "num_decode_batches", "num_eval_batches",
                "final_decode_batches", "num_attention_images", "head_importance_batches"):
    evaluation.integer(field, 0)
  if evaluation["num_attention_images"] > MAX_ATTENTION_IMAGES:
    evaluation.fail("num_attention_images", f"expected at most {MAX_ATTENTION_IMAGES} (each "
                                            f"is drawn at every evaluation)")
  _check_best_metric(config)
  per_update = num_devices * config.train.grad_accum_steps
  if config.train.batch_size % per_update:
    loop.fail("batch_size", f"it must be divisible by devices x grad_accum_steps = "
                            f"{num_devices} x {config.train.grad_accum_steps} = {per_update}")
  if config.eval.eval_batch_size % num_devices:
    evaluation.fail("eval_batch_size", f"it must be divisible by the number of devices "
                                       f"({num_devices})")


def _check_best_metric(config: ml_collections.ConfigDict) -> None:
  """config.eval.best_metric: "" (off), a loss metric, or one the family reports (on the
  data it reports it for)."""
  evaluation, metric = Fields(config, "eval"), config.eval.best_metric
  every = ("", "loss", "perplexity", "accuracy") + tuple(
      m for family in tasks.TASKS.values() for m in family.metrics + family.text_metrics)
  evaluation.choice("best_metric", tuple(dict.fromkeys(every)))
  family = tasks.TASKS[config.task]
  if metric in every[:4] or metric in family.metrics or (
      metric in family.text_metrics and config.data.dataset != "synthetic"):
    return
  text = [name for name, other in tasks.TASKS.items() if metric in other.text_metrics]
  if text:
    evaluation.fail("best_metric", f"{metric} is reported by {' and '.join(text)} on real "
                                   f"text only")
  owners = [name for name, other in tasks.TASKS.items() if metric in other.metrics]
  evaluation.fail("best_metric", f"{metric} is reported by {' and '.join(owners)} only")


def check_same_model(saved: dict, config: ml_collections.ConfigDict, where: str) -> None:
  """ConfigError when `config` differs from the config `saved` with a checkpoint (in
  `where`) in config.task, config.objective, a config.model field or a field the family
  names in `identity_fields` (translation: the language pair), unless
  config.train.allow_config_change. A config saved before the fields were grouped is
  regrouped first; a field it lacks counts as configs/default.py's value for the task."""
  saved = default.group_flat_config(saved)
  fields = [f"model.{k}" for k in config.model]
  fields += list(getattr(tasks.TASKS.get(config.task), "identity_fields", ()))
  # A field the saved config lacks was added to the codebase after that run: it ran as
  # configs/default.py's value, the behaviour before the field existed.
  before = (default.get_config(f"task={config.task}") if config.get("task") in default.TASKS
            else config)
  changed = []
  if "task" in saved and saved["task"] != config.task:
    changed.append(f"task: {saved['task']!r} there, {config.task!r} now")
  # A masked-token pre-training checkpoint is not a classifier's (config.objective).
  if saved.get("objective", "") != config.get("objective", ""):
    changed.append(f"objective: {saved.get('objective', '')!r} there, "
                   f"{config.get('objective', '')!r} now")
  for path in fields:
    group, field = path.split(".")
    now = config[group][field]
    if field in saved.get(group, {}):
      then, absent = saved[group][field], ""
    else:
      then = before[group][field] if field in before.get(group, {}) else now
      absent = " (absent there: the default before the field existed)"
    if then != now:
      changed.append(f"{path}: {then!r} there{absent}, {now!r} now")
  if changed and not config.train.allow_config_change:
    raise ConfigError(
        f"the config differs from the one the checkpoint in {where} was trained with in "
        f"model fields ({'; '.join(changed)}); use that config, another --workdir, or "
        f"--config.train.allow_config_change=True to load the checkpoint anyway")


# The checkpoint config's record of the tokenizers' fingerprint (a key no config field has:
# configs saved before the fields were grouped had a flat `tokenizer` field, the kind).
# ----------------------------------------------------------------------------- evaluation


def sum_dicts(dicts: List[Dict[str, float]]) -> Dict[str, float]:
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


def batch_counts(task, eval_dataset, num_examples: int = 0,
                 decode_batches: Optional[int] = None,
                 loss_batches: Optional[int] = None) -> Tuple[int, int]:
  """(batches `evaluate` scores the loss of, batches of them it predicts) with these
  arguments: the first `loss_batches` (all when None) and of those the first
  `decode_batches` (all when None; none when predictions are neither scored nor shown)."""
  total = len(eval_dataset) if loss_batches is None else min(loss_batches, len(eval_dataset))
  if not task.scores_predictions and not num_examples:
    decode_batches = 0  # predictions that are neither scored nor shown are not made
  return total, total if decode_batches is None else min(decode_batches, total)


def evaluate(task, p_eval, p_predict, params, eval_dataset, split: str = "eval",
             num_examples: int = 0, decode_batches: Optional[int] = None,
             loss_batches: Optional[int] = None, title: str = ""):
  """Loss metrics over the first `loss_batches` batches of the split (all when None), and
  predictions scored on its first `decode_batches` batches (all when None).

  Returns (metrics from `task.summarize`, example lines, per-example output records).
  With several processes, each scores the whole split: every process calls this with the
  same number of batches (its rows of each global batch) and gets the same results. A
  long evaluation logs a progress line ("`title`: batch 3/8  ETA 1m10s"; the title
  defaults to "evaluating `split`").
  """
  loss_sums, score_sums, records, lines = [], [], [], []
  pending = collections.deque()  # loss sums of the batches dispatched but not fetched
  total, decode_batches = batch_counts(task, eval_dataset, num_examples, decode_batches,
                                       loss_batches)
  # The ETA assumes the batches left cost what the batches so far did: high while the
  # predicted batches (the first `decode_batches`) are done and loss-only ones remain.
  progress = reporting.PhaseProgress(f"{title or 'evaluating ' + split}: batch", total)
  for index, batch in enumerate(batching.iterate(eval_dataset, limit=loss_batches)):
    _check_stop(f"evaluating {split} (batch {index + 1})")
    progress.update(index)
    pending.append(p_eval(params, batch))
    if len(pending) > EVAL_IN_FLIGHT:
      loss_sums.append(jax.device_get(pending.popleft()))
    if index >= decode_batches:
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
  loss_sums += jax.device_get(list(pending))
  progress.update(total)
  progress.finish()
  sums = sum_dicts([jax.tree.map(lambda x: x[0], s) for s in loss_sums])
  sums.update(sum_dicts(score_sums))
  return task.summarize(sums, records), lines, records


def _check_stop(doing: str) -> None:
  """preemption.Stopped when a stop signal has arrived (preemption.check). Several
  processes agree first (a small collective): all of them stop before the same batch, or
  the others would wait for it forever."""
  if jax.process_count() == 1:
    preemption.check(doing)
    return
  signum = _agreed_signal(preemption.current())
  if signum:
    raise preemption.Stopped(signum, doing)


def _agreed_signal(stop: Optional[preemption.StopRequest]) -> int:
  """The largest signal number any process has received (0: none); a collective every
  process must call."""
  mine = np.int32(stop.signum or 0) if stop is not None else np.int32(0)
  return int(np.max(multihost_utils.process_allgather(mine)))


def final_decode_batches(task, config) -> Optional[int]:
  """Batches a whole-split evaluation predicts: where predictions are scored, the first
  config.eval.final_decode_batches (all when 0: a short smoke run may bound it, as an
  untrained model decodes every example to its length limit), else only the
  num_decode_batches shown as samples."""
  if task.scores_predictions:
    return config.eval.final_decode_batches or None
  return config.eval.num_decode_batches or None


@dataclasses.dataclass
class Evaluator:
  """Evaluates one split with the pmapped steps, writes the metrics (and example lines,
  tables, images, attention summaries) to `writer` under a prefix, and logs them."""
  task: Any
  p_eval: Any
  p_predict: Any
  dataset: Any
  split: str = "eval"
  writer: Optional[reporting.MetricWriter] = None
  attention_examples: int = 0  # also draw the attention maps of that many eval examples

  def run(self, title: str, step: int, params, prefix: str = "eval", num_examples: int = 0,
          decode_batches: Optional[int] = None, loss_batches: Optional[int] = None,
          elapsed: Optional[float] = None):
    """Returns (metrics, output records); `elapsed`: seconds since the run started."""
    metrics, lines, records = evaluate(self.task, self.p_eval, self.p_predict, params,
                                       self.dataset, self.split, num_examples, decode_batches,
                                       loss_batches, title=title)
    scope = self.scope(num_examples, decode_batches, loss_batches, len(records))
    texts = self.task.summary_texts(records)
    attention = attention_maps.EvalSummaries({}, {}, {}, "")
    if self.attention_examples and self.writer is not None and self.writer.enabled:
      device_0 = jax.tree.map(lambda x: x.addressable_shards[0].data.reshape(x.shape[1:]),
                              params)
      attention = attention_maps.eval_summaries(self.task, device_0, self.attention_examples)
    self.write(step, prefix, metrics, records, lines, texts, attention, elapsed)
    logging.info("%s at step %d: %s%s%s%s%s", title, step,
                 "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()), scope,
                 "".join(f"\n{name}:\n{text}" for name, text in texts.items()),
                 f"\nattention (means over layers and heads):\n{attention.log}"
                 if attention.log else "",
                 "".join("\n" + line for line in lines))
    return metrics, records

  def scope(self, num_examples: int = 0, decode_batches: Optional[int] = None,
            loss_batches: Optional[int] = None, records: int = 0) -> str:
    """What part of the split an evaluation with these arguments covers, when not all of
    it: "  (predictions on 1 of 8 batches: 128 examples)"; `records`: its output records."""
    total, decoded = batch_counts(self.task, self.dataset, num_examples, decode_batches,
                                  loss_batches)
    whole, parts = len(self.dataset), []
    if total < whole:
      parts.append(f"loss on {total} of {whole} batches")
    if self.task.scores_predictions and decoded < whole:
      parts.append(f"predictions on {decoded} of {whole} batches"
                   + (f": {records} examples" if records else ""))
    return f"  ({'; '.join(parts)})" if parts else ""

  def covers(self, **args) -> str:
    """`scope` in words: "predictions on 1 of 8 batches", or "all 8 batches"."""
    return self.scope(**args).strip()[1:-1] or f"all {len(self.dataset)} batches"

  def write(self, step: int, prefix: str, metrics, records, lines=(), texts=None,
            attention=None, elapsed: Optional[float] = None) -> None:
    """Writes an evaluation's metrics, example lines, tables (`texts`, default: the task's
    summary of `records`) and images under `prefix` (nothing without a writer)."""
    if self.writer is None:
      return
    texts = self.task.summary_texts(records) if texts is None else texts
    attention = attention or attention_maps.EvalSummaries({}, {}, {}, "")
    extra = {} if elapsed is None else {f"{prefix}/elapsed_seconds": elapsed}
    self.writer.write_scalars(step, {**{f"{prefix}/{k}": v for k, v in metrics.items()},
                                     **extra,
                                     **{f"{prefix}/{k}": v
                                        for k, v in attention.scalars.items()}})
    if lines:
      self.writer.write_text(step, f"{prefix}/examples", "\n\n".join(lines))
    for name, text in {**texts, **attention.texts}.items():  # rendered as markdown
      self.writer.write_text(step, f"{prefix}/{name}", "    " + text.replace("\n", "\n    "))
    for name, image in {**self.task.summary_images(records), **attention.images}.items():
      self.writer.write_image(step, f"{prefix}/{name}", image)


# ----------------------------------------------------------------------------- opening a run


def chief_first(build, barrier: str):
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


def _fewest_ids(config: ml_collections.ConfigDict) -> int:
  """The smallest vocabulary the config can give the model (the memory estimate is a lower
  bound): the digits' ids, or on text 256 (bytes) or config.model.vocab_size if fewer."""
  if config.data.dataset == "synthetic":
    return synthetic.VOCAB_SIZE
  return min(config.model.vocab_size, 256)


def open_task(config: ml_collections.ConfigDict, workdir: str,
              devices: Optional[Sequence[jax.Device]] = None, training: bool = True,
              split: Optional[str] = "eval"):
  """(devices, task, optimizer, eval dataset of `split` or None) of a run: the config
  checked against the devices, the task opened (its data read, its tokenizer built when
  `training`, else loaded from `workdir`). Every mode opens its run with this."""
  reporting.quiet_library_logs()
  devices = list(devices or jax.local_devices())
  validate(config, num_devices=len(devices) * jax.process_count())
  # A batch far too large for the machine is refused here, before any data is read.
  memory.check_fits(config, tasks.TASKS[config.task].batch_lengths(config),
                    _fewest_ids(config), devices, jax.process_count(), training=training)
  logging.info("%d local %s device(s) in process %d of %d", len(devices),
               devices[0].platform, jax.process_index(), jax.process_count())
  if training and workdir and jax.process_index() == 0:
    files.check_writable(workdir)  # before the data is prepared and a tokenizer trained

  def task_and_eval_data():  # opening the eval split may prepare the tfds data
    task = tasks.get_task(config, workdir, training=training)
    if split is None:
      return task, None
    return task, task.eval_dataset(split, config.eval.eval_batch_size, len(devices),
                                   jax.process_index(), jax.process_count())

  task, eval_dataset = chief_first(task_and_eval_data, "task files written")
  return devices, task, optimizers.make_optimizer(config), eval_dataset


# ----------------------------------------------------------------------------- the loop


def _prepare_workdir(workdir: str, config, is_chief: bool) -> None:
  """Writes the workdir's config.json (atomically: a kill never leaves half a file). The
  workdir exists by now: process 0 created it to lock it and tried writing there."""
  if is_chief:
    files.write_atomically(os.path.join(workdir, checkpointing.CONFIG_FILE),
                           config.to_json(indent=2))


def _stop_signal(stop: preemption.StopRequest, step: int, every: int) -> int:
  """The signal that asks this run to stop after `step` (0: none), the same on every
  process: they must all stop after the same step, or the others would wait forever in
  the next one. With several processes that agreement is a blocking collective, made
  only every `every` steps."""
  if jax.process_count() == 1:
    return stop.signum or 0
  if step % every:
    return 0
  return _agreed_signal(stop)


def call_sizes(start: int, total: int, per_call: int, acts_after) -> List[int]:
  """How the updates after `start` up to `total` are grouped into calls of the train step:
  `per_call` updates a call (config.train.steps_per_call), except where such a call would
  pass a step after which the loop acts (`acts_after(done)`: it logs, evaluates, saves,
  ...) or the end; those updates go one call each, until the next aligned step."""
  sizes, step = [], start
  while step < total:
    n = per_call if step + per_call <= total and not any(
        acts_after(done) for done in range(step + 1, step + per_call)) else 1
    sizes.append(n)
    step += n
  return sizes


def _close_all(*closables) -> None:
  """Closes each (waiting for pending checkpoint writes) even if an earlier one fails."""
  for item in closables:
    try:
      item.close()
    except Exception as e:  # pylint: disable=broad-except  # do not hide the first error
      logging.error("while closing %s: %s", type(item).__name__, e)


def _refuse_another_model(config, workdir: str) -> None:
  """check_same_model against the workdir's config.json when the workdir has checkpoints,
  before the task is built: building it writes the tokenizer into the workdir, and a run
  of another task or model must leave that workdir as it found it. The checkpoint's own
  config is checked again when it is restored (_restore_or_create)."""
  path = os.path.join(workdir, checkpointing.CONFIG_FILE)
  if not (os.path.isfile(path) and checkpointing.has_checkpoints(workdir)):
    return
  try:
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
  except (OSError, UnicodeDecodeError, ValueError):
    return  # unreadable: the checkpoint's copy of the config is checked later
  if isinstance(saved, dict):
    check_same_model(saved, config, checkpointing.checkpoint_directory(workdir))


def _restore_or_create(config, workdir, task, tx, checkpoints, is_chief):
  """(host state, data iterator state) of the newest checkpoint, or a fresh state.
  config.json is replaced only once the checkpoint has restored into `config`'s model: a
  run refused on the way (another model, or one allow_config_change let past the checks
  whose shapes do not fit) leaves the workdir's config as it was."""
  start_step = checkpoints.latest_step()
  state = steps.create_state(task, tx, config.seed)
  data_state, saved = None, {}
  if start_step is not None:
    saved = default.group_flat_config(checkpoints.restore_config(start_step) or {})
    check_same_model(saved, config, checkpoints.directory)
    tokenizers.check_same_tokenizer(saved, task, config, checkpoints.directory)
  logging.info("%s", reporting.config_summary(
      config, default.get_config(f"task={config.task}"),
      f"configs/default.py:task={config.task}",
      os.path.join(workdir, checkpointing.CONFIG_FILE)))
  logging.info("parameters:\n%s", reporting.parameter_table(state.params))
  logging.info("%s", checkpointing.disk_use_line(
      state, config.train.keep_checkpoints, bool(config.eval.best_metric), workdir))
  if start_step is not None:
    state = checkpoints.restore(jax.device_get(state), start_step)
    data_state = checkpoints.restore_data_state(start_step)
    logging.info("resumed from the checkpoint at step %d in %s", int(state.step),
                 checkpoints.directory)
    note = optimizers.length_change_note(
        config, saved.get("train", {}).get("num_train_steps"), int(state.step))
    if note and is_chief:  # the decay restarts: said once, the run goes on
      logging.warning(note)
  _prepare_workdir(workdir, config, is_chief)
  return state, data_state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       devices: Optional[Sequence[jax.Device]] = None,
                       final_evaluation: bool = True) -> Dict[str, float]:
  """Trains `config` in `workdir`, resuming from its newest checkpoint; returns the final
  evaluation metrics (empty without `final_evaluation`, which benchmarks skip). `devices`
  defaults to all local devices.

  SIGTERM, SIGINT or SIGHUP stop it after the current step (or evaluation batch) with a
  complete checkpoint (preemption.Preempted is raised); a resumed run continues from that
  checkpoint's parameters, optimizer state and data position exactly.
  """
  run_start = time.perf_counter()
  fresh = not os.path.exists(workdir)
  # One trainer per workdir (process 0 holds the lock for all), taken before anything is
  # written there; a second trainer stops here.
  lock = workdir_lock.WorkdirLock(workdir) if jax.process_index() == 0 else None
  if lock is not None:
    lock.acquire()
  try:
    try:  # the training data is checked before anything else is written into the workdir
      _refuse_another_model(config, workdir)
      devices, task, tx, eval_dataset = open_task(config, workdir, devices)
      train_dataset = task.train_dataset(config.train.batch_size, len(devices),
                                         jax.process_index(), jax.process_count())
    except BaseException:  # (a stop signal too: nothing here is worth keeping)
      if lock is not None:  # e.g. a tokenizer trained on unusable data: leave no trace
        lock.release(remove=lock.created_file)
        if fresh:
          shutil.rmtree(workdir, ignore_errors=True)
      raise
    checkpoints = checkpointing.Checkpointer(workdir, keep=config.train.keep_checkpoints)
    try:
      state, data_state = _restore_or_create(config, workdir, task, tx, checkpoints,
                                             jax.process_index() == 0)
    except BaseException:
      _close_all(checkpoints)
      raise
    loop = _Loop(config, workdir, devices, task, tx, eval_dataset, checkpoints, run_start)
    return loop.run(state, train_dataset, data_state, final_evaluation)
  finally:
    if lock is not None:
      lock.release()
    # jax's pmap keeps every function it compiled, and the program, for the life of the
    # process (its cache entry holds the function it is keyed on), so each run's steps
    # would stay loaded: about 700 memory maps for a tiny run, and Linux stops a process
    # at 65,530 (vm.max_map_count) with a segmentation fault in the next compile. A
    # process that trains model after model (a sweep, a notebook) needs them dropped;
    # other functions compile again on their next call (docs/performance.md).
    jax.clear_caches()


class _Loop:
  """One run of the loop: the pmapped steps, the state on the devices, and what writes,
  saves and watches as it goes."""

  def __init__(self, config, workdir, devices, task, tx, eval_dataset, checkpoints,
               run_start: float):
    self.config, self.workdir, self.devices, self.task = config, workdir, devices, task
    self.checkpoints, self.run_start = checkpoints, run_start
    self.is_chief = jax.process_index() == 0
    self.p_train, p_eval, p_predict = steps.compile_steps(task, tx, config, devices)
    self.p_train_many = (steps.compile_multi_step(task, tx, config, devices)
                         if config.train.steps_per_call > 1 else None)
    self.writer = reporting.MetricWriter(workdir, enabled=self.is_chief)
    self.evaluator = Evaluator(task, p_eval, p_predict, eval_dataset, writer=self.writer,
                               attention_examples=config.eval.num_attention_images)
    self.best = monitors.BestCheckpoint(config, workdir, is_chief=self.is_chief)
    self.guard = monitors.NonFiniteGuard(config, checkpoints.directory)
    self.schedule = optimizers.learning_rate_schedule(
        config.optim.schedule, config.optim.learning_rate, config.optim.warmup_steps,
        config.train.num_train_steps)
    self.config_dict = {**json.loads(config.to_json()), **tokenizers.tokenizer_record(task)}
    self.last_saved = checkpoints.latest_step()
    self.history: List[Dict[str, jax.Array]] = []
    self.last_eval = None  # (step, metrics, evaluate's arguments, records) of the last one

  def _batches(self, train_dataset, data_state, start: int, sizes: List[int]):
    """The training batches from `start` on, on the devices ahead of their steps: one item
    per call of the train step (`sizes`: its updates; see `steps.prefetch_to_devices`)."""
    c = self.config.data
    train_iter = batching.iterate(train_dataset, num_threads=c.data_threads,
                                  prefetch=c.data_prefetch)
    if data_state is None and start:
      logging.warning("the checkpoint of step %d holds no data iterator state (it predates "
                      "them or another process count wrote it); continuing at batch %d",
                      start, start)
      data_state = {"next_index": start}
    if data_state is not None:
      train_iter.set_state(data_state)
    return steps.prefetch_to_devices(train_iter, self.devices, c.device_prefetch,
                                     len(sizes), sizes=sizes)

  def run(self, state, train_dataset, data_state, final_evaluation: bool):
    start, total = int(state.step), self.config.train.num_train_steps
    p_state = steps.replicate(state, self.devices)
    del state
    trace = monitors.StepTrace(os.path.join(self.workdir, "profile", *(
        [f"process_{jax.process_index()}"] if jax.process_count() > 1 else [])),
                               start, self.config.train.profile_steps)
    sizes = call_sizes(start, total, self.config.train.steps_per_call,
                       lambda done: self._acts_after(done, trace))
    batches = self._batches(train_dataset, data_state, start, sizes)
    self.progress = reporting.Progress(start, total)
    if start >= total:
      logging.info("training already finished (step %d of %d)", start, total)
    try:
      with preemption.StopRequest() as stop:
        position, step = None, start
        for n in sizes:  # one call of the train step: n updates (steps_per_call)
          trace.before(step, p_state)
          try:
            batch, next_position = self._next_batch(batches, stop, step)
          except preemption.Stopped as stopped:
            self._stop_waiting(stopped, step, start, p_state, position, stop)
          position = next_position
          step_fn = self.p_train if n == 1 else self.p_train_many
          with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):
            p_state, metrics = step_fn(p_state, batch)
          # The first call compiles, and so does one with a batch of a new shape
          # (config.data.length_bucket): the rate and ETA leave it out.
          self.progress.exclude(step_fn.take_compile_seconds())
          self.history.append(metrics)
          step += n
          trace.after(step, p_state)
          self._after_step(step, p_state, position, stop)
        trace.close(p_state)  # a run shorter than the trace: what ran, without evaluation
        if total == 0 and self.last_saved is None:  # a pretrained model as it is: step 0
          self.checkpoints.save(0, steps.unreplicate_to_host(p_state), self.config_dict,
                                data_state={"next_index": 0})
          self.last_saved = 0
        self.checkpoints.wait()
        if not final_evaluation:
          return {}
        try:
          metrics = self._final_evaluation(max(start, total), p_state)
        except preemption.Stopped as stopped:  # between two batches; every step is saved
          raise preemption.Preempted(self.last_saved, stopped.signum,
                                     self.checkpoints.directory) from None
        return metrics
    finally:
      with preemption.StopRequest():  # a signal now must not cut short a checkpoint write
        _close_all(trace, self.best, self.checkpoints, self.writer)

  def _final_evaluation(self, step: int, p_state) -> Dict[str, float]:
    """The whole split evaluated after the last step ("final/"). When this run's periodic
    evaluation of `step` covered what it would (the loss of every batch and, where
    predictions are scored, the same predicted batches), its metrics are reused: written
    again under "final/" with its tables and images (example lines stay under "eval/")."""
    c, evaluator = self.config, self.evaluator
    args = dict(num_examples=c.eval.num_print_examples,
                decode_batches=final_decode_batches(self.task, c))
    wanted = batch_counts(self.task, evaluator.dataset, **args)
    elapsed = time.perf_counter() - self.run_start
    if self.last_eval is not None and self.last_eval[0] == step:
      _, metrics, done_args, records = self.last_eval
      covered = batch_counts(self.task, evaluator.dataset, **done_args)
      if covered[0] == wanted[0] and (covered[1] == wanted[1]
                                      or not self.task.scores_predictions):
        logging.info("final evaluation at step %d: the evaluation at this step covered the "
                     "whole %s split (%d batches); its metrics, and the examples printed "
                     "with it above, are the final ones", step,
                     evaluator.split, wanted[0])
        evaluator.write(step, "final", metrics, records, elapsed=elapsed)
        return metrics
      logging.info("final evaluation at step %d: the evaluation at this step covered other "
                   "batches of the %s split (%s, against %s); evaluating", step,
                   evaluator.split, evaluator.covers(**done_args), evaluator.covers(**args))
    metrics, _ = evaluator.run("final evaluation", step, p_state.params, prefix="final",
                               elapsed=elapsed, **args)
    return metrics

  def _next_batch(self, batches, stop: preemption.StopRequest, step: int):
    """(the batch of update `step + 1`, the data position after it). With one process a
    signal ends the wait at once (preemption.Stopped): a large batch can take minutes to
    build. Several processes wait on: they must all stop after the same step."""
    if jax.process_count() > 1:
      return next(batches)
    with stop.interrupting(f"building the batch of step {step + 1}"):
      return next(batches)

  def _stop_waiting(self, stopped: preemption.Stopped, done: int, start: int, p_state,
                    position, stop) -> None:
    """A signal while waiting for the batch after update `done`: saves that update (when
    this run made it) and raises Preempted; with no update made here, the newest
    checkpoint stands (Preempted names it), or there is none: `stopped` goes on."""
    if done > start:
      self._after_step(done, p_state, position, stop)  # saves, raises Preempted
    if self.last_saved is not None:
      raise preemption.Preempted(self.last_saved, stopped.signum,
                                 self.checkpoints.directory) from None
    raise stopped

  def _after_step(self, done: int, p_state, position, stop) -> None:
    """Logs, evaluates, saves and stops after update `done` as the config says."""
    c = self.config
    stopping = _stop_signal(stop, done, c.train.signal_check_every_steps)
    last = done == c.train.num_train_steps
    if self.history and (done % c.train.log_every_steps == 0 or last or stopping):
      self._log(done)
    # Periodic evaluations ("eval/" in the logs) decode the same `num_decode_batches`
    # batches every time, so their scores compare (the best checkpoint relies on that);
    # the final evaluation decodes the whole split ("final/"). A signal stops an
    # evaluation between two batches; this step is then saved.
    if done % c.eval.eval_every_steps == 0 and not stopping:
      t0 = time.perf_counter()
      args = dict(num_examples=c.eval.num_print_examples if self.task.prints_samples else 0,
                  decode_batches=c.eval.num_decode_batches or None,
                  loss_batches=c.eval.num_eval_batches or None)
      try:
        metrics, records = self.evaluator.run("eval", done, p_state.params,
                                              elapsed=t0 - self.run_start, **args)
      except preemption.Stopped as stopped:
        stopping = stopped.signum
        if self.history:
          self._log(done)
      else:
        self.last_eval = (done, metrics, args, records)
        self.best.update(done, metrics, steps.unreplicate_to_host(p_state), self.config_dict)
      self.progress.exclude(time.perf_counter() - t0)
    if self.last_saved != done and (done % c.train.checkpoint_every_steps == 0 or last
                                    or stopping):
      t0 = time.perf_counter()
      if not self.guard.skip:
        self.guard.check([m["nonfinite"] for m in self._fetched_history()], done,
                         self.last_saved)
      # The position after this step's batch (the iterator itself has read ahead).
      self.checkpoints.save(done, steps.unreplicate_to_host(p_state), self.config_dict,
                            data_state=position)
      self.last_saved = done
      self.progress.exclude(time.perf_counter() - t0)
    if stopping:
      self.checkpoints.wait()
      logging.warning("stopped by signal %d after step %d; checkpoint complete in %s",
                      stopping, done, self.checkpoints.directory)
      raise preemption.Preempted(done, stopping, self.checkpoints.directory)

  def _acts_after(self, done: int, trace: monitors.StepTrace) -> bool:
    """Whether the loop may act between update `done` and the next (log, evaluate, save,
    agree on a signal, start or stop the profiler trace): a call of several updates must
    not run past it (`call_sizes`)."""
    c = self.config.train
    periods = [c.log_every_steps, c.checkpoint_every_steps, self.config.eval.eval_every_steps]
    if jax.process_count() > 1:
      periods.append(c.signal_check_every_steps)
    return any(done % p == 0 for p in periods) or done in trace.edges()

  def _fetched_history(self) -> List[Dict[str, float]]:
    """The training metrics of each update since the last log, in order, as floats (device
    0's copy: the step sums them over devices). A call of n updates left them `[n]`."""
    out = []
    for metrics in jax.device_get(self.history):
      first = jax.tree.map(lambda x: np.asarray(x[0]), metrics)
      for i in range(first["loss"].size):
        out.append(jax.tree.map(lambda x, i=i: float(x.reshape(-1)[i]), first))
    return out

  def _log(self, done: int) -> None:
    """The progress line and the training metrics of the steps since the last one."""
    fetched = self._fetched_history()
    self.guard.check([m["nonfinite"] for m in fetched], done, self.last_saved)
    sums = sum_dicts(fetched)
    speed = self.progress.update(done, sums["tokens"])
    metrics = {
        "loss": sums["loss"] / max(sums["weight"], 1.0),
        "accuracy": sums["correct"] / max(sums["weight"], 1.0),
        "learning_rate": float(self.schedule(done - 1)),
        "grad_norm": sums["grad_norm"] / len(fetched),
        "param_norm": fetched[-1]["param_norm"],
        "tokens_per_sec": speed["tokens_per_sec"],
        "steps_per_sec": speed["steps_per_sec"],
    }
    if "rdrop_kl" in sums:  # R-drop's consistency term (config.optim.rdrop_alpha)
      metrics["rdrop_kl"] = sums["rdrop_kl"] / max(sums["weight"], 1.0)
    if self.guard.skip:
      metrics["skipped_updates"] = self.guard.skipped
    self.writer.write_scalars(done, {f"train/{k}": v for k, v in metrics.items()})
    logging.info(
        "step %d/%d  loss %.4f  acc %.4f  lr %.3g  |g| %.3g  %s tok/s  %.1f steps/s  "
        "ETA %s", done, self.config.train.num_train_steps, metrics["loss"],
        metrics["accuracy"], metrics["learning_rate"], metrics["grad_norm"],
        f"{speed['tokens_per_sec']:,.0f}", speed["steps_per_sec"],
        reporting.format_duration(speed["eta_seconds"]))
    self.history = []
