"""Multi-host data parallelism (jax.distributed) on one machine: two `main.py` processes of
two CPU devices each must train exactly like one process of four devices with the same
global batch, and the process flags must fail as one-line user errors."""

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import modes
import tasks
from benchmarks.run_record import cpu_device_flags
from input_pipeline import batching
from tests.cli_helpers import REPO, assert_one_error_line, run_main
from tests.test_classification import config_flags as classification_flags
from tests.test_classification import tiny_config as classification_config
from tests.test_classification import write_corpus
from tests.tiny_configs import tiny_config
from training import checkpointing, optimizers, steps

TIMEOUT = 240  # seconds for a whole group of processes; they are killed after it
# Four devices in all, a global batch of 16 rows (4 per device) for training and eval;
# dropout on, so each device's dropout key (folded from its global index) matters.
OVERRIDES = dict(
    train=dict(num_train_steps=6, log_every_steps=1, checkpoint_every_steps=3, batch_size=16),
    eval=dict(eval_every_steps=3, eval_batch_size=16, best_metric="loss"),
    data=dict(num_eval_examples=40),
    optim=dict(dropout_rate=0.1, warmup_steps=2, learning_rate=3e-3))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _tiny_flags():
  config = tiny_config(**OVERRIDES)
  fields = [("model", k) for k in ("d_model", "d_ff", "num_heads", "num_encoder_layers",
                                   "num_decoder_layers")]
  fields += [("data", k) for k in ("max_digits", "max_input_length", "max_target_length")]
  fields += [("eval", "num_print_examples")]
  fields += [(group, k) for group, values in OVERRIDES.items() for k in values]
  return [f"--config.{group}.{k}={config[group][k]}" for group, k in fields]


def _start(log, cpu_devices, *flags, env=None):
  """`python main.py *flags` with `cpu_devices` CPU devices, in the background (output to
  `log`: a pipe nobody reads could fill and stall the process), in `env` if given."""
  env = dict(env or os.environ, JAX_PLATFORMS="cpu")
  # not the tests' 8 devices (config.compute.cpu_devices sets them); their other flags
  env["XLA_FLAGS"] = cpu_device_flags(0, env.get("XLA_FLAGS", ""))
  with open(log, "w", encoding="utf-8") as out:
    return subprocess.Popen(
        [sys.executable, os.path.join(REPO, "main.py"), *flags,
         f"--config.compute.cpu_devices={cpu_devices}"],  # after any --config=FILE
        cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def _start_pair(logs, *flags, env=None):
  """Two processes of two CPU devices each, joined by jax.distributed."""
  port = _free_port()
  return [_start(log, 2, *flags, f"--coordinator_address=localhost:{port}",
                 "--num_processes=2", f"--process_id={i}", env=env)
          for i, log in enumerate(logs)]


# Imported by Python at start-up from PYTHONPATH: process 1's os._exit comes 2 s late.
_LATE_EXIT = """import os, sys, time
if "--process_id=1" in sys.argv:
  _exit = os._exit
  def _late_exit(status):
    time.sleep(2)
    _exit(status)
  os._exit = _late_exit
"""


def _wait(processes, logs):
  """Waits for every process (TIMEOUT in all); kills them all on a timeout or failure so
  that a process waiting on a collective can never hang the test run."""
  deadline = time.monotonic() + TIMEOUT
  try:
    for process, log in zip(processes, logs):
      try:
        code = process.wait(timeout=max(deadline - time.monotonic(), 1))
      except subprocess.TimeoutExpired:
        pytest.fail(f"{log}: still running after {TIMEOUT}s:\n{_tail(log)}")
      assert code == 0, f"{log}: exit {code}\n{_tail(log)}"
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.wait()


def _read(log) -> str:
  with open(log, encoding="utf-8", errors="replace") as f:
    return f.read()


def _tail(log) -> str:
  return _read(log)[-3000:]


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _series(records, key):
  return {r["step"]: r[key] for r in records if key in r}


def _restored(workdir, directory="checkpoints"):
  config = tiny_config(**OVERRIDES)
  template = jax.device_get(steps.create_state(
      tasks.get_task(config), optimizers.make_optimizer(config), config.seed))
  checkpoints = checkpointing.Checkpointer(workdir, keep=10, subdir=directory)
  try:
    return checkpoints.all_steps(), checkpoints.restore(template)
  finally:
    checkpoints.close()


def test_two_processes_train_like_one_process_with_their_devices(tmp_path):
  """2 processes x 2 devices == 1 process x 4 devices, same global batch: the same loss at
  every step, the same evaluation (each process scores the whole split), the same final
  parameters. Not bitwise: the cross-process sums (gloo) add in another order than
  in-process ones, so values differ in the last float32 bits (rtol 1e-5 is ~100 ulps,
  far below any real divergence such as a process training on its own)."""
  multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
  logs = [str(tmp_path / f"process{i}.log") for i in range(2)] + [str(tmp_path / "one.log")]
  processes = _start_pair(logs[:2], f"--workdir={multi}", *_tiny_flags())
  processes.append(_start(logs[2], 4, f"--workdir={single}", *_tiny_flags()))
  _wait(processes, logs)

  for i in range(2):
    assert f"2 local cpu device(s) in process {i} of 2" in _read(logs[i]), _tail(logs[i])
  with open(os.path.join(multi, "train.lock"), encoding="utf-8") as f:
    assert json.load(f)["pid"] == processes[0].pid  # process 0 held the workdir's lock
  a, b = _metrics(multi), _metrics(single)
  losses = _series(a, "train/loss")
  assert sorted(losses) == list(range(1, 7))
  np.testing.assert_allclose([losses[s] for s in range(1, 7)],
                             [_series(b, "train/loss")[s] for s in range(1, 7)], rtol=1e-5)
  for key in ("eval/loss", "eval/accuracy", "eval/exact_match", "final/loss",
              "final/accuracy", "final/perplexity"):
    x, y = _series(a, key), _series(b, key)
    assert sorted(x) == sorted(y) and x, key
    np.testing.assert_allclose([x[s] for s in sorted(x)], [y[s] for s in sorted(y)],
                               rtol=1e-5, err_msg=key)

  for directory in ("checkpoints", "best"):  # every process took part in the saves
    (steps_a, state_a), (steps_b, state_b) = _restored(multi, directory), _restored(
        single, directory)
    assert steps_a == steps_b and int(state_a.step) == int(state_b.step)
    for x, y in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params),
                    strict=True):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  with open(os.path.join(multi, "best", "best.json"), encoding="utf-8") as f:
    assert json.load(f)["step"] in (3, 6)


