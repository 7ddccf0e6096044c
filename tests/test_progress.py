"""Progress in long phases: the phase progress line (count, ETA, rate limit), the compile
announcement, head importance's progress, and the final evaluation reusing a periodic one
that covered the same step and split."""

import json
import os

import jax
import numpy as np
import pytest

import train
from inspection import attention_maps
from tests.tiny_configs import tiny_config
from training import reporting, steps

ONE_DEVICE = jax.local_devices()[:1]


class FakeClock:

  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def _phase(total, every=10.0):
  clock, lines = FakeClock(), []
  progress = reporting.PhaseProgress("final evaluation: batch", total, every=every,
                                     clock=clock, log=lambda fmt, *a: lines.append(fmt % a))
  return progress, clock, lines


def test_phase_progress_logs_count_and_eta_at_most_every_interval():
  progress, clock, lines = _phase(total=40)
  for done in range(1, 41):
    clock.now += 2.0  # 2 s an item: 80 s in all
    progress.update(done)
  assert progress.finish() == pytest.approx(80.0)
  # A line every 10 s (items 5, 10, ..., 35), not one per item, then the total time.
  assert len(lines) == 8
  assert lines[0] == "final evaluation: batch 5/40  ETA 1m10s"  # 35 items at 2 s
  assert lines[3] == "final evaluation: batch 20/40  ETA 40s"
  assert lines[-2] == "final evaluation: batch 35/40  ETA 10s"
  assert lines[-1] == "final evaluation: batch 40/40 in 1m20s"


def test_phase_progress_eta_follows_the_rate_so_far():
  progress, clock, lines = _phase(total=10)
  clock.now += 30.0  # one slow item (a compilation) ...
  progress.update(1)
  assert lines == ["final evaluation: batch 1/10  ETA 4m30s"]
  clock.now += 10.0  # ... then the rate so far: 2 items in 40 s
  progress.update(2)
  assert lines[-1] == "final evaluation: batch 2/10  ETA 2m40s"


def test_a_short_phase_logs_nothing():
  progress, clock, lines = _phase(total=4)
  for done in range(1, 5):
    clock.now += 1.0
    progress.update(done)
  progress.finish()
  assert lines == []


def test_phase_progress_without_a_total_counts_and_shows_the_time():
  progress, clock, lines = _phase(total=None)
  clock.now += 12.0
  progress.update(3)
  progress.finish()
  assert lines == ["final evaluation: batch 3  (12s so far)",
                   "final evaluation: batch 3 in 12s"]


def test_head_importance_logs_its_progress(monkeypatch, caplog):
  monkeypatch.setattr(reporting, "PHASE_EVERY_SECONDS", 0.0)  # a line per head
  shapes = {"encoder_self": (2, 3), "cross": (1, 2)}
  with caplog.at_level("INFO"), caplog.at_level("INFO", logger="absl"):
    attention_maps.head_importance(shapes, lambda masks: float(sum(m.sum() for m in
                                                                    masks.values())))
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("head imp")]
  assert lines[0].startswith("head importance: head 1/8  ETA ")
  assert [line.split()[3] for line in lines[:-1]] == [f"{n}/8" for n in range(1, 8)]
  assert lines[-1].startswith("head importance: head 8/8 in ")


# ----------------------------------------------------------------------------- the loop


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _run(tmp_path, monkeypatch, caplog, **eval_fields):
  """Trains tiny_config (20 steps, periodic evaluations at 10 and 20; the eval split is 2
  batches of 32) and returns (final metrics, metrics.jsonl records, the `evaluate` calls'
  decode_batches, the log)."""
  calls = []
  evaluate = train.evaluate

  def counting(*args, **kwargs):
    calls.append(kwargs.get("title"))
    return evaluate(*args, **kwargs)

  monkeypatch.setattr(train, "evaluate", counting)
  config = tiny_config(eval=dict(eval_every_steps=10, num_attention_images=0, **eval_fields))
  # The absl logger's own level too: a test earlier in the same worker may have lowered
  # absl's verbosity, and its records would then never reach caplog.
  with caplog.at_level("INFO"), caplog.at_level("INFO", logger="absl"):
    metrics = train.train_and_evaluate(config, str(tmp_path), devices=ONE_DEVICE)
  return metrics, _records(str(tmp_path)), calls, [r.getMessage() for r in caplog.records]


