"""End-to-end tests of the training loop: learning, resume, device-count invariance, eval,
non-finite losses, and the command line."""

import functools
import gc
import json
import os
import re

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import modes
import tasks
import train
from input_pipeline import batching
from input_pipeline.local_builders import DataError
from modes.evaluate import report_name
from tests.tiny_configs import tiny_config
from training import checkpointing, monitors, optimizers, steps
from tests.cli_helpers import run_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_DEVICE = jax.local_devices()[:1]


def restored_state(config, workdir):
  """The newest checkpoint of `workdir` as a host TrainState."""
  task = tasks.get_task(config)
  template = jax.device_get(
      steps.create_state(task, optimizers.make_optimizer(config), config.seed))
  checkpoints = checkpointing.Checkpointer(workdir, keep=config.train.keep_checkpoints)
  try:
    return checkpoints.restore(template)
  finally:
    checkpoints.close()


def train_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def assert_trees_close(a, b, rtol=1e-6, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_translation_learns_to_reverse(tmp_path):
  config = tiny_config(model=dict(d_model=64, d_ff=128, num_heads=4),
                       train=dict(num_train_steps=500, log_every_steps=100,
                                  checkpoint_every_steps=1000),
                       optim=dict(warmup_steps=50, learning_rate=3e-3, schedule="cosine"),
                       eval=dict(eval_every_steps=1000, num_attention_images=0),
                       data=dict(num_eval_examples=256, max_digits=4))
  metrics = train.train_and_evaluate(config, str(tmp_path), devices=ONE_DEVICE)
  assert metrics["exact_match"] >= 0.9, metrics
  assert metrics["accuracy"] >= 0.95, metrics


def test_generation_learns_the_continuation(tmp_path):
  config = tiny_config("generation", model=dict(d_model=64, d_ff=128, num_heads=4),
                       train=dict(num_train_steps=800, log_every_steps=100,
                                  checkpoint_every_steps=1000),
                       optim=dict(warmup_steps=50, learning_rate=3e-3, schedule="cosine"),
                       eval=dict(eval_every_steps=1000, num_attention_images=0),
                       data=dict(num_eval_examples=256, max_digits=4, synthetic_task="copy"))
  metrics = train.train_and_evaluate(config, str(tmp_path), devices=ONE_DEVICE)
  # The digits before the separator are random (log 10 nats each); the copy after it is
  # learnable, so greedy continuation from the prompt must be exact.
  assert metrics["exact_match"] >= 0.9, metrics


def test_classification_learns_majority(tmp_path):
  config = tiny_config("classification",
                       train=dict(num_train_steps=300, log_every_steps=100,
                                  checkpoint_every_steps=1000),
                       optim=dict(warmup_steps=30, learning_rate=3e-3, schedule="cosine"),
                       eval=dict(eval_every_steps=1000, num_attention_images=0),
                       data=dict(num_eval_examples=256, max_digits=7))
  metrics = train.train_and_evaluate(config, str(tmp_path), devices=ONE_DEVICE)
  assert metrics["accuracy"] >= 0.9, metrics


@pytest.mark.parametrize("task", ["translation", "generation", "classification"])
def test_resume_equals_uninterrupted(tmp_path, task):
  """Train N steps straight, or k steps, restart from the checkpoint, then N - k."""
  # rsqrt does not depend on num_train_steps, so stopping at k does not change the schedule.
  config = tiny_config(task, train=dict(num_train_steps=12, checkpoint_every_steps=4),
                       eval=dict(eval_every_steps=100),
                       optim=dict(dropout_rate=0.1, schedule="rsqrt"))
  # Checkpoints and training losses are compared, not evaluations: none is run.
  straight = str(tmp_path / "straight")
  train.train_and_evaluate(config, straight, devices=ONE_DEVICE, final_evaluation=False)

  resumed = str(tmp_path / "resumed")
  first = tiny_config(task, train=dict(num_train_steps=8, checkpoint_every_steps=4),
                      eval=dict(eval_every_steps=100),
                      optim=dict(dropout_rate=0.1, schedule="rsqrt"))
  train.train_and_evaluate(first, resumed, devices=ONE_DEVICE, final_evaluation=False)
  assert int(restored_state(config, resumed).step) == 8
  train.train_and_evaluate(config, resumed, devices=ONE_DEVICE, final_evaluation=False)

  a, b = restored_state(config, straight), restored_state(config, resumed)
  assert int(a.step) == int(b.step) == 12
  assert_trees_close(a.params, b.params)
  assert_trees_close(a.opt_state, b.opt_state)
  assert train_losses(straight)[12] == pytest.approx(train_losses(resumed)[12], rel=1e-6)


def test_eight_devices_match_one_device(tmp_path):
  """Same global batch on 8 devices or 1: the same losses and parameters."""
  assert len(jax.local_devices()) == 8
  config = tiny_config(train=dict(num_train_steps=10, log_every_steps=1, grad_accum_steps=1),
                       eval=dict(eval_every_steps=100, num_attention_images=0))
  one, eight = str(tmp_path / "one"), str(tmp_path / "eight")
  m1 = train.train_and_evaluate(config, one, devices=ONE_DEVICE)
  m8 = train.train_and_evaluate(config, eight, devices=jax.local_devices())
  l1, l8 = train_losses(one), train_losses(eight)
  assert sorted(l1) == list(range(1, 11))
  np.testing.assert_allclose([l8[s] for s in sorted(l1)], [l1[s] for s in sorted(l1)],
                             rtol=1e-4)
  assert_trees_close(restored_state(config, one).params,
                     restored_state(config, eight).params, rtol=1e-4, atol=1e-5)
  assert m1["loss"] == pytest.approx(m8["loss"], rel=1e-4)


def test_the_all_reduce_per_array_makes_the_same_updates(tmp_path):
  """compute.flat_allreduce off (psum array by array) or on (the default, one vector per
  dtype): on 8 devices, the same losses and parameters."""
  assert len(jax.local_devices()) == 8
  flat = tiny_config(train=dict(num_train_steps=5, log_every_steps=1),
                     eval=dict(eval_every_steps=100))
  per_array = tiny_config(train=dict(num_train_steps=5, log_every_steps=1),
                          eval=dict(eval_every_steps=100), compute=dict(flat_allreduce=False))
  assert flat.compute.flat_allreduce and not per_array.compute.flat_allreduce
  workdirs = str(tmp_path / "flat"), str(tmp_path / "per_array")
  for config, workdir in zip((flat, per_array), workdirs):
    train.train_and_evaluate(config, workdir, devices=jax.local_devices(),
                             final_evaluation=False)
  losses = [train_losses(w) for w in workdirs]
  assert sorted(losses[0]) == sorted(losses[1]) == list(range(1, 6))
  np.testing.assert_allclose([losses[1][s] for s in range(1, 6)],
                             [losses[0][s] for s in range(1, 6)], rtol=1e-6)
  assert_trees_close(restored_state(flat, workdirs[0]).params,
                     restored_state(per_array, workdirs[1]).params, rtol=1e-6, atol=1e-7)


def test_psum_flat_equals_psum_for_every_leaf_and_dtype():
  """The one-vector-per-dtype all-reduce gives each leaf psum's sum, shape and dtype."""
  devices = jax.local_devices()
  rng = np.random.default_rng(0)
  tree = {"w": rng.normal(size=(len(devices), 3, 4)).astype(np.float32),
          "b": rng.normal(size=(len(devices), 5)).astype(np.float32),
          "count": rng.integers(0, 100, (len(devices),)).astype(np.int32),
          "half": [rng.normal(size=(len(devices), 2, 2)).astype(jnp.bfloat16)],
          "loss": rng.normal(size=(len(devices),)).astype(np.float32)}
  flat = jax.pmap(lambda t: steps.psum_flat(t, "d"), axis_name="d", devices=devices)(tree)
  plain = jax.pmap(lambda t: jax.lax.psum(t, "d"), axis_name="d", devices=devices)(tree)
  assert jax.tree.structure(flat) == jax.tree.structure(plain)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(flat), jax.tree.leaves(plain)):
    assert a.dtype == b.dtype and a.shape == b.shape, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                  err_msg=jax.tree_util.keystr(path))


