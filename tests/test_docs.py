"""The scripts behind docs/: they run, measure what the documents say, and the documents
quote what they print (docs/architecture.md and docs/attention.md cannot drift from the code)."""

import importlib.util
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import attention

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


def load(name):
  spec = importlib.util.spec_from_file_location(f"docs_{name}", os.path.join(DOCS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def read(name):
  with open(os.path.join(DOCS, name)) as f:
    return f.read()


# ----------------------------------------------------------------------------- scaling.py


FAST = dict(dims=(4, 64, 1024), key_sets=8, queries=16, keys=64, seed=0)


@pytest.fixture(scope="module")
def scaling_results():
  # 128 queries over 64 keys per d_k: seconds, and loose bounds still hold.
  return load("scaling").run(**FAST)


def test_scaling_logit_variance_grows_with_d_k_only_without_the_scaling(scaling_results):
  for d, r in scaling_results.items():
    assert 0.75 < r["var_unscaled"] / d < 1.25, (d, r["var_unscaled"])
    assert 0.75 < r["var_scaled"] < 1.25, (d, r["var_scaled"])
    # the "unscaled" path (the codebase's attention called with q * sqrt(d_k)) must be
    # softmax(q.k): this fails if attention_weights divides by anything but sqrt(d_k)
    assert r["check"] < 1e-5, (d, r["check"])


def test_scaling_unscaled_softmax_saturates_and_its_gradients_vanish(scaling_results):
  big, small = scaling_results[1024], scaling_results[4]
  assert big["max_weight_unscaled"] > 0.85 and big["one_hot_unscaled"] > 0.5
  assert big["entropy_unscaled"] < 0.1 * big["entropy_scaled"]
  for r in scaling_results.values():  # scaled: the same regime whatever d_k
    assert r["max_weight_scaled"] < 0.2 and r["one_hot_scaled"] == 0.0
    assert abs(r["grad_logits_scaled"] - small["grad_logits_scaled"]) < 0.1
  assert big["jacobian_unscaled"] < 0.01 * big["jacobian_scaled"]
  assert big["grad_logits_unscaled"] < 0.01 * big["grad_logits_scaled"]
  assert big["grad_query_unscaled"] < 0.1 * big["grad_query_scaled"]


def test_softmax_jacobian_is_diag_p_minus_p_p_transposed():
  z = jnp.array([2.0, -1.0, 0.5, 3.0])
  p = attention.stable_softmax(z)
  np.testing.assert_allclose(jax.jacrev(attention.stable_softmax)(z),
                             jnp.diag(p) - jnp.outer(p, p), atol=1e-6)
  one_hot = attention.stable_softmax(jnp.array([40.0, 0.0, 0.0, 0.0]))
  assert jnp.abs(jax.jacrev(attention.stable_softmax)(one_hot * 40.0)).max() < 1e-12


def test_scaling_script_writes_figure_and_table(scaling_results, tmp_path, capsys):
  out = tmp_path / "figures" / "scaling.png"
  # the fixture's sizes: jax reuses the operations it has compiled for them
  load("scaling").main(["--dims=4,64,1024", "--key_sets=8", "--queries=16", "--keys=64",
                        f"--output={out}"])
  printed = capsys.readouterr().out
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert load("scaling").tables(scaling_results, 64) in printed


def test_scaling_doc_quotes_a_table_of_the_script(scaling_results):
  doc = read("scaling.md")
  assert "python docs/scaling.py --output=docs/figures/scaling.png" in doc
  for line in load("scaling").tables(scaling_results, 64).splitlines():
    if line.startswith(("| d_k", "|---", "Softmax")):
      assert line in doc, line
  rows = [l for l in doc.splitlines() if re.match(r"\| (4|16|64|256|1024) \|", l)]
  assert len(rows) == 10


# ------------------------------------------------------------------------- qkv_example.py


def test_qkv_example_properties():
  qkv = load("qkv_example")
  s = qkv.single_head()
  np.testing.assert_allclose(s["weights"].sum(-1), 1.0, atol=1e-6)
  assert (s["weights"].argmax(-1) == np.array([3, 0, 1, 2])).all()  # one token back
  np.testing.assert_allclose(s["out"], s["weights"], atol=1e-6)  # one-hot values
  np.testing.assert_allclose(s["out_mixed"], s["weights"] @ s["mixed"], atol=1e-6)
  masked = qkv.masked()
  _, causal = masked["causal"]
  assert np.triu(causal, 1).max() == 0.0 and causal[0, 0] == 1.0
  _, padding = masked["padding"]
  assert padding[:, 3][:3].max() == 0.0
  np.testing.assert_allclose(padding[3], 0.25)  # a fully masked row is uniform, not NaN
  m = qkv.multi_head()
  assert m["q"].shape == (1, 4, 2, 4) and m["weights"].shape == (1, 2, 4, 4)
  assert m["per_head_difference"] < 1e-5


def test_attention_doc_quotes_the_script_output():
  printed = [l for l in load("qkv_example").report().splitlines() if l.strip()]
  quoted = "\n".join(re.findall(r"```text\n(.*?)\n```", read("attention.md"), re.S))
  assert quoted.splitlines() == printed, "rerun python docs/qkv_example.py and update " \
                                         "docs/attention.md"


# ------------------------------------------------------------------------ architecture.py


def test_architecture_doc_matches_the_code():
  arch = load("architecture")
  current = read("architecture.md")
  assert arch.updated_doc(current) == current, (
      "docs/architecture.md is stale: run python docs/architecture.py --write")


@pytest.mark.parametrize("task", ["translation", "generation", "classification"])
def test_architecture_trace_covers_every_parameter(task):
  arch = load("architecture")
  _, _, model, inputs = arch.build(f"task={task}")
  root, variables = arch.trace(model, inputs)
  called = set()

  def walk(call):
    called.add(call.path)
    for c in call.children:
      walk(c)
  walk(root)
  owners = {tuple(p.key for p in path[:-1])
            for path, _ in jax.tree_util.tree_leaves_with_path(variables["params"])}
  assert owners <= called, owners - called
  logits = root.output[0]
  assert logits.shape[0] == arch.BATCH and logits.dtype == jnp.float32
