"""The core's contracts: one UserError base, one atomic writer, the grouped config (old flat
names refused, old flat checkpoints regrouped), masks without an import cycle, and the
typed interfaces the modes ask of the families."""

import ast
import os
import subprocess
import sys

import pytest

import config_checks
import errors
import files
import tasks
import train
from configs import default, presets
from configs.sweeps import SweepError
from input_pipeline.batching import ExampleTooLongError
from input_pipeline.local_builders import DataError
from input_pipeline.tokenizers import TokenizerError
from tasks.base import LineMapper, TextGenerator
from tests.cli_helpers import REPO, assert_one_error_line, run_main
from training.checkpointing import CheckpointError, CheckpointWriteError


@pytest.mark.parametrize("error", [config_checks.ConfigError, presets.VariantError, SweepError,
                                   ExampleTooLongError, DataError, TokenizerError,
                                   CheckpointError, CheckpointWriteError, errors.WriteError])
def test_every_user_error_derives_from_the_one_base(error):
  assert issubclass(error, errors.UserError)


def test_write_atomically_replaces_whole_files_and_leaves_no_temporary(tmp_path):
  path = tmp_path / "deep" / "report.json"
  files.write_atomically(str(path), "first\n")
  files.write_atomically(str(path), b"second")
  assert path.read_bytes() == b"second"
  assert sorted(os.listdir(path.parent)) == ["report.json"]


def test_write_atomically_into_an_unwritable_place_is_a_user_error_and_keeps_the_old(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  with pytest.raises(errors.WriteError, match="cannot write .*a_file/x.json"):
    files.write_atomically(str(blocker / "x.json"), "{}")
  if os.geteuid() != 0:  # root writes into read-only directories
    directory = tmp_path / "ro"
    directory.mkdir()
    (directory / "kept.txt").write_text("old")
    directory.chmod(0o500)
    try:
      with pytest.raises(errors.WriteError):
        files.write_atomically(str(directory / "kept.txt"), "new")
      assert (directory / "kept.txt").read_text() == "old"
    finally:
      directory.chmod(0o700)


def test_every_grouped_field_is_named_once():
  where = default.field_groups()
  config = default.get_config()
  assert len(where) == sum(len(config[g]) for g in default.GROUPS)
  for field, path in where.items():
    group, name = path.split(".")
    assert name == field and group in default.GROUPS
  assert not set(where) & {"task", "size", "accel", "seed"}


def test_a_flat_config_from_before_the_groups_is_regrouped():
  grouped = default.get_config().to_dict()
  flat = {k: v for k, v in grouped.items() if k not in default.GROUPS}
  for group in default.GROUPS:
    flat.update(grouped[group])
  assert default.group_flat_config(flat) == grouped
  assert default.group_flat_config(grouped) is grouped


def test_a_checkpoint_config_saved_flat_is_checked_by_its_model_group():
  config = default.get_config()
  grouped = config.to_dict()
  flat = {k: v for k, v in grouped.items() if k not in default.GROUPS}
  for group in default.GROUPS:
    flat.update(grouped[group])
  flat["num_train_steps"] = 7  # not a model field: may differ
  train.check_same_model(flat, config, "old/checkpoints")
  flat["num_heads"] = 8
  with pytest.raises(config_checks.ConfigError,
                     match=r"model fields \(model\.num_heads: 8 there, 4 now\)"):
    train.check_same_model(flat, config, "old/checkpoints")


def test_a_model_field_added_since_a_checkpoint_counts_as_its_default():
  """A saved config without a model field added to the codebase later ran as
  configs/default.py's value: the same value now is the same model, another is not (the
  parameters would not fit), and the error says the field was absent."""
  config = default.get_config("task=classification")
  saved = config.to_dict()
  del saved["model"]["conv_kernel"]
  train.check_same_model(saved, config, "run/checkpoints")
  config.model.conv_kernel = 3
  with pytest.raises(config_checks.ConfigError,
                     match=r"model\.conv_kernel: 0 there \(absent there: the default before "
                           r"the field existed\), 3 now"):
    train.check_same_model(saved, config, "run/checkpoints")


def test_a_translation_checkpoint_also_pins_its_language_pair():
  config = default.get_config("task=translation")
  saved = config.to_dict()
  train.check_same_model(saved, config, "run/checkpoints")
  config.data.language_pair = "en-de"
  with pytest.raises(config_checks.ConfigError,
                     match=r"data\.language_pair: 'de-en' there, 'en-de' now"):
    train.check_same_model(saved, config, "run/checkpoints")


def test_an_old_flat_flag_names_its_new_place():
  result = run_main("--workdir=unused", "--config.num_heads=3")
  assert_one_error_line(result, "--config.num_heads is now --config.model.num_heads")
  result = run_main("--workdir=unused", "--config.eval_batch_size=3")
  assert_one_error_line(result, "--config.eval.eval_batch_size")


def test_masks_import_neither_attention_module():
  """models/masks.py is below both attention modules: no cycle, no function-local import."""
  source = open(os.path.join(REPO, "models", "masks.py"), encoding="utf-8").read()
  imported = {n.module for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)}
  imported |= {a.name for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Import)
               for a in n.names}
  assert not any("attention" in (name or "") for name in imported), imported
  code = "import models.blockwise_attention, models.attention; print('ok')"
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)
  assert result.stdout.strip() == "ok", result.stderr[-2000:]


