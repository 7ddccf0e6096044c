"""Stop signals outside the training step, the memory estimate, and evaluation on a loaded
CPU: real `main.py` processes (signals, exit codes, what is left on disk) and the pure
parts (training/memory.py, training/preemption.py) in process."""

import glob
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

import tasks
import train
from benchmarks import fault_injection
from benchmarks.run_record import cpu_device_flags
from configs import classification, default, generation, translation
from tests import test_generation
from tests.cli_helpers import REPO, assert_one_error_line, run_main
from tests.tiny_configs import tiny_config
from training import memory, preemption

GIB = 1024**3
# A tiny translation model on short digit strings, as command-line flags.
TINY = ["--config.model.d_model=32", "--config.model.d_ff=64", "--config.model.num_heads=2",
        "--config.model.num_encoder_layers=1", "--config.model.num_decoder_layers=1",
        "--config.data.max_digits=5", "--config.data.max_input_length=8",
        "--config.data.max_target_length=8", "--config.eval.num_print_examples=0",
        "--config.eval.num_attention_images=0", "--config.eval.eval_batch_size=32"]
LONG_EVAL = "--config.data.num_eval_examples=400000"  # minutes of decoding on a CPU
SIGNAL_BOUND = 30.0  # seconds a stopped process may take after the signal (a loaded CPU)


def _start(workdir, *flags, log):
  """`python main.py` on one CPU device, stdout and stderr into the file `log`."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = cpu_device_flags(0, env.get("XLA_FLAGS", ""))
  with open(log, "w", encoding="utf-8") as out:
    return subprocess.Popen([sys.executable, os.path.join(REPO, "main.py"),
                             f"--workdir={workdir}", *flags], cwd=REPO, env=env,
                            stdout=out, stderr=subprocess.STDOUT, text=True)


def _read(log):
  with open(log, encoding="utf-8", errors="replace") as f:
    return f.read()


def _wait_for_text(log, text, process, timeout=300.0):
  """Waits until `text` is in the log; fails if the process ends first."""
  end = time.time() + timeout
  while time.time() < end:
    if text in _read(log):
      return
    assert process.poll() is None, _read(log)[-3000:]
    time.sleep(0.05)
  process.kill()
  raise AssertionError(f"{text!r} never came: {_read(log)[-3000:]}")


def _signal_and_wait(process, signum, log):
  """Sends `signum`; (exit status, seconds it took, the last output line)."""
  sent = time.time()
  process.send_signal(signum)
  try:
    status = process.wait(timeout=SIGNAL_BOUND * 4)
  except subprocess.TimeoutExpired:
    process.kill()
    process.wait()
    raise AssertionError(f"still running {SIGNAL_BOUND * 4} s after {signum!r}: "
                         f"{_read(log)[-3000:]}")
  lines = _read(log).strip().splitlines()
  return status, time.time() - sent, lines[-1] if lines else ""


def _checkpoint_steps(workdir):
  """The steps of `workdir`'s checkpoints, each restored and checked (raises if not)."""
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return []
  return fault_injection.readable_steps(workdir)


# ----------------------------------------------------------------------------- signals


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_during_a_periodic_evaluation_saves_the_step_and_exits_4(tmp_path, signum):
  """The evaluation after step 5 would decode 400k examples; the signal stops it between
  two batches, the step (not due for a checkpoint) is saved complete, and the run exits 4
  with its one line, long before the evaluation could have finished."""
  workdir, log = str(tmp_path / "run"), str(tmp_path / "log.txt")
  process = _start(workdir, *TINY, LONG_EVAL, "--config.train.num_train_steps=1000",
                   "--config.train.log_every_steps=5", "--config.eval.eval_every_steps=5",
                   "--config.train.checkpoint_every_steps=1000", log=log)
  _wait_for_text(log, "step 5/1000", process)
  time.sleep(3)  # into the evaluation
  status, seconds, last = _signal_and_wait(process, signum, log)
  name = signal.Signals(signum).name
  assert status == preemption.EXIT_PREEMPTED, _read(log)[-3000:]
  assert seconds < SIGNAL_BOUND, (seconds, _read(log)[-3000:])
  assert last.startswith(f"stopped: stopped by {name} after step 5; its checkpoint is "
                         f"complete"), last
  assert "eval at step 5:" not in _read(log)  # it did not run to its end
  assert _checkpoint_steps(workdir) == [5]


