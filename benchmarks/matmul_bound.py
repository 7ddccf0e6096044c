"""How fast this machine runs the matmuls of a train step, at the step's own shapes: an
upper bound on the MFU of benchmarks/train_throughput.py's rows.

    python -m benchmarks.matmul_bound --shapes=generation_small_256 --cpu_devices=2
    python -m benchmarks.matmul_bound --shapes=families --cpu_devices=2 --output=runs/mb.json

MFU divides a step's model FLOPs by a peak: the rate of one jitted 1024x1024 float32
matmul (`train_throughput.measure_peak`). A step cannot beat the rate at which the machine
runs the step's own matmuls. Those are smaller, or thinner, than 1024x1024, and with
`--cpu_devices=N` each runs on 1/N of the rows. For each shape this lists every dense
product of a training step:

- per block: the q, k, v and output projections, the two feed-forward matrices, the
  attention scores (q k^T) and the weighted values (p v);
- in the decoder of an encoder-decoder, cross-attention as well;
- the output logits.

Each product appears three times, once forward and twice backward (dX = dY W^T and
dW = X^T dY), with the shapes of each. Each distinct product is timed as a pmapped
(`--cpu_devices`) jitted matmul, its median over `--reps` calls. The bound is then total
matmul FLOPs over the summed matmul time, as a share of the same run's peak. Norms,
softmax, dropout, the loss and the optimizer come on top, so a step's MFU sits below the
bound. Nothing here asserts a timing.
"""

import argparse
import collections
import json
import os
import sys

if __package__ in (None, ""):  # run as a script: put the repository root on the path
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import run_record  # noqa: E402  (no JAX)


def products(config, shape):
  """`{(batch, m, k, n, split): count}`: the `[batch, m, k] @ [batch, k, n]` products of
  one train step of `shape` (all devices' rows together), forward and backward."""
  m = config.model
  d, f, h = m.d_model, m.d_ff, m.num_heads
  dh = (m.head_dim or d // h)
  out = collections.Counter()

  # Each key ends with the axis the devices split, as a pmapped step splits its batch:
  # the rows (m) of Y = X W and dX = dY W^T, the contracted rows (k) of dW = X^T dY (each
  # device's partial dW is then summed), and the batch x heads (b) of attention.
  def dense(rows, k, n, count=1):
    out[(1, rows, k, n, "m")] += count
    out[(1, rows, n, k, "m")] += count
    out[(1, k, rows, n, "k")] += count

  def attention(queries, keys, count=1):  # scores q k^T and values p v, both passes
    b = shape.batch * h
    for m_, k_, n_ in ((queries, dh, keys), (queries, keys, dh)):
      out[(b, m_, k_, n_, "b")] += count
      out[(b, m_, n_, k_, "b")] += count
      out[(b, k_, m_, n_, "b")] += count

  src = shape.src_length
  tgt = shape.tgt_length
  stacks = []
  if shape.task in ("translation", "classification"):
    stacks.append(("encoder", src, m.num_encoder_layers))
  if shape.task in ("translation", "generation"):
    stacks.append(("decoder", tgt, m.num_decoder_layers))
  for name, length, layers in stacks:
    rows = shape.batch * length
    dense(rows, d, d, 4 * layers)
    dense(rows, d, f, layers)
    dense(rows, f, d, layers)
    attention(length, length, layers)
    if name == "decoder" and shape.task == "translation":
      dense(rows, d, d, 2 * layers)  # cross-attention queries and output
      dense(shape.batch * src, d, d, 2 * layers)  # its keys and values, from the encoder
      attention(length, src, layers)
  if shape.task != "classification":
    vocab = shape.vocab_size or 16
    dense(shape.batch * (tgt or src), d, vocab)
  return out


def time_product(product, num_devices: int, reps: int) -> float:
  """Median seconds of the pmapped `[batch, m, k] @ [batch, k, n]`, its `split` axis
  divided over the devices."""
  import jax
  import jax.numpy as jnp
  b, m, k, n, split = product
  part = {axis: size // num_devices if axis == split else size
          for axis, size in (("b", b), ("m", m), ("k", k))}
  from benchmarks import train_throughput
  x = jnp.ones((num_devices, part["b"], part["m"], part["k"]), jnp.float32)
  w = jnp.ones((num_devices, part["b"], part["k"], n), jnp.float32)
  return train_throughput.median_call_seconds(jax.pmap(jnp.matmul), (x, w), reps)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--shapes", default="generation_small_256",
                      help="shape or group names of benchmarks/train_throughput.py")
  parser.add_argument("--cpu_devices", type=int, default=0)
  parser.add_argument("--reps", type=int, default=20)
  parser.add_argument("--output", default="")
  args = parser.parse_args(argv)
  if args.cpu_devices:
    os.environ["XLA_FLAGS"] = run_record.cpu_device_flags(args.cpu_devices,
                                                          os.environ.get("XLA_FLAGS", ""))
  import jax
  from benchmarks import train_throughput as tt
  devices = max(1, args.cpu_devices) if jax.default_backend() == "cpu" else 1
  peak = tt.measure_peak(1024, 30)["flops_per_sec"]
  print(f"peak: jitted float32 1024x1024 matmul, {peak / 1e9:.1f} GFLOP/s; products split "
        f"over {devices} pmap device(s)")
  results = []
  names, skipped = tt.select_shapes(args.shapes)
  for name, why in skipped:
    print(f"skipped {name}: {why}")
  for shape in (tt.SHAPES_BY_NAME[name] for name in names):
    config = tt.build_config(shape)
    rows = []
    total_flops = total_seconds = 0.0
    for product, count in sorted(products(config, shape).items()):
      seconds = time_product(product, devices, args.reps)
      b, m, k, n, _ = product
      flops = 2.0 * b * m * k * n
      total_flops += count * flops
      total_seconds += count * seconds
      rows.append({"product": product, "count": count, "seconds": seconds,
                   "gflops_per_sec": flops / seconds / 1e9})
    bound = total_flops / total_seconds / peak
    results.append({"shape": shape.name, "matmul_gflop": total_flops / 1e9,
                    "matmul_seconds": total_seconds, "bound_mfu": bound, "products": rows})
    print(f"\n{shape.name}: {total_flops / 1e9:.2f} GFLOP of matmuls a step in "
          f"{total_seconds * 1e3:.1f} ms = {total_flops / total_seconds / 1e9:.1f} GFLOP/s: "
          f"bound **{100 * bound:.1f}%** of the peak")
    print("| [batch, m, k] @ [k, n] | count | ms each | GFLOP/s | share of matmul time |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
      b, m, k, n, _ = r["product"]
      print(f"| [{b}, {m}, {k}] @ [{k}, {n}] | {r['count']} | {r['seconds'] * 1e3:.2f} | "
            f"{r['gflops_per_sec']:.1f} | {100 * r['count'] * r['seconds'] / total_seconds:.1f}% |")
  if args.output:
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
      json.dump({"peak_flops_per_sec": peak, "devices": devices, "shapes": results}, f,
                indent=1)


if __name__ == "__main__":
  run_record.start_with_huge_pages()
  main()
