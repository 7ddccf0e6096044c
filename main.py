"""Entry point: pick a config, a workdir and a mode.

    python main.py --workdir=runs/demo                          # train (or resume), evaluate
    python main.py --workdir=runs/demo --mode=eval              # evaluate the newest checkpoint
    python main.py --config=configs/translation.py --workdir=runs/m30k \
        --config.data_dir=../shared/data/multi30k                # Multi30k de->en
    python main.py --config=configs/translation.py --workdir=runs/m30k \
        --config.data_dir=../shared/data/multi30k --mode=eval --split=test --checkpoint=best
    python main.py --config=configs/translation.py --workdir=runs/m30k --mode=average
    echo "Ein Mann fährt Fahrrad." | python main.py --config=configs/translation.py \
        --workdir=runs/m30k --config.data_dir=../shared/data/multi30k --mode=decode
    python main.py --config=configs/generation.py --workdir=runs/shakespeare  # char-level LM
    python main.py --config=configs/generation.py --workdir=runs/shakespeare \
        --mode=generate --prompt="ROMEO:" --config.temperature=0.8 --config.num_samples=3
    python main.py --config=configs/default.py:task=generation,size=small --workdir=runs/lm
    python main.py --config=configs/classification.py --workdir=runs/sst2  # SST-2
    echo "a gorgeous, witty film" | python main.py --config=configs/classification.py \
        --workdir=runs/sst2 --mode=predict --checkpoint=best
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
MODES = ("train", "eval", "decode", "generate", "predict", "average")

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
                  "eval: decode and score a split with a checkpoint, writing the scores "
                  "and hypotheses under <workdir>/eval; decode: translate lines of --input "
                  "to standard output; generate: continue each --prompt (or each line of "
                  "--input) with a language model, sampling as config says; predict: "
                  "classify each line of --input, printing per line the predicted label, "
                  "its probability and every class's probability, tab-separated as "
                  "'label<TAB>p<TAB>name1=p1 name2=p2 ...' (an empty line for an empty "
                  "line); average: "
                  "average the newest --num_average checkpoints into <workdir>/averaged.")
flags.DEFINE_integer("step", None, "eval/decode/predict: the checkpoint step (default: newest); "
                     "average: the newest step to include.")
flags.DEFINE_enum("checkpoint", "latest", ("latest", "best", "averaged"),
                  "eval/decode/predict: which checkpoint: the regular ones (newest or --step), the "
                  "best by config.best_metric, or the --mode=average one.")
flags.DEFINE_string("split", None, "eval: the split to score (default config.eval_split).")
flags.DEFINE_string("input", "-", "decode: a text file with a sentence a line; generate: a "
                    "text file with a prompt a line (when no --prompt); predict: a text "
                    "file with a text to classify a line; - = stdin.")
flags.DEFINE_multi_string("prompt", None, "generate: a prompt (repeat the flag for several; "
                          "\\n stands for a newline; an empty prompt starts from nothing).")
flags.DEFINE_integer("num_average", 5, "average: how many of the newest checkpoints.")
flags.mark_flags_as_required(["workdir"])


def _user_errors():
  # Imported lazily so that `--help` and flag errors do not pay for importing jax.
  from configs.presets import VariantError
  from input_pipeline.batching import ExampleTooLongError
  from input_pipeline.local_builders import DataError
  from input_pipeline.tokenizers import TokenizerError
  from training.checkpointing import CheckpointError
  from validation import ConfigError
  return (ConfigError, VariantError, CheckpointError, ExampleTooLongError, DataError,
          TokenizerError)


def _read_input(path: str):
  """The lines of --input (a file, or standard input for -)."""
  if path == "-":
    return sys.stdin.read().splitlines()
  try:
    with open(path, encoding="utf-8") as f:
      return f.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    _user_error(f"--input={path}: cannot read it as UTF-8 text ({e})")


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


def _require_real_data(config, mode: str, task: str, what: str) -> None:
  """--mode=`mode` `what` (e.g. "translates text"): it needs `task` on real data."""
  if config.task != task or config.dataset == "synthetic":
    _user_error(f"--mode={mode} {what}: it needs config.task='{task}' on real data "
                f"(config.task={config.task!r}, config.dataset={config.dataset!r})")


def _set_cpu_devices(config) -> None:
  """config.cpu_devices > 0: XLA's host platform gets that many devices, so the pmapped
  step runs data-parallel over the CPU cores (one device per core) instead of splitting
  each small matmul between them. Set before JAX starts its backends; the GPU and TPU
  backends ignore it."""
  count = config.get("cpu_devices", 0)
  if isinstance(count, bool) or not isinstance(count, int) or count < 0:
    _user_error(f"config.cpu_devices={count!r} is invalid: expected an integer >= 0")
  if count:
    flag = f"--xla_force_host_platform_device_count={count}"
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(kept + [flag])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = _load_config()
  _set_cpu_devices(config)
  user_errors = _user_errors()
  import train  # pylint: disable=g-import-not-at-top
  workdir = flags.FLAGS.workdir
  try:
    mode = flags.FLAGS.mode
    if mode == "train":
      train.train_and_evaluate(config, workdir)
    elif mode == "eval":
      train.evaluate_checkpoint(config, workdir, step=flags.FLAGS.step,
                                split=flags.FLAGS.split, checkpoint=flags.FLAGS.checkpoint)
    elif mode in ("decode", "predict"):  # a line out for each line in
      task, what, run = {
          "decode": ("translation", "translates text", train.decode_lines),
          "predict": ("classification", "labels text", train.predict_lines)}[mode]
      _require_real_data(config, mode, task, what)
      lines = _read_input(flags.FLAGS.input)
      for line in run(config, workdir, lines, step=flags.FLAGS.step,
                      checkpoint=flags.FLAGS.checkpoint):
        print(line, flush=True)
    elif mode == "generate":
      _require_real_data(config, "generate", "generation", "continues text")
      prompts = ([p.replace("\\n", "\n") for p in flags.FLAGS.prompt]
                 if flags.FLAGS.prompt is not None else _read_input(flags.FLAGS.input))
      if not prompts:
        _user_error("--mode=generate: no prompt; give --prompt=TEXT or lines on --input")
      samples = train.generate_text(config, workdir, prompts, step=flags.FLAGS.step,
                                    checkpoint=flags.FLAGS.checkpoint)
      for i, texts in enumerate(samples, 1):
        for j, text in enumerate(texts, 1):
          print(f"--- prompt {i}, sample {j}\n{text}", flush=True)
    else:
      step = train.average_checkpoints(config, workdir, flags.FLAGS.num_average,
                                       last_step=flags.FLAGS.step)
      print(f"averaged the newest {flags.FLAGS.num_average} checkpoints (up to step {step}) "
            f"into {os.path.join(workdir, 'averaged')}")
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