def test_a_signal_while_the_first_batch_is_built_stops_at_once_with_nothing_to_save(
    tmp_path):
  """A batch of 1.5M examples takes a minute or more to build in Python; SIGTERM during
  it ends the run within seconds (exit 4, a line saying nothing needed saving), with no
  checkpoint and no step run."""
  workdir, log = str(tmp_path / "run"), str(tmp_path / "log.txt")
  process = _start(workdir, *TINY, "--config.train.batch_size=1500000",
                   "--config.train.grad_accum_steps=1000",  # small micro-batches: it fits
                   "--config.data.data_threads=1", "--config.data.data_prefetch=1",
                   "--config.data.device_prefetch=0", log=log)
  _wait_for_text(log, "parameters:", process)  # the loop starts building its first batch
  time.sleep(3)
  status, seconds, last = _signal_and_wait(process, signal.SIGTERM, log)
  assert status == preemption.EXIT_PREEMPTED, _read(log)[-3000:]
  assert seconds < SIGNAL_BOUND, (seconds, _read(log)[-3000:])
  assert last.startswith("stopped: stopped by SIGTERM while building the batch of step 1; "
                         "nothing needed saving"), last
  assert _checkpoint_steps(workdir) == []
  assert "step 1/" not in _read(log)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir with a 2-step checkpoint of the TINY model."""
  workdir = str(tmp_path_factory.mktemp("trained") / "run")
  result = run_main(f"--workdir={workdir}", *TINY, "--config.train.num_train_steps=2",
                    "--config.data.num_eval_examples=32")
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_sigterm_during_eval_mode_stops_at_once_and_writes_no_report(trained, tmp_path):
  log = str(tmp_path / "log.txt")
  process = _start(trained, "--mode=eval", *TINY, LONG_EVAL, log=log)
  _wait_for_text(log, "device(s) in process", process)
  time.sleep(5)  # restoring, compiling or evaluating: all stop at once
  status, seconds, last = _signal_and_wait(process, signal.SIGTERM, log)
  assert status == preemption.EXIT_PREEMPTED, _read(log)[-3000:]
  assert seconds < SIGNAL_BOUND, (seconds, _read(log)[-3000:])
  assert last.startswith("stopped: stopped by SIGTERM while "), last
  assert "nothing needed saving" in last
  assert not glob.glob(os.path.join(trained, "eval", "*.json"))
  assert _checkpoint_steps(trained) == [2]  # untouched


def _python(code):
  """Runs `code` in a fresh interpreter at the repo root; (status, stdout, stderr)."""
  result = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {REPO!r})\n"
                           + code], capture_output=True, text=True, timeout=120, cwd=REPO)
  return result.returncode, result.stdout, result.stderr


def test_an_interrupting_request_raises_stopped_and_a_nested_one_shares_the_flag():
  status, out, err = _python(
      "import signal\n"
      "from training import preemption\n"
      "with preemption.StopRequest(interrupt=True, doing='reading') as outer:\n"
      "  try:\n"
      "    signal.raise_signal(signal.SIGHUP)\n"
      "    print('not stopped')\n"
      "  except preemption.Stopped as e:\n"
      "    print('stopped:', e)\n"
      "with preemption.StopRequest(interrupt=True) as outer:\n"
      "  with preemption.StopRequest() as inner:\n"  # the training loop's: flag only
      "    signal.raise_signal(signal.SIGTERM)\n"
      "    print('flag', inner.signum, preemption.current() is inner)\n"
      "  print('outer', outer.signum)\n"
      "  try:\n"
      "    preemption.check('evaluating')\n"
      "  except preemption.Stopped as e:\n"
      "    print('checked:', e)\n")
  assert status == 0, err
  lines = out.splitlines()
  assert lines[0].startswith("stopped: stopped by SIGHUP while reading; nothing needed"), out
  assert lines[1] == f"flag {int(signal.SIGTERM)} True", out
  assert lines[2] == f"outer {int(signal.SIGTERM)}", out
  assert lines[3].startswith("checked: stopped by SIGTERM while evaluating"), out
  assert "SIGHUP received: stopping now" in err


def test_sighup_is_caught_like_sigterm():
  assert signal.SIGHUP in preemption.SIGNALS
  assert issubclass(preemption.Stopped, BaseException)
  assert not issubclass(preemption.Stopped, Exception)  # `except Exception` lets it through


# ----------------------------------------------------------------------------- memory


@pytest.mark.parametrize("flag, field", [
    ("--config.train.batch_size=100000000", "config.train.batch_size=100000000"),
    ("--config.eval.eval_batch_size=100000000", "config.eval.eval_batch_size=100000000")])
def test_an_absurd_batch_size_is_one_line_before_any_work(tmp_path, flag, field):
  workdir = tmp_path / "run"
  start = time.time()
  result = run_main(f"--workdir={workdir}", flag)
  line = assert_one_error_line(result, field, "GiB of host memory", "GiB available",
                               "estimated from the config")
  assert time.time() - start < 120, line  # no batch was built (that takes hours)
  assert not workdir.exists()  # nothing was written


def test_the_estimate_counts_batches_and_grows_with_the_batch():
  config = tiny_config()
  lengths = tasks.TASKS[config.task].batch_lengths(config)
  assert lengths == {"inputs": 8, "targets": 8}
  small = memory.training_need(config, lengths, 16, num_devices=1)
  config.train.batch_size *= 1000
  large = memory.training_need(config, lengths, 16, num_devices=1)
  rows = config.train.batch_size
  held = config.data.data_prefetch + 1
  # at least the padded int32 rows of every batch held, and the examples' objects
  assert large.host >= held * rows * 16 * 4 + rows * (memory.EXAMPLE_BYTES +
                                                      2 * memory.FIELD_BYTES)
  assert large.host > 900 * small.host and large.device > 100 * small.device
  # split over devices or micro-batches, the activations per device shrink
  assert memory.training_need(config, lengths, 16, num_devices=8).device < large.device
  config.train.grad_accum_steps = 10
  assert memory.training_need(config, lengths, 16, num_devices=1).device < large.device


def test_parameter_count_is_a_lower_bound_of_the_real_one():
  import jax  # pylint: disable=g-import-not-at-top
  for task in ("translation", "generation", "classification"):
    config = tiny_config(task)
    task_object = tasks.get_task(config)
    shapes = jax.eval_shape(task_object.init_params, jax.random.PRNGKey(0))
    real = sum(x.size for x in jax.tree.leaves(shapes))
    fewest = train._fewest_ids(config)  # pylint: disable=protected-access
    estimate = memory.parameter_count(config, fewest)
    assert real * 0.25 < estimate <= real, (task, estimate, real)


def test_check_fits_names_the_field_the_estimate_and_the_limit():
  config = tiny_config()
  lengths = tasks.TASKS[config.task].batch_lengths(config)
  devices = [object()]
  memory.check_fits(config, lengths, 16, devices, host_limit=None, device_limit=None)
  with pytest.raises(train.ConfigError,
                     match=r"config.train.batch_size=16 is invalid: a batch and its step "
                           r"need at least .* of host memory \(CPU devices share it\), more "
                           r"than the 0.0625 MiB available"):
    memory.check_fits(config, lengths, 16, devices, host_limit=2**16, device_limit=None)
  with pytest.raises(train.ConfigError, match=r"eval_batch_size=32 .* on each device, more "
                                              r"than its 0.0977 MiB"):
    memory.check_fits(config, lengths, 16, devices, training=False, host_limit=None,
                      device_limit=100 * 1024)


def _recipes():
  """Every config file's configs, its variants for sizes and accelerators included."""
  for module, variants in ((default, ["", "task=generation", "task=classification"]),
                           (translation, [""]), (generation, ["", "dataset=lm1b"]),
                           (classification, [""])):
    for variant in variants:
      for extra in ("", "size=small", "size=base,accel=gpu", "size=big,accel=gpu"):
        arg = ",".join(filter(None, (variant, extra)))
        yield f"{module.__name__}:{arg}", module.get_config(arg or None)


