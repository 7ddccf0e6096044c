"""Entry point: pick a config, a workdir and a mode.

    python main.py --workdir=runs/demo                          # train (or resume), evaluate
    python main.py --workdir=runs/demo --mode=eval              # evaluate the newest checkpoint
    python main.py --config=configs/default.py:task=generation,size=small --workdir=runs/lm
    python main.py --workdir=runs/demo --config.num_train_steps=500 --config.d_model=128

Exit status: 0 done; 2 a user error (bad config, missing or unusable checkpoint or data),
printed as one line without a traceback; 3 a non-finite loss (nothing bad was saved).
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                               "default.py")
MODES = ("train", "eval")

config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Config file, optionally with a variant: path.py:key=value,...",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.")
flags.DEFINE_enum("mode", "train", MODES, "train: train (resuming) then evaluate; "
                  "eval: evaluate the newest checkpoint.")
flags.DEFINE_integer("step", None, "With --mode=eval: the checkpoint step to evaluate.")
flags.mark_flags_as_required(["workdir"])


def _user_errors():
  # Imported lazily so that `--help` and flag errors do not pay for importing jax.
  import train  # noqa: F401  pylint: disable=g-import-not-at-top
  from configs.presets import VariantError
  from input_pipeline.batching import ExampleTooLongError
  from training.checkpointing import CheckpointError
  from validation import ConfigError
  return (ConfigError, VariantError, CheckpointError, ExampleTooLongError)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  user_errors = _user_errors()
  import train  # pylint: disable=g-import-not-at-top
  config = flags.FLAGS.config
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
  app.run(main)
