"""Presets shared by the config files: model sizes, accelerators, and the variant string.

A config file's `get_config(arg)` takes a variant string such as
`"task=generation,size=small,accel=gpu"`: comma-separated `key=value` pairs, parsed by
`parse_variant`. Presets only set fields; `--config.<field>=<value>` flags still override
anything afterwards. `config.size` and `config.accel` record the presets applied: a
`--config.size=...` or `--config.accel=...` flag is refused (it would apply nothing).
"""

from typing import Optional

import ml_collections

from errors import UserError

# Model sizes. `base` and `big` are table 3 of the paper; `tiny` and `small` fit a CPU.
# The learning rate is the peak reached at the end of warmup; for base and big it is the
# paper's d_model^-0.5 * warmup_steps^-0.5 with its rsqrt schedule. The tiny demo anneals
# with a cosine instead: it reaches exact reversal more reliably in a few thousand steps.
SIZES = {
    "tiny": dict(model=dict(num_encoder_layers=2, num_decoder_layers=2, d_model=64, d_ff=256,
                            num_heads=4),
                 optim=dict(dropout_rate=0.0, learning_rate=3e-3, warmup_steps=200,
                            schedule="cosine")),
    "small": dict(model=dict(num_encoder_layers=3, num_decoder_layers=3, d_model=256,
                             d_ff=1024, num_heads=4),
                  optim=dict(dropout_rate=0.1, learning_rate=1.5e-3, warmup_steps=1000,
                             schedule="rsqrt")),
    "base": dict(model=dict(num_encoder_layers=6, num_decoder_layers=6, d_model=512,
                            d_ff=2048, num_heads=8),
                 optim=dict(dropout_rate=0.1, learning_rate=512**-0.5 * 4000**-0.5,
                            warmup_steps=4000, schedule="rsqrt")),
    "big": dict(model=dict(num_encoder_layers=6, num_decoder_layers=6, d_model=1024,
                           d_ff=4096, num_heads=16),
                optim=dict(dropout_rate=0.3, learning_rate=1024**-0.5 * 4000**-0.5,
                           warmup_steps=4000, schedule="rsqrt")),
}

# Accelerators: compute dtype, attention implementation and batch sizes (global).
ACCELERATORS = {
    "cpu": dict(compute=dict(dtype="float32", attention_impl="reference"),
                train=dict(batch_size=64), eval=dict(eval_batch_size=128)),
    "gpu": dict(compute=dict(dtype="bfloat16", attention_impl="fused"),
                train=dict(batch_size=256), eval=dict(eval_batch_size=512)),
    "tpu": dict(compute=dict(dtype="bfloat16", attention_impl="fused"),
                train=dict(batch_size=512), eval=dict(eval_batch_size=1024)),
}


class VariantError(UserError, ValueError):
  """A malformed variant string or an unknown key or preset name in it."""


def parse_variant(arg, allowed):
  """`"a=1,b=x"` -> `{"a": "1", "b": "x"}`, checking keys and values.

  Args:
    arg: the string after the colon in `--config=file.py:arg`, or None/empty.
    allowed: dict key -> collection of allowed values (None = any value).
  """
  out = {}
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    key, value = key.strip(), value.strip()
    if not sep or not key or not value:
      raise VariantError(f"config variant item {item!r} is not of the form key=value "
                         f"(keys: {', '.join(allowed)})")
    if key not in allowed:
      raise VariantError(f"unknown config variant key {key!r}; expected one of "
                         f"{', '.join(allowed)}")
    if allowed[key] is not None and value not in allowed[key]:
      raise VariantError(f"config variant {key}={value!r} is unknown; expected one of "
                         f"{', '.join(allowed[key])}")
    if key in out and out[key] != value:  # the last would win without a word
      raise VariantError(f"config variant key {key!r} is given twice ({out[key]!r} and "
                         f"{value!r}); keep one")
    out[key] = value
  return out


# The top-level fields that record the presets applied. Only a variant string applies a
# preset: a `--config.size=...` flag would change the record, not the fields.
LABELS = ("size", "accel")


def refuse_label_overrides(overrides, config_file: Optional[str]) -> None:
  """VariantError for an override of a preset's label (`{"size": "small"}`), naming the
  variant string of `config_file` that applies the preset (None: a sweep's base)."""
  for name in LABELS:
    if name in overrides:
      value = overrides[name]
      where = (f"the variant string: --config={config_file}:{name}={value} (keys task, size, "
               f"accel, comma-separated)" if config_file else
               f"the sweep file's base config (get_config(\"{name}={value}\"))")
      raise VariantError(f"--config.{name}={value} would only relabel the config, not apply "
                         f"the {name} preset; choose presets with {where}")


def missing_accelerator(config: ml_collections.ConfigDict, platform: str) -> str:
  """One line when config.accel names an accelerator that JAX's default backend
  (`platform`: cpu, gpu, tpu) is not, else ""."""
  if config.accel == "cpu" or platform == config.accel:
    return ""
  return (f"config.accel={config.accel}, but JAX found no {config.accel.upper()}: running "
          f"on {platform} with the {config.accel} preset's settings as they are "
          f"(compute.dtype={config.compute.dtype}, compute.attention_impl="
          f"{config.compute.attention_impl}, train.batch_size={config.train.batch_size})")


def apply_presets(config: ml_collections.ConfigDict, size: str, accel: str) -> None:
  """Sets the size and accelerator fields (and records the preset names)."""
  config.size = size
  update_groups(config, SIZES[size])
  config.accel = accel
  update_groups(config, ACCELERATORS[accel])


def update_groups(config: ml_collections.ConfigDict, values) -> None:
  """Sets `values`, `{group: {field: value}}` (or top-level `{field: value}`), on fields
  the config has; a name it lacks is a KeyError (ConfigDict.update would add it)."""
  for key, value in values.items():
    if key not in config:
      raise KeyError(f"config has no field {key!r}")
    if isinstance(value, dict):
      update_groups(config[key], value)
    else:
      config[key] = value