def test_final_evaluation_reuses_a_periodic_one_that_covered_the_split(
    tmp_path, monkeypatch, caplog):
  metrics, records, calls, log = _run(tmp_path, monkeypatch, caplog, num_decode_batches=0,
                                      num_eval_batches=0)
  assert calls == ["eval", "eval"]  # steps 10 and 20; the final one not run again
  periodic = [r for r in records if r["step"] == 20 and "eval/loss" in r][-1]
  final = [r for r in records if "final/loss" in r]
  assert [r["step"] for r in final] == [20]
  for name, value in metrics.items():
    assert final[0][f"final/{name}"] == periodic[f"eval/{name}"] == value
  assert "final/exact_match" in final[0] and "final/elapsed_seconds" in final[0]
  assert any("the evaluation at this step covered the whole eval split (2 batches)" in line
             for line in log)


def test_final_evaluation_runs_when_the_periodic_one_decoded_part_of_the_split(
    tmp_path, monkeypatch, caplog):
  metrics, records, calls, log = _run(tmp_path, monkeypatch, caplog, num_decode_batches=1)
  assert calls == ["eval", "eval", "final evaluation"]
  why = [line for line in log if line.startswith("final evaluation at step 20: the eval")]
  assert why == ["final evaluation at step 20: the evaluation at this step covered other "
                 "batches of the eval split (predictions on 1 of 2 batches, against all 2 "
                 "batches); evaluating"]
  periodic = [line for line in log if line.startswith("eval at step 20:")]
  assert "(predictions on 1 of 2 batches)" in periodic[0]
  final_line = [line for line in log if line.startswith("final evaluation at step 20: loss")]
  assert "predictions on" not in final_line[0]  # the whole split
  final = [r for r in records if "final/loss" in r]
  assert [r["step"] for r in final] == [20]
  assert final[0]["final/exact_match"] == metrics["exact_match"]
  # The loss is the same (both covered every batch); exact match now counts both batches.
  eval_20 = [r for r in records if r["step"] == 20 and "eval/loss" in r][-1]
  assert final[0]["final/loss"] == pytest.approx(eval_20["eval/loss"], rel=1e-6)


def test_a_bounded_final_decode_says_how_much_it_covered(tmp_path, monkeypatch, caplog):
  _, records, calls, log = _run(tmp_path, monkeypatch, caplog, num_decode_batches=0,
                                final_decode_batches=1)
  assert calls == ["eval", "eval", "final evaluation"]  # the periodic one decoded more
  final_line = [line for line in log if line.startswith("final evaluation at step 20: loss")]
  assert final_line[0].split("\n")[0].endswith("(predictions on 1 of 2 batches)")
  assert [r["step"] for r in records if "final/loss" in r] == [20]


def test_the_first_call_of_each_step_is_announced_as_a_compilation(
    tmp_path, monkeypatch, caplog):
  _, _, _, log = _run(tmp_path, monkeypatch, caplog)
  for step in ("train", "eval", "predict"):
    announced = [i for i, line in enumerate(log) if line == f"compiling the {step} step ..."]
    timed = [i for i, line in enumerate(log) if line.startswith(f"compiled the {step} step in ")]
    assert len(announced) == len(timed) == 1, step  # once, not at every call
    assert announced[0] < timed[0]
  first_step = next(i for i, line in enumerate(log) if line.startswith("step "))
  assert log.index("compiling the train step ...") < first_step


