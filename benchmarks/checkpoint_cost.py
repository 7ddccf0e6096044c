"""What the checkpoint checksums cost: saving and restoring the base model's train state.

    python -m benchmarks.checkpoint_cost                      # base translation, 32k vocab
    python -m benchmarks.checkpoint_cost --output=runs/benchmarks/checkpoint_cost.json

Builds the train state of the paper's base encoder-decoder (d_model 512, 6+6 layers,
vocabulary --vocab_size; parameters and both Adam moments, float32) on the host and, `--reps`
times each, side by side in one run:
  checksums    training/checkpointing.array_checksums over every array (what a save adds
               before its write starts, and what a restore adds after its read)
  save         Checkpointer.save + wait (the write to disk, checksums included)
  restore      Checkpointer.restore (read, then verify every array against its checksum)
and prints the medians, with the checksums' share of a save and of a restore. A save in
training returns once the arrays are captured (the write goes on in the background), so
the checksums' time is also what a save adds to the loop's pause.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: put the repository root on the path
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from benchmarks import run_record, train_throughput  # noqa: E402
from configs import default  # noqa: E402
from training import checkpointing, optimizers, reporting, steps  # noqa: E402


def _timed(function, reps: int):
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    result = function()
    times.append(time.perf_counter() - start)
  return statistics.median(times), result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--vocab_size", type=int, default=32000)
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--directory", default="", help="where to write (default: a temp dir)")
  parser.add_argument("--output", default="")
  args = parser.parse_args()
  config = default.get_config("task=translation,size=base")
  task = train_throughput.build_task(config, args.vocab_size)
  state = jax.device_get(steps.create_state(task, optimizers.make_optimizer(config),
                                            config.seed))
  megabytes = sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20
  parameters = reporting.count_parameters(state.params)
  load_before = os.getloadavg()
  root = args.directory or tempfile.mkdtemp(prefix="checkpoint-cost-")
  checkpoints = checkpointing.Checkpointer(root, keep=1)
  step = iter(range(1, 10**6))
  try:
    checksums, _ = _timed(lambda: checkpointing.array_checksums(state), args.reps)

    def save():
      checkpoints.save(next(step), state, {"benchmark": True})
      checkpoints.wait()

    saving, _ = _timed(save, args.reps)
    restoring, restored = _timed(lambda: checkpoints.restore(state), args.reps)
    assert int(restored.step) == int(state.step)
  finally:
    checkpoints.close()
    if not args.directory:
      shutil.rmtree(root, ignore_errors=True)
  print(run_record.machine_line())
  print(run_record.load_line(load_before, os.getloadavg()))
  print(f"base translation state: {parameters / 1e6:.2f}M parameters, {megabytes:.0f} MiB "
        f"with the Adam moments; medians of {args.reps}")
  print(f"checksums {checksums * 1e3:8.1f} ms  ({megabytes / 1024 / checksums:.1f} GiB/s)")
  print(f"save      {saving * 1e3:8.1f} ms  (checksums {100 * checksums / saving:.1f}%)")
  print(f"restore   {restoring * 1e3:8.1f} ms  (checksums {100 * checksums / restoring:.1f}%)")
  if args.output:
    run_record.write_json(args.output, {
        "parameters": parameters, "state_mib": megabytes, "reps": args.reps,
        "checksums_s": checksums, "save_s": saving, "restore_s": restoring})


if __name__ == "__main__":
  run_record.start_with_huge_pages()
  main()
