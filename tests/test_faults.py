"""Faults during training: signals, hard kills, non-finite losses, damaged or incompatible
checkpoints, an unwritable workdir and a full disk. Each test checks that the run stops
with a clear message, that no checkpoint on disk is left unreadable, and that a resumed
run ends exactly where the uninterrupted one does."""

import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import config_checks
import errors
import modes
import tasks
import train
from benchmarks import fault_injection
from benchmarks.run_record import cpu_device_flags
from tests import test_classification, test_generation, test_translation
from tests.cli_helpers import REPO, assert_one_error_line, run_main
from tests.tiny_configs import tiny_config
from training import checkpointing, monitors, optimizers, preemption, steps, workdir_lock

ONE_DEVICE = jax.local_devices()[:1]
TWO_DEVICES = jax.local_devices()[:2]


def host_state(config, workdir, step=None):
  """A checkpoint of `workdir` (the newest, or `step`'s) as a host TrainState."""
  template = jax.device_get(steps.create_state(
      tasks.get_task(config), optimizers.make_optimizer(config), config.seed))
  checkpoints = checkpointing.Checkpointer.for_reading(workdir)
  try:
    return checkpoints.restore(template, step)
  finally:
    checkpoints.close()


def assert_bitwise_equal(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def losses(workdir):
  """{step: train loss} from metrics.jsonl (a resumed run's records replace older ones)."""
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return {r["step"]: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}


# ----------------------------------------------------------------------------- signals


def test_first_signal_sets_the_flag_and_the_second_exits_at_once():
  code = ("import signal, sys\n"
          f"sys.path.insert(0, {REPO!r})\n"
          "from training import preemption\n"
          "with preemption.StopRequest() as stop:\n"
          "  signal.raise_signal(signal.SIGTERM)\n"
          "  print('flag', stop.signum, flush=True)\n"
          "  signal.raise_signal(signal.SIGINT)\n"
          "  print('still running', flush=True)\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
  assert result.returncode == 128 + signal.SIGINT, result.stderr
  assert result.stdout.split() == ["flag", str(int(signal.SIGTERM))]
  assert "SIGTERM received" in result.stderr


def test_stop_request_restores_the_previous_handlers():
  before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
  with preemption.StopRequest() as stop:
    assert signal.getsignal(signal.SIGTERM) == stop._handle  # pylint: disable=protected-access
  assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


# ----------------------------------------------------------------------------- exact resume


def _translation(tmp_path):
  test_translation.write_corpus(tmp_path / "data", {"train": 120, "val": 16, "test": 8})
  return test_translation.tiny_config(
      tmp_path / "data", tmp_path / "tfds", model=dict(d_model=32, d_ff=64, num_heads=2),
      train=dict(num_train_steps=14, log_every_steps=3, checkpoint_every_steps=5),
      eval=dict(eval_every_steps=100, best_metric="", num_print_examples=0),
      optim=dict(dropout_rate=0.1))


def _generation(tmp_path):
  test_generation.write_text(tmp_path / "data")
  return test_generation.tiny_config(
      tmp_path / "data", tmp_path / "tfds",
      train=dict(num_train_steps=14, log_every_steps=3, checkpoint_every_steps=5),
      eval=dict(eval_every_steps=100, num_print_examples=0), optim=dict(dropout_rate=0.1))


def _classification(tmp_path):
  test_classification.write_corpus(tmp_path / "data", sizes=(("train", 100), ("dev", 16)))
  return test_classification.tiny_config(
      tmp_path / "data", tmp_path / "tfds",
      train=dict(num_train_steps=14, log_every_steps=3, checkpoint_every_steps=5),
      eval=dict(eval_every_steps=100, best_metric="", num_print_examples=0),
      optim=dict(dropout_rate=0.1))


def _stop_at(monkeypatch, step):
  """Makes the loop see a SIGTERM right after `step` (the signal handler's effect)."""
  calls = []

  def fake(stop, step_done, every):
    del stop, step_done, every
    calls.append(1)
    return int(signal.SIGTERM) if len(calls) >= step else 0

  monkeypatch.setattr(train, "_stop_signal", fake)


@pytest.mark.parametrize("make", [_translation, _generation, _classification],
                         ids=["translation", "generation", "classification"])
def test_a_run_stopped_by_a_signal_resumes_bitwise(tmp_path, monkeypatch, make):
  """Stopped after step 7 (between checkpoints and log steps, with dropout), the resumed
  run ends with the same parameters, optimizer state and losses as the uninterrupted one
  (two devices in both): the checkpoint holds the data position, the optimizer state and
  the dropout key."""
  config = make(tmp_path)
  whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
  train.train_and_evaluate(config, whole, devices=TWO_DEVICES, final_evaluation=False)

  with monkeypatch.context() as patch:
    _stop_at(patch, 7)
    with pytest.raises(preemption.Preempted, match="SIGTERM after step 7") as stopped:
      train.train_and_evaluate(config, parts, devices=TWO_DEVICES, final_evaluation=False)
  assert stopped.value.step == 7
  checkpoints = checkpointing.Checkpointer(parts, keep=100)
  assert checkpoints.all_steps() == [5, 7]
  assert checkpoints.restore_data_state(7) == {"next_index": 7}
  checkpoints.close()
  train.train_and_evaluate(config, parts, devices=TWO_DEVICES, final_evaluation=False)

  a, b = host_state(config, whole), host_state(config, parts)
  assert int(a.step) == int(b.step) == 14
  assert_bitwise_equal(a, b)
  # Step 9's loss averages steps 7-9 in one run and 8-9 in the other; the rest match.
  assert ({s: v for s, v in losses(whole).items() if s != 9} ==
          {s: v for s, v in losses(parts).items() if s not in (7, 9)})


# ----------------------------------------------------------------------------- hard kills

KILL_FLAGS = [
    "--config.train.num_train_steps=30", "--config.train.log_every_steps=1",
    "--config.eval.eval_every_steps=1000", "--config.train.checkpoint_every_steps=1",
    "--config.train.keep_checkpoints=3", "--config.optim.dropout_rate=0.1",
    "--config.model.d_model=32", "--config.model.d_ff=64", "--config.model.num_heads=2",
    "--config.model.num_encoder_layers=1", "--config.model.num_decoder_layers=1",
    "--config.data.max_digits=5", "--config.data.max_input_length=8",
    "--config.data.max_target_length=8", "--config.train.batch_size=16",
    "--config.eval.eval_batch_size=32", "--config.data.num_eval_examples=64",
    "--config.optim.warmup_steps=5", "--config.eval.num_print_examples=0",
    "--config.eval.num_attention_images=0"]


def test_random_kills_and_signals_never_lose_a_checkpoint(tmp_path):
  """SIGKILL at random moments (while starting, training, or writing a checkpoint),
  SIGTERM once and twice in a row (benchmarks/fault_injection.py): after each, every
  checkpoint on disk restores, the newest step never goes back, and the run finally ends
  bitwise equal to an uninterrupted one (one device in both)."""
  # The uninterrupted run saves once, at its end: only its final state is compared.
  config = tiny_config(train=dict(num_train_steps=30, log_every_steps=1,
                                  checkpoint_every_steps=30, keep_checkpoints=3),
                       eval=dict(eval_every_steps=1000), optim=dict(dropout_rate=0.1))
  reference = str(tmp_path / "reference")
  train.train_and_evaluate(config, reference, devices=ONE_DEVICE, final_evaluation=False)

  faults = ["sigterm", "kill_during_write", "kill_random", "kill_starting", "sigterm_twice"]
  workdir = str(tmp_path / "run")
  result = fault_injection.run(workdir, KILL_FLAGS, faults, seed=0,
                               log_path=str(tmp_path / "log.txt"))
  print("faults:", [(r["fault"], r["exit"], r["checkpoint_being_written"], r["steps"])
                    for r in result["faults"]])
  records = result["faults"]
  assert [r["fault"] for r in records] == faults, "training finished before every fault"
  for r in records:
    assert r["expected_exit"], r
    assert r["steps"] and not r["newest_went_back"], r
  assert records[0]["stopped_line"].startswith("stopped: stopped by SIGTERM after step")
  assert records[1]["checkpoint_being_written"]
  assert result["lost"] == 0 and result["final_exit"] == 0
  assert result["final_steps"][-1] == 30
  assert_bitwise_equal(host_state(config, workdir), host_state(config, reference))


# ----------------------------------------------------------------------------- NaN


def _poisoned_task(monkeypatch, poisoned_batches):
  """The real task, whose training loss is NaN on the given batch indices (0-based) while
  its gradient stays finite: only the loss check can catch it."""
  real_get_task = tasks.get_task

  def get_task(config, workdir=None, training=True):
    task = real_get_task(config, workdir, training)
    real_loss, real_dataset = task.loss, task.train_dataset

    def loss(params, batch, rng, train):
      sums = real_loss(params, batch, rng, train)
      if "poison" in batch:
        sums = {**sums, "loss": sums["loss"] + jnp.where(batch["poison"].any(), jnp.nan, 0.0)}
      return sums

    def train_dataset(*args, **kwargs):
      return real_dataset(*args, **kwargs).map_with_index(
          lambda i, b: {**b, "poison": np.full(b["inputs"].shape[:2],
                                               int(i in poisoned_batches), np.int32)})

    task.loss, task.train_dataset = loss, train_dataset
    return task

  monkeypatch.setattr(tasks, "get_task", get_task)


def test_skipped_nonfinite_updates_are_counted_and_never_saved(tmp_path, monkeypatch):
  _poisoned_task(monkeypatch, {3, 7})
  config = tiny_config(train=dict(num_train_steps=10, log_every_steps=5,
                                  checkpoint_every_steps=2, nonfinite_updates="skip"),
                       eval=dict(eval_every_steps=100))
  train.train_and_evaluate(config, str(tmp_path), devices=ONE_DEVICE, final_evaluation=False)
  with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
    skipped = {r["step"]: r["train/skipped_updates"] for r in map(json.loads, f)
               if "train/skipped_updates" in r}
  assert skipped == {5: 1, 10: 2}  # steps 4 and 8
  steps = fault_injection.readable_steps(str(tmp_path))
  assert steps[-1] == 10
  # A skipped update is not applied: the optimizer counted 8 updates in 10 steps.
  state = host_state(config, str(tmp_path))
  counts = [int(x) for x in jax.tree.leaves(state.opt_state) if np.ndim(x) == 0]
  assert 8 in counts, counts


def test_too_many_skipped_updates_stop_the_run(tmp_path, monkeypatch):
  _poisoned_task(monkeypatch, {3, 7})
  config = tiny_config(train=dict(num_train_steps=10, log_every_steps=5,
                                  checkpoint_every_steps=2, nonfinite_updates="skip",
                                  max_skipped_updates=1),
                       eval=dict(eval_every_steps=100))
  with pytest.raises(train.NonFiniteLossError,
                     match=r"2 updates skipped.*max_skipped_updates=1.*step 8.*Last good "
                           r"checkpoint: step 8"):
    train.train_and_evaluate(config, str(tmp_path), devices=ONE_DEVICE)


def test_a_nonfinite_loss_names_its_step_and_the_last_checkpoint(tmp_path, monkeypatch):
  _poisoned_task(monkeypatch, {6})
  config = tiny_config(train=dict(num_train_steps=10, log_every_steps=5,
                                  checkpoint_every_steps=4),
                       eval=dict(eval_every_steps=100))
  with pytest.raises(train.NonFiniteLossError,
                     match=r"at step 7;.*Last good checkpoint: step 4 in"):
    train.train_and_evaluate(config, str(tmp_path), devices=ONE_DEVICE)
  assert fault_injection.readable_steps(str(tmp_path)) == [4]


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny run with checkpoints at steps 5 and 10."""
  workdir = str(tmp_path_factory.mktemp("trained"))
  config = tiny_config(train=dict(num_train_steps=10, checkpoint_every_steps=5),
                       eval=dict(eval_every_steps=100))
  train.train_and_evaluate(config, workdir, devices=ONE_DEVICE, final_evaluation=False)
  return config, workdir


def _copy(trained, tmp_path):
  config, workdir = trained
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  return config.copy_and_resolve_references(), copy


def test_a_model_field_that_differs_from_the_workdir_is_refused(trained, tmp_path):
  config, workdir = _copy(trained, tmp_path)
  before = open(os.path.join(workdir, "config.json"), encoding="utf-8").read()
  config.train.num_train_steps = 20  # a training field: allowed
  config.model.num_heads = 4  # a model field: refused, though the shapes would load
  with pytest.raises(config_checks.ConfigError,
                     match=r"model fields \(model\.num_heads: 2 there, 4 now\).*"
                           r"allow_config_change"):
    train.train_and_evaluate(config, workdir, devices=ONE_DEVICE)
  assert open(os.path.join(workdir, "config.json"), encoding="utf-8").read() == before
  with pytest.raises(config_checks.ConfigError, match=r"model\.num_heads: 2 there, 4 now"):
    modes.evaluate_checkpoint(config, workdir, devices=ONE_DEVICE)
  config.model.num_heads = 2
  config.model.activation = "gelu"  # the same parameters, another function
  with pytest.raises(config_checks.ConfigError,
                     match=r"model\.activation: 'relu' there, 'gelu' now"):
    modes.evaluate_checkpoint(config, workdir, devices=ONE_DEVICE)
  config.train.allow_config_change = True  # the same shapes: it loads
  assert "loss" in modes.evaluate_checkpoint(config, workdir, devices=ONE_DEVICE)


def _listing(directory):
  """path -> (size, mtime) of every file under `directory` but the trainers' lock (each
  trainer, refused or not, takes it: workdir_lock)."""
  return {os.path.join(root, name): (os.stat(os.path.join(root, name)).st_size,
                                     os.stat(os.path.join(root, name)).st_mtime_ns)
          for root, _, names in os.walk(directory) for name in names
          if name != workdir_lock.LOCK_FILE}


def test_another_task_on_a_trained_workdir_is_refused_before_it_writes(trained, tmp_path,
                                                                       monkeypatch):
  """A config of another task (or model) given a workdir with checkpoints is refused
  from the workdir's config.json before the task is built: building it would write that
  task's tokenizer into the other run's workdir, and its checks (a vocabulary size) would
  speak first and advise deleting the other run's files."""
  _, workdir = _copy(trained, tmp_path)
  before = _listing(workdir)
  monkeypatch.setattr(train, "open_task", lambda *a, **k: pytest.fail("the task was built"))
  for config in (tiny_config("generation"), tiny_config(model=dict(d_model=48))):
    with pytest.raises(config_checks.ConfigError,
                       match=r"task: 'translation' there, 'generation' now|"
                             r"model\.d_model: 32 there, 48 now"):
      train.train_and_evaluate(config, workdir, devices=ONE_DEVICE)
  assert _listing(workdir) == before


def test_an_incompatible_checkpoint_names_the_differing_parameters(trained, tmp_path):
  """allow_config_change lets a changed model try the checkpoint: shapes that do not fit
  are named, and the refused run leaves the workdir's config.json as it was (the
  message sends the user to it; a run that rewrote it would lock the workdir out)."""
  config, workdir = _copy(trained, tmp_path)
  before = open(os.path.join(workdir, "config.json"), encoding="utf-8").read()
  config.model.d_model = 48
  config.train.allow_config_change = True
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"step 10 .* holds a different model than the config describes: "
                           r"params/.* is float32\[.*32.*\] in the checkpoint, "
                           r"float32\[.*48.*\] in the model"):
    train.train_and_evaluate(config, workdir, devices=ONE_DEVICE)
  assert open(os.path.join(workdir, "config.json"), encoding="utf-8").read() == before


