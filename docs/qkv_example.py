"""Queries, keys and values on a hand-made example, through the codebase's attention.

    python docs/qkv_example.py

Four tokens A B C D with d_k = 2. Each token's key points a different way; each
token's query points at the key of the token before it (A, having none, points at D's), so
this one "head" looks one token back. The values are one-hot, so an output row reads
directly as "how much of each token's value it took". Then the same example with a
padding mask and a causal mask, and finally a `MultiHeadAttention` module whose shapes
show how d_model is split into heads. docs/attention.md quotes the printout.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from models import attention  # noqa: E402
from models import masks as mask_lib  # noqa: E402

TOKENS = "ABCD"
RADIUS = 2.0  # length of every query and key: sets how sharp the match is


def example():
  """Queries, keys `[1, 4, 1 head, 2]`, values `[1, 4, 1 head, 4]` (numpy float32)."""
  angles = np.pi / 2 * np.arange(4)  # A east, B north, C west, D south
  keys = RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=-1)
  queries = np.roll(keys, 1, axis=0)  # token i looks for token i-1 (A for D)
  values = np.eye(4)
  as4d = lambda a: a[None, :, None, :].astype(np.float32)  # noqa: E731
  # Rounding clears cos(pi/2) = 6e-17; "+ 0.0" turns the -0.0 it leaves into 0.0.
  return as4d(np.round(queries, 6) + 0.0), as4d(np.round(keys, 6) + 0.0), as4d(values)


def _matrix(name, array, rows=TOKENS, cols=TOKENS, fmt="{:7.3f}"):
  array = np.asarray(array)
  lines = [name, "      " + "".join(f"{c:>8}" for c in cols)]
  for r, row in zip(rows, array):
    lines.append(f"  {r:>3} " + "".join(" " + fmt.format(x) for x in row))
  return "\n".join(lines)


def single_head() -> dict:
  """Runs the example through `attention_weights` and `dot_product_attention`."""
  q, k, v = example()
  scores = np.einsum("qd,kd->qk", q[0, :, 0], k[0, :, 0])
  weights = attention.attention_weights(jnp.asarray(q), jnp.asarray(k))
  out = attention.dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
  mixed = np.random.default_rng(0).normal(size=(1, 4, 1, 3)).astype(np.float32)
  out_mixed = attention.dot_product_attention(jnp.asarray(q), jnp.asarray(k),
                                              jnp.asarray(mixed))
  return dict(q=q, k=k, v=v, scores=scores, weights=np.asarray(weights)[0, 0],
              out=np.asarray(out)[0, :, 0], mixed=mixed[0, :, 0],
              out_mixed=np.asarray(out_mixed)[0, :, 0])


def masked() -> dict:
  """The example's weights under a padding mask (D is padding), a causal mask and both."""
  q, k, _ = example()
  token_ids = jnp.array([[5, 6, 7, 0]])  # A B C, then padding (id 0)
  masks = {
      "padding": mask_lib.padding_mask(token_ids, token_ids),
      "causal": mask_lib.causal_mask(4),
  }
  masks["padding and causal"] = mask_lib.combine_masks(masks["padding"], masks["causal"])
  return {name: (np.asarray(m)[0, 0],
                 np.asarray(attention.attention_weights(jnp.asarray(q), jnp.asarray(k), m))[0, 0])
          for name, m in masks.items()}