def test_two_processes_on_real_files_build_the_tokenizer_once_and_score_the_split(tmp_path):
  """Classification on generated .tsv files: process 0 prepares the data and trains the
  sentencepiece model and label list into the workdir, the other reads them; training and
  --mode=eval in two processes score the whole dev split exactly as one process does on
  the same checkpoint (accuracy and the corpus-level macro F1)."""
  write_corpus(tmp_path / "corpus", sizes=(("train", 200), ("dev", 50)))
  config = classification_config(tmp_path / "corpus", tmp_path / "tfds",
                                 train=dict(num_train_steps=4, log_every_steps=2,
                                            checkpoint_every_steps=4),
                                 eval=dict(eval_every_steps=2))
  workdir = str(tmp_path / "run")
  flags = [f"--config={REPO}/configs/classification.py", f"--workdir={workdir}",
           *classification_flags(config), "--config.train.num_train_steps=4",
           "--config.data.length_bucket=0",  # buckets are one process's (a config error)
           "--config.train.log_every_steps=2", "--config.eval.eval_every_steps=2",
           "--config.train.checkpoint_every_steps=4"]
  logs = [str(tmp_path / f"train{i}.log") for i in range(2)]
  _wait(_start_pair(logs, *flags), logs)
  assert ("preparing the dataset" in _read(logs[0])
          and "preparing the dataset" not in _read(logs[1]))
  assert sorted(n for n in os.listdir(workdir) if not os.path.isdir(os.path.join(workdir, n))
                ) == ["config.json", "labels.json", "metrics.jsonl", "tokenizer.model",
                      "train.lock"]

  logs = [str(tmp_path / f"eval{i}.log") for i in range(2)]
  _wait(_start_pair(logs, *flags, "--mode=eval", "--checkpoint=best"), logs)
  [report] = glob.glob(os.path.join(workdir, "eval", "validation-best-*.json"))
  with open(report, encoding="utf-8") as f:
    multi = json.load(f)
  os.remove(report)
  single = modes.evaluate_checkpoint(config, workdir, devices=jax.local_devices()[:4],
                                     checkpoint="best")
  assert multi["examples"] == 50 and np.sum(multi["confusion_matrix"]) == 50
  assert multi["metrics"] == pytest.approx(single, rel=1e-6)
  # The final evaluation scores the last step's parameters (step 4), which the best
  # checkpoint (by accuracy) need not hold.
  last = modes.evaluate_checkpoint(config, workdir, devices=jax.local_devices()[:4],
                                   checkpoint="latest")
  final = {k: v for r in _metrics(workdir) for k, v in r.items() if k.startswith("final/")}
  assert final["final/accuracy"] == pytest.approx(last["accuracy"], rel=1e-6)
  assert final["final/macro_f1"] == pytest.approx(last["macro_f1"], rel=1e-6)