@pytest.mark.parametrize("damage", ["truncate", "garbage_metadata", "delete_arrays",
                                    "flip_a_bit"])
def test_a_damaged_checkpoint_is_named_and_the_previous_one_still_resumes(trained, tmp_path,
                                                                          damage):
  config, workdir = _copy(trained, tmp_path)
  step_dir = os.path.join(workdir, "checkpoints", "10")
  if damage == "flip_a_bit":  # still decodes: only the checksums can tell
    fault_injection.flip_byte(workdir, 10, random.Random(0))
  elif damage == "truncate":
    for path in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True):
      with open(path, "r+b") as f:
        f.truncate(7)
  elif damage == "garbage_metadata":
    with open(os.path.join(step_dir, "state", "_METADATA"), "w", encoding="utf-8") as f:
      f.write("{not json")
  else:
    shutil.rmtree(os.path.join(step_dir, "state"))
    os.mkdir(os.path.join(step_dir, "state"))
  flags = ["--config.train.num_train_steps=10", "--config.train.checkpoint_every_steps=5",
           "--config.eval.eval_every_steps=100", "--config.model.d_model=32",
           "--config.model.d_ff=64", "--config.model.num_heads=2",
           "--config.model.num_encoder_layers=1",
           "--config.model.num_decoder_layers=1", "--config.data.max_digits=5",
           "--config.data.max_input_length=8", "--config.data.max_target_length=8",
           "--config.train.batch_size=16", "--config.eval.eval_batch_size=32",
           "--config.data.num_eval_examples=64", "--config.optim.warmup_steps=5"]
  result = run_main(f"--workdir={workdir}", "--mode=eval", *flags)
  # Not assert_one_error_line: when orbax gives up reading, tensorstore's threads may print
  # 'Event loop is closed' tracebacks before the message (noise from inside orbax).
  assert result.returncode == 2, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  for text in ("error: checkpoint step 10", "is damaged or incomplete",
               "to use the previous checkpoint (step 5, which restores intact)"):
    assert text in last, last
  if damage == "flip_a_bit":
    assert re.search(r"the contents of \S+ differ from the checksums written with them",
                     last), last
  with pytest.raises(checkpointing.CheckpointError, match="step 10 .* damaged"):
    train.train_and_evaluate(config, workdir, devices=ONE_DEVICE)
  shutil.move(step_dir, str(tmp_path / "damaged-10"))  # what the message advises
  config.train.num_train_steps = 12
  train.train_and_evaluate(config, workdir, devices=ONE_DEVICE, final_evaluation=False)
  assert fault_injection.readable_steps(workdir)[-1] == 12


