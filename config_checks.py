"""Checks of config values, used next to the code that reads each group of fields.

Every check raises `ConfigError` with one message that names the field (as
`config.<group>.<field>`), its value and what is allowed. They run before any compute:
train.validate calls each group's check (models, optimizers, data sources, families, the
loop), and main.py prints the message as one line.
"""

import math
from typing import Any, Callable, Collection

from errors import UserError


class ConfigError(UserError, ValueError):
  """A config value that cannot work; the message is meant for the user as is."""


def fail(path: str, value: Any, allowed: str) -> None:
  raise ConfigError(f"config.{path}={value!r} is invalid: {allowed}")


def _number(value) -> bool:
  """A finite int or float (not a bool, nan or inf)."""
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


class Fields:
  """The fields of one group of a config (`group` "" for the top level), checked by name."""

  def __init__(self, config, group: str = ""):
    self.group = group
    self.values = config[group] if group else config

  def path(self, field: str) -> str:
    return f"{self.group}.{field}" if self.group else field

  def __getitem__(self, field: str):
    return self.values[field]

  def fail(self, field: str, allowed: str) -> None:
    fail(self.path(field), self.values[field], allowed)

  def choice(self, field: str, allowed: Collection) -> None:
    if self.values[field] not in allowed:
      self.fail(field, f"expected one of {', '.join(map(str, allowed))}")

  def integer(self, field: str, minimum: int) -> None:
    value = self.values[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
      self.fail(field, f"expected an integer >= {minimum}")

  def number(self, field: str, ok: Callable[[float], bool], allowed: str) -> None:
    """Fails with `allowed` unless the value is a finite number for which `ok` holds."""
    value = self.values[field]
    if not (_number(value) and ok(value)):
      self.fail(field, allowed)

  def rate(self, field: str, upper_inclusive: bool = False) -> None:
    self.number(field, lambda v: 0 <= v and (v <= 1 if upper_inclusive else v < 1),
                f"expected a number in [0, 1{']' if upper_inclusive else ')'}")

  def positive(self, field: str) -> None:
    self.number(field, lambda v: v > 0, "expected a number > 0")

  def boolean(self, field: str) -> None:
    if not isinstance(self.values[field], bool):
      self.fail(field, "expected True or False")

  def text(self, field: str, what: str) -> None:
    value = self.values[field]
    if not isinstance(value, str) or not value.strip():
      self.fail(field, f"expected {what}")