def test_eval_mode_reproduces_final_evaluation(tmp_path):
  config = tiny_config(train=dict(num_train_steps=10))
  trained = train.train_and_evaluate(config, str(tmp_path), devices=ONE_DEVICE)
  evaluated = modes.evaluate_checkpoint(config, str(tmp_path), devices=ONE_DEVICE)
  assert evaluated == pytest.approx(trained, rel=1e-6)


def test_eval_split_names_are_the_datas_and_never_paths(tmp_path):
  """Synthetic digits have the splits train and validation: another name is refused (it
  was scored as the eval set under that name, and '../' put the report outside the
  workdir); the endless training stream is scored on num_eval_examples strings."""
  workdir = tmp_path / "run"
  config = tiny_config(train=dict(num_train_steps=2), eval=dict(eval_every_steps=100))
  train.train_and_evaluate(config, str(workdir), devices=ONE_DEVICE, final_evaluation=False)
  before = sorted(os.listdir(tmp_path))
  for split in ("test", "../escape", "../../eval/x"):
    with pytest.raises(DataError, match=rf"split {re.escape(repr(split))}: the synthetic "
                                        rf"digits have the splits train, validation"):
      modes.evaluate_checkpoint(config, str(workdir), devices=ONE_DEVICE, split=split)
  assert sorted(os.listdir(tmp_path)) == before and not (workdir / "eval").exists()
  assert len(tasks.get_task(config).data.eval_examples("train")) == 64
  metrics = modes.evaluate_checkpoint(config, str(workdir), devices=ONE_DEVICE, split="train")
  with open(workdir / "eval" / "train-latest-step2.json", encoding="utf-8") as f:
    assert json.load(f)["metrics"] == metrics
  # A name that passed the dataset's check still never becomes a path in a report's name.
  assert [report_name(s) for s in ("validation", "train[:10%]", "../x", "a/b", "..")] == [
      "validation", "train[:10%]", "_._x", "a_b", "_."]


