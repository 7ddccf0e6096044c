"""Why attention divides Q K^T by sqrt(d_k): measures it with the codebase's own attention.

    python docs/scaling.py --output=docs/figures/scaling.png

For each d_k it draws queries, keys and values with unit-variance entries and a random
output direction g with entries of variance 1/d_k (so that the loss's pull on each weight,
v_j.g, has unit variance whatever d_k), all from a fixed seed, and measures, with and
without the 1/sqrt(d_k):
- the variance of the logits q.k (or q.k / sqrt(d_k));
- how saturated the softmax is: its largest weight, its entropy (log(keys) is uniform) and
  the share of queries whose largest weight exceeds 0.99;
- the softmax's Jacobian d weights / d logits (Frobenius norm, by autodiff), and the
  gradient of the loss L = <attention output, g> with respect to the logits and with
  respect to the query (medians of the per-query norms).

The scaled path is `models.attention.dot_product_attention` / `attention_weights` as the
model calls them. The unscaled path calls the same functions with the query multiplied by
sqrt(d_k), which cancels their division: the logits are then exactly q.k. The gradients with
respect to the logits go through `models.attention.stable_softmax`.

Prints two Markdown tables (docs/scaling.md quotes them) and, with --output, draws a figure.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from models import attention  # noqa: E402

DIMS = (4, 16, 64, 256, 1024)
SETTINGS = ("unscaled", "scaled")


def _entropy(weights: jax.Array) -> jax.Array:
  """Entropy (nats) of each row of `[..., keys]` weights; 0 log 0 counts as 0."""
  plogp = jnp.where(weights > 0, weights * jnp.log(jnp.where(weights > 0, weights, 1.0)), 0.0)
  return -jnp.sum(plogp, axis=-1)


def measure(d_k: int, key_sets: int = 100, queries: int = 32, keys: int = 64,
            seed: int = 0) -> dict:
  """Statistics over `key_sets * queries` queries, each attending over `keys` keys.

  Shapes as `models.attention` has them: queries `[key_sets, queries, 1 head, d_k]`, keys
  and values `[key_sets, keys, 1 head, d_k]`, weights `[key_sets, 1, queries, keys]`.
  Returns a dict of floats: `var_<setting>`, `max_weight_<setting>` (mean over queries),
  `entropy_<setting>` (mean, nats), `one_hot_<setting>` (share of queries whose largest
  weight is above 0.99), `jacobian_<setting>`, `grad_logits_<setting>`, `grad_query_<setting>`
  (medians of per-query norms) for setting in SETTINGS, and `check` (largest difference
  between the codebase's weights and stable_softmax of the logits computed here).
  """
  rq, rk, rv, rg = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), d_k), 4)
  q = jax.random.normal(rq, (key_sets, queries, 1, d_k), jnp.float32)
  k = jax.random.normal(rk, (key_sets, keys, 1, d_k), jnp.float32)
  v = jax.random.normal(rv, (key_sets, keys, 1, d_k), jnp.float32)
  root = jnp.sqrt(jnp.float32(d_k))
  g = jax.random.normal(rg, (key_sets, queries, 1, d_k), jnp.float32) / root
  factor = {"unscaled": root, "scaled": jnp.float32(1.0)}  # multiplies the query

  dots = jnp.einsum("bqhd,bkhd->bhqk", q, k)  # q.k, the logits without the scaling
  logits = {"unscaled": dots, "scaled": dots / root}

  def loss_from_logits(z):
    out = jnp.einsum("bhqk,bkhd->bqhd", attention.stable_softmax(z), v)
    return jnp.sum(out * g)

  out = {"check": 0.0}
  for s in SETTINGS:
    weights = attention.attention_weights(q * factor[s], k)
    out["check"] = max(out["check"], float(jnp.max(jnp.abs(
        weights - attention.stable_softmax(logits[s])))))
    out[f"var_{s}"] = float(jnp.var(logits[s]))
    largest = jnp.max(weights, axis=-1)
    out[f"max_weight_{s}"] = float(jnp.mean(largest))
    out[f"one_hot_{s}"] = float(jnp.mean(largest > 0.99))
    out[f"entropy_{s}"] = float(jnp.mean(_entropy(weights)))
    rows = logits[s].reshape(-1, keys)
    jacobians = jax.vmap(jax.jacrev(attention.stable_softmax))(rows)  # [rows, keys, keys]
    out[f"jacobian_{s}"] = float(jnp.median(jnp.linalg.norm(jacobians, axis=(-2, -1))))
    grad_z = jax.grad(loss_from_logits)(logits[s])  # [key_sets, 1, queries, keys]
    out[f"grad_logits_{s}"] = float(jnp.median(jnp.linalg.norm(grad_z, axis=-1)))
    loss_q = lambda x, f=factor[s]: jnp.sum(  # noqa: E731
        attention.dot_product_attention(x * f, k, v) * g)
    grad_q = jax.grad(loss_q)(q)  # [key_sets, queries, 1, d_k]
    out[f"grad_query_{s}"] = float(jnp.median(jnp.linalg.norm(grad_q, axis=-1)))
  return out


def run(dims=DIMS, key_sets: int = 100, queries: int = 32, keys: int = 64,
        seed: int = 0) -> dict:
  """`{d_k: measure(d_k, ...)}` for each d_k in `dims`."""
  return {d: measure(d, key_sets, queries, keys, seed) for d in dims}


def _g(x: float) -> str:
  return f"{x:.3g}"


def tables(results: dict, keys: int) -> str:
  """The two Markdown tables: saturation of the softmax, then gradient sizes."""
  lines = [
      f"Softmax over {keys} keys (uniform: largest weight {1 / keys:.3g}, "
      f"entropy log {keys} = {np.log(keys):.3g} nats)",
      "",
      "| d_k | var(q.k) | var(q.k/sqrt(d_k)) | largest weight, unscaled | largest weight, "
      "scaled | entropy, unscaled | entropy, scaled | rows > 0.99, unscaled "
      "| rows > 0.99, scaled |",
      "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for d, r in results.items():
    lines.append(f"| {d} | {_g(r['var_unscaled'])} | {_g(r['var_scaled'])} | "
                 f"{r['max_weight_unscaled']:.3f} | {r['max_weight_scaled']:.3f} | "
                 f"{r['entropy_unscaled']:.3f} | {r['entropy_scaled']:.3f} | "
                 f"{r['one_hot_unscaled']:.1%} | {r['one_hot_scaled']:.1%} |")
  lines += [
      "",
      "Softmax Jacobian (Frobenius norm) and gradients of L = <attention output, g>: "
      "medians of the per-query norms",
      "",
      "| d_k | softmax Jacobian, unscaled | softmax Jacobian, scaled | dL/dlogits, unscaled "
      "| dL/dlogits, scaled | dL/dq, unscaled | dL/dq, scaled |",
      "|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for d, r in results.items():
    lines.append(f"| {d} | {_g(r['jacobian_unscaled'])} | {_g(r['jacobian_scaled'])} "
                 f"| {_g(r['grad_logits_unscaled'])} | {_g(r['grad_logits_scaled'])} "
                 f"| {_g(r['grad_query_unscaled'])} | {_g(r['grad_query_scaled'])} |")
  return "\n".join(lines)


def plot(results: dict, keys: int, path: str) -> None:
  """Three panels against d_k: logit variance, saturation, gradient norms."""
  # The Agg canvas directly: no GUI backend, nothing global changed.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  dims = np.array(list(results))
  col = lambda name: np.array([results[d][name] for d in dims])  # noqa: E731
  colors = {"unscaled": "tab:red", "scaled": "tab:blue"}
  labels = {"unscaled": "q.k", "scaled": "q.k / sqrt(d_k)"}
  fig = Figure(figsize=(15, 4.3))
  FigureCanvasAgg(fig)
  ax1, ax2, ax3 = fig.subplots(1, 3)

  for s in SETTINGS:
    ax1.plot(dims, col(f"var_{s}"), "o-", color=colors[s], label=labels[s])
  ax1.plot(dims, dims, ":", color="gray", label="d_k")
  ax1.set(xscale="log", yscale="log", xlabel="d_k", ylabel="variance of the logits",
          title="Logit variance")
  ax1.legend()

  for s in SETTINGS:
    ax2.plot(dims, col(f"max_weight_{s}"), "o-", color=colors[s],
             label=f"largest weight, {labels[s]}")
    ax2.plot(dims, col(f"entropy_{s}") / np.log(keys), "s--", color=colors[s],
             label=f"entropy / log {keys}, {labels[s]}")
  ax2.set(xscale="log", ylim=(0, 1.05), xlabel="d_k",
          title=f"Softmax saturation ({keys} keys, mean over queries)")
  ax2.legend(fontsize=8)

  for s in SETTINGS:
    ax3.plot(dims, col(f"jacobian_{s}"), "^:", color=colors[s],
             label=f"|softmax Jacobian|, {labels[s]}")
    ax3.plot(dims, col(f"grad_logits_{s}"), "o-", color=colors[s],
             label=f"|dL/dlogits|, {labels[s]}")
    ax3.plot(dims, col(f"grad_query_{s}"), "s--", color=colors[s],
             label=f"|dL/dq|, {labels[s]}")
  ax3.set(xscale="log", yscale="log", xlabel="d_k", title="Gradient norm (median per query)")
  ax3.legend(fontsize=8)

  for ax in (ax1, ax2, ax3):
    ax.set_xticks(dims, [str(d) for d in dims])
    ax.minorticks_off()
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--output", default="", help="figure (PNG) to write; '' = none")
  parser.add_argument("--dims", default=",".join(map(str, DIMS)), help="d_k values")
  parser.add_argument("--key_sets", type=int, default=100, help="independent key sets")
  parser.add_argument("--queries", type=int, default=32, help="queries per key set")
  parser.add_argument("--keys", type=int, default=64, help="keys each query attends over")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  dims = [int(d) for d in args.dims.split(",")]
  results = run(dims, args.key_sets, args.queries, args.keys, args.seed)
  print(f"{args.key_sets * args.queries} queries per d_k, seed {args.seed}\n")
  print(tables(results, args.keys))
  if args.output:
    plot(results, args.keys, args.output)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
  main()
