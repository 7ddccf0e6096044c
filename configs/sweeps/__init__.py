"""Ablation sweeps: a base config and named variants, each a few field overrides of it.

A sweep file (`configs/sweeps/<name>.py`) defines `get_sweep()` returning a `Sweep`:

    from configs import translation
    from configs.sweeps import Sweep, Variant

    def get_sweep():
      base = translation.get_config()
      base.train.num_train_steps = 800
      return Sweep(base, [
          Variant("base"),
          Variant("heads_1", {"model.num_heads": 1}, group="A", description="one head, d_k = 128"),
      ])

`python main.py --mode=sweep --sweep=<file> --workdir=<dir>` trains the variants one after
another (modes/sweep.py). This module only loads and checks the file; it imports no JAX, so
main.py can read the base config before JAX starts (config.compute.cpu_devices).
"""

import copy
import dataclasses
import importlib.util
import json
import os
import re
import traceback
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import ml_collections

from configs import default
from errors import UserError

# A variant's name is its sub-directory of the sweep workdir and its row in the tables.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
# Fields that concern the process, not the run: the sweep's one process has one value.
_PROCESS_FIELDS = ("compute.cpu_devices",)


class SweepError(UserError, ValueError):
  """A sweep file that cannot be loaded or names what the base config lacks."""


@dataclasses.dataclass(frozen=True)
class Variant:
  """One row of the comparison: `overrides` (dotted field name such as "model.num_heads"
  -> value) applied to the base config."""
  name: str
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  group: str = ""  # a label shared by related rows (the paper's Table 3: A, B, C, D, E)
  description: str = ""  # one line for the table


@dataclasses.dataclass(frozen=True)
class Sweep:
  base: ml_collections.ConfigDict
  variants: Sequence[Variant]
  name: str = ""  # the title of the comparison; load_sweep sets the file's stem if empty

  def config(self, variant: Variant,
             overrides: Optional[Mapping[str, Any]] = None) -> ml_collections.ConfigDict:
    """The base, then the variant's overrides, then `overrides` (the command line's, the
    same for every variant): a config of its own (changing it leaves the base alone)."""
    config = copy.deepcopy(self.base)
    for where, values in ((f"variant {variant.name!r}", variant.overrides),
                          ("the command line", overrides or {})):
      for field, value in values.items():
        if not has_field(config, field):
          raise SweepError(f"sweep {self.name!r}, {where}: unknown config field {field!r}")
        *groups, name = field.split(".")
        node = config
        for group in groups:
          node = node[group]
        try:
          node[name] = value
        except (TypeError, ValueError):  # ConfigDict keeps each field's type
          raise SweepError(f"sweep {self.name!r}, {where}: {field}={value!r} is invalid: "
                           f"expected the type of the base's value, "
                           f"{node[name]!r} ({type(node[name]).__name__})") from None
    return config

  def check(self, overrides: Optional[Mapping[str, Any]] = None) -> None:
    """Raises SweepError for the first malformed variant (bad or repeated name, unknown
    field, a value of the wrong type). Run-config checks come later (train.validate)."""
    if not isinstance(self.base, ml_collections.ConfigDict):
      raise SweepError(f"sweep {self.name!r}: base is a {type(self.base).__name__}, not an "
                       f"ml_collections.ConfigDict")
    if not self.variants:
      raise SweepError(f"sweep {self.name!r} has no variants")
    seen = set()
    for variant in self.variants:
      if not isinstance(variant, Variant):
        raise SweepError(f"sweep {self.name!r}: {variant!r} is not a configs.sweeps.Variant")
      if not isinstance(variant.name, str) or not _NAME.fullmatch(variant.name):
        raise SweepError(f"sweep {self.name!r}: variant name {variant.name!r} is invalid: "
                         f"expected letters, digits and _.+- (it names a directory)")
      if variant.name in seen:
        raise SweepError(f"sweep {self.name!r}: duplicate variant name {variant.name!r}")
      seen.add(variant.name)
      for field in _PROCESS_FIELDS:
        if field in variant.overrides:
          raise SweepError(f"sweep {self.name!r}, variant {variant.name!r}: {field} is set "
                           f"once for the whole sweep (in the base or on the command line)")
      self.config(variant, overrides)


def load_sweep(path: str) -> Sweep:
  """Imports the sweep file at `path`, calls its get_sweep() and checks the result."""
  if os.path.isdir(path):
    raise SweepError(f"--sweep={path} is a folder; give a sweep file in it (e.g. "
                     f"configs/sweeps/table3.py)")
  if not os.path.isfile(path):
    raise SweepError(f"--sweep={path}: no such file")
  name, extension = os.path.splitext(os.path.basename(path))
  if extension != ".py":
    raise SweepError(f"--sweep={path}: a sweep file is Python (a .py file defining "
                     f"get_sweep()); see configs/sweeps/")
  try:
    spec = importlib.util.spec_from_file_location(f"_sweep_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_sweep", None)):
      raise SweepError(f"sweep file {path} defines no get_sweep()")
    sweep = module.get_sweep()
  except SweepError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # the file's own code failed
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__)
             if os.path.abspath(f.filename) == os.path.abspath(path)]
    where = f" (line {lines[-1]})" if lines else ""
    raise SweepError(f"cannot load sweep file {path}{where}: {type(e).__name__}: "
                     f"{' '.join(str(e).split())}") from None
  if not isinstance(sweep, Sweep):
    raise SweepError(f"get_sweep() of {path} returned a {type(sweep).__name__}, not a "
                     f"configs.sweeps.Sweep")
  return sweep if sweep.name else dataclasses.replace(sweep, name=name)


def has_field(config: ml_collections.ConfigDict, dotted: str) -> bool:
  """Whether `config` has the field `dotted` ("model.num_heads"; a group is not a field)."""
  node = config
  for part in dotted.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return not isinstance(node, ml_collections.ConfigDict)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
  """`{"model": {"num_heads": 4}}` -> `{"model.num_heads": 4}`."""
  out: Dict[str, Any] = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def format_overrides(overrides: Mapping[str, Any]) -> str:
  """`{"model.num_heads": 1}` -> `model.num_heads=1`."""
  return ", ".join(f"{k}={v}" for k, v in overrides.items())


def field_differences(recorded: Dict[str, Any],
                      config: ml_collections.ConfigDict) -> Dict[str, Tuple[Any, Any]]:
  """`{field: (value then, value now)}` for each field where a run's recorded config (its
  JSON) differs from `config` (None: the field is absent on that side).

  A field the recorded config lacks that `config` holds at configs/default.py's value for
  its task was added to the codebase after that run; new fields default to the behaviour
  before them, so it is no difference (a finished sweep still resumes after an upgrade).
  """
  now = flatten(json.loads(config.to_json()))
  recorded = flatten(default.group_flat_config(recorded))  # a run before the groups: flat
  task = config.get("task")
  defaults = (flatten(json.loads(default.get_config(f"task={task}").to_json()))
              if task in default.TASKS else {})
  return {k: (recorded.get(k), now.get(k))
          for k in sorted(set(recorded) | set(now)) if recorded.get(k) != now.get(k)
          and not (k not in recorded and k in defaults and now.get(k) == defaults[k])}


def config_differences(recorded: Dict[str, Any], config: ml_collections.ConfigDict):
  """`field: then -> now` for each field where a run's recorded config (its JSON) differs
  from `config`."""
  return [f"{k}: {then!r} then, {now!r} now"
          for k, (then, now) in field_differences(recorded, config).items()]