def test_eval_without_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(checkpointing.CheckpointError, match="no latest checkpoint in .*train first"):
    modes.evaluate_checkpoint(tiny_config(), str(tmp_path), devices=ONE_DEVICE)


def test_skipped_updates_stop_the_run_past_a_share_of_its_steps():
  """nonfinite_updates="skip": 59 of 60 updates skipped (under max_skipped_updates=100)
  stop the run at the first check past max_skipped_fraction from the 10th skip on; a few
  skips early in a run (1 of 1, 9 of 9) or rare ones do not."""
  config = tiny_config(train=dict(nonfinite_updates="skip", max_skipped_updates=100,
                                  max_skipped_fraction=0.1))
  guard = monitors.NonFiniteGuard(config, "ckpt")
  guard.check([1.0] * 9, 9, None)  # 9 of 9: too few to judge a share
  guard.check([0.0] * 91, 100, None)
  guard.check([1.0], 101, None)  # 10 of 101: 9.9%
  assert guard.skipped == 10
  with pytest.raises(train.NonFiniteLossError, match=r"11 updates skipped.*11% of its 102"):
    guard.check([1.0], 102, None)  # 11 of 102: 10.8%
  guard = monitors.NonFiniteGuard(config, "ckpt")
  guard.check([0.0] * 100, 100, None)
  guard.check([1.0] * 11, 111, None)  # 11 of 111: 9.9%
  with pytest.raises(train.NonFiniteLossError,
                     match=r"^59 updates skipped for a non-finite loss or gradient in this "
                           r"run, 98% of its 60 updates, more than "
                           r"config\.train\.max_skipped_fraction=0\.1 \(the last at step 60\)"):
    guard = monitors.NonFiniteGuard(config, "ckpt")
    guard.check([0.0] + [1.0] * 59, 60, None)
  config.train.max_skipped_fraction = 1.0  # the share off: the count alone stops it
  guard = monitors.NonFiniteGuard(config, "ckpt")
  guard.check([1.0] * 100, 100, None)
  with pytest.raises(train.NonFiniteLossError, match=r"max_skipped_updates=100"):
    guard.check([1.0], 101, None)


