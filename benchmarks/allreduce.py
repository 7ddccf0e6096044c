"""What summing a gradient tree over pmap devices costs: psum of the tree, one array at a
time as XLA:CPU runs it, against `training.steps.psum_flat` (one vector per dtype).

    python -m benchmarks.allreduce --cpu_devices=2
    python -m benchmarks.allreduce --cpu_devices=2 --shape=generation_small_256

The tree is the parameter tree of a `benchmarks/train_throughput.py` shape (default
nanogpt: 52 float32 arrays, 0.81M numbers), filled with ones on every device. Each
variant is one pmapped function that sums the tree over the devices and then scales each
array (as the step's division by the token count and the optimizer read each gradient, so
that the flat vector's slices can fuse into their readers as they do in the step): `psum`
(jax.lax.psum of the tree), `psum_flat`, and `scale` alone (no collective: what touching
the tree costs without one). It reports the median time of `--calls` blocked calls, in
`--rounds` interleaved rounds. Nothing here asserts a timing.
"""

import argparse
import os
import statistics
import sys
import time

if __package__ in (None, ""):  # run as a script: put the repository root on the path
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import run_record  # noqa: E402  (no JAX)

if __name__ == "__main__":  # --cpu_devices must reach XLA_FLAGS before JAX starts
  run_record.start_cpu_benchmark(sys.argv[1:])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import train_throughput  # noqa: E402
from training import steps  # noqa: E402


def parameter_tree(shape_name: str):
  """The parameter shapes of a train_throughput shape (no compilation: eval_shape)."""
  shape = train_throughput.SHAPES_BY_NAME[shape_name]
  config = train_throughput.build_config(shape)
  task = train_throughput.build_task(config, shape.vocab_size)
  return jax.eval_shape(task.init_params, jax.random.PRNGKey(0))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", default="nanogpt", help="a train_throughput shape's parameters")
  parser.add_argument("--cpu_devices", type=int, default=0,
                      help="split the host into this many pmap devices (set before JAX starts)")
  parser.add_argument("--calls", type=int, default=50, help="timed calls a round")
  parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
  args = parser.parse_args(argv)
  devices = jax.local_devices()
  tree = parameter_tree(args.shape)
  leaves = jax.tree.leaves(tree)
  replicated = jax.pmap(lambda _: jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), tree),
                        devices=devices)(jnp.zeros(len(devices)))
  scale = lambda t: jax.tree.map(lambda x: x * 0.5, t)  # noqa: E731
  variants = {
      "psum": lambda t: scale(jax.lax.psum(t, steps.AXIS)),
      "psum_flat": lambda t: scale(steps.psum_flat(t, steps.AXIS)),
      "scale": scale,
  }
  fns = {name: jax.pmap(fn, axis_name=steps.AXIS, devices=devices)
         for name, fn in variants.items()}
  for fn in fns.values():
    jax.block_until_ready(fn(replicated))
  times = {name: [] for name in fns}
  for _ in range(args.rounds):
    for name, fn in fns.items():
      calls = []
      for _ in range(args.calls):
        start = time.perf_counter()
        jax.block_until_ready(fn(replicated))
        calls.append(time.perf_counter() - start)
      times[name].append(statistics.median(calls))
  numbers = sum(x.size for x in leaves)
  print(f"{args.shape}: {len(leaves)} arrays, {numbers:,} numbers, {len(devices)} device(s)")
  print("| variant | ms a call (median of rounds) | rounds |")
  print("|---|---|---|")
  for name, values in times.items():
    rounds = ", ".join(f"{1e3 * v:.3f}" for v in values)
    print(f"| {name} | {1e3 * statistics.median(values):.3f} | {rounds} |")
  print(run_record.machine_line(f"{len(devices)} device(s)"))


if __name__ == "__main__":
  main()