def multi_head(d_model: int = 8, num_heads: int = 2, head_dim: int = 4) -> dict:
  """A `MultiHeadAttention` on `[1, 4, d_model]` inputs: shapes and a per-head recomputation."""
  mha = attention.MultiHeadAttention(num_heads=num_heads, head_dim=head_dim)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 4, d_model)), jnp.float32)
  params = mha.init(jax.random.PRNGKey(0), x)["params"]
  out, state = mha.apply({"params": params}, x, capture_intermediates=True,
                         mutable=["intermediates"])
  inter = state["intermediates"]
  q, k, v = (inter[name]["__call__"][0] for name in ("query", "key", "value"))
  weights = inter["attention_weights"][0]
  # Each head on its own: attention over its slice of q, k, v only.
  heads = [attention.dot_product_attention(q[:, :, h:h + 1], k[:, :, h:h + 1],
                                           v[:, :, h:h + 1]) for h in range(num_heads)]
  w_out = params["out"]["kernel"]  # [heads, head_dim, d_model]
  by_head = sum(jnp.einsum("bld,de->ble", heads[h][:, :, 0], w_out[h]) for h in range(num_heads))
  return dict(x=x, params=params, q=q, k=k, v=v, weights=np.asarray(weights), out=out,
              per_head_difference=float(jnp.max(jnp.abs(by_head - out))))


def report() -> str:
  """The whole printout (deterministic)."""
  np.set_printoptions(precision=3, suppress=True)
  s = single_head()
  lines = [
      "== 1. One head, no mask: d_k = 2, four tokens ==",
      _matrix("queries q (row = token)", s["q"][0, :, 0], cols=("d0", "d1")),
      _matrix("keys k", s["k"][0, :, 0], cols=("d0", "d1")),
      _matrix("scores q.k (row = query, column = key; computed here for display, "
              "attention_weights computes them inside)", s["scores"]),
      _matrix("scaled scores q.k / sqrt(2)", s["scores"] / np.sqrt(2.0)),
      _matrix("weights = attention.attention_weights(q, k), softmax of each row",
              s["weights"]),
      "row sums: " + " ".join(f"{x:.3f}" for x in s["weights"].sum(-1)),
      _matrix("values v (row = token; one-hot, so feature A belongs to token A, ...)",
              s["v"][0, :, 0]),
      _matrix("output = attention.dot_product_attention(q, k, v) (row = query)", s["out"]),
      "with one-hot values the output row is the weight row: each query took "
      f"{s['weights'][1, 0]:.3f} of the value of the token before it",
      _matrix("other values v' (random, 3 features)", s["mixed"], cols=("f0", "f1", "f2")),
      _matrix("output with v'", s["out_mixed"], cols=("f0", "f1", "f2")),
      "output == weights @ v' (NumPy, to 1e-6): "
      f"{np.allclose(s['out_mixed'], s['weights'] @ s['mixed'], atol=1e-6)}",
      "",
      "== 2. Masks: True = may attend ==",
  ]
  for name, (mask, weights) in masked().items():
    lines += [_matrix(f"{name} mask", mask.astype(int), fmt="{:7d}"),
              _matrix(f"weights with the {name} mask", weights)]
  m = multi_head()
  shapes = lambda tree: {"/".join(p.key for p in path): tuple(leaf.shape)  # noqa: E731
                         for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
  lines += [
      "",
      "== 3. MultiHeadAttention(num_heads=2, head_dim=4) on d_model = 8 ==",
      f"inputs x: {tuple(m['x'].shape)}  [batch, length, d_model]",
      "parameters: " + ", ".join(f"{p} {s}" for p, s in shapes(m["params"]).items()),
      f"query, key, value (outputs of the projections): {tuple(m['q'].shape)}  "
      "[batch, length, heads, head_dim]",
      f"attention weights (sown): {tuple(m['weights'].shape)}  [batch, heads, q_length, kv_length]",
  ]
  for h in range(m["weights"].shape[1]):
    lines.append(_matrix(f"head {h} weights", m["weights"][0, h]))
  lines += [
      f"output: {tuple(m['out'].shape)}  [batch, length, d_model]",
      "each head attending on its own slice of q, k, v, then out/kernel applied per head "
      f"and summed, gives the module's output (to 1e-5): {m['per_head_difference'] < 1e-5}",
  ]
  return "\n".join(lines)


if __name__ == "__main__":
  print(report())