# ----------------------------------------------------------------------------- one workdir


def test_the_workdir_lock_names_its_holder_and_dies_with_it(tmp_path):
  """A process holding the lock keeps a second one out (one line naming its process and
  host); SIGKILL releases it: no stale lock."""
  workdir = str(tmp_path / "run")
  code = (f"import sys, time; sys.path.insert(0, {REPO!r})\n"
          "from training import workdir_lock\n"
          f"lock = workdir_lock.WorkdirLock({workdir!r}); lock.acquire()\n"
          "print('locked', flush=True); time.sleep(600)\n")
  holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(workdir_lock.WorkdirBusyError,
                       match=rf"--workdir={re.escape(workdir)} is in use by another training "
                             rf"run \(process {holder.pid} on host "):
      workdir_lock.WorkdirLock(workdir).acquire()
  finally:
    holder.kill()
    holder.wait()
  with workdir_lock.WorkdirLock(workdir):  # the kernel released it with the process
    pass


def test_a_second_trainer_is_refused_and_readers_beside_a_trainer_disturb_nothing(tmp_path):
  """Real processes (benchmarks/fault_injection.py): a second trainer on a live workdir
  exits 2 at once naming the holder; eval run twice beside the trainer (which saves every
  step) exits 0 and the trainer, stopped later by SIGTERM, saves and exits 4; a bit
  flipped in the newest checkpoint makes eval exit 2 naming it. Every checkpoint left
  restores and verifies, and the newest never goes back."""
  workdir, rng = str(tmp_path / "run"), random.Random(0)
  flags = [f for f in KILL_FLAGS if "num_train_steps" not in f]
  flags.append("--config.train.num_train_steps=100000")  # stopped by the faults
  newest = 0
  for fault in ("second_trainer", "eval_beside", "flip_bits"):
    record = fault_injection.inject(fault, workdir, flags, rng, newest,
                                    str(tmp_path / "log.txt"))
    print(fault, record["exit"], record["beside"], record["steps"])
    assert record["expected_exit"], record
    assert record["steps"], record
    if fault != "flip_bits":
      assert not record["newest_went_back"], record
    newest = record["steps"][-1]


