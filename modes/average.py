"""--mode=average: the mean of the newest checkpoints' parameters, as a checkpoint of its
own (the paper averages the last 5 or 20 checkpoints of its models)."""

import json
import os
import shutil
from typing import Optional

import jax
import ml_collections
import numpy as np
from absl import logging

from errors import UserError
from modes.run import open_run
from training import checkpointing


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
  checkpoints = checkpointing.Checkpointer(workdir, keep=config.train.keep_checkpoints)
  try:
    steps = sorted(s for s in checkpoints.all_steps()
                   if last_step is None or s <= last_step)[-num_checkpoints:]
    if len(steps) < num_checkpoints:
      raise checkpointing.CheckpointError(
          f"{directory} has {len(steps)} checkpoint(s) ({', '.join(map(str, steps))}), "
          f"fewer than the {num_checkpoints} to average; lower --num_average or keep more "
          f"(config.train.keep_checkpoints)")
    template = run.state_shape()
    total, state = None, None
    for step in steps:
      state = checkpoints.restore(template, step)
      params = jax.tree.map(lambda x: np.asarray(x, np.float64), state.params)
      total = params if total is None else jax.tree.map(np.add, total, params)
  finally:
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
