"""The training loop's speed against its pure step: how much of the step's rate main.py's loop
keeps (issue 15's target: at least 90%).

    python -m benchmarks.loop_speed                                    # tiny Shakespeare, CPU
    python -m benchmarks.loop_speed --steps_per_call=1,4,16 --steps=600
    python -m benchmarks.loop_speed --config=configs/generation.py:recipe=gpu   # on a GPU
    python -m benchmarks.loop_speed --config=configs/translation.py --config.train.log_every_steps=50

For each `--steps_per_call` value, a child process (fresh JAX, with the config's
compute.cpu_devices split applied as main.py applies it) measures, on the config's real
training data:

- the loop: `train.train_and_evaluate` (what `main.py --mode=train` runs) trains `--steps`
  updates in a fresh workdir, with the config's logging, asynchronous checkpoints and
  prefetching, no periodic evaluation and no final one. Its rate is the wall time between
  the first and the last training log record (the first interval, which compiles, is left
  out): checkpoint saves and logging count, nothing is excluded.
- the pure step: the same task's pmapped train step (steps.compile_steps, one update a call)
  called `--pure_calls` times back to back on one real batch already on the devices and
  waited for once: no input pipeline, no host work between the calls. `--rounds` rounds
  before the loop and as many after it; the median of them all. 1 / that time is the rate
  a loop of single-update calls can at best reach.

The ratio loop / pure is printed per row. Nothing here asserts a timing.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from benchmarks import run_record  # noqa: E402  (no JAX: the parent sets XLA_FLAGS first)

DEFAULT_CONFIG = os.path.join(REPO, "configs", "generation.py") + ":recipe=fast"


# ----------------------------------------------------------------------------- child


def _pure_step(config, task, tx, devices, batch, calls: int, rounds: int) -> List[float]:
  """Seconds per update of the one-update pmapped step, back to back: `rounds` values."""
  import jax  # pylint: disable=g-import-not-at-top
  from training import steps

  p_train, _, _ = steps.compile_steps(task, tx, config, devices)
  p_state = steps.replicate(steps.create_state(task, tx, config.seed), devices)
  batch = jax.device_put(batch, steps.device_sharding(devices))
  for _ in range(3):  # compiles, then the second call's layout
    p_state, metrics = p_train(p_state, batch)
  jax.block_until_ready((p_state, metrics))
  out = []
  for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(calls):
      p_state, metrics = p_train(p_state, batch)
    jax.block_until_ready((p_state, metrics))
    out.append((time.perf_counter() - start) / calls)
  return out


def loop_rate(records: List[Dict[str, Any]]) -> Dict[str, float]:
  """Updates per second between the first and the last training log record of a run's
  metrics.jsonl records (the first interval, with the compilation, is left out)."""
  logs = [r for r in records if "train/loss" in r]
  if len(logs) < 2:
    raise SystemExit("the loop logged fewer than 2 training records: raise --steps or lower "
                     "config.train.log_every_steps")
  first, last = logs[0], logs[-1]
  return {"steps": last["step"] - first["step"], "seconds": last["time"] - first["time"],
          "steps_per_sec": (last["step"] - first["step"]) / (last["time"] - first["time"])}


def child(args, overrides) -> Dict[str, Any]:
  """One row, in this process: the loop, then the pure step (see the module docstring)."""
  import jax  # pylint: disable=g-import-not-at-top
  from absl import logging

  import train
  from input_pipeline import batching

  logging.set_verbosity(logging.WARNING)
  config = run_record.load_config(args.config, overrides)
  per_call = args.child_steps_per_call
  with config.unlocked():
    config.train.num_train_steps = args.steps
    config.train.steps_per_call = per_call
    config.eval.eval_every_steps = args.steps + 1  # no periodic evaluation
  devices = jax.local_devices()
  train.validate(config, len(devices))
  workdir = tempfile.mkdtemp(prefix="loop_speed-")
  # The pure step first, in a fresh process (the task opened as training would open it:
  # a tokenizer trained here is kept for the loop), then the loop, then the pure step again.
  _, task, tx, _ = train.open_task(config, workdir, devices)
  dataset = task.train_dataset(config.train.batch_size, len(devices), jax.process_index(),
                               jax.process_count())
  batch = next(batching.iterate(dataset, num_threads=0, prefetch=0))
  pure = _pure_step(config, task, tx, devices, batch, args.pure_calls, args.rounds)
  start = time.perf_counter()
  train.train_and_evaluate(config, workdir, devices=devices, final_evaluation=False)
  loop_wall = time.perf_counter() - start
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    rate = loop_rate([json.loads(line) for line in f])
  pure += _pure_step(config, task, tx, devices, batch, args.pure_calls, args.rounds)
  step_s = statistics.median(pure)
  return {
      "config": args.config, "overrides": overrides, "steps_per_call": per_call,
      "devices": len(devices), "batch_size": config.train.batch_size,
      "log_every_steps": config.train.log_every_steps,
      "checkpoint_every_steps": config.train.checkpoint_every_steps,
      "steps": args.steps, "loop_wall_s": loop_wall, "loop": rate,
      "pure_step_s": step_s, "pure_step_rounds_s": pure,
      "pure_steps_per_sec": 1.0 / step_s,
      "loop_over_pure": rate["steps_per_sec"] * step_s, "workdir": workdir,
  }


# ----------------------------------------------------------------------------- parent


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default=DEFAULT_CONFIG,
                      help="config file[:variant]; --config.<group>.<field>=<value> "
                           "overrides follow as for main.py")
  parser.add_argument("--steps_per_call", default="1,4",
                      help="comma-separated config.train.steps_per_call values, one row each")
  parser.add_argument("--steps", type=int, default=400, help="updates the loop trains")
  parser.add_argument("--pure_calls", type=int, default=50, help="pure-step calls a round")
  parser.add_argument("--rounds", type=int, default=3, help="pure-step rounds (median)")
  parser.add_argument("--output", default="", help="also write the rows as JSON here")
  parser.add_argument("--child_steps_per_call", type=int, default=0, help=argparse.SUPPRESS)
  return parser.parse_known_args(argv)


def main(argv=None):
  args, overrides = parse_args(argv)
  if args.child_steps_per_call:
    print(json.dumps(child(args, overrides)))
    return
  config = run_record.load_config(args.config, overrides)
  env = dict(os.environ, XLA_FLAGS=run_record.cpu_device_flags(config.compute.cpu_devices,
                                                     os.environ.get("XLA_FLAGS", "")))
  load_before = os.getloadavg()
  rows = []
  for per_call in (int(n) for n in args.steps_per_call.split(",")):
    command = [sys.executable, "-m", "benchmarks.loop_speed", f"--config={args.config}",
               f"--steps={args.steps}", f"--pure_calls={args.pure_calls}",
               f"--rounds={args.rounds}", f"--child_steps_per_call={per_call}"] + overrides
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                            check=False)
    if result.returncode:
      sys.exit(f"steps_per_call={per_call} failed ({result.returncode}):\n"
               f"{result.stderr[-3000:]}")
    row = json.loads(result.stdout.strip().splitlines()[-1])
    rows.append(row)
    print(f"steps_per_call={per_call}: loop {row['loop']['steps_per_sec']:.1f} steps/s, "
          f"pure step {row['pure_step_s'] * 1e3:.2f} ms ({row['pure_steps_per_sec']:.1f}/s): "
          f"{100 * row['loop_over_pure']:.0f}%", file=sys.stderr, flush=True)
  load_after = os.getloadavg()
  print("\n" + run_record.machine_line(f"{rows[0]['devices']} device(s)"))
  print(run_record.load_line(load_before, load_after))
  print(f"config {args.config} {' '.join(overrides)}; batch {rows[0]['batch_size']}, log "
        f"every {rows[0]['log_every_steps']} steps, checkpoint every "
        f"{rows[0]['checkpoint_every_steps']}, {args.steps} updates\n")
  print("| steps_per_call | loop steps/s | pure step ms | pure steps/s | loop / pure |")
  print("|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['steps_per_call']} | {r['loop']['steps_per_sec']:.1f} | "
          f"{r['pure_step_s'] * 1e3:.2f} | {r['pure_steps_per_sec']:.1f} | "
          f"{100 * r['loop_over_pure']:.0f}% |")
  if args.output:
    run_record.write_json(args.output, {"args": vars(args), "load_before": load_before,
                                        "load_after": load_after, "rows": rows})


if __name__ == "__main__":
  run_record.start_with_huge_pages()
  main()
