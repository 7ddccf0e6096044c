"""The config of a run in an existing workdir: the one training saved there
(<workdir>/config.json), with the command line's `--config.<group>.<field>` overrides.

    resolve_config(workdir, file_config, overrides, explicit_file)   every mode but sweeps

A workdir remembers how it was made: `main.py --workdir=runs/x --mode=decode` needs neither
the training command's --config nor its overrides. An override may change what may differ
between runs of one workdir (data paths, compute, optimizer, loop, evaluation, decoding);
one that would change what the checkpoint must match (config.task, config.model, the
family's identity_fields) is refused unless --config.train.allow_config_change=True, which
is never taken from the saved config. An explicit --config=FILE is used as it is, with its
overrides, as for a new workdir; restoring a checkpoint still checks its model against it
(train.check_same_model).
"""

import json
import os
from typing import Any, Mapping

from absl import logging
import ml_collections

import tasks
from config_checks import ConfigError
from configs import default
from training import checkpointing
from training.checkpointing import CONFIG_FILE


def resolve_config(workdir: str, file_config: ml_collections.ConfigDict,
                   overrides: Mapping[str, Any],
                   explicit_file: bool) -> ml_collections.ConfigDict:
  """The config a mode runs with in `workdir`: `file_config` (the --config file with
  `overrides` applied) for a new workdir or an `explicit_file`; else the config saved in
  the workdir with `overrides` ({"group.field": value}, typed by config_flags) applied.
  Raises ConfigError for an unreadable saved config or an override of a model field."""
  path = os.path.join(workdir, CONFIG_FILE)
  if explicit_file:
    return file_config
  if not os.path.isfile(path):
    if checkpointing.has_checkpoints(workdir):
      raise ConfigError(f"{workdir} has checkpoints but no {CONFIG_FILE} (the config "
                        f"training saved there); give the run's --config=FILE and flags")
    return file_config
  config = _saved_config(path)
  _refuse_model_changes(config, overrides, workdir, path)
  for name, value in overrides.items():
    _set(config, name, value, f"--config.{name}")
  logging.info("config: %s%s", path, f" with --config.{', --config.'.join(overrides)}"
               if overrides else "")
  return config


def _saved_config(path: str) -> ml_collections.ConfigDict:
  """The config saved at `path` on the fields of configs/default.py (a field added since
  keeps its default; one removed since is dropped); allow_config_change off."""
  try:
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
  except (OSError, UnicodeDecodeError, ValueError) as e:
    raise ConfigError(f"cannot read the config saved in {path} ({e}); give the run's "
                      f"--config=FILE and flags, or another --workdir") from e
  if isinstance(saved, dict):
    saved = default.group_flat_config(saved)
  if not isinstance(saved, dict) or saved.get("task") not in default.TASKS:
    raise ConfigError(f"the config saved in {path} has no task of {', '.join(default.TASKS)}; "
                      f"give the run's --config=FILE and flags, or another --workdir")
  config = default.get_config(f"task={saved['task']}")
  dropped = []
  for key, value in saved.items():
    if key not in config:
      dropped.append(key)
    elif isinstance(config[key], ml_collections.ConfigDict):
      for field, inner in (value if isinstance(value, dict) else {}).items():
        if field in config[key]:
          _set(config, f"{key}.{field}", inner, f"{path}: {key}.{field}")
        else:
          dropped.append(f"{key}.{field}")
    else:
      _set(config, key, value, f"{path}: {key}")
  if dropped:
    logging.info("%s: fields this code no longer has, left out: %s", path, ", ".join(dropped))
  config.train.allow_config_change = False  # a permission given per command, never inherited
  return config


def _refuse_model_changes(config, overrides: Mapping[str, Any], workdir: str,
                          path: str) -> None:
  """ConfigError naming each override that changes config.task, a config.model field or
  an identity field of the family, unless the overrides allow config changes."""
  if overrides.get("train.allow_config_change"):
    return
  identity = getattr(tasks.TASKS.get(config.task), "identity_fields", ())
  changed = [(name, value) for name, value in overrides.items()
             if (name == "task" or name.startswith("model.") or name in identity)
             and value != _get(config, name)]
  if changed:
    flags = ", ".join(f"--config.{name}={value}" for name, value in changed)
    then = ", ".join(f"{name}={_get(config, name)!r}" for name, _ in changed)
    must = ", ".join(["config.task", "config.model"] + [f"config.{f}" for f in identity])
    raise ConfigError(
        f"{flags} would change the model {workdir} was trained with ({then} in {path}); "
        f"its checkpoints must match {must}: drop {'them' if len(changed) > 1 else 'it'}, "
        f"use another --workdir, or add "
        f"--config.train.allow_config_change=True to load the checkpoint anyway")


def _get(config: ml_collections.ConfigDict, name: str) -> Any:
  for part in name.split("."):
    config = config[part]
  return config


def _set(config: ml_collections.ConfigDict, name: str, value: Any, what: str) -> None:
  """config.<name> = value; a value of another type (a damaged file) is a ConfigError."""
  *groups, field = name.split(".")
  for group in groups:
    config = config[group]
  try:
    config[field] = value
  except TypeError as e:
    raise ConfigError(f"{what}={value!r} does not fit the field ({e})") from e