def test_no_recipe_is_refused_on_a_small_machine():
  """Each recipe, base and big on a GPU included, fits 8 GiB of host memory and a 16 GiB
  accelerator by the estimate (a lower bound: it must never refuse what runs)."""
  for name, config in _recipes():
    lengths = tasks.TASKS[config.task].batch_lengths(config)
    vocab = train._fewest_ids(config)  # pylint: disable=protected-access
    on_gpu = config.accel != "cpu"
    try:
      memory.check_fits(config, lengths, vocab, [object()], host_limit=8 * GIB,
                        device_limit=16 * GIB if on_gpu else None)
    except train.ConfigError as e:
      raise AssertionError(f"{name}: {e}") from None


def test_available_host_memory_is_measured():
  available = memory.available_host_bytes()
  assert available is None or 0 < available < 2**50


# ----------------------------------------------------------------------------- a loaded CPU


def test_main_makes_the_cpu_collective_timeout_generous_unless_given():
  code = ("import os, sys\n"
          "sys.argv = ['main.py', '--workdir=unused']\n"
          "import main\n"
          "from tests.tiny_configs import tiny_config\n"
          "c = tiny_config(compute=dict(cpu_devices=2))\n"
          "os.environ['XLA_FLAGS'] = '--xla_cpu_collective_call_terminate_timeout_seconds=7'\n"
          "main._set_cpu_devices(c)\n"
          "print(os.environ['XLA_FLAGS'])\n"
          "os.environ.pop('XLA_FLAGS')\n"
          "main._set_cpu_devices(c)\n"
          "print(os.environ['XLA_FLAGS'])\n")
  status, out, err = _python(code)
  assert status == 0, err
  given, default_flags = out.splitlines()
  assert given.split() == ["--xla_cpu_collective_call_terminate_timeout_seconds=7",
                           "--xla_force_host_platform_device_count=2",
                           "--xla_cpu_collective_call_warn_stuck_timeout_seconds=120"]
  assert "--xla_cpu_collective_call_terminate_timeout_seconds=600" in default_flags.split()