def test_nonfinite_loss_stops_without_saving_it(tmp_path):
  config = tiny_config(optim=dict(learning_rate=1e30, max_grad_norm=0.0, warmup_steps=0),
                       train=dict(num_train_steps=20, checkpoint_every_steps=1))
  with pytest.raises(train.NonFiniteLossError, match="non-finite loss or gradient at step"):
    train.train_and_evaluate(config, str(tmp_path), devices=ONE_DEVICE)
  saved = checkpointing.Checkpointer(str(tmp_path), keep=100)
  saved_steps = saved.all_steps()
  saved.close()
  for step in saved_steps:  # whatever was saved before the error is finite
    state = checkpointing.Checkpointer(str(tmp_path), keep=100).restore(
        jax.device_get(steps.create_state(tasks.get_task(config),
                                          optimizers.make_optimizer(config), 0)), step)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))


def live_step_functions():
  """The ids of the live functools.partial objects that wrap training.steps' functions
  (`type(o) is`, not isinstance: no __class__ lookup on every object, which wakes
  deprecation warnings in other libraries' lazy modules)."""
  gc.collect()
  return {id(o) for o in gc.get_objects() if type(o) is functools.partial
          and getattr(o.func, "__module__", "") == steps.__name__}


def test_a_finished_run_leaves_no_step_function_alive(tmp_path):
  """jax's pmap keeps each function it compiled, and its program, for the process's life
  unless its caches are cleared: a process training model after model would keep every
  run's programs loaded until it reached Linux's limit of memory maps and crashed.
  train_and_evaluate drops them when it returns, and when it raises."""
  before = live_step_functions()
  config = tiny_config(train=dict(num_train_steps=4, checkpoint_every_steps=4,
                                  steps_per_call=2))
  train.train_and_evaluate(config, str(tmp_path / "done"), devices=ONE_DEVICE)
  assert not live_step_functions() - before
  config = tiny_config(optim=dict(learning_rate=1e30, max_grad_norm=0.0, warmup_steps=0),
                       train=dict(num_train_steps=20, checkpoint_every_steps=20))
  with pytest.raises(train.NonFiniteLossError):
    train.train_and_evaluate(config, str(tmp_path / "diverged"), devices=ONE_DEVICE)
  assert not live_step_functions() - before


@pytest.mark.parametrize("size", [0, 1, 3])
def test_device_prefetch_yields_each_batch_with_the_position_after_it(size):
  """Batches come in order, and each carries the iterator position right after it (what
  its step's checkpoint saves), not the position after the batches fetched ahead."""
  dataset = grain.MapDataset.range(10).map(
      lambda i: {"inputs": np.full((1, 2, 3), i, np.int32)})
  iterator = batching.iterate(dataset)
  out = list(steps.prefetch_to_devices(iterator, ONE_DEVICE, size, count=6))
  assert [int(np.asarray(batch["inputs"])[0, 0, 0]) for batch, _ in out] == list(range(6))
  assert [position for _, position in out] == [{"next_index": i + 1} for i in range(6)]
  assert iterator.get_state() == {"next_index": 6}  # nothing read past `count`
  assert isinstance(out[0][0]["inputs"], jax.Array if size else np.ndarray)


def test_device_prefetch_stacks_the_batches_of_one_call():
  """With `sizes`, one item per call: n > 1 batches stacked on axis 1, in order, with the
  position after the call's last batch; n = 1 a plain batch."""
  dataset = grain.MapDataset.range(10).map(
      lambda i: {"inputs": np.full((1, 2, 3), i, np.int32)})
  iterator = batching.iterate(dataset)
  out = list(steps.prefetch_to_devices(iterator, ONE_DEVICE, 1, 3, sizes=[2, 1, 3]))
  shapes = [np.asarray(batch["inputs"]).shape for batch, _ in out]
  assert shapes == [(1, 2, 2, 3), (1, 2, 3), (1, 3, 2, 3)]
  assert [np.asarray(out[2][0]["inputs"])[0, :, 0, 0].tolist()] == [[3, 4, 5]]
  assert [position for _, position in out] == [{"next_index": n} for n in (2, 3, 6)]
  assert iterator.get_state() == {"next_index": 6}


