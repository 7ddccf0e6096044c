"""Defaults a user meets in the first hour: the translation recipe keeps the checkpoints
averaging needs and a run says what its checkpoints take on disk; eval mode reports how
many examples it scored for every task."""

import ast
import json
import logging
import os
import re

import jax
import numpy as np
import pytest
from absl import logging as absl_logging

import modes
import train
from configs import translation
from modes import evaluate
from tests.tiny_configs import tiny_config
from training import checkpointing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_DEVICE = jax.local_devices()[:1]


def _num_average_default() -> int:
  """The default of main.py's --num_average, read from its source (importing main.py
  would define its flags in the test process)."""
  with open(os.path.join(REPO, "main.py"), encoding="utf-8") as f:
    tree = ast.parse(f.read())
  for node in ast.walk(tree):
    if (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "DEFINE_integer"
        and isinstance(node.args[0], ast.Constant) and node.args[0].value == "num_average"):
      return node.args[1].value
  raise AssertionError("main.py defines no --num_average")


@pytest.mark.parametrize("dataset", tuple(translation.DATASETS))
def test_translation_recipe_keeps_what_averaging_needs(dataset):
  config = translation.get_config(f"dataset={dataset}")
  assert _num_average_default() == 5  # the paper averages the last 5 for the base model
  # Every checkpoint --mode=average reads by default is kept, and no more.
  assert config.train.keep_checkpoints == _num_average_default()


def _directory_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(path) for name in names)


def _megabytes(text: str) -> float:
  value, unit = text.split()
  return float(value) * {"MB": 1e6, "GB": 1e9}[unit]


class _Lines(logging.Handler):
  """Keeps the messages logged."""

  def __init__(self):
    super().__init__()
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """(config, workdir, log lines) of a tiny synthetic translation run that keeps its best
  checkpoint too."""
  config = tiny_config(train=dict(num_train_steps=4, checkpoint_every_steps=2,
                                  keep_checkpoints=2),
                       eval=dict(eval_every_steps=2, best_metric="loss"))
  workdir = str(tmp_path_factory.mktemp("defaults") / "run")
  handler, verbosity = _Lines(), absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.INFO)
  logging.getLogger("absl").addHandler(handler)
  try:
    train.train_and_evaluate(config, workdir, devices=ONE_DEVICE)
  finally:
    logging.getLogger("absl").removeHandler(handler)
    absl_logging.set_verbosity(verbosity)
  return config, workdir, handler.lines


def test_a_run_says_what_its_checkpoints_take_on_disk(tiny_run):
  _, workdir, lines = tiny_run
  said = [line for line in lines if line.startswith("checkpoints will take")]
  assert len(said) == 1, lines[:20]
  match = re.fullmatch(r"checkpoints will take about (\S+ [MG]B) in (.+): 2 kept "
                       r"\(config.train.keep_checkpoints\) x (\S+ [MG]B) each "
                       r"\+ 1 best \(config.eval.best_metric\)", said[0])
  assert match, said[0]
  assert match.group(2) == workdir
  total, each = _megabytes(match.group(1)), _megabytes(match.group(3))
  assert total == pytest.approx(3 * each, rel=0.01)
  # What is on disk now: two regular steps and the best, each about the announced size
  # (the arrays, plus orbax's metadata, the checksums, the config and data position).
  steps = checkpointing.Checkpointer.for_reading(workdir).all_steps()
  assert sorted(steps) == [2, 4]
  for step in steps:
    on_disk = _directory_bytes(os.path.join(workdir, "checkpoints", str(step), "state"))
    assert each <= on_disk <= 1.3 * each, (step, on_disk, each)
  assert _directory_bytes(os.path.join(workdir, "best")) <= 1.3 * each + 50_000


def test_eval_reports_the_examples_scored_without_per_example_records(tiny_run, capsys):
  # Translation of synthetic digits writes no per-example records; it still scores every
  # one of config.data.num_eval_examples strings.
  config, workdir, _ = tiny_run
  modes.evaluate_checkpoint(config, workdir, devices=ONE_DEVICE)
  with open(os.path.join(workdir, "eval", "validation-latest-step4.json"), encoding="utf-8") as f:
    report = json.load(f)
  assert report["examples"] == config.data.num_eval_examples == 64
  assert "predicted_examples" not in report
  assert "(latest checkpoint, step 4, 64 examples)" in capsys.readouterr().out


def test_real_examples_counts_rows_holding_a_token():
  inputs = np.zeros((2, 3, 4), np.int32)  # [devices, rows, length]
  inputs[0, 0, 0] = inputs[0, 2, 3] = inputs[1, 1, 1] = 5
  assert evaluate.real_examples({"inputs": inputs}) == 3
