"""Checkpoints (round trip, retention, interrupted saves, mismatched templates, the
tokenizer they were trained with) and the metric writers (TensorBoard event file,
metrics.jsonl)."""

import glob
import json
import os
import random
import re
import struct
import sys

import jax
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

import modes
import tasks
import train
from benchmarks import fault_injection
from configs import default, presets
from input_pipeline import tokenizers
from input_pipeline.tokenizers import TokenizerError
from tests.test_classification import ONE_DEVICE, tiny_config, write_corpus
from training import checkpointing, optimizers, reporting, steps

CONFIG = {"task": "translation", "model": {"d_model": 16}, "optim": {"learning_rate": 0.5},
          "size": "tiny"}


def _state(step, scale=1.0):
  return {
      "step": np.array(step, np.int32),
      "params": {"dense": {"kernel": np.arange(12, dtype=np.float32).reshape(3, 4) * scale,
                           "bias": np.full((4,), -1.5 * scale, np.float32)}},
      "opt_state": [np.zeros((3, 4), np.float32) + step, np.array(step, np.int32)],
      "rng": np.array([123456789, 4000000000], np.uint32),  # > int32 max on purpose
  }


def _assert_same(a, b):
  flat_a, tree_a = jax.tree.flatten(a)
  flat_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(flat_a, flat_b):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x, y)


@pytest.fixture
def checkpointer(tmp_path):
  c = checkpointing.Checkpointer(str(tmp_path), keep=2)
  yield c
  c.close()


def test_round_trip(tmp_path, checkpointer):
  state = _state(7, scale=2.0)
  checkpointer.save(7, state, CONFIG)
  checkpointer.wait()
  assert checkpointer.latest_step() == 7
  template = _state(0)  # values differ, shapes and dtypes match
  restored = checkpointer.restore(template)
  _assert_same(restored, state)
  assert checkpointer.restore_config() == CONFIG
  # A new Checkpointer (a resumed run) sees the same checkpoint.
  again = checkpointing.Checkpointer(str(tmp_path), keep=2)
  assert again.latest_step() == 7
  _assert_same(again.restore(template), state)
  again.close()


def test_keep_only_newest(checkpointer):
  for step in (1, 2, 3, 4, 5):
    checkpointer.save(step, _state(step), dict(CONFIG, step=step))
  checkpointer.wait()
  assert checkpointer.all_steps() == [4, 5]
  assert checkpointer.latest_step() == 5
  assert sorted(os.listdir(checkpointer.directory)) == ["4", "5", checkpointing.TRASH]
  assert not os.listdir(os.path.join(checkpointer.directory, checkpointing.TRASH))
  _assert_same(checkpointer.restore(_state(0), step=4), _state(4))
  _assert_same(checkpointer.restore(_state(0)), _state(5))
  assert checkpointer.restore_config(step=4)["step"] == 4
  assert checkpointer.restore_config()["step"] == 5


def test_no_checkpoint(checkpointer):
  assert checkpointer.latest_step() is None
  assert checkpointer.all_steps() == []
  with pytest.raises(checkpointing.CheckpointError, match="no checkpoint"):
    checkpointer.restore(_state(0))


@pytest.mark.parametrize("change", ["shape", "missing_leaf", "extra_leaf"])
def test_mismatched_template_raises(checkpointer, change):
  checkpointer.save(3, _state(3), CONFIG)
  checkpointer.wait()
  template = _state(0)
  if change == "shape":
    template["params"]["dense"]["kernel"] = np.zeros((3, 5), np.float32)
  elif change == "missing_leaf":
    del template["params"]["dense"]["bias"]
  else:
    template["params"]["norm"] = {"scale": np.ones((4,), np.float32)}
  with pytest.raises(checkpointing.CheckpointError) as info:
    checkpointer.restore(template)
  assert "step 3" in str(info.value)
  assert checkpointer.directory in str(info.value)


def test_interrupted_save_is_not_a_checkpoint(tmp_path, checkpointer):
  checkpointer.save(2, _state(2), CONFIG)
  checkpointer.wait()
  for name in ("9.orbax-checkpoint-tmp", "8.orbax-checkpoint-tmp-1712345678"):
    partial = os.path.join(checkpointer.directory, name, "state")
    os.makedirs(partial)
    with open(os.path.join(partial, "_METADATA"), "w") as f:
      f.write("{")  # half-written
  resumed = checkpointing.Checkpointer(str(tmp_path), keep=2)
  assert resumed.latest_step() == 2
  assert resumed.all_steps() == [2]
  _assert_same(resumed.restore(_state(0)), _state(2))
  resumed.close()


