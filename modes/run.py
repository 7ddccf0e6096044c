"""What every mode after training shares: open the run (config, task, devices) and restore
a checkpoint of its workdir, read-only."""

import dataclasses
import os
from typing import Any, List, Optional, Sequence

import jax
import ml_collections
from absl import logging

import train
from input_pipeline import tokenizers
from training import checkpointing, steps

RETRIES = 5  # newest steps a reader tries when a live trainer retires the one it reads
CHECKPOINT_KINDS = {"latest": "checkpoints", "best": "best", "averaged": "averaged"}
_HINTS = {"latest": "train first with --mode=train and the same --workdir",
          "best": "set config.eval.best_metric when training to keep the best checkpoint",
          "averaged": "create it with --mode=average"}


@dataclasses.dataclass
class Run:
  """An opened run: its config, workdir, devices, task and optimizer (for the state's
  shape), and the eval data of `split` when one was asked for."""
  config: ml_collections.ConfigDict
  workdir: str
  devices: List[jax.Device]
  task: Any
  tx: Any
  eval_dataset: Any = None
  split: Optional[str] = None

  def restore(self, checkpoint: str = "latest", step: Optional[int] = None):
    """(step, host params) of a checkpoint: the newest (or `step`'s) regular one, the best
    one or the averaged one. Read-only: it creates, renames and deletes nothing, so it
    works beside a live trainer (reading the newest finished checkpoint)."""
    subdir = CHECKPOINT_KINDS[checkpoint]
    directory = checkpointing.checkpoint_directory(self.workdir, subdir)
    if not os.path.lexists(directory):
      raise checkpointing.CheckpointError(
          f"no {checkpoint} checkpoint in {directory}; {_HINTS[checkpoint]}")
    checkpoints = checkpointing.Checkpointer.for_reading(self.workdir, subdir)
    try:
      for attempt in range(RETRIES + 1):
        if checkpoints.latest_step() is None:
          raise checkpointing.CheckpointError(
              f"no {checkpoint} checkpoint in {directory}; {_HINTS[checkpoint]}")
        if step is not None and step not in checkpoints.all_steps():
          raise checkpointing.CheckpointError(
              f"no checkpoint of step {step} in {directory}; it has steps "
              f"{', '.join(map(str, checkpoints.all_steps()))}")
        wanted = checkpoints.latest_step() if step is None else step
        try:
          saved = checkpoints.restore_config(wanted) or {}
          train.check_same_model(saved, self.config, directory)
          tokenizers.check_same_tokenizer(saved, self.task, self.config, directory)
          state = checkpoints.restore(self.state_shape(), wanted)
          break
        except checkpointing.CheckpointError:
          # A live trainer retires its oldest steps as it saves: the newest step of a
          # moment ago may be gone by now. Then the newest is read again; a step that is
          # still there is really damaged.
          checkpoints.reload()
          if step is not None or wanted in checkpoints.all_steps() or attempt == RETRIES:
            raise
          logging.info("checkpoint step %d was retired by the trainer while it was read; "
                       "reading the newest again", wanted)
    finally:
      checkpoints.close()
    return int(state.step), state.params

  def state_shape(self):
    """The train state's shapes and dtypes (nothing computed)."""
    return jax.eval_shape(lambda: steps.create_state(self.task, self.tx, self.config.seed))


def open_run(config: ml_collections.ConfigDict, workdir: str,
             devices: Optional[Sequence[jax.Device]] = None,
             split: Optional[str] = None) -> Run:
  """The run of `workdir` as `config` describes it, its task opened from the files training
  wrote there (tokenizer, labels); with `split`, that split's eval data too."""
  devices, task, tx, eval_dataset = train.open_task(config, workdir, devices, training=False,
                                                    split=split)
  return Run(config, workdir, devices, task, tx, eval_dataset, split)
