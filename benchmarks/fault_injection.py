"""Interrupts a training run again and again, then checks that nothing was lost.

    python benchmarks/fault_injection.py --workdir=/tmp/faults --faults=30 -- \
        --config=configs/default.py --config.train.num_train_steps=400 \
        --config.train.checkpoint_every_steps=2

Starts `python main.py --workdir=W <flags after -->` and, each time, injects one fault:
  sigterm            SIGTERM once training has written a new checkpoint (expect exit 4)
  sigterm_twice      two SIGTERMs 0.1 s apart (exit 128+15, or 4 if the first finished)
  kill_during_write  SIGKILL while a checkpoint's temporary directory exists
  kill_random        SIGKILL 0-0.3 s after a new checkpoint appeared
  kill_starting      SIGKILL 0.5-6 s after the start (imports, restore, compilation)
  second_trainer     a second `main.py` training on the same workdir once the first has
                     saved: it must be refused at once (exit 2, one line naming the
                     holder); then SIGTERM to the first (exit 4)
  eval_beside        `--mode=eval` run twice beside the live trainer (each exit 0): a
                     reader must not disturb the trainer's saves; then SIGTERM (exit 4)
  flip_bits          with no trainer running, one bit of an array file of the newest
                     checkpoint is flipped where the checkpoint still decodes (flip_byte):
                     `--mode=eval` must exit 2 naming that step as damaged; the step is
                     then moved aside, as the message advises
After each fault every checkpoint on disk must restore (finite parameters, the right
step, contents equal to their checksums) and the newest step must not go back. Then the
run is finished with one more start, and (with --reference) compared bitwise with an
uninterrupted run of the same flags.
Prints a table and writes it as JSON to --output. tests/test_faults.py runs this on a
tiny model.
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from typing import List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import run_record  # noqa: E402  (no JAX)

FAULTS = ("sigterm", "kill_during_write", "kill_random", "kill_starting", "sigterm_twice",
          "second_trainer", "eval_beside", "flip_bits")


def start(workdir: str, flags: List[str], log=subprocess.PIPE) -> subprocess.Popen:
  """`python main.py` on one CPU device (the device-count flag dropped from XLA_FLAGS),
  output to `log`."""
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  env["XLA_FLAGS"] = run_record.cpu_device_flags(0, env.get("XLA_FLAGS", ""))
  return subprocess.Popen([sys.executable, os.path.join(REPO, "main.py"),
                           f"--workdir={workdir}", *flags], cwd=REPO, env=env,
                          stdout=log, stderr=subprocess.STDOUT, text=True)


def run_beside(workdir: str, flags: List[str]) -> dict:
  """Another `main.py` on `workdir` (flags include the mode) to its end: exit and last line."""
  process = start(workdir, flags)
  output, _ = process.communicate(timeout=300)
  lines = output.strip().splitlines()
  return {"exit": process.returncode, "last_line": lines[-1] if lines else ""}


def _decoded_arrays(state_dir: str) -> Optional[list]:
  """The arrays of a checkpoint's state item as orbax decodes them, without the checksums;
  None if they do not decode."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  try:
    with ocp.PyTreeCheckpointer() as reader:
      return [np.asarray(x) for x in jax.tree.leaves(reader.restore(state_dir))]
  except Exception:  # pylint: disable=broad-except  # any failure to decode
    return None


def flip_byte(workdir: str, step: int, rng: random.Random, tries: int = 20) -> str:
  """Flips one bit of checkpoint `step`'s array files where the checkpoint still decodes
  but an array's value changed, so that only the checksums can tell; returns the file.

  The value files are zstd frames: a bit flipped in coded data may instead make
  decompression fail, and OCDBT's tree nodes carry CRC-32C checksums of their own; both are
  damage any reader notices. So each file, largest first, gets up to `tries` flips in its
  middle half, each put back unless the arrays still decode and differ. If none does, the
  largest file keeps one such flip (a damage that does not decode)."""
  state_dir = os.path.join(os.path.abspath(workdir), "checkpoints", str(step), "state")
  files = sorted((os.path.join(root, name) for root, _, names in os.walk(state_dir)
                  for name in names
                  if os.sep + "d" + os.sep in os.path.join(root, name) + os.sep),
                 key=os.path.getsize, reverse=True)
  before = _decoded_arrays(state_dir)

  def flip(path: str, intact: bytes) -> None:
    data = bytearray(intact)
    data[rng.randrange(len(data) // 4, 3 * len(data) // 4)] ^= 1 << rng.randrange(8)
    with open(path, "wb") as f:
      f.write(data)

  for path in files if before is not None else []:
    with open(path, "rb") as f:
      intact = f.read()
    for _ in range(tries):
      flip(path, intact)
      after = _decoded_arrays(state_dir)
      if after is not None and any(a.tobytes() != b.tobytes() for a, b in zip(before, after)):
        return path
    with open(path, "wb") as f:
      f.write(intact)
  with open(files[0], "rb") as f:
    flip(files[0], f.read())
  return files[0]


def entries(directory: str) -> List[str]:
  return os.listdir(directory) if os.path.isdir(directory) else []


def wait_for(predicate, process: subprocess.Popen, timeout: float = 300.0) -> bool:
  """Polls `predicate` every 2 ms; False if the process ended first."""
  end = time.time() + timeout
  while time.time() < end:
    if predicate():
      return True
    if process.poll() is not None:
      return False
    time.sleep(0.002)
  raise TimeoutError("the training process made no progress")


def saved_config(workdir: str):
  import ml_collections  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f))