def test_library_modules_import_only_from_floors_below():
  """floor 1 (models, input_pipeline, training, configs) imports no floor 2 or 3 module;
  floor 2 (tasks, inspection) imports no floor 3 module."""
  floors = {"models": 1, "input_pipeline": 1, "training": 1, "configs": 1, "tasks": 2,
            "inspection": 2, "train": 3, "modes": 3, "main": 4}
  for root, _, names in os.walk(REPO):
    if any(part in root for part in ("tests", "benchmarks", "docs", ".git")):
      continue
    for name in names:
      if not name.endswith(".py"):
        continue
      path = os.path.join(root, name)
      top = os.path.relpath(path, REPO).split(os.sep)[0].removesuffix(".py")
      if top not in floors:
        continue
      tree = ast.parse(open(path, encoding="utf-8").read())
      for node in ast.walk(tree):
        modules = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                   [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        for module in modules:
          target = module.split(".")[0]
          if target in floors and target != top:
            assert floors[target] <= floors[top], f"{path} imports {module}"


@pytest.mark.parametrize("name,line_mapper,generator", [
    ("translation", True, False), ("generation", False, True), ("classification", True, False)])
def test_families_offer_the_interfaces_the_modes_use(name, line_mapper, generator):
  family = tasks.TASKS[name]
  assert issubclass(family, LineMapper) == line_mapper
  assert issubclass(family, TextGenerator) == generator
  assert bool(family.line_mode) == line_mapper


def test_a_mode_for_another_family_is_one_line():
  result = run_main("--workdir=unused", "--mode=decode",
                    f"--config={REPO}/configs/default.py:task=classification", stdin="x\n")
  assert_one_error_line(result, "--mode=decode translates text",
                        "config.task='translation' on real data")


def _flatten_saved_configs(workdir):
  """Rewrites every checkpoint's saved config in the flat form runs wrote before the
  groups (what a checkpoint of an older version of this code holds)."""
  import glob  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  paths = glob.glob(os.path.join(workdir, "checkpoints", "*", "config", "metadata"))
  assert paths
  for path in paths:
    with open(path, encoding="utf-8") as f:
      grouped = json.load(f)
    if "model" not in grouped:
      continue  # flat already
    flat = {k: v for k, v in grouped.items() if k not in default.GROUPS}
    for group in default.GROUPS:
      flat.update(grouped[group])
    with open(path, "w", encoding="utf-8") as f:
      json.dump(flat, f)


def test_checkpoints_saved_with_a_flat_config_restore_and_resume(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  import modes  # pylint: disable=g-import-not-at-top
  from tests.tiny_configs import tiny_config  # pylint: disable=g-import-not-at-top
  one_device = jax.local_devices()[:1]
  config = tiny_config(train=dict(num_train_steps=10, checkpoint_every_steps=5),
                       eval=dict(eval_every_steps=100, num_attention_images=0))
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir, devices=one_device, final_evaluation=False)
  _flatten_saved_configs(workdir)
  assert "loss" in modes.evaluate_checkpoint(config, workdir, devices=one_device)
  longer = config.copy_and_resolve_references()
  longer.train.num_train_steps = 15
  train.train_and_evaluate(longer, workdir, devices=one_device, final_evaluation=False)
  _flatten_saved_configs(workdir)
  longer.model.d_ff = 128
  with pytest.raises(config_checks.ConfigError, match=r"model\.d_ff: 64 there, 128 now"):
    modes.evaluate_checkpoint(longer, workdir, devices=one_device)


def test_a_pretraining_checkpoint_is_not_resumed_as_a_classifier():
  """config.objective is pinned like the model: a masked-token run resumed without it
  would silently train a fresh head on the pre-trained encoder."""
  config = default.get_config("task=classification")
  saved = config.to_dict()
  saved["objective"] = "mlm"
  with pytest.raises(config_checks.ConfigError, match=r"objective: 'mlm' there, '' now"):
    train.check_same_model(saved, config, "run/checkpoints")
  config.objective = "mlm"
  train.check_same_model(saved, config, "run/checkpoints")
  del saved["objective"]  # a config saved before the field existed: the family's own
  with pytest.raises(config_checks.ConfigError, match=r"objective: '' there, 'mlm' now"):
    train.check_same_model(saved, config, "run/checkpoints")