def _flip_one_bit(tmp_path, step):
  """A bit flipped where the checkpoint still decodes, to other values: the damage only
  the checksums can see (benchmarks/fault_injection.py)."""
  fault_injection.flip_byte(str(tmp_path), step, random.Random(step))


@pytest.mark.parametrize("values", ["random", "five_distinct"])
def test_a_flipped_bit_still_decodes_and_only_the_checksums_tell(checkpointer, tmp_path,
                                                                 values):
  """The fault tests' bit flip must leave a checkpoint that decodes, or they test the
  decompressor's error instead of the checksums. Five distinct values compress well enough
  that zstd codes them (about two flips in three there fail to decompress, measured);
  random ones it mostly stores as they are."""
  rng = np.random.default_rng(0)
  if values == "random":
    arrays = {"a": rng.standard_normal(4096).astype(np.float32)}
  else:
    arrays = {"a": rng.integers(0, 5, 16384).astype(np.float32)}
  for step in (1, 2, 3, 4):  # four places: a single flip fails to decode in most of them
    checkpointer.save(step, {"step": np.array(step, np.int32), "params": arrays}, CONFIG)
    checkpointer.wait()
    _flip_one_bit(tmp_path, step)
    decoded = fault_injection._decoded_arrays(  # pylint: disable=protected-access
        os.path.join(checkpointer.step_directory(step), "state"))
    assert decoded is not None
    reader = checkpointing.Checkpointer.for_reading(str(tmp_path))
    with pytest.raises(checkpointing.CheckpointError,
                       match=rf"checkpoint step {step} in .* is damaged or incomplete \(the "
                             r"contents of params/a differ from the checksums written with "
                             r"them\)"):
      reader.restore({"step": np.array(0, np.int32), "params": arrays})
    reader.close()


def test_the_checksums_name_a_flipped_bit_and_the_newest_intact_step(checkpointer, tmp_path):
  """The arrays restore (the file still decodes) but one value changed: the restore names
  the step, the array and the newest earlier step that restores intact; the checksums are
  of the saved values, so an intact step still restores bitwise."""
  rng = np.random.default_rng(0)
  first, second = (rng.standard_normal(4096).astype(np.float32) for _ in range(2))
  state = _state(1)
  state["params"]["dense"]["bias"] = first
  checkpointer.save(1, state, CONFIG)
  checkpointer.wait()
  state["params"]["dense"]["bias"] = second
  checkpointer.save(2, state, CONFIG)
  checkpointer.wait()
  template = _state(0)
  template["params"]["dense"]["bias"] = np.zeros((4096,), np.float32)
  _flip_one_bit(tmp_path, 2)
  reader = checkpointing.Checkpointer.for_reading(str(tmp_path))
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"checkpoint step 2 in .* is damaged or incomplete \(the contents "
                           r"of params/dense/bias differ from the checksums written with "
                           r"them\); move .*/2 away to use the previous checkpoint \(step 1, "
                           r"which restores intact\)"):
    reader.restore(template)
  np.testing.assert_array_equal(reader.restore(template, step=1)["params"]["dense"]["bias"],
                                first)
  _flip_one_bit(tmp_path, 1)
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"step 2 .* no earlier checkpoint restores intact"):
    reader.restore(template)
  reader.close()


def test_a_checkpoint_without_checksums_still_restores(checkpointer):
  """Checkpoints written before checksums were saved are read unverified."""
  checkpointer.save(3, _state(3), CONFIG)
  checkpointer.wait()
  checksums = os.path.join(checkpointer.step_directory(3), "checksums")
  assert json.load(open(os.path.join(checksums, "metadata")))[checkpointing.CHECKSUM]
  for name in os.listdir(checksums):
    os.remove(os.path.join(checksums, name))
  os.rmdir(checksums)
  _assert_same(checkpointer.restore(_state(0)), _state(3))


