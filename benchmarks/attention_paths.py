"""Reference vs fused attention on the current backend: agreement and speed.

    python benchmarks/attention_paths.py                  # CPU here; on a GPU, cuDNN
    python benchmarks/attention_paths.py --dtype=bfloat16 --lengths=256,1024,4096

For each mask kind (padding, causal, packed segments, all three) it checks that the fused
path (jax.nn.dot_product_attention) agrees with the reference written in
models/attention.py, in values and in gradients, then times forward+backward of both at
base size (8 heads of 64) for each sequence length: the median of repeated timings.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from models import attention  # noqa: E402
from models import masks as mask_lib  # noqa: E402


def masks(batch: int, length: int):
  """The mask kinds a pipeline produces, each `[batch, 1, length, length]` bool."""
  lengths = np.linspace(length // 2, length, batch).astype(int)
  tokens = jnp.asarray((np.arange(length)[None] < lengths[:, None]).astype(np.int32))
  segments = jnp.asarray((np.arange(length)[None] >= length // 3).astype(np.int32) + 1)
  segments = jnp.broadcast_to(segments, (batch, length)) * tokens
  padding = mask_lib.padding_mask(tokens, tokens)
  causal = mask_lib.causal_mask(length)
  segment = mask_lib.segment_mask(segments, segments)
  return {"padding": padding, "causal": jnp.broadcast_to(causal, padding.shape),
          "segments": segment & padding,
          "all": mask_lib.combine_masks(padding, causal, segment)}, tokens


def loss_fn(implementation):
  def f(q, k, v, mask, valid):
    out = attention.dot_product_attention(q, k, v, mask, implementation=implementation)
    return jnp.sum(out.astype(jnp.float32) * valid[:, :, None, None])
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))


def median_time(fn, *args, repeats: int = 5) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--lengths", default="128,512")
  parser.add_argument("--batch", type=int, default=2)
  args = parser.parse_args()
  dtype = jnp.dtype(args.dtype)
  tol = 2e-2 if dtype == jnp.bfloat16 else 2e-5
  print(f"backend {jax.default_backend()}  device {jax.devices()[0].device_kind}  "
        f"jax {jax.__version__}  dtype {args.dtype}  fused implementation "
        f"{attention.fused_backend(dtype)}")
  ref, fused = loss_fn("reference"), loss_fn("fused")
  print("| length | mask | output rel. diff | max grad diff | grad rel. diff | agree | "
        "reference ms | fused ms | speed-up |")
  print("|---|---|---|---|---|---|---|---|---|")
  for length in [int(x) for x in args.lengths.split(",")]:
    keys = jax.random.split(jax.random.PRNGKey(length), 3)
    q, k, v = (jax.random.normal(key, (args.batch, length, 8, 64), dtype) for key in keys)
    mask_kinds, tokens = masks(args.batch, length)
    valid = (tokens > 0).astype(jnp.float32)
    for name, mask in mask_kinds.items():
      try:
        (lr, gr), (lf, gf) = ref(q, k, v, mask, valid), fused(q, k, v, mask, valid)
      except Exception as e:  # pylint: disable=broad-except  # report and go on
        print(f"| {length} | {name} | fused path failed: {str(e).splitlines()[0][:200]} |")
        continue
      # Compare the per-position outputs through the gradient of a weighted sum, and the
      # sum itself; padding query rows are excluded (their output is arbitrary).
      scale = float(jnp.abs(lr)) + 1.0
      out_rel = abs(float(lr) - float(lf)) / scale
      grad_diff = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                      for a, b in zip(gr, gf))
      grad_scale = max(float(jnp.max(jnp.abs(a.astype(jnp.float32)))) for a in gr)
      grad_rel = grad_diff / grad_scale
      status = "ok" if out_rel < tol and grad_rel < tol else "MISMATCH"
      t_ref = median_time(ref, q, k, v, mask, valid)
      t_fused = median_time(fused, q, k, v, mask, valid)
      print(f"| {length} | {name} | {out_rel:.2e} | {grad_diff:.2e} | {grad_rel:.2e} | "
            f"{status} | {t_ref * 1e3:.2f} | {t_fused * 1e3:.2f} | {t_ref / t_fused:.2f}x |")


if __name__ == "__main__":
  main()