def test_readers_never_delete_or_rename_anything(trained, tmp_path):
  """A save in flight (orbax's temporary step directory) and retired steps waiting in the
  trash are the trainer's: eval, decode-style restores and average leave them."""
  config, workdir = _copy(trained, tmp_path)
  directory = checkpointing.checkpoint_directory(workdir)
  os.makedirs(os.path.join(directory, "15.orbax-checkpoint-tmp-123", "state"))
  os.makedirs(os.path.join(directory, checkpointing.TRASH, "1"))
  before = sorted(os.listdir(directory))
  modes.evaluate_checkpoint(config, workdir, devices=ONE_DEVICE)
  modes.average_checkpoints(config, workdir, 2)
  assert sorted(os.listdir(directory)) == before
  assert fault_injection.readable_steps(workdir) == [5, 10]


def test_a_reader_whose_step_the_trainer_retires_reads_the_newest_again(trained, tmp_path,
                                                                        monkeypatch):
  """The race eval beside a trainer that saves every step runs into: the newest step when
  the reader looked (10) is retired before it is read, after a newer one (15) was saved.
  The reader reads the newest again instead of calling step 10 damaged."""
  config, workdir = _copy(trained, tmp_path)
  directory = checkpointing.checkpoint_directory(workdir)
  real = checkpointing.Checkpointer.restore_config
  calls = []

  def trainer_moves_on(self, step=None):
    calls.append(step)
    if len(calls) == 1:  # the trainer saves step 15 (a copy of 10 here), retires 10
      shutil.copytree(os.path.join(directory, "10"), os.path.join(directory, "15"))
      shutil.move(os.path.join(directory, "10"), str(tmp_path / "retired-10"))
    return real(self, step)

  monkeypatch.setattr(checkpointing.Checkpointer, "restore_config", trainer_moves_on)
  run = modes.run.open_run(config, workdir, ONE_DEVICE)
  step, params = run.restore()
  assert calls == [10, 15] and step == 10  # (the copy holds step 10's state)
  assert_bitwise_equal(params, host_state(config, str(tmp_path / "copy"), 15).params)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_file_where_the_checkpoints_go_is_one_line_before_any_step(tmp_path, mode):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "checkpoints").write_text("not a directory")
  result = run_main(f"--workdir={workdir}", f"--mode={mode}",
                    "--config.train.num_train_steps=2", "--config.model.d_model=32",
                    "--config.model.d_ff=64", "--config.model.num_heads=2")
  assert_one_error_line(result, f"{workdir}/checkpoints is a file where the checkpoint "
                                f"directory", "move it away")
  assert not (workdir / "metrics.jsonl").exists()  # no step ran