def test_a_reader_creates_nothing_and_cannot_save(tmp_path, checkpointer):
  checkpointer.save(2, _state(2), CONFIG)
  checkpointer.wait()
  partial = os.path.join(checkpointer.directory, "3.orbax-checkpoint-tmp-17", "state")
  os.makedirs(partial)  # a live trainer's save in flight
  before = sorted(os.listdir(checkpointer.directory))
  reader = checkpointing.Checkpointer.for_reading(str(tmp_path))
  assert reader.all_steps() == [2]
  _assert_same(reader.restore(_state(0)), _state(2))
  with pytest.raises(ValueError, match="opened for reading"):
    reader.save(4, _state(4), CONFIG)
  reader.close()
  assert sorted(os.listdir(checkpointer.directory)) == before
  assert not os.path.exists(os.path.join(str(tmp_path), "best"))
  with pytest.raises(checkpointing.CheckpointError, match="is a file where the checkpoint"):
    open(os.path.join(str(tmp_path), "best"), "w").close()
    checkpointing.Checkpointer.for_reading(str(tmp_path), "best")


def test_only_late_write_callbacks_are_dropped_from_the_unraisable_hook(monkeypatch,
                                                                         tmp_path):
  """A writer installs a sys.unraisablehook that drops RuntimeError("Event loop is closed")
  raised in a closed loop's call_soon_threadsafe (what tensorstore's writes of a failed
  save meet) and hands everything else to the hook that was there; installed once."""
  import asyncio  # pylint: disable=import-outside-toplevel
  import types  # pylint: disable=import-outside-toplevel

  def unraisable(raise_it):
    try:
      raise_it()
    except Exception as e:  # pylint: disable=broad-except
      return types.SimpleNamespace(exc_type=type(e), exc_value=e,
                                   exc_traceback=e.__traceback__, err_msg=None, object=None)
    raise AssertionError("nothing raised")

  loop = asyncio.new_event_loop()
  loop.close()
  late = unraisable(lambda: loop.call_soon_threadsafe(print))
  def same_text_elsewhere():
    raise RuntimeError("Event loop is closed")
  elsewhere = unraisable(same_text_elsewhere)
  other = unraisable(lambda: loop.call_soon_threadsafe(print, 1 / 0))
  seen = []
  previous = seen.append
  monkeypatch.setattr("sys.unraisablehook", previous)
  checkpointing.Checkpointer(str(tmp_path / "a"), keep=1, async_save=False)
  hook = sys.unraisablehook
  assert hook is not previous
  checkpointing.Checkpointer(str(tmp_path / "b"), keep=1, async_save=False)
  assert sys.unraisablehook is hook  # installed once
  for record in (late, elsewhere, other):
    hook(record)
  assert seen == [elsewhere, other]


def test_saving_does_not_alias_the_live_state(checkpointer):
  """save() returns before the write finishes; changing the arrays afterwards (the next
  training step) must not change what is written."""
  state = _state(1)
  checkpointer.save(1, state, CONFIG)
  state["params"]["dense"]["kernel"][...] = 99.0
  checkpointer.wait()
  _assert_same(checkpointer.restore(_state(0)), _state(1))


def _train_state(d_model, abstract):
  """A real TrainState (flax dataclass, optax state): as host arrays (what a resumed run
  restores into) or as ShapeDtypeStructs (what modes.evaluate_checkpoint restores into)."""
  config = default.get_config()
  presets.update_groups(config, dict(
      model=dict(d_model=d_model, d_ff=32, num_heads=2, num_encoder_layers=1,
                 num_decoder_layers=1),
      data=dict(max_digits=4, max_input_length=6, max_target_length=6)))
  task, tx = tasks.get_task(config), optimizers.make_optimizer(config)
  shapes = jax.eval_shape(lambda: steps.create_state(task, tx, 0))
  if abstract:
    return shapes
  rng = np.random.default_rng(d_model)
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes)


def test_train_state_round_trip_and_config_mismatch(checkpointer):
  """The real state restores into both kinds of template; a checkpoint of another model
  size is refused up front instead of being loaded in the wrong shapes."""
  state = _train_state(16, abstract=False)
  state = state.replace(step=np.array(42, np.int32),
                        rng=np.array([7, 4000000000], np.uint32))
  checkpointer.save(42, state, CONFIG)
  checkpointer.wait()
  _assert_same(checkpointer.restore(jax.tree.map(np.zeros_like, state)), state)
  restored = checkpointer.restore(_train_state(16, abstract=True))
  _assert_same(restored, state)
  assert int(restored.step) == 42 and restored.rng.dtype == np.uint32
  for abstract in (False, True):
    with pytest.raises(checkpointing.CheckpointError,
                       match=r"step 42.*different model.*params/decoder/block_0/"
                             r"cross_attention/key/kernel is float32\[16, 2, 8\] in the "
                             r"checkpoint, float32\[32, 2, 16\] in the model"):
      checkpointer.restore(_train_state(32, abstract=abstract))


# ----------------------------------------------------------------------------- reporting


