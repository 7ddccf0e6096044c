"""Checkpoints with orbax: asynchronous saves, the newest K kept, resolved config beside them.

A checkpoint step directory holds four items:
  state/      the train state as host (unreplicated) arrays, so it loads on any device count
  checksums/  a CRC-32 of every array of state/ (JSON), checked on every restore: damage
              that still decodes (flipped bits, a chunk replaced) is named as damage, with
              the array it hit and the newest earlier step that restores intact
  config/     the resolved run config as JSON
  data/       each process's training-data iterator position (grain's iterator state, JSON:
              process_<i>-of-<n>.json), so a resumed run reads the batches the uninterrupted
              run would have read
Orbax writes each step into a temporary directory and renames it when complete, so a save
that is interrupted (a kill, a full disk) never leaves a step that looks finished, and the
earlier steps are untouched; steps beyond the newest K are renamed into `deleted/` before
their files are removed, for the same reason. Nothing is pickled: arrays, JSON and text.
A reader (`Checkpointer.for_reading`: eval, decode and the other modes) opens the directory
read-only: it never creates, renames or deletes anything, so it can run beside a live
trainer, whose save in flight it leaves alone (it sees only finished steps).

Errors name what is wrong: `CheckpointError` for a checkpoint that is missing, damaged or
written by a different model (with the differing parameters), `CheckpointWriteError` for a
save that failed (an unwritable directory, a full disk).
"""

import json
import os
import re
import shutil
import sys
import time
import zlib
from typing import Any, Dict, List, Mapping, Optional

import grain
import grain.checkpoint  # noqa: F401  (registers grain's orbax handler)
import jax
import numpy as np
import orbax.checkpoint as ocp

from errors import UserError, WriteError


TRASH = "deleted"  # subdirectory where retired steps wait to be deleted
# Listings a read-only opening tries when a step vanishes under it (a trainer retiring it).
READ_ONLY_LIST_ATTEMPTS = 5


class CheckpointError(UserError, RuntimeError):
  """A checkpoint that cannot be restored into the requested state."""


class CheckpointWriteError(WriteError, RuntimeError):
  """A checkpoint could not be written; the earlier ones are intact."""


def _is_late_write_callback(unraisable) -> bool:
  """An asyncio loop's "Event loop is closed" raised in `call_soon_threadsafe`: the sign of
  tensorstore finishing (failing) one more write of a save after orbax gave the save up
  and closed the loop that awaited it. Reported by CheckpointWriteError already."""
  error, tb = unraisable.exc_value, unraisable.exc_traceback
  names = []
  while tb is not None:
    names.append(tb.tb_frame.f_code.co_name)
    tb = tb.tb_next
  return (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
          and "call_soon_threadsafe" in names)


def _quiet_late_write_callbacks() -> None:
  """When a background save fails (a full disk), tensorstore's other writes of it fail
  too, each after orbax has closed the event loop they would report to; their callbacks'
  RuntimeError went to sys.unraisablehook, dozens of tracebacks ahead of the one-line
  error. Those alone are dropped; anything else goes to the hook that was there."""
  previous = sys.unraisablehook
  if getattr(previous, "drops_late_write_callbacks", False):
    return

  def hook(unraisable):
    if not _is_late_write_callback(unraisable):
      previous(unraisable)
  hook.drops_late_write_callbacks = True
  sys.unraisablehook = hook


def checkpoint_directory(workdir: str, subdir: str = "checkpoints") -> str:
  return os.path.abspath(os.path.join(workdir, subdir))


# The config a training run saves in its workdir (train._prepare_workdir), which the
# modes read back (modes/workdir_config.py).
CONFIG_FILE = "config.json"


def has_checkpoints(workdir: str) -> bool:
  """Whether `workdir` has a non-empty checkpoint directory (a run has saved there)."""
  directory = checkpoint_directory(workdir)
  return os.path.isdir(directory) and bool(os.listdir(directory))


def _cause(error: BaseException, limit: int = 240) -> str:
  """An exception as one short line (tensorstore messages run to kilobytes)."""
  text = " ".join(str(error).split()) or type(error).__name__
  return text if len(text) <= limit else text[:limit] + "..."


