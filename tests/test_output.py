"""What main.py prints for a person: plain lines (no absl prefixes, no library chatter),
warnings marked, the config as its differences from the defaults (whole with --verbose),
a short --help and a --help_config read from configs/default.py's comments."""

import os
import re
import subprocess
import sys

import pytest

from configs import default
from tests.cli_helpers import REPO, run_main
from tests.test_classification import config_flags as classification_flags
from tests.test_classification import tiny_config as classification_config
from tests.test_classification import write_corpus

ABSL_PREFIX = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ [\w.]+:\d+\] ", re.M)
TINY = ["--config.train.num_train_steps=2", "--config.train.log_every_steps=1",
        "--config.train.checkpoint_every_steps=2", "--config.model.d_model=32",
        "--config.model.d_ff=64", "--config.model.num_heads=2",
        "--config.model.num_encoder_layers=1", "--config.model.num_decoder_layers=1",
        "--config.data.num_eval_examples=16", "--config.data.max_digits=4",
        "--config.data.max_input_length=8", "--config.data.max_target_length=8",
        "--config.train.batch_size=8", "--config.eval.eval_batch_size=16"]


def _leaves(config, prefix=""):
  for key, value in config.items():
    if hasattr(value, "items"):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield prefix + key, value


def test_a_training_run_prints_plain_lines_and_only_the_changed_config_fields(tmp_path):
  workdir = str(tmp_path / "run")
  result = run_main(f"--workdir={workdir}", *TINY)
  assert result.returncode == 0, result.stderr[-3000:]
  output = result.stdout + result.stderr
  assert not ABSL_PREFIX.search(output), output[:3000]
  assert "Unable to initialize backend" not in output
  assert re.search(r"^step 2/2  loss [\d.]+ .* ETA", result.stderr, re.M), result.stderr
  assert re.search(r"^final evaluation at step 2: loss ", result.stderr, re.M)
  assert "1 local cpu device(s) in process 0 of 1" in result.stderr
  # The fields given on the command line, not the ~110 lines of the whole config.
  assert (f"config, where it differs from configs/default.py:task=translation (the whole "
          f"config is in {os.path.join(workdir, 'config.json')}; --verbose prints it):"
          ) in result.stderr
  assert "\n  model.d_model = 32\n" in result.stderr
  assert "\n  train.num_train_steps = 2\n" in result.stderr
  assert "layer_norm_epsilon" not in result.stderr and "adam_b2" not in result.stderr
  assert os.path.exists(os.path.join(workdir, "config.json"))

  # --verbose: everything as absl logs it, the whole config included.
  again = run_main(f"--workdir={workdir}", *TINY, "--config.train.num_train_steps=3",
                   "--verbose")
  assert again.returncode == 0, again.stderr[-3000:]
  assert ABSL_PREFIX.search(again.stderr)
  assert re.search(r"train\.py:\d+\] config:\n", again.stderr), again.stderr[:3000]
  assert "\n  layer_norm_epsilon: 1.0e-06\n" in again.stderr
  assert "resumed from the checkpoint at step 2" in again.stderr


def test_data_preparation_is_one_plain_line_without_tfds_chatter(tmp_path):
  """Local .tsv files prepared through tfds: no "Downloading and preparing dataset
  Unknown size", no "Variant folder ... has no dataset_info.json", no tfds INFO lines;
  the project's own line says where the data was prepared."""
  write_corpus(tmp_path / "corpus", sizes=(("train", 64), ("dev", 16)))
  config = classification_config(tmp_path / "corpus", tmp_path / "tfds")
  result = run_main(f"--config={REPO}/configs/classification.py",
                    f"--workdir={tmp_path / 'run'}", *classification_flags(config),
                    "--config.train.num_train_steps=1", "--config.train.log_every_steps=1",
                    "--config.eval.eval_every_steps=1", "--config.compute.cpu_devices=1")
  assert result.returncode == 0, result.stderr[-3000:]
  output = result.stdout + result.stderr
  assert not ABSL_PREFIX.search(output), output[:3000]
  for noise in ("Downloading and preparing", "Subsequent calls will reuse",
                "dataset_info.json", "Generating dataset", "Done writing",
                "Using custom data configuration"):
    assert noise not in output, (noise, output[:3000])
  assert re.search(r"^preparing the dataset labeled_text_files/\S+ in .*tfds", result.stderr,
                   re.M), result.stderr[:3000]
  assert result.stdout == ""