def test_stacking_a_calls_batches_pads_them_to_one_length():
  """length_bucket cuts batches to different lengths: stacked for one call, the shorter are
  padded with 0 (padding), their tokens unchanged."""
  short = np.arange(1, 7, dtype=np.int32).reshape(1, 2, 3)
  long = np.arange(1, 11, dtype=np.int32).reshape(1, 2, 5)
  stacked = steps.stack_padded(short, long)
  assert stacked.shape == (1, 2, 2, 5)
  np.testing.assert_array_equal(stacked[:, 0, :, :3], short)
  assert not stacked[:, 0, :, 3:].any()
  np.testing.assert_array_equal(stacked[:, 1], long)


def test_call_sizes_never_run_past_a_step_the_loop_acts_after():
  assert train.call_sizes(0, 11, 3, lambda done: done % 5 == 0) == [3, 1, 1, 3, 1, 1, 1]
  assert train.call_sizes(4, 4, 3, lambda done: False) == []
  assert train.call_sizes(0, 7, 1, lambda done: False) == [1] * 7
  rng = np.random.default_rng(0)
  for _ in range(50):
    start, total, per_call = rng.integers(0, 20), rng.integers(20, 60), rng.integers(1, 9)
    periods = rng.integers(1, 15, size=3)
    acts = lambda done: any(done % p == 0 for p in periods)  # noqa: E731
    sizes = train.call_sizes(start, total, per_call, acts)
    ends = start + np.cumsum(sizes)
    assert ends[-1] == total and set(sizes) <= {1, per_call}
    assert {d for d in range(start + 1, total + 1) if acts(d)} <= set(ends.tolist())


def test_steps_per_call_makes_the_same_updates(tmp_path):
  """steps_per_call=3 (one lax.scan per call, single steps around the log and save steps):
  the same losses, parameters, optimizer state and data position as one update a call,
  dropout included."""
  def run(per_call):
    config = tiny_config("generation", train=dict(num_train_steps=11, log_every_steps=5,
                                                  checkpoint_every_steps=10,
                                                  steps_per_call=per_call),
                         eval=dict(eval_every_steps=100), optim=dict(dropout_rate=0.1))
    workdir = str(tmp_path / str(per_call))
    train.train_and_evaluate(config, workdir, devices=ONE_DEVICE, final_evaluation=False)
    return config, workdir
  (c1, one), (c3, three) = run(1), run(3)
  assert sorted(train_losses(three)) == [5, 10, 11]
  np.testing.assert_allclose([train_losses(three)[s] for s in (5, 10, 11)],
                             [train_losses(one)[s] for s in (5, 10, 11)], rtol=1e-6)
  a, b = restored_state(c1, one), restored_state(c3, three)
  assert int(a.step) == int(b.step) == 11
  assert_trees_close(a.params, b.params)
  assert_trees_close(a.opt_state, b.opt_state)
  positions = []
  for workdir in (one, three):
    checkpoints = checkpointing.Checkpointer(workdir, keep=3)
    positions.append([checkpoints.restore_data_state(s) for s in (10, 11)])
    checkpoints.close()
  assert positions[0] == positions[1]
  assert positions[1][1] is not None


def test_profile_steps_writes_a_trace(tmp_path):
  """profile_steps=0 writes nothing; otherwise a resumed run traces the steps after its
  first into <workdir>/profile (an XPlane file, with the steps' annotations)."""
  config = tiny_config(train=dict(num_train_steps=2, checkpoint_every_steps=2),
                       eval=dict(eval_every_steps=100))
  train.train_and_evaluate(config, str(tmp_path), devices=ONE_DEVICE, final_evaluation=False)
  assert not (tmp_path / "profile").exists()
  config = tiny_config(train=dict(num_train_steps=6, checkpoint_every_steps=2,
                                  profile_steps=2),
                       eval=dict(eval_every_steps=100))
  train.train_and_evaluate(config, str(tmp_path), devices=ONE_DEVICE, final_evaluation=False)
  traces = list((tmp_path / "profile").glob("plugins/profile/*/*.xplane.pb"))
  assert len(traces) == 1, list((tmp_path / "profile").rglob("*"))
  assert b"train" in traces[0].read_bytes()  # the StepTraceAnnotation of each traced step


