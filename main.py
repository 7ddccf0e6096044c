"""Entry point: pick a config, a workdir and a mode.

    python main.py --workdir=runs/demo                          # train (or resume), evaluate
    python main.py --workdir=runs/demo --mode=eval              # evaluate the newest checkpoint
    python main.py --config=configs/default.py:task=generation,size=small --workdir=runs/lm
    python main.py --workdir=runs/demo --config.num_train_steps=500 --config.d_model=128

Exit status: 0 done; 2 a user error (bad config, missing or unusable checkpoint or data),
printed as one line without a traceback; 3 a non-finite loss (nothing bad was saved).
"""

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                               "default.py")
MODES = ("train", "eval")

def _user_error(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


try:  # config_flags reads --config.<field> overrides from sys.argv right here
  config_flags.DEFINE_config_file(
      "config", _DEFAULT_CONFIG,
      "Config file, optionally with a variant: path.py:key=value,...", lock_config=True)
except (KeyError, AttributeError) as e:
  while isinstance(e, BaseException) and e.args:  # KeyError inside AttributeError inside...
    e = e.args[0]
  _user_error(f"unknown config field in the overrides: {' '.join(str(e).split())}")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.")
flags.DEFINE_enum("mode", "train", MODES, "train: train (resuming) then evaluate; "
                  "eval: evaluate the newest checkpoint.")
flags.DEFINE_integer("step", None, "With --mode=eval: the checkpoint step to evaluate.")
flags.mark_flags_as_required(["workdir"])


def _user_errors():
  # Imported lazily so that `--help` and flag errors do not pay for importing jax.
  from configs.presets import VariantError
  from input_pipeline.batching import ExampleTooLongError
  from training.checkpointing import CheckpointError
  from validation import ConfigError
  return (ConfigError, VariantError, CheckpointError, ExampleTooLongError)


def _one_line(error: BaseException) -> str:
  """A config or flag error as one line (config_flags embeds tracebacks in its messages)."""
  lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
  if any(line.startswith("Traceback") for line in lines):
    lines = lines[-1:]  # the exception line at the end of the embedded traceback
  return re.sub(r"^[\w.]*(Error|Exception): ", "", " ".join(lines))


def _parse_flags(argv):
  """absl's flag parsing, with bad flags reported as user errors."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _user_error(_one_line(e))


def _load_config():
  """The config, loaded (lazily, by config_flags) from the file named by --config."""
  try:
    config = flags.FLAGS.config
    config.to_json()  # forces the lazy load here, where errors are caught
    return config
  except Exception as e:  # pylint: disable=broad-except  # a broken config file
    _user_error(f"cannot load --config: {_one_line(e)}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  user_errors = _user_errors()
  import train  # pylint: disable=g-import-not-at-top
  config = _load_config()
  workdir = flags.FLAGS.workdir
  try:
    if flags.FLAGS.mode == "train":
      train.train_and_evaluate(config, workdir)
    else:
      train.evaluate_checkpoint(config, workdir, step=flags.FLAGS.step)
  except user_errors as e:
    logging.flush()
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except train.NonFiniteLossError as e:
    logging.flush()
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