def test_eval_of_a_long_split_on_two_cpu_devices_passes_on_a_loaded_machine(tmp_path):
  """The tiny-Shakespeare case: --mode=eval --split=train with cpu_devices=2 while
  busy-loop processes keep every core loaded exits 0 with its scores."""
  text = "".join(f"line {i}: {test_generation.POEM}" for i in range(400))  # ~45 KB
  data = test_generation.write_text(tmp_path / "data", text)
  config = test_generation.tiny_config(data, tmp_path / "tfds")
  flags = test_generation.cli_flags(config, tmp_path / "run")
  flags += ["--config.compute.cpu_devices=2", "--config.train.num_train_steps=2",
            "--config.eval.eval_batch_size=8"]
  result = run_main(*flags, "--config.eval.num_attention_images=0")  # (training: not read)
  assert result.returncode == 0, result.stderr[-3000:]
  busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
          for _ in range(2 * (os.cpu_count() or 2))]
  try:
    result = run_main(*flags, "--mode=eval", "--split=train")
  finally:
    for process in busy:
      process.kill()
      process.wait()
  assert result.returncode == 0, result.stderr[-3000:]
  reports = glob.glob(str(tmp_path / "run" / "eval" / "train-latest-step2.json"))
  assert reports, result.stdout
  with open(reports[0], encoding="utf-8") as f:
    report = json.load(f)
  assert math.isfinite(report["metrics"]["loss"]) and report["metrics"]["loss"] > 0