def test_the_final_evaluation_of_an_interrupted_periodic_schedule_is_run(
    tmp_path, monkeypatch, caplog):
  """No periodic evaluation at the last step (20 is not a multiple of 15): run it."""
  calls = []
  evaluate = train.evaluate
  monkeypatch.setattr(train, "evaluate",
                      lambda *a, **k: calls.append(k.get("title")) or evaluate(*a, **k))
  config = tiny_config(eval=dict(eval_every_steps=15, num_attention_images=0))
  train.train_and_evaluate(config, str(tmp_path), devices=ONE_DEVICE)
  assert calls == ["eval", "final evaluation"]
  assert np.isfinite([r["final/loss"] for r in _records(str(tmp_path))
                      if "final/loss" in r]).all()


def test_a_new_input_shape_is_announced_and_left_out_of_the_rate(caplog):
  """A call with inputs of shapes not seen before compiles again: announced and timed like
  the first compilation, naming the new shapes; the seconds of the calls that compiled
  (only theirs: not a repeated shape's) are handed to the loop once."""
  step = steps.AnnouncedCompile(
      jax.jit(lambda state, x: (state, sum(a.sum() for a in jax.tree.leaves(x)))), "the test step")
  with caplog.at_level("INFO"), caplog.at_level("INFO", logger="absl"):
    step(0, np.zeros((2, 3), np.float32))
    assert step.take_compile_seconds() > 0.0
    step(0, np.ones((2, 3), np.float32))
    assert step.take_compile_seconds() == 0.0
    step(0, {"x": np.zeros((2, 5), np.float32), "y": np.zeros((2, 3), np.float32)})
    assert step.take_compile_seconds() > 0.0
    assert step.take_compile_seconds() == 0.0
    step(0, {"x": np.ones((2, 5), np.float32), "y": np.ones((2, 3), np.float32)})
    assert step.take_compile_seconds() == 0.0
    step(0, np.zeros((2, 3), np.int32))  # a new dtype compiles too
    assert step.take_compile_seconds() > 0.0
  log = [r.getMessage() for r in caplog.records]
  assert log.count("compiling the test step ...") == 1
  again = [line for line in log if "new shapes" in line]
  assert again[0] == "compiling the test step for inputs of new shapes ([2, 5]) ..."
  assert again[1].startswith("compiled the test step for inputs of new shapes ([2, 5]) in ")
  assert again[2] == "compiling the test step for inputs of new shapes ([2, 3]) ..."
  assert len(again) == 4


def test_length_buckets_compile_again_outside_the_rate(tmp_path, monkeypatch, caplog):
  """With config.data.length_bucket the train step meets several batch lengths: each is
  announced, and the loop leaves every compilation out of the steps/s and ETA."""
  excluded, taken = [], []
  exclude, take = reporting.Progress.exclude, steps.AnnouncedCompile.take_compile_seconds
  monkeypatch.setattr(reporting.Progress, "exclude",
                      lambda self, seconds: excluded.append(seconds) or exclude(self, seconds))
  monkeypatch.setattr(steps.AnnouncedCompile, "take_compile_seconds",
                      lambda self: taken.append(take(self)) or taken[-1])
  config = tiny_config("classification", data=dict(length_bucket=2),
                       train=dict(num_train_steps=12), eval=dict(eval_every_steps=100))
  with caplog.at_level("INFO"), caplog.at_level("INFO", logger="absl"):
    train.train_and_evaluate(config, str(tmp_path), devices=ONE_DEVICE,
                             final_evaluation=False)
  again = [r.getMessage() for r in caplog.records
           if r.getMessage().startswith("compiled the train step for inputs of new shapes")]
  assert again, "the batches had one length: the test no longer tests buckets"
  compiled = [s for s in taken if s > 0.0]
  assert len(compiled) == 1 + len(again) and len(taken) == 12  # one take a call
  assert all(s in excluded for s in compiled)