class _IteratorPosition:
  """A data iterator's state captured when the save starts, written and read by grain's
  orbax handler (bytes stand for a JSON state there), so a save that finishes in the
  background records the position of its step, not a later one."""

  def __init__(self, state: Optional[Mapping] = None):
    self.state = None if state is None else dict(state)

  def get_state(self) -> bytes:
    return json.dumps(self.state, sort_keys=True).encode()

  def set_state(self, state: bytes) -> None:
    self.state = json.loads(state)

  def start_prefetch(self) -> None:  # the handler calls it after set_state
    pass


def _key_name(key) -> str:
  for field in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
    if hasattr(key, field):
      return str(getattr(key, field))
  return str(key)


def _leaf_paths(tree) -> dict:
  """{"params/decoder/block_0/...": leaf}: the same names for a TrainState and for the
  nested dicts orbax's metadata holds."""
  return {"/".join(_key_name(k) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def tree_differences(saved, wanted, limit: int = 4) -> List[str]:
  """What differs between two trees of arrays (or shape/dtype metadata): missing or
  extra entries and shape or dtype changes, at most `limit` of each kind."""
  saved, wanted = _leaf_paths(saved), _leaf_paths(wanted)
  out = []
  missing = [k for k in wanted if k not in saved]
  extra = [k for k in saved if k not in wanted]
  for keys, what in ((missing, "not in the checkpoint"), (extra, "not in the model")):
    if keys:
      more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
      out.append(f"{', '.join(keys[:limit])}{more} {what}")
  changed = [(k, saved[k], wanted[k]) for k in wanted if k in saved
             and (tuple(saved[k].shape) != tuple(wanted[k].shape)
                  or np.dtype(saved[k].dtype) != np.dtype(wanted[k].dtype))]
  for k, s, w in changed[:limit]:
    out.append(f"{k} is {np.dtype(s.dtype).name}{list(s.shape)} in the checkpoint, "
               f"{np.dtype(w.dtype).name}{list(w.shape)} in the model")
  if len(changed) > limit:
    out.append(f"{len(changed) - limit} more differ")
  return out


CHECKSUM = "crc32"  # of each array's bytes (C order); zlib's runs at several GB/s


def array_checksums(tree) -> Dict[str, str]:
  """{"params/...": "<crc32 hex> <dtype>[shape]"} of every array leaf of `tree`."""
  out = {}
  for path, leaf in _leaf_paths(tree).items():
    array = np.ascontiguousarray(np.asarray(leaf))
    crc = zlib.crc32(array.reshape(-1).view(np.uint8))
    out[path] = f"{crc:08x} {array.dtype.name}{list(array.shape)}"
  return out


def state_bytes(tree) -> int:
  """Bytes of the arrays of a (host or device) tree: what its checkpoint's state/ holds,
  before the few kilobytes of metadata, checksums, config and data position."""
  return sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def _megabytes(n: float) -> str:
  return f"{n / 1e9:.3g} GB" if n >= 1e9 else f"{n / 1e6:.3g} MB"


def disk_use_line(state, keep: int, best: bool, workdir: str) -> str:
  """What a run's checkpoints will take on disk, in one line: `keep` checkpoints of the
  size of `state`, and one more (<workdir>/best) when `best`."""
  size = state_bytes(state)
  total = (keep + best) * size
  line = (f"checkpoints will take about {_megabytes(total)} in {workdir}: {keep} kept "
          f"(config.train.keep_checkpoints) x {_megabytes(size)} each")
  if best:
    line += " + 1 best (config.eval.best_metric)"
  return line


def _directory_blocker(directory: str) -> Optional[str]:
  """The path that keeps `directory` from being one (a file where it or a parent should
  be), or None."""
  path = directory
  while path and path != os.path.dirname(path):
    if os.path.lexists(path):
      return None if os.path.isdir(path) else path
    path = os.path.dirname(path)
  return None


class Checkpointer:
  """Saves and restores the train state of one workdir (`<workdir>/<subdir>`: the regular
  checkpoints, or "best" and "averaged"). `Checkpointer.for_reading` opens one read-only."""

  def __init__(self, workdir: str, keep: int, async_save: bool = True,
               subdir: str = "checkpoints", read_only: bool = False):
    self.directory = checkpoint_directory(workdir, subdir)
    self.read_only = read_only
    blocker = _directory_blocker(self.directory)
    if blocker:  # orbax would only fail at the first save, after the steps before it
      raise (CheckpointError if read_only else CheckpointWriteError)(
          f"{blocker} is a file where the checkpoint directory {self.directory} should be; "
          f"move it away (or use another --workdir)")
    if read_only:
      options = ocp.CheckpointManagerOptions(
          read_only=True, create=False, save_interval_steps=0, cleanup_tmp_directories=False)
    else:
      # Old steps are renamed into TRASH (atomic) and deleted from there: orbax's own
      # deletion removes a step's files one by one, so a kill in the middle would leave a
      # half-deleted step that still looks finished. Temporary directories of saves that
      # were interrupted are removed when the manager starts (only a writer does that: the
      # workdir lock makes it the only one).
      options = ocp.CheckpointManagerOptions(
          max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
          todelete_subdir=TRASH, cleanup_tmp_directories=True)
      _quiet_late_write_callbacks()
    # A reader lists the steps while a live trainer may retire one (renamed into TRASH):
    # a step gone between the listing and its read is not an error; list again.
    attempts = READ_ONLY_LIST_ATTEMPTS if read_only else 1
    for attempt in range(attempts):
      try:
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "checksums": ocp.JsonCheckpointHandler(),
                           "config": ocp.JsonCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler()})
        break
      except FileNotFoundError as e:
        if attempt + 1 < attempts:
          time.sleep(0.2)
          continue
        raise (CheckpointError if read_only else CheckpointWriteError)(
            f"cannot {'read' if read_only else 'create'} the checkpoint directory "
            f"{self.directory}: {_cause(e)}") from e
      except OSError as e:
        raise CheckpointWriteError(
            f"cannot create the checkpoint directory {self.directory}: {_cause(e)}") from e
    self._empty_trash()

  @classmethod
  def for_reading(cls, workdir: str, subdir: str = "checkpoints") -> "Checkpointer":
    """A read-only Checkpointer: restores only; creates, renames and deletes nothing."""
    return cls(workdir, keep=1, async_save=False, subdir=subdir, read_only=True)

  def _empty_trash(self) -> None:
    """Deletes the steps orbax retired into TRASH (only process 0 retires steps)."""
    if self.read_only:
      return
    trash = os.path.join(self.directory, TRASH)
    for name in os.listdir(trash) if os.path.isdir(trash) else ():
      shutil.rmtree(os.path.join(trash, name), ignore_errors=True)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def reload(self) -> None:
    """Lists the steps on disk again (a live trainer adds and retires steps meanwhile)."""
    self._manager.reload()

  def all_steps(self):
    return list(self._manager.all_steps())

  def step_directory(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, host_state: Any, config: Mapping,
           data_state: Optional[Mapping] = None) -> None:
    """Starts saving `host_state` (numpy arrays, not device buffers) at `step`, with the
    data iterator's state `data_state` (a JSON-able dict) if given.

    Returns once the arrays are captured; the write finishes in the background. A failed
    write (this one's or the previous background one's) raises CheckpointWriteError.
    """
    if self.read_only:
      raise ValueError(f"{self.directory} was opened for reading")
    self._empty_trash()
    items = {"state": ocp.args.StandardSave(host_state),
             "checksums": ocp.args.JsonSave({CHECKSUM: array_checksums(host_state)}),
             "config": ocp.args.JsonSave(dict(config))}
    if data_state is not None:
      items["data"] = grain.checkpoint.CheckpointSave(_IteratorPosition(data_state))
    try:
      self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # pylint: disable=broad-except  # orbax re-raises OSError etc.
      raise self._write_error(step, e) from e

  def _write_error(self, step: int, error: BaseException) -> CheckpointWriteError:
    # A background write's error surfaces at the next save; its temporary directory
    # ("<step>.orbax-checkpoint-tmp") names the step that failed.
    failed = re.search(r"[/\\](\d+)\.orbax-checkpoint-tmp", str(error))
    step = int(failed.group(1)) if failed else step
    kept = self.all_steps()
    return CheckpointWriteError(
        f"could not write the checkpoint of step {step} in {self.directory} "
        f"({_cause(error)}); the earlier checkpoints are intact (steps: "
        f"{', '.join(map(str, kept)) or 'none'}). Free disk space or fix the directory's "
        f"permissions, then rerun the same command to resume")

  def _metadata(self, step: int, abstract: Any = None):
    try:
      return self._manager.item_metadata(step)
    except Exception as e:  # pylint: disable=broad-except
      raise self._damaged(step, e, abstract) from e

  def _damaged(self, step: int, error: BaseException,
               abstract: Any = None) -> CheckpointError:
    """The error for a damaged `step`, naming the newest earlier step to fall back to:
    with `abstract` (the state's shapes), the newest that restores and verifies."""
    older = [s for s in self.all_steps() if s < step]
    intact = older[-1] if older else None
    if abstract is not None:
      intact = next((s for s in reversed(older) if self._restores(abstract, s)), None)
    if intact is not None:
      hint = (f"move {self.step_directory(step)} away to use the previous checkpoint "
              f"(step {intact}{', which restores intact' if abstract is not None else ''})")
    else:
      hint = ("no earlier checkpoint restores intact" if abstract is not None and older
              else "no earlier checkpoint remains")
    return CheckpointError(
        f"checkpoint step {step} in {self.directory} is damaged or incomplete "
        f"({_cause(error)}); {hint}")

  def _restores(self, abstract: Any, step: int) -> bool:
    try:
      self._read_state(abstract, step)
      return True
    except Exception:  # pylint: disable=broad-except  # any failure: not intact
      return False

  def _read_state(self, abstract: Any, step: int) -> Any:
    """The state arrays of `step`, verified against the checksums saved with them (a
    checkpoint written before checksums were saved is read unverified)."""
    items = {"state": ocp.args.StandardRestore(abstract)}
    verify = os.path.isdir(os.path.join(self.step_directory(step), "checksums"))
    if verify:
      items["checksums"] = ocp.args.JsonRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    if verify:
      saved = (restored["checksums"] or {}).get(CHECKSUM, {})
      now = array_checksums(restored["state"])
      wrong = [k for k in now if saved.get(k) != now[k]]
      wrong += [k for k in saved if k not in now]
      if wrong:
        more = f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""
        raise ValueError(
            f"the contents of {', '.join(wrong[:3])}{more} differ from the checksums "
            f"written with them")
    return restored["state"]

  def restore(self, template: Any, step: Optional[int] = None) -> Any:
    """Restores the state at `step` (default: the newest) shaped like `template`.

    Raises CheckpointError naming the differing parameters when the checkpoint holds a
    different model, and the damaged step (and the newest earlier one that restores
    intact) when its files cannot be read or its arrays differ from their checksums.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    saved = self._metadata(step, abstract)["state"]
    if saved is None:
      raise self._damaged(step, FileNotFoundError("no state item"), abstract)
    saved_tree = getattr(saved, "tree", saved)
    differences = tree_differences(saved_tree, abstract)
    if differences:
      raise CheckpointError(
          f"checkpoint step {step} in {self.directory} holds a different model than the "
          f"config describes: {'; '.join(differences)}. Use the config it was trained "
          f"with (saved in the checkpoint and in the workdir's config.json) or another "
          f"--workdir")
    try:
      restored = self._read_state(abstract, step)
    except Exception as e:  # pylint: disable=broad-except  # tensorstore, json, OS errors
      raise self._damaged(step, e, abstract) from e
    # Checked again on the arrays read: numpy templates come back in the saved shape.
    differences = tree_differences(restored, abstract)
    if differences:
      raise self._damaged(step, ValueError("; ".join(differences)))
    return restored

  def restore_config(self, step: Optional[int] = None) -> Optional[dict]:
    """The run config saved with `step` (default: the newest); None if it has none."""
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    try:
      return self._manager.restore(step, args=ocp.args.Composite(
          config=ocp.args.JsonRestore()))["config"]
    except Exception as e:  # pylint: disable=broad-except
      raise self._damaged(step, e) from e

  def restore_data_state(self, step: int) -> Optional[dict]:
    """This process's data iterator state saved with `step`; None when the checkpoint has
    none (it was written before iterator states were saved, or by another process count).
    """
    if not os.path.isdir(os.path.join(self.step_directory(step), "data")):
      return None
    position = _IteratorPosition()
    try:
      self._manager.restore(step, args=ocp.args.Composite(
          data=grain.checkpoint.CheckpointRestore(position)))
    except ValueError:  # grain: no file for this process index and count
      return None
    except Exception as e:  # pylint: disable=broad-except
      raise self._damaged(step, e) from e
    return position.state

  def wait(self) -> None:
    """Blocks until every started save is on disk (CheckpointWriteError if one failed)."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(self.latest_step() or -1, e) from e
    self._empty_trash()

  def close(self) -> None:
    try:
      self._manager.wait_until_finished()
    finally:
      self._manager.close()
    self._empty_trash()