def restore(workdir: str, step: Optional[int] = None):
  """A checkpoint of `workdir` as a host TrainState (the model from its config.json)."""
  import jax  # pylint: disable=g-import-not-at-top
  import tasks  # pylint: disable=g-import-not-at-top
  from training import checkpointing, optimizers, steps  # pylint: disable=g-import-not-at-top
  config = saved_config(workdir)
  template = jax.device_get(steps.create_state(
      tasks.get_task(config, workdir, training=False), optimizers.make_optimizer(config),
      config.seed))
  checkpoints = checkpointing.Checkpointer.for_reading(workdir)
  try:
    return checkpoints.restore(template, step)
  finally:
    checkpoints.close()


def readable_steps(workdir: str) -> List[int]:
  """Every checkpoint step of `workdir`, each restored and checked (raises if one fails)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from training import checkpointing  # pylint: disable=g-import-not-at-top
  checkpoints = checkpointing.Checkpointer.for_reading(workdir)
  steps = checkpoints.all_steps()
  checkpoints.close()
  for step in steps:
    state = restore(workdir, step)
    if int(state.step) != step:
      raise AssertionError(f"checkpoint {step} holds step {int(state.step)}")
    if not all(np.isfinite(x).all() for x in jax.tree.leaves(state.params)):
      raise AssertionError(f"checkpoint {step} holds non-finite parameters")
  return sorted(steps)


def inject(fault: str, workdir: str, flags: List[str], rng: random.Random, newest: int,
           log_path: str) -> dict:
  """Starts training, injects `fault`, waits for the process; returns what happened."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  writing, beside = None, []
  if fault == "flip_bits":
    return _damage(workdir, flags, rng, newest)
  with open(log_path, "w", encoding="utf-8") as log:
    process = start(workdir, flags, log)
    try:
      if fault == "kill_starting":
        time.sleep(rng.uniform(0.5, 6.0))
        process.kill()
      else:
        progressed = wait_for(lambda: any(e.isdigit() and int(e) > newest
                                          for e in entries(directory)), process)
        if not progressed:  # it ended (finished, or failed): reported below
          pass
        elif fault == "kill_during_write":
          wait_for(lambda: any("tmp" in e for e in entries(directory)), process)
          writing = any("tmp" in e for e in entries(directory))
          process.kill()
        elif fault == "kill_random":
          time.sleep(rng.uniform(0.0, 0.3))
          process.kill()
        elif fault in ("sigterm", "second_trainer", "eval_beside"):
          if fault == "second_trainer":
            beside.append(run_beside(workdir, flags))
          elif fault == "eval_beside":
            beside += [run_beside(workdir, flags + ["--mode=eval"]) for _ in range(2)]
          process.send_signal(signal.SIGTERM)
        elif fault == "sigterm_twice":
          # 1 ms apart, both would reach Python's handler as one signal; 0.1 s lets the
          # first be handled, so the second lands during the step or the save.
          process.send_signal(signal.SIGTERM)
          time.sleep(0.1)
          process.send_signal(signal.SIGTERM)
        else:
          raise ValueError(f"unknown fault {fault!r}")
      code = process.wait(timeout=300)
    finally:
      if process.poll() is None:
        process.kill()
  with open(log_path, encoding="utf-8") as f:
    output = f.read()
  expected = {"sigterm": (4,), "sigterm_twice": (128 + signal.SIGTERM, 4),
              "second_trainer": (4,), "eval_beside": (4,)}.get(fault, (-signal.SIGKILL,))
  if fault == "second_trainer":
    expected_beside = [(2, "is in use by another training run (process")]
  else:
    expected_beside = [(0, "")] * len(beside)
  steps = readable_steps(workdir)
  return {"fault": fault, "exit": code, "expected_exit": code in expected and all(
              b["exit"] == e and t in b["last_line"]
              for b, (e, t) in zip(beside, expected_beside)) and len(beside) == len(
                  expected_beside),
          "beside": beside,
          "checkpoint_being_written": writing, "steps": steps,
          "newest_went_back": bool(steps) and steps[-1] < newest,
          "stopped_line": next((line for line in output.splitlines()
                                if line.startswith("stopped:")), ""),
          "tail": output[-2000:] if code not in expected else ""}


