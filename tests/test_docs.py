"""The scripts behind docs/: they run, measure what the documents say, and the documents
quote what they print (docs/architecture.md and docs/attention.md cannot drift from the code)."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.run_record import cpu_device_flags

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


# ----------------------------------------------------------------------------- demo.py


def test_readme_quotes_the_recorded_demo_run():
  """README's demo output (the progress line, the ending, the parameter count, the Results
  cell) is docs/demo_results.json's, recorded by docs/demo.py from a real run, and the demo
  config has not changed since that run (else: rerun docs/demo.py and paste its quotes)."""
  demo = load("demo")
  with open(demo.RECORD, encoding="utf-8") as f:
    record = json.load(f)
  assert demo.config_drift(record["config"]) == []
  with open(os.path.join(os.path.dirname(DOCS), "README.md"), encoding="utf-8") as f:
    readme = f.read()
  for quote in demo.readme_quotes(record):
    assert quote in readme, quote


def test_demo_record_parses_the_printed_output():
  """docs/demo.py reads the progress line, the evaluations' exact match, the last step's
  evaluation lines and the parameter count from the demo's output, with or without absl's
  prefix, and refuses output that lacks one of them."""
  demo = load("demo")
  output = "\n".join([
      "I1204 20:57:48.061405 1400804 train.py:570] module  parameters",
      "total         233,000",
      "step 100/3000  loss 1.2  acc 0.5  (includes compilation)",
      f"step {demo.QUOTED_STEP}/3000  loss 0.0084  acc 0.99  35.1 steps/s  ETA 1m",
      "step 3000/3000  loss 0.001  acc 1  30.0 steps/s  ETA 0s",
      "eval at step 1000: loss 0.5  exact_match 0.832",
      "eval at step 3000: loss 0.01  exact_match 1",
      "final evaluation at step 3000: loss 0.01  exact_match 1",
      "  input: 123 -> 321"])
  record = demo.parse(output)
  assert record["progress_line"].startswith(f"step {demo.QUOTED_STEP}/3000")
  assert record["exact_match"] == {"1000": 0.832, "3000": 1.0}
  assert record["ending"] == ["eval at step 3000: loss 0.01  exact_match 1",
                              "final evaluation at step 3000: loss 0.01  exact_match 1",
                              "input: 123 -> 321"]
  assert record["parameters"] == 233000 and record["steps_per_second"] == [30.0, 35.1]
  with pytest.raises(ValueError, match="a final evaluation"):
    demo.parse(output.replace("final evaluation at", "eval at"))


SHARED_DATA = os.path.join(os.path.dirname(os.path.dirname(DOCS)), "shared", "data")


@pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason="needs ../shared/data")
def test_the_python_api_example_runs_as_a_notebook(tmp_path):
  """docs/python_api.md's python cells, in order, in one namespace (their own asserts
  check the results), as a user runs them: a fresh Python on one CPU device, from the
  repository root, with the runs directory moved under tmp_path."""
  cells = re.findall(r"```python\n(.*?)```", read("python_api.md"), re.S)
  assert len(cells) >= 4 and 'RUNS = os.path.join("runs", "python_api")' in cells[0]
  cells[0] = cells[0].replace('os.path.join("runs", "python_api")', repr(str(tmp_path / "runs")))
  script = tmp_path / "notebook.py"
  script.write_text("\n".join(f"# cell {i + 1}\n{cell}" for i, cell in enumerate(cells)))
  root = os.path.dirname(DOCS)
  # (a notebook started in the repository root imports from it; so does `pip install -e .`)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root)
  # Not the 8 fake devices, and LLVM's full optimisation back (conftest.py lowers it): the
  # notebook runs 450 real steps, about 2x slower each at level 0 (the whole notebook, alone
  # on the machine: 79 s against 108 s).
  flags = cpu_device_flags(0, env.get("XLA_FLAGS", "")).split()
  env["XLA_FLAGS"] = " ".join(f for f in flags if "xla_backend_optimization_level" not in f)
  result = subprocess.run([sys.executable, str(script)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=1200)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "ROMEO:" in result.stdout
  assert os.path.isdir(tmp_path / "runs" / "sst2" / "checkpoints")


def test_induction_scores_of_hand_built_heads():
  induction = load("induction_heads")
  tokens = list("abcab")  # the second "a" (4th) and "b" (5th) occurred before
  assert induction.induction_targets(tokens) == {3: 1, 4: 2}
  assert induction.copyable_positions([5, 6, 7, 5, 6]) == [4]
  n = len(tokens)
  previous = np.zeros((n, n))
  previous[0, 0] = 1.0
  previous[np.arange(1, n), np.arange(n - 1)] = 1.0
  copier = np.eye(n)
  copier[3] = np.eye(n)[1]  # query 3 ("a") looks at 1, the token after the earlier "a"
  copier[4] = np.eye(n)[2]
  weights = np.stack([previous, copier])[None]  # [1 layer, 2 heads, q, k]
  np.testing.assert_allclose(induction.previous_token_scores(weights), [[1.0, 0.0]])
  np.testing.assert_allclose(induction.induction_scores(weights, tokens), [[0.0, 1.0]])
  lines = induction.repeated_spans(20, seed=0, span=6, min_span=3)
  for line in lines:
    half = len(line) // 2
    assert 3 <= half <= 6 and len(set(line[:half])) == half and line[:half] == line[half:]
  assert len({len(line) for line in lines}) > 1


def test_configs_doc_lists_every_field_of_every_group():
  """docs/configs.md's table of groups names each field of configs/default.py's groups
  (and no field that is gone), so a new field cannot go undocumented there."""
  from configs import default
  with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "configs.md"),
            encoding="utf-8") as f:
    rows = {m.group(1): set(re.findall(r"`(\w+)`", m.group(2)))
            for m in re.finditer(r"^\| `config\.(\w+)` \|[^|]*\|(.*)\|$", f.read(), re.M)}
  config = default.get_config()
  groups = {k for k, v in config.items() if hasattr(v, "items")}
  assert groups == set(rows)
  for group in groups:
    assert rows[group] == set(config[group].keys()), group


# ----------------------------------------------------------------------------- results/


@pytest.mark.parametrize("sweep", sorted(
    d for d in os.listdir(os.path.join(os.path.dirname(DOCS), "results"))
    if os.path.exists(os.path.join(os.path.dirname(DOCS), "results", d, "comparison.csv"))))
def test_committed_sweep_results_are_well_formed_and_agree(sweep):
  """Each committed sweep's comparison.csv parses (every row as wide as the header, as
  csv.DictReader reads it) and says what its comparison.md says: the same variants in the
  same order with the same validation losses. A hand edit that breaks the quoting of a
  field with commas (as once happened to results/since_2017/) fails here."""
  import csv  # pylint: disable=import-outside-toplevel
  folder = os.path.join(os.path.dirname(DOCS), "results", sweep)
  with open(os.path.join(folder, "comparison.csv"), encoding="utf-8", newline="") as f:
    table = list(csv.reader(f))
  header, rows = table[0], table[1:]
  assert rows and all(len(row) == len(header) for row in rows), [
      row[0] for row in rows if len(row) != len(header)]
  rows = [dict(zip(header, row)) for row in rows]
  assert {row["status"] for row in rows} <= {"done", "partial", "failed", "not run"}
  with open(os.path.join(folder, "comparison.md"), encoding="utf-8") as f:
    md = [[cell.strip() for cell in line.strip().strip("|").split("|")]
          for line in f if line.startswith("| ")]
  column = md[0].index("val loss")
  assert [cells[0] for cells in md[1:]] == [row["variant"] for row in rows]
  assert [cells[column] for cells in md[1:]] == [row["val_loss"] for row in rows]