@pytest.mark.parametrize("seconds,text", [
    (0, "0s"), (4.2, "4s"), (59.6, "1m00s"), (75, "1m15s"), (3600, "1h00m00s"),
    (12345, "3h25m45s"), (90061, "25h01m01s"), (float("inf"), "?"), (float("nan"), "?"),
])
def test_format_duration(seconds, text):
  assert reporting.format_duration(seconds) == text


def _tfrecords(path):
  """Records of a TFRecord file: length (8 bytes), crc (4), data, crc (4)."""
  with open(path, "rb") as f:
    data = f.read()
  out, offset = [], 0
  while offset < len(data):
    (length,) = struct.unpack("<Q", data[offset:offset + 8])
    out.append(data[offset + 12:offset + 12 + length])
    offset += 12 + length + 4
  assert offset == len(data), "truncated event file"
  return out


def _scalars(workdir):
  files = glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
  assert len(files) == 1, files
  found = {}
  for record in _tfrecords(files[0]):
    event = event_pb2.Event.FromString(record)
    for value in event.summary.value:
      if value.HasField("simple_value"):
        found[(value.tag, event.step)] = value.simple_value
      elif value.HasField("tensor") and value.tensor.float_val:
        found[(value.tag, event.step)] = value.tensor.float_val[0]
  return found


def test_metric_writer(tmp_path):
  workdir = str(tmp_path / "run")
  writer = reporting.MetricWriter(workdir)
  writer.write_scalars(10, {"train/loss": 2.5, "train/accuracy": np.float32(0.25)})
  writer.write_scalars(20, {"train/loss": 1.25, "eval/bleu": 31.0})
  writer.write_text(20, "eval/examples", "input: 1 2  prediction: 2 1")
  writer.close()

  scalars = _scalars(workdir)
  assert scalars[("train/loss", 10)] == pytest.approx(2.5)
  assert scalars[("train/accuracy", 10)] == pytest.approx(0.25)
  assert scalars[("train/loss", 20)] == pytest.approx(1.25)
  assert scalars[("eval/bleu", 20)] == pytest.approx(31.0)

  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    lines = [json.loads(line) for line in f]
  assert [line["step"] for line in lines] == [10, 20]
  assert lines[0]["train/loss"] == 2.5 and lines[0]["train/accuracy"] == 0.25
  assert lines[1]["train/loss"] == 1.25 and lines[1]["eval/bleu"] == 31.0
  assert all("time" in line for line in lines)

  # A resumed run appends to metrics.jsonl instead of overwriting it.
  writer = reporting.MetricWriter(workdir)
  writer.write_scalars(30, {"train/loss": 1.0})
  writer.close()
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    assert [json.loads(line)["step"] for line in f] == [10, 20, 30]


def test_disabled_metric_writer_writes_nothing(tmp_path):
  workdir = str(tmp_path / "other_process")
  writer = reporting.MetricWriter(workdir, enabled=False)
  writer.write_scalars(1, {"train/loss": 1.0})
  writer.write_text(1, "x", "y")
  writer.close()
  assert not os.path.exists(workdir)


def test_progress_measures_each_interval_and_leaves_out_what_it_is_told(monkeypatch):
  """A slow first interval does not leak into later rates; excluded eval time is skipped."""
  now = [100.0]
  monkeypatch.setattr(reporting.time, "perf_counter", lambda: now[0])
  progress = reporting.Progress(first_step=0, total_steps=1000)
  now[0] += 50.0  # 100 slow steps
  first = progress.update(100, tokens=1000.0)
  assert first["steps_per_sec"] == pytest.approx(2.0)
  now[0] += 10.0
  progress.exclude(5.0)  # 5 s of evaluation
  second = progress.update(200, tokens=4000.0)
  assert second["steps_per_sec"] == pytest.approx(20.0)
  assert second["tokens_per_sec"] == pytest.approx(800.0)
  assert second["eta_seconds"] == pytest.approx(800 / 20.0)


