"""--mode=average: the mean of the newest checkpoints' parameters, as a checkpoint of its
own (the paper averages the last 5 or 20 checkpoints of its models)."""

import json
import os
import shutil
import time
from typing import Optional

import jax
import ml_collections
import numpy as np
from absl import logging

from errors import UserError, WriteError
from input_pipeline import tokenizers
from modes.run import open_run
from training import checkpointing

LINK = "averaged"  # <workdir>/averaged: a symbolic link to the newest version


def average_checkpoints(config: ml_collections.ConfigDict, workdir: str,
                        num_checkpoints: int, last_step: Optional[int] = None) -> int:
  """Averages the parameters of the newest `num_checkpoints` checkpoints of `workdir` (up to
  `last_step` if given) into <workdir>/averaged; returns the newest averaged step.
  Evaluate it with `--mode=eval --checkpoint=averaged`."""
  if num_checkpoints < 1:
    raise UserError(f"--num_average={num_checkpoints} is invalid: expected an integer >= 1 "
                    f"(how many of the newest checkpoints to average)")
  run = open_run(config, workdir, jax.local_devices()[:1])  # on the host, no pmap
  directory = checkpointing.checkpoint_directory(workdir)
  if not os.path.isdir(directory):
    raise checkpointing.CheckpointError(f"no checkpoints in {directory}; train first")
  checkpoints = checkpointing.Checkpointer.for_reading(workdir)
  try:
    steps = sorted(s for s in checkpoints.all_steps()
                   if last_step is None or s <= last_step)[-num_checkpoints:]
    if len(steps) < num_checkpoints:
      raise checkpointing.CheckpointError(
          f"{directory} has {len(steps)} checkpoint(s) ({', '.join(map(str, steps))}), "
          f"fewer than the {num_checkpoints} to average; lower --num_average or keep more "
          f"(config.train.keep_checkpoints)")
    # The tokenizer record of the checkpoints (not this run's), so evaluating the average
    # checks the tokenizer against the one they were trained with.
    record = {k: v for k, v in (checkpoints.restore_config(steps[-1]) or {}).items()
              if k == tokenizers.TOKENIZER_KEY}
    template = run.state_shape()
    total, state = None, None
    for step in steps:
      state = checkpoints.restore(template, step)
      params = jax.tree.map(lambda x: np.asarray(x, np.float64), state.params)
      total = params if total is None else jax.tree.map(np.add, total, params)
  finally:
    checkpoints.close()
  averaged = jax.tree.map(lambda t, x: (t / len(steps)).astype(x.dtype), total, state.params)
  final = _install(workdir, lambda subdir: _save(workdir, subdir, steps, state.replace(
      params=averaged), {**json.loads(config.to_json()), **record, "averaged_steps": steps}))
  logging.info("averaged the parameters of steps %s into %s", steps, final)
  return steps[-1]


def _save(workdir: str, subdir: str, steps, state, config_dict) -> None:
  out = checkpointing.Checkpointer(workdir, keep=1, subdir=subdir, async_save=False)
  try:
    out.save(steps[-1], state, config_dict)
  finally:
    out.close()


def _install(workdir: str, write) -> str:
  """Writes a new averaged checkpoint (`write(subdir)`) and makes it <workdir>/averaged in
  one atomic step; returns that path.

  <workdir>/averaged is a symbolic link to a versioned directory (averaged.v<ns>): the new
  version is written beside the old one, then a new link is renamed over the old link (a
  rename is atomic), then the old version is deleted. A kill at any moment leaves the old
  average or the new one under <workdir>/averaged, never none (except once: a plain
  directory left there by an older version of this code is moved aside just before the
  first link replaces it); a version left behind by a kill is deleted by the next
  --mode=average.
  """
  final = checkpointing.checkpoint_directory(workdir, "averaged")
  version = f"{LINK}.v{time.time_ns()}"
  write(version)
  link = f"{final}.link-{os.getpid()}"
  try:
    if os.path.lexists(link):
      os.remove(link)
    os.symlink(version, link)  # relative: the workdir can be moved
    if os.path.isdir(final) and not os.path.islink(final):  # written by an older version
      os.replace(final, f"{final}.v0")
    os.replace(link, final)
  except OSError as e:
    raise WriteError(f"cannot make {final} point to the new average in "
                     f"{os.path.join(workdir, version)} ({e.strerror or e}); the old "
                     f"average, if any, is intact") from e
  current = os.readlink(final)
  for name in os.listdir(workdir):  # older versions, and partial ones of killed runs
    if (name.startswith(f"{LINK}.v") and name != current) or name == f"{LINK}.partial":
      shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
  return final
