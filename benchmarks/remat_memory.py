"""What rematerialization costs and saves: XLA's memory for the train step, and its time.

    python -m benchmarks.remat_memory                       # ~4 min on 2 cores
    python -m benchmarks.remat_memory --length=256 --batch=4 --steps=1 --quick

For the base decoder-only LM (`configs/default.py:task=generation,size=base`, 256-token
vocabulary, float32) at `--batch` x `--length` tokens, for every remat policy with and
without `scan_layers`, it compiles the real pmapped train step (`steps.compile_steps`) and
reports XLA's compiled memory analysis (temporaries: the activations kept for the
backward pass live there) and the median step time of `--steps` steps after a warm-up
step. Memory figures are exact properties of the compiled program; times are noisy.
"""

import argparse
import json
import os
import statistics
import sys
import time
import warnings

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from benchmarks import run_record, train_throughput  # noqa: E402
from configs import default, presets  # noqa: E402
from training import optimizers, steps  # noqa: E402

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
GIB = 2**30


def measure(remat: str, scan: bool, batch: int, length: int, num_steps: int, layers: int):
  config = default.get_config("task=generation,size=base")
  presets.update_groups(config, dict(
      data=dict(max_target_length=length), train=dict(batch_size=batch),
      compute=dict(remat=remat), model=dict(scan_layers=scan, num_decoder_layers=layers)))
  task = train_throughput.build_task(config, 256)
  tx = optimizers.make_optimizer(config)
  devices = jax.local_devices()[:1]
  p_train, _, _ = steps.compile_steps(task, tx, config, devices)
  p_state = steps.replicate(steps.create_state(task, tx, config.seed), devices)
  data = train_throughput.synthetic_batch(task, 256, batch, seed=0)
  t = time.perf_counter()
  compiled = p_train.lower(p_state, data).compile()
  compile_s = time.perf_counter() - t
  memory = compiled.memory_analysis()
  times = []
  for i in range(num_steps + 1):
    t = time.perf_counter()
    p_state, metrics = p_train(p_state, data)
    jax.block_until_ready((p_state, metrics))
    if i:  # the first call is a warm-up
      times.append(time.perf_counter() - t)
  return {"remat": remat, "scan_layers": scan, "batch": batch, "length": length,
          "layers": layers, "compile_s": compile_s,
          "temp_gib": memory.temp_size_in_bytes / GIB,
          "argument_gib": memory.argument_size_in_bytes / GIB,
          "step_s": statistics.median(times), "loss": float(metrics["loss"][0])}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=512)
  parser.add_argument("--layers", type=int, default=6)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--quick", action="store_true", help="2 layers")
  parser.add_argument("--output", default="")
  args = parser.parse_args(argv)
  if args.quick:
    args.layers = 2
  rows = []
  for scan in (False, True):
    for remat in ("none", "full", "matmuls"):
      row = measure(remat, scan, args.batch, args.length, args.steps, args.layers)
      rows.append(row)
      print(json.dumps(row), flush=True)
  lines = ["| scan_layers | remat | XLA temporaries GiB | vs no remat | compile s | step s | "
           "vs no remat |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    base = next(b for b in rows if b["scan_layers"] == r["scan_layers"]
                and b["remat"] == "none")
    lines.append(f"| {r['scan_layers']} | {r['remat']} | {r['temp_gib']:.3f} | "
                 f"{r['temp_gib'] / base['temp_gib']:.2f}x | {r['compile_s']:.1f} | "
                 f"{r['step_s']:.2f} | {r['step_s'] / base['step_s']:.2f}x |")
  print("\n".join(lines))
  if args.output:
    run_record.write_json(args.output, {"args": vars(args), "rows": rows,
                                        "markdown": "\n".join(lines),
                                        "load_after": os.getloadavg()})


if __name__ == "__main__":
  run_record.start_with_huge_pages()
  main()