@pytest.mark.parametrize("record", ['{"metric": "loss", "val', '{"metric": "bleu", "value": 3}',
                                    '{"metric": "loss", "value": NaN, "step": 5}'])
def test_a_damaged_or_foreign_best_record_is_named(tmp_path, record):
  config = tiny_config(eval=dict(best_metric="loss"))
  path = tmp_path / "best" / "best.json"
  path.parent.mkdir()
  path.write_text(record)
  with pytest.raises(checkpointing.CheckpointError,
                     match=rf"{re.escape(str(path))} (is damaged|records the best bleu)"):
    monitors.BestCheckpoint(config, str(tmp_path))
  assert path.read_text() == record  # left for the user to look at


def test_averaging_swaps_the_average_in_whole(trained, tmp_path, monkeypatch):
  """<workdir>/averaged is replaced in one rename: a failure before it leaves the old
  average, and one version directory remains after each average."""
  config, workdir = _copy(trained, tmp_path)
  final = os.path.join(workdir, "averaged")

  def averaged_steps():
    checkpoints = checkpointing.Checkpointer.for_reading(workdir, "averaged")
    try:
      return checkpoints.restore_config()["averaged_steps"]
    finally:
      checkpoints.close()

  modes.average_checkpoints(config, workdir, 2)
  assert os.path.islink(final) and averaged_steps() == [5, 10]
  with monkeypatch.context() as patch:
    def fail(*args):
      raise OSError(28, "No space left on device")
    patch.setattr(modes.average.os, "replace", fail)
    with pytest.raises(errors.WriteError, match="the old average, if any, is intact"):
      modes.average_checkpoints(config, workdir, 1)
  assert averaged_steps() == [5, 10]
  modes.average_checkpoints(config, workdir, 1)
  assert averaged_steps() == [10]
  versions = [n for n in os.listdir(workdir) if n.startswith("averaged")]
  assert sorted(versions) == sorted(["averaged", os.readlink(final)])