def test_a_signal_to_one_process_stops_both_at_one_step_and_both_resume(tmp_path):
  """SIGTERM to process 1 only: both processes agree on the step (at a multiple of
  signal_check_every_steps), save one checkpoint with each process's data position, and
  exit 4; started again, both restore it and end like an uninterrupted 4-device run.
  Process 1 exits 2 s after process 0 would: without the processes' shutdown barrier
  (main.py `_exit`), process 0 closes the coordination service first and process 1's
  client aborts it (SIGABRT, exit -6; once in CI by chance, every time with the delay)."""
  steps = 40
  flags = [*_tiny_flags(), f"--config.train.num_train_steps={steps}",
           "--config.train.checkpoint_every_steps=1000",
           "--config.eval.eval_every_steps=1000", "--config.eval.best_metric=",
           "--config.train.signal_check_every_steps=2"]
  multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
  logs = [str(tmp_path / f"process{i}.log") for i in range(2)]
  (tmp_path / "late_exit").mkdir()
  (tmp_path / "late_exit" / "sitecustomize.py").write_text(_LATE_EXIT)
  late = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(tmp_path / "late_exit"), *filter(None, [os.environ.get("PYTHONPATH")])]))
  pair = _start_pair(logs, f"--workdir={multi}", *flags, env=late)
  try:
    deadline = time.monotonic() + TIMEOUT
    while not os.path.exists(os.path.join(multi, "metrics.jsonl")) or not _metrics(multi):
      assert time.monotonic() < deadline and all(p.poll() is None for p in pair), (
          _tail(logs[0]))
      time.sleep(0.05)
    pair[1].send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=TIMEOUT) for p in pair]
  finally:
    for p in pair:
      if p.poll() is None:
        p.kill()
  assert codes == [4, 4], [_tail(log) for log in logs]
  stopped = [line for log in logs for line in _read(log).splitlines()
             if line.startswith("stopped:")]
  assert len(stopped) == 2 and stopped[0] == stopped[1], stopped
  step = int(stopped[0].split("after step ")[1].split(";")[0])
  assert 0 < step < steps and step % 2 == 0, stopped
  data = os.path.join(multi, "checkpoints", str(step), "data")
  assert sorted(os.listdir(data)) == ["commit_success.txt", "process_0-of-2.json",
                                      "process_1-of-2.json"]

  logs2 = [str(tmp_path / f"again{i}.log") for i in range(2)] + [str(tmp_path / "one.log")]
  processes = _start_pair(logs2[:2], f"--workdir={multi}", *flags)
  processes.append(_start(logs2[2], 4, f"--workdir={single}", *flags))
  _wait(processes, logs2)
  for log in logs2[:2]:
    assert f"resumed from the checkpoint at step {step}" in _read(log), _tail(log)
  a, b = _restored(multi)[1], _restored(single)[1]
  assert int(a.step) == int(b.step) == steps
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)  # gloo's sum order: see above


@pytest.mark.parametrize("shuffle, repeat", [(True, True), (False, False)])
def test_processes_read_their_rows_of_the_single_process_batches(shuffle, repeat):
  """Process p's batch k is rows [p*b, (p+1)*b) of the batch one process would read, so
  the global batch does not depend on the process count (one pass: 21 examples in
  global batches of 8, the last one partly empty in both processes)."""

  class Numbered:
    def __len__(self):
      return 21

    def __getitem__(self, i):
      return {"inputs": np.full(3, i + 1, np.int32), "index": np.int32(i)}

  def batches(index, count):
    dataset = batching.batched_dataset(
        Numbered(), batch_size=8 // count, num_devices=2, lengths={"inputs": 4},
        shuffle=shuffle, seed=3, repeat=repeat, process_index=index, process_count=count)
    return list(batching.iterate(dataset, limit=5 if repeat else None))

  whole = batches(0, 1)
  halves = [batches(0, 2), batches(1, 2)]
  assert len(whole) == len(halves[0]) == len(halves[1]) == (5 if repeat else 3)
  for k, batch in enumerate(whole):
    for key in batch:
      joined = np.concatenate([halves[0][k][key], halves[1][k][key]])  # [4, 2, ...]
      np.testing.assert_array_equal(joined, batch[key].reshape(joined.shape))


@pytest.mark.parametrize("args, expected", [
    (["--num_processes=2", "--process_id=2", "--coordinator_address=localhost:1"],
     "--process_id=2 is invalid: expected 0 to 1"),
    (["--num_processes=2", "--process_id=0"], "--coordinator_address missing"),
    (["--num_processes=0", "--process_id=0", "--coordinator_address=localhost:1"],
     "--num_processes=0 is invalid"),
    (["--distributed", "--coordinator_address=localhost"],
     "--coordinator_address='localhost' is invalid: expected host:port"),
    (["--distributed", "--mode=average"], "--mode=average runs in one process"),
    (["--distributed"], "cannot start the multi-process runtime"),  # no cluster here
])
def test_bad_process_flags_are_one_line_errors(tmp_path, monkeypatch, args, expected):
  for name in list(os.environ):  # a CI job under SLURM or mpirun must not be detected
    if name.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR")):
      monkeypatch.delenv(name)
  assert_one_error_line(run_main(f"--workdir={tmp_path / 'run'}", *args), expected)
  assert not (tmp_path / "run").exists()
