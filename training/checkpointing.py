"""Checkpoints with orbax: asynchronous saves, the newest K kept, resolved config beside them.

A checkpoint step directory holds two items:
  state/   the train state as host (unreplicated) arrays, so it loads on any device count
  config/  the resolved run config as JSON
Orbax writes each step into a temporary directory and renames it when complete, so an
interrupted save never leaves a step that looks finished. No pickle is involved.
"""

import os
from typing import Any, Mapping, Optional

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be restored into the requested state."""


def checkpoint_directory(workdir: str, subdir: str = "checkpoints") -> str:
  return os.path.abspath(os.path.join(workdir, subdir))


class Checkpointer:
  """Saves and restores the train state of one workdir (`<workdir>/<subdir>`: the regular
  checkpoints, or "best" and "averaged")."""

  def __init__(self, workdir: str, keep: int, async_save: bool = True,
               subdir: str = "checkpoints"):
    self.directory = checkpoint_directory(workdir, subdir)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "config"))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self):
    return list(self._manager.all_steps())

  def save(self, step: int, host_state: Any, config: Mapping) -> None:
    """Starts saving `host_state` (numpy arrays, not device buffers) at `step`.

    Returns once the arrays are captured; the write finishes in the background.
    """
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(host_state), config=ocp.args.JsonSave(dict(config))),
                       force=True)

  def restore(self, template: Any, step: Optional[int] = None) -> Any:
    """Restores the state at `step` (default: the newest) shaped like `template`."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract)))
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise CheckpointError(
          f"checkpoint step {step} in {self.directory} cannot be restored into this model "
          f"(was it written by a different config?): {e}") from e
    # Orbax checks shapes only for templates with a sharding (jax arrays); numpy arrays and
    # ShapeDtypeStructs come back in the saved shape, whatever the template says.
    restored = restored["state"]
    for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(abstract),
                                 jax.tree.leaves(restored)):
      if tuple(got.shape) != tuple(want.shape):
        raise CheckpointError(
            f"checkpoint step {step} in {self.directory} cannot be restored into this model "
            f"(was it written by a different config?): {jax.tree_util.keystr(path)} has "
            f"shape {tuple(got.shape)} in the checkpoint, {tuple(want.shape)} in the model")
    return restored

  def restore_config(self, step: Optional[int] = None) -> dict:
    step = self.latest_step() if step is None else step
    return self._manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))["config"]

  def wait(self) -> None:
    """Blocks until every started save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
