"""What watches the training loop: the non-finite guard, the profiler trace of a few
steps, and the best checkpoint.

    NonFiniteGuard   stops (or counts skipped updates) on a NaN/inf loss or gradient
    StepTrace        a jax.profiler trace of config.train.profile_steps steps
    BestCheckpoint   keeps the checkpoint with the best config.eval.best_metric
"""

import json
import os
from typing import Dict, List, Optional

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

import files
from training import checkpointing

NONFINITE_UPDATES = ("stop", "skip")  # config.train.nonfinite_updates

class NonFiniteLossError(RuntimeError):
  """The loss or gradients became NaN/inf; the offending update was not applied."""


class NonFiniteGuard:
  """Acts on the steps whose loss or gradient was not finite (their update was never
  applied, see training/steps.train_step): config.train.nonfinite_updates="stop" stops
  the run at the first, "skip" counts them and stops once more than
  config.train.max_skipped_updates were skipped, or, from the SHARE_FROM-th skipped update
  on, more than config.train.max_skipped_fraction of the run's updates (a run that skips
  most of its updates learns nothing while it seems to run)."""

  SHARE_FROM = 10  # the share is judged from this many skipped updates on (not 1 of 1)

  HINT = ("Lower config.optim.learning_rate, raise config.optim.warmup_steps or enable "
          "config.optim.max_grad_norm")

  def __init__(self, config, directory: str):
    self.skip = config.train.nonfinite_updates == "skip"
    self.limit = config.train.max_skipped_updates
    self.fraction = config.train.max_skipped_fraction
    self.directory = directory
    self.skipped = 0
    self.steps = 0  # the updates of this run checked so far

  def check(self, flags: List[float], done: int, last_saved: Optional[int]) -> None:
    """`flags` are the `nonfinite` metrics of the steps ending at `done`."""
    bad = [done - len(flags) + 1 + i for i, flag in enumerate(flags) if flag]
    self.steps += len(flags)
    if not bad:
      return
    saved = (f"step {last_saved} in {self.directory}" if last_saved is not None
             else f"(none) in {self.directory}")
    if self.skip:
      self.skipped += len(bad)
      logging.warning("non-finite loss or gradient: skipped the update of step(s) %s "
                      "(%d skipped in this run)", ", ".join(map(str, bad)), self.skipped)
      if self.skipped > self.limit:
        limit = f"more than config.train.max_skipped_updates={self.limit}"
      elif self.skipped >= self.SHARE_FROM and self.skipped > self.fraction * self.steps:
        limit = (f"{self.skipped / self.steps:.0%} of its {self.steps} updates, more than "
                 f"config.train.max_skipped_fraction={self.fraction:g}")
      else:
        return
      raise NonFiniteLossError(
          f"{self.skipped} updates skipped for a non-finite loss or gradient in this run, "
          f"{limit} (the last at step {bad[-1]}); no checkpoint holds a non-finite value. "
          f"Last good checkpoint: {saved}. {self.HINT}.")
    raise NonFiniteLossError(
        f"non-finite loss or gradient at step {bad[0]}; that update was skipped and no "
        f"checkpoint was written after it. Last good checkpoint: {saved}. {self.HINT} "
        f"(or set config.train.nonfinite_updates='skip' to skip such updates).")


class StepTrace:
  """A jax.profiler trace (config.train.profile_steps) of the `count` steps after a run's first
  (which compiles), written under `directory` (TensorBoard's profile plugin or XProf
  reads it: `<directory>/plugins/profile/<time>/<host>.xplane.pb`).

  The device is waited for at both ends, so the trace holds exactly those steps, their
  input pipeline and their host-to-device copies, not the compilation before them.
  """

  INTACT = "no trace is kept; the checkpoints saved before are intact"

  def __init__(self, directory: str, first: int, count: int):
    """first: the run's first step (0-based: the number of updates applied before it)."""
    self.directory, self.start, self.count = directory, first + 1, count
    self.active = False
    self.done = first
    if count:  # the profiler writes only when the trace stops: try the place first
      files.check_writable(directory)

  def edges(self) -> set:
    """The update counts at which the trace starts and stops: a call of several updates
    (config.train.steps_per_call) must end at each, not run past it."""
    return {self.start, self.start + self.count} if self.count else set()

  def before(self, step: int, state) -> None:
    """Call before step `step` (0-based) is dispatched, with the state it will update."""
    if self.count and step == self.start:
      jax.block_until_ready(state)
      with files.checked(self.directory, self.INTACT):
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
    with files.checked(self.directory, self.INTACT):
      jax.profiler.stop_trace()
    logging.info("profiler trace of steps %d to %d written to %s", self.start + 1,
                 self.done, self.directory)


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
    self.best = self._read_record() if self.enabled and os.path.exists(self.record) else None
    self.checkpoints = (checkpointing.Checkpointer(workdir, keep=1, subdir="best")
                        if self.enabled else None)

  def _read_record(self) -> float:
    """The best value so far, from best.json; a damaged record or one of another metric is
    a CheckpointError (the run would otherwise compare against nothing and could replace
    a better checkpoint)."""
    try:
      with open(self.record, encoding="utf-8") as f:
        record = json.load(f)
      metric, value = record["metric"], float(record["value"])
      if not np.isfinite(value):
        raise ValueError(f"value {value}")
    except (OSError, ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
      raise checkpointing.CheckpointError(
          f"{self.record} is damaged ({type(e).__name__}: {' '.join(str(e).split())}); "
          f"delete it to start a new record of the best {self.metric} from the next "
          f"evaluation (the checkpoint in {os.path.dirname(self.record)} is kept until a "
          f"better one replaces it)") from e
    if metric != self.metric:
      raise checkpointing.CheckpointError(
          f"{self.record} records the best {metric}, but config.eval.best_metric="
          f"{self.metric!r}; move {os.path.dirname(self.record)} away to keep the best by "
          f"{self.metric}, or train with best_metric={metric!r}")
    return value

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
      files.write_atomically(self.record, json.dumps(
          {"metric": self.metric, "value": value, "step": step}))
    logging.info("new best %s %.4g at step %d (saved in %s)", self.metric, value, step,
                 self.checkpoints.directory)

  def close(self) -> None:
    if self.checkpoints is not None:
      self.checkpoints.close()