def _damage(workdir: str, flags: List[str], rng: random.Random, newest: int) -> dict:
  """flip_bits: damages the newest checkpoint; eval must name it, then it is moved aside
  (the newest step goes back by design: that is not counted as lost)."""
  steps = readable_steps(workdir)
  if not steps:
    return {"fault": "flip_bits", "exit": None, "expected_exit": True, "steps": steps,
            "newest_went_back": False, "checkpoint_being_written": None, "beside": [],
            "stopped_line": "", "tail": "no checkpoint to damage yet"}
  path = flip_byte(workdir, steps[-1], rng)
  result = run_beside(workdir, flags + ["--mode=eval"])
  named = (f"checkpoint step {steps[-1]} in" in result["last_line"]
           and "is damaged" in result["last_line"])
  step_dir = os.path.join(os.path.abspath(workdir), "checkpoints", str(steps[-1]))
  os.replace(step_dir, os.path.join(os.path.dirname(os.path.abspath(workdir)),
                                    f"damaged-{os.path.basename(workdir)}-{steps[-1]}"))
  left = readable_steps(workdir)
  return {"fault": "flip_bits", "exit": result["exit"],
          "expected_exit": result["exit"] == 2 and named, "damaged_file": path,
          "beside": [result], "steps": left, "newest_went_back": False,
          "checkpoint_being_written": None, "stopped_line": "",
          "tail": "" if named else result["last_line"]}


def run(workdir: str, flags: List[str], faults: List[str], seed: int = 0,
        log_path: Optional[str] = None) -> dict:
  """Injects each of `faults` in turn (stopping early if training finishes), then runs to
  the end. Returns {"faults": [per-fault records], "final_exit": ..., "lost": ...}."""
  rng = random.Random(seed)
  log_path = log_path or os.path.join(tempfile.mkdtemp(prefix="faults-"), "log.txt")
  records, newest, lost = [], 0, 0
  for fault in faults:
    record = inject(fault, workdir, flags, rng, newest, log_path)
    records.append(record)
    # A checkpoint is lost if a step that was on disk is gone and nothing newer replaced
    # it; retention (keep_checkpoints) removes old steps only after newer ones exist.
    if fault == "flip_bits":  # the damaged newest step was moved aside on purpose
      newest = record["steps"][-1] if record["steps"] else 0
    elif record["steps"]:
      lost += int(record["newest_went_back"])
      newest = max(newest, record["steps"][-1])
    if record["exit"] == 0:
      break
  with open(log_path, "w", encoding="utf-8") as log:
    final = start(workdir, flags, log)
    code = final.wait()
  return {"faults": records, "final_exit": code, "lost": lost,
          "final_steps": readable_steps(workdir)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--faults", type=int, default=20, help="how many faults to inject")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--reference", default="",
                      help="also train uninterrupted in this workdir and compare bitwise")
  parser.add_argument("--output", default="")
  args, flags = parser.parse_known_args()
  flags = [f for f in flags if f != "--"]
  rng = random.Random(args.seed)
  faults = [FAULTS[i % len(FAULTS)] for i in range(args.faults)]
  rng.shuffle(faults)
  started = time.time()
  result = run(args.workdir, flags, faults, seed=args.seed)
  result["seconds"] = time.time() - started
  if args.reference:
    with open(os.devnull, "w", encoding="utf-8") as log:
      if start(args.reference, flags, log).wait() != 0:
        raise SystemExit("the uninterrupted reference run failed")
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    a, b = restore(args.workdir), restore(args.reference)
    result["bitwise_equal_to_uninterrupted"] = all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  if args.output:  # first: the table below is only a view of it
    with open(args.output, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)
  print(f"{'fault':<18} {'exit':>5}  {'as expected':<11} {'mid-write':<9} steps on disk")
  for r in result["faults"]:
    print(f"{r['fault']:<18} {str(r['exit']):>5}  {str(r['expected_exit']):<11} "
          f"{str(r['checkpoint_being_written']):<9} {r['steps']}")
    for other in r.get("beside", ()):
      print(f"{'':<18} beside it: exit {other['exit']}: {other['last_line'][:150]}")
  print(f"final run: exit {result['final_exit']}, steps {result['final_steps']}; "
        f"checkpoints lost: {result['lost']}; {result['seconds']:.0f} s"
        + (f"; bitwise equal to the uninterrupted run: "
           f"{result['bitwise_equal_to_uninterrupted']}" if args.reference else ""))


if __name__ == "__main__":
  main()