def test_a_reader_lists_again_when_a_trainer_retires_a_step_under_it(tmp_path, monkeypatch):
  """Opening read-only while a live trainer renames an old step away: orbax's listing can
  meet a step that is gone (FileNotFoundError); the reader lists again instead of failing.
  A writer, and a step still gone after every try, fail as before."""
  saver = checkpointing.Checkpointer(str(tmp_path), keep=2, async_save=False)
  saver.close()
  real, failures = checkpointing.ocp.CheckpointManager, [2]

  def racing(*args, **kwargs):
    if failures[0]:
      failures[0] -= 1
      raise FileNotFoundError(2, "No such file or directory", str(tmp_path / "93"))
    return real(*args, **kwargs)

  monkeypatch.setattr(checkpointing.ocp, "CheckpointManager", racing)
  monkeypatch.setattr(checkpointing.time, "sleep", lambda seconds: None)
  checkpointing.Checkpointer.for_reading(str(tmp_path)).close()
  assert failures[0] == 0
  failures[0] = checkpointing.READ_ONLY_LIST_ATTEMPTS
  with pytest.raises(checkpointing.CheckpointError, match="cannot read the checkpoint"):
    checkpointing.Checkpointer.for_reading(str(tmp_path))
  failures[0] = 1
  with pytest.raises(checkpointing.CheckpointWriteError, match="cannot create"):
    checkpointing.Checkpointer(str(tmp_path), keep=2)


# ----------------------------------------------------------------------------- tokenizer


def test_a_tokenizer_rebuilt_from_changed_data_is_refused_by_resume_and_eval(tmp_path):
  """Each checkpoint records its tokenizer's fingerprint. A workdir's tokenizer lost and
  rebuilt from the same data is the same one (the run resumes); rebuilt after the data
  changed, it maps ids to other words: training and evaluation refuse it, naming the
  file, and touch no checkpoint; the original file put back, the run resumes."""
  write_corpus(tmp_path / "corpus")
  config = tiny_config(tmp_path / "corpus", tmp_path / "tfds",
                       train=dict(num_train_steps=10, checkpoint_every_steps=10),
                       eval=dict(eval_every_steps=1000))  # no evaluation is read here
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir, devices=ONE_DEVICE, final_evaluation=False)
  path = os.path.join(workdir, "tokenizer.model")
  with open(path, "rb") as f:
    original = f.read()
  reader = checkpointing.Checkpointer.for_reading(workdir)
  recorded = reader.restore_config(10)[tokenizers.TOKENIZER_KEY]
  reader.close()
  assert recorded == tasks.get_task(config, workdir).data.tokenizer_fingerprint()

  os.remove(path)  # lost; the same data rebuilds the same tokenizer
  config.train.num_train_steps = 20
  train.train_and_evaluate(config, workdir, devices=ONE_DEVICE, final_evaluation=False)
  with open(path, "rb") as f:
    assert f.read() == original

  os.remove(path)  # lost after the training data changed
  write_corpus(tmp_path / "corpus", sizes=(("train", 300), ("dev", 64)), seed=1)
  config.train.num_train_steps = 30
  with pytest.raises(TokenizerError, match=rf"\({re.escape(path)}\) is not the one the "
                                           rf"checkpoint in .* was trained with .*rebuilt or "
                                           rf"replaced since"):
    train.train_and_evaluate(config, workdir, devices=ONE_DEVICE)
  with pytest.raises(TokenizerError, match="rebuilt or replaced since"):
    modes.evaluate_checkpoint(config, workdir, devices=ONE_DEVICE)
  reader = checkpointing.Checkpointer.for_reading(workdir)
  assert reader.latest_step() == 20
  reader.close()

  with open(path, "wb") as f:  # the run's own file back: it resumes
    f.write(original)
  train.train_and_evaluate(config, workdir, devices=ONE_DEVICE, final_evaluation=False)
  reader = checkpointing.Checkpointer.for_reading(workdir)
  assert reader.latest_step() == 30
  reader.close()


def test_tokenizer_check_reads_only_its_own_record():
  """A config saved before the fields were grouped has a flat `tokenizer` field (the
  kind, not a fingerprint): it is not mistaken for a record. A record that differs is."""
  class Data:
    def tokenizer_fingerprint(self):
      return "0123456789abcdef"

    def tokenizer_files(self):
      return "runs/x/tokenizer.model"

  class Task:
    data = Data()

  config = default.get_config("task=classification")
  flat = {"task": "classification", "tokenizer": "sentencepiece", "d_model": 32}
  key, where = tokenizers.TOKENIZER_KEY, "runs/x/checkpoints"
  tokenizers.check_same_tokenizer(flat, Task(), config, where)
  tokenizers.check_same_tokenizer({**flat, key: "0123456789abcdef"}, Task(), config, where)
  with pytest.raises(TokenizerError, match=r"\(runs/x/tokenizer.model\) is not the one"):
    tokenizers.check_same_tokenizer({**flat, key: "fedcba9876543210"}, Task(), config, where)