def test_library_records_are_dropped_and_warnings_marked():
  """The log set-up main.py makes (reporting.plain_logs), in a fresh interpreter: jax's
  backend probing and a library's INFO lines are left out, a library's warning passes;
  this project's lines are plain, its warnings and errors marked."""
  script = """
import logging as std_logging
from absl import flags, logging
from training import reporting
flags.FLAGS(["main.py"])  # as app.run does before the program logs
logging.set_verbosity(logging.INFO)
reporting.plain_logs()
std_logging.getLogger("jax._src.xla_bridge").info("Unable to initialize backend 'tpu'")
std_logging.getLogger("jax._src.xla_bridge").warning("a jax warning")
logging.info("plain info")
logging.warning("careful")
logging.error("broken")
record = logging.get_absl_logger().makeRecord(
    "absl", std_logging.INFO, "/x/site-packages/tensorflow_datasets/core/b.py", 1,
    "Generating dataset %s", ("x",), None)
logging.get_absl_logger().handle(record)
record = logging.get_absl_logger().makeRecord(
    "absl", std_logging.WARNING, "/x/site-packages/tensorflow_datasets/core/u.py", 1,
    "Variant folder /d/1.0.0 has no dataset_info.json", (), None)
logging.get_absl_logger().handle(record)
"""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stderr.splitlines() == ["warning: a jax warning", "plain info",
                                        "warning: careful", "ERROR: broken"], result.stderr


def test_help_is_short_and_lists_the_modes():
  full = run_main("--helpfull")  # absl's list of every flag, still there
  assert full.returncode == 0 and "--[no]logtostderr" in full.stdout
  assert "--config.data.data_dir=../shared/data/multi30k" in full.stdout  # the docstring
  modes = re.search(r"--mode: <([\w|\s]+)>", full.stdout).group(1).split("|")
  modes = [mode.strip() for mode in modes]
  result = run_main("--help")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert 10 < len(lines) < 60, result.stdout
  assert max(len(line) for line in lines) <= 100
  assert lines[0].startswith("usage: python main.py --workdir=DIR")
  assert len(modes) >= 10
  for mode in modes:
    assert re.search(rf"^  {mode} +\S", result.stdout, re.M), mode
  assert "python main.py --workdir=runs/demo" in result.stdout
  assert "--help_config" in result.stdout and "--helpfull" in result.stdout
  assert "logtostderr" not in result.stdout  # not absl's list of every module's flags
  assert run_main("-h").stdout == result.stdout


def test_help_config_lists_every_field_with_its_comment_from_default_py():
  result = run_main("--help_config")
  assert result.returncode == 0, result.stderr
  with open(os.path.join(REPO, "configs", "default.py"), encoding="utf-8") as f:
    source = f.read()
  lines = result.stdout.splitlines()
  for group in default.GROUPS:
    assert any(line.startswith(f"config.{group}: ") for line in lines), group
  config = default.get_config()
  for path, value in _leaves(config):
    name = path.split(".")[-1]
    comments = re.findall(rf"^\s+\w+\.{name} = .*?  # (.+)$", source, re.M)
    assert comments, path  # every field has its one comment line in default.py
    shown = [line for line in lines if line.startswith(f"  {path} = {value!r} ")]
    assert len(shown) == 1, (path, result.stdout)
    assert shown[0].endswith(comments[0].strip()), (shown[0], comments)


@pytest.mark.parametrize("flag", ["--help", "--help_config"])
def test_help_needs_no_workdir_and_ignores_other_flags(flag):
  result = run_main(flag, "--mode=eval", "--config.train.batch_size=3")
  assert result.returncode == 0 and result.stdout and not result.stderr, result.stderr