# ----------------------------------------------------------------------------- the disk


def test_an_unwritable_workdir_is_one_clear_line(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  result = run_main(f"--workdir={blocker}/run", "--config.train.num_train_steps=2")
  assert_one_error_line(result, f"{blocker}/run", "Not a directory")


def test_a_full_disk_during_a_save_keeps_the_earlier_checkpoints(tmp_path):
  """Files may not grow past 50 kB once a first checkpoint is on disk (RLIMIT_FSIZE: EFBIG
  stands in for ENOSPC; the tiny model's checkpoint is ~250 kB, the logs stay smaller): the
  next save fails, the run stops with one line naming that step and the intact ones, every
  earlier checkpoint restores, and the same command resumes once space is back.

  The trainer sets the limit on itself, at the first save that finds a finished step in
  the directory (a hook around Checkpointer.save in the child): a limit set from outside
  raced the run, which on a loaded machine could reach its last save first."""
  workdir = str(tmp_path / "run")
  directory = checkpointing.checkpoint_directory(workdir)
  steps = 100  # the limit comes at step 40's save (60's if step 20 was still being written)
  flags = [f"--workdir={workdir}", f"--config.train.num_train_steps={steps}",
           "--config.train.checkpoint_every_steps=20", "--config.train.log_every_steps=50",
           "--config.eval.eval_every_steps=1000", "--config.model.d_model=32",
           "--config.model.d_ff=64", "--config.model.num_heads=2",
           "--config.model.num_encoder_layers=1",
           "--config.model.num_decoder_layers=1", "--config.data.max_digits=5",
           "--config.data.max_input_length=8", "--config.data.max_target_length=8",
           "--config.train.batch_size=16", "--config.eval.num_print_examples=0",
           "--config.eval.num_attention_images=0", "--config.data.num_eval_examples=64"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = cpu_device_flags(0, env.get("XLA_FLAGS", ""))
  # With SIGXFSZ ignored, writes past the limit fail with EFBIG instead of killing.
  code = ("import os, resource, runpy, signal, sys\n"
          "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
          "from training import checkpointing\n"
          "save = checkpointing.Checkpointer.save\n"
          "def limited_save(self, step, *args, **kwargs):\n"
          "  if any(e.isdigit() for e in os.listdir(self.directory)):\n"
          "    resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))\n"
          "  return save(self, step, *args, **kwargs)\n"
          "checkpointing.Checkpointer.save = limited_save\n"
          f"sys.argv = ['main.py'] + {flags!r}\n"
          f"runpy.run_path({os.path.join(REPO, 'main.py')!r}, run_name='__main__')\n")
  process = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           timeout=300, check=False)
  stderr = process.stderr
  assert process.returncode == 2, stderr[-3000:]
  # No traceback: tensorstore's late write callbacks, which found orbax's event loop
  # closed and printed one each through sys.unraisablehook (in most runs, a dozen or
  # more), are dropped (checkpointing._quiet_late_write_callbacks).
  assert "Traceback" not in stderr, stderr[-3000:]
  last = stderr.strip().splitlines()[-1]
  match = re.search(r"error: could not write the checkpoint of step (\d+) in \S+ \(.*\); "
                    r"the earlier checkpoints are intact \(steps: ([\d, ]+)\)\. [^\n]*$", last)
  assert match, stderr[-3000:]
  failed, intact = int(match[1]), [int(x) for x in match[2].split(", ")]
  assert failed % 20 == 0 and failed < steps and intact and max(intact) < failed, last
  assert sorted(int(e) for e in fault_injection.entries(directory) if e.isdigit()) == intact
  assert fault_injection.readable_steps(workdir) == intact
  result = run_main(*flags)  # space is back
  assert result.returncode == 0, result.stderr[-3000:]
  assert fault_injection.readable_steps(workdir)[-1] == steps


# ----------------------------------------------------------------------------- security


def test_nothing_loaded_from_files_is_unpickled_or_executed():
  """Workdirs and data files are read as data (JSON, text, arrays, SentencePiece models):
  no module of the project unpickles or evaluates what it reads."""
  banned = ("import pickle", "from pickle", "cPickle", "allow_pickle=True", "dill",
            "np.load(", "eval(", "exec(", "yaml.load(", "marshal")
  offenders = []
  for path in glob.glob(os.path.join(REPO, "**", "*.py"), recursive=True):
    if "/.venv/" in path or "/tests/" in path:
      continue
    with open(path, encoding="utf-8") as f:
      for number, line in enumerate(f, 1):
        code = line.split("#")[0]
        if any(b in code for b in banned) and ".eval(" not in code and "_eval(" not in code:
          offenders.append(f"{os.path.relpath(path, REPO)}:{number}: {line.strip()}")
  assert not offenders, offenders