# main.py's command line for a tiny model on short digit strings (as tiny_config), without
# the attention maps each evaluation draws by default.
TINY_FLAGS = ["--config.model.d_model=32", "--config.model.d_ff=64", "--config.model.num_heads=2",
              "--config.model.num_encoder_layers=1", "--config.model.num_decoder_layers=1",
              "--config.data.max_digits=5", "--config.data.max_input_length=8",
              "--config.data.max_target_length=8", "--config.eval.num_attention_images=0"]


def test_main_trains_resumes_and_evaluates(tmp_path):
  workdir = str(tmp_path / "run")
  flags = [f"--workdir={workdir}", "--config.train.num_train_steps=6",
           "--config.train.checkpoint_every_steps=3", "--config.train.log_every_steps=3",
           *TINY_FLAGS, "--config.data.num_eval_examples=32", "--config.train.batch_size=16",
           "--config.eval.eval_batch_size=32"]
  first = run_main(*flags)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "step 6/6" in first.stderr and "ETA" in first.stderr and "tok/s" in first.stderr
  assert "final evaluation at step 6" in first.stderr
  assert os.path.exists(os.path.join(workdir, "config.json"))
  assert any(name.startswith("events.out.tfevents")
             for name in os.listdir(os.path.join(workdir, "tensorboard")))

  again = run_main(*flags[:1], "--config.train.num_train_steps=9", *flags[2:])
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resumed from the checkpoint at step 6" in again.stderr
  assert "step 9/9" in again.stderr

  evaluated = run_main(*flags, "--mode=eval")
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert "evaluation of the latest checkpoint on validation at step 9" in evaluated.stderr


def test_main_splits_the_cpu_into_config_cpu_devices(tmp_path):
  flags = [f"--workdir={tmp_path / 'run'}", "--config.train.num_train_steps=2",
           "--config.train.log_every_steps=1", *TINY_FLAGS,
           "--config.data.num_eval_examples=12", "--config.train.batch_size=12",
           "--config.eval.eval_batch_size=12"]
  default = run_main(*flags)
  assert default.returncode == 0, default.stderr[-3000:]
  assert "1 local cpu device(s)" in default.stderr
  split = run_main(*flags, "--config.compute.cpu_devices=3", f"--workdir={tmp_path / 'run3'}")
  assert split.returncode == 0, split.stderr[-3000:]
  assert "3 local cpu device(s)" in split.stderr
  bad = run_main(*flags, "--config.compute.cpu_devices=-1", f"--workdir={tmp_path / 'bad'}")
  assert bad.returncode == 2 and "config.compute.cpu_devices=-1 is invalid" in bad.stderr
  assert not (tmp_path / "bad").exists()


def test_main_reports_a_bad_config_in_one_line(tmp_path):
  workdir = tmp_path / "run"
  result = run_main(f"--workdir={workdir}", "--config.model.num_heads=3")
  assert result.returncode == 2
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: config.model.num_heads=3 is invalid"), result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert not workdir.exists()


@pytest.mark.parametrize("args, expected", [
    (["--config=configs/default.py:size=huge"], "config variant size='huge' is unknown"),
    (["--config=configs/default.py:size"], "is not of the form key=value"),
    (["--config.model.d_modl=3"], "unknown config field in the overrides: 'd_modl'"),
    (["--config.model.d_model=abc"], "flag --config.model.d_model=abc"),
    (["--mode=fly"], "flag --mode=fly"),
    (["--config=configs/missing.py"], "cannot load --config"),
    (["--config.train.batch_size=0"], "config.train.batch_size=0 is invalid"),
    (["--mode=eval"], "no latest checkpoint in"),
])
def test_main_reports_bad_flags_in_one_line(tmp_path, args, expected):
  result = run_main(f"--workdir={tmp_path / 'run'}", *args)
  assert result.returncode == 2, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and expected in last, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
