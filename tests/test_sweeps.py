"""Ablation sweeps: a sweep of two tiny variants run through main.py writes the comparison
(Markdown, CSV, plot) with the right overrides and parameter counts, and a rerun skips the
finished variant and resumes the stopped one; bad sweep files are one-line errors; the
comparison of a partial sweep is honest about what is missing."""

import csv
import json
import os
import struct

import jax
import numpy as np
import pytest

from modes import sweep as sweeps
import tasks
from configs.sweeps import Sweep, SweepError, Variant, load_sweep
from tests.cli_helpers import assert_one_error_line, run_main
from tests.tiny_configs import tiny_config

SWEEP_FILE = """
from configs.sweeps import Sweep, Variant
from tests.tiny_configs import tiny_config


def get_sweep():
  base = tiny_config(train=dict(num_train_steps=4, log_every_steps=2,
                                checkpoint_every_steps=2),
                     optim=dict(warmup_steps=2), data=dict(num_eval_examples=32),
                     eval=dict(eval_every_steps=2, num_print_examples=0))
  return Sweep(base, [
      Variant("base", description="the tiny base"),
      Variant("wide", {"model.d_model": 48, "model.d_ff": 96}, group="C",
              description="wider"),
  ])
"""


def _write_sweep(tmp_path, name="two", text=None):
  path = tmp_path / f"{name}.py"
  path.write_text(SWEEP_FILE if text is None else text)
  return str(path)


def _mtimes(directory):
  """path -> mtime of every file under `directory`."""
  return {os.path.join(root, name): os.stat(os.path.join(root, name)).st_mtime_ns
          for root, _, names in os.walk(directory) for name in names}


def _png_size(path):
  with open(path, "rb") as f:
    header = f.read(24)
  assert header[:8] == b"\x89PNG\r\n\x1a\n"
  return struct.unpack(">II", header[16:24])  # the IHDR chunk's width and height


def _recount(config) -> int:
  """The parameters of `config`'s model, initialised for real and counted leaf by leaf."""
  params = tasks.get_task(config).init_params(jax.random.PRNGKey(1))
  return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(params))


def test_sweep_compares_variants_and_resumes_without_retraining(tmp_path):
  path, workdir = _write_sweep(tmp_path), str(tmp_path / "sweep")
  first = run_main("--mode=sweep", f"--sweep={path}", f"--workdir={workdir}")
  assert first.returncode == 0, first.stderr[-3000:]
  assert "2 of 2 variants done" in first.stdout

  with open(os.path.join(workdir, "comparison.csv"), encoding="utf-8") as f:
    rows = {r["variant"]: r for r in csv.DictReader(f)}
  assert list(rows) == ["base", "wide"]
  assert rows["base"]["overrides"] == ""
  assert rows["wide"]["overrides"] == "model.d_model=48, model.d_ff=96"
  assert rows["wide"]["group"] == "C"
  base = tiny_config(data=dict(num_eval_examples=32))
  wide = tiny_config(data=dict(num_eval_examples=32), model=dict(d_model=48, d_ff=96))
  assert int(rows["base"]["parameters"]) == _recount(base)
  assert int(rows["wide"]["parameters"]) == _recount(wide) > _recount(base)
  for name, row in rows.items():
    assert row["status"] == "done" and row["steps"] == "4"
    assert float(row["train_seconds"]) > 0 and row["train_seconds_lower_bound"] == "False"
    records = sweeps.read_metrics(os.path.join(workdir, name))
    final = [r for r in records if "final/loss" in r][-1]
    assert float(row["val_loss"]) == pytest.approx(final["final/loss"], abs=1e-4)
    assert float(row["val_perplexity"]) == pytest.approx(final["final/perplexity"], abs=1e-3)
    assert float(row["exact_match"]) == pytest.approx(final["final/exact_match"], abs=1e-4)
  markdown = open(os.path.join(workdir, "comparison.md"), encoding="utf-8").read()
  assert "| wide | C | wider | model.d_model=48, model.d_ff=96 |" in markdown
  assert f"| {int(rows['wide']['parameters']):,} |" in markdown
  assert _png_size(os.path.join(workdir, "validation_loss.png")) == (900, 550)

  # "wide" loses its result, as if stopped after its last checkpoint: the rerun resumes it
  # from there (no training step is left) and leaves the finished "base" untouched.
  state_path = os.path.join(workdir, "wide", sweeps.STATE_FILE)
  with open(state_path, encoding="utf-8") as f:
    state = json.load(f)
  del state["result"]
  with open(state_path, "w", encoding="utf-8") as f:
    json.dump(state, f)
  before = _mtimes(os.path.join(workdir, "base"))
  again = run_main("--mode=sweep", f"--sweep={path}", f"--workdir={workdir}")
  assert again.returncode == 0, again.stderr[-3000:]
  assert "variant 1/2 'base' finished earlier (done in" in again.stderr
  assert "skipped" in again.stderr
  assert f"training in {os.path.join(workdir, 'base')}" not in again.stderr
  assert "resumed from the checkpoint at step 4" in again.stderr
  assert "step 2/4" not in again.stderr and "step 4/4" not in again.stderr
  assert _mtimes(os.path.join(workdir, "base")) == before
  with open(os.path.join(workdir, "comparison.csv"), encoding="utf-8") as f:
    rows_again = {r["variant"]: r for r in csv.DictReader(f)}
  assert rows_again["wide"]["status"] == "done"
  assert len(sweeps.read_state(os.path.join(workdir, "wide"))["segments"]) == 2
  assert float(rows_again["wide"]["train_seconds"]) > float(rows["wide"]["train_seconds"])

  # A finished variant is never silently reported under a config it did not run (checked
  # before anything trains, so in-process here).
  with pytest.raises(SweepError, match=r"variant 'base' finished .* with another config "
                                       r"\(eval\.num_print_examples: 0 then, 1 now\)"):
    sweeps.run_sweep(load_sweep(path), workdir, {"eval.num_print_examples": 1})

  # A run recorded before a config field existed (here data.length_bucket, absent from
  # its record) resumes while the field holds its default, and is refused when it does not.
  state_path = os.path.join(workdir, "base", sweeps.STATE_FILE)
  with open(state_path, encoding="utf-8") as f:
    state = json.load(f)
  del state["result"]["config"]["data"]["length_bucket"]
  with open(state_path, "w", encoding="utf-8") as f:
    json.dump(state, f)
  assert [r["status"] for r in sweeps.run_sweep(load_sweep(path), workdir, {})] == ["done"] * 2
  with pytest.raises(SweepError, match=r"variant 'base' finished .* with another config "
                                       r"\(data\.length_bucket: None then, 16 now\)"):
    sweeps.run_sweep(load_sweep(path), workdir, {"data.length_bucket": 16})


@pytest.mark.parametrize("variants,expected", [
    ('Variant("a", {"model.d_modle": 48}), Variant("b")',
     ["variant 'a'", "unknown config field 'model.d_modle'"]),
    ('Variant("a"), Variant("a", {"model.d_model": 48})', ["duplicate variant name 'a'"]),
], ids=["unknown_field", "duplicate_name"])
def test_bad_sweep_file_is_a_one_line_error(tmp_path, variants, expected):
  text = ("from configs.sweeps import Sweep, Variant\nfrom configs import default\n\n"
          f"def get_sweep():\n  return Sweep(default.get_config(), [{variants}])\n")
  result = run_main("--mode=sweep", f"--sweep={_write_sweep(tmp_path, 'bad', text)}",
                    f"--workdir={tmp_path / 'sweep'}")
  assert_one_error_line(result, *expected)
  assert not os.path.exists(tmp_path / "sweep")


@pytest.mark.parametrize("variants,expected", [
    ([Variant("a", {"model.d_model": "wide"})], "model.d_model='wide' is invalid"),
    ([Variant("a/b")], "variant name 'a/b' is invalid"),
    ([Variant("a", {"compute.cpu_devices": 2})],
     "compute.cpu_devices is set once for the whole sweep"),
    ([], "has no variants"),
], ids=["wrong_type", "bad_name", "process_field", "empty"])
def test_sweep_checks_its_variants(variants, expected):
  with pytest.raises(SweepError, match=expected.replace("(", r"\(")):
    Sweep(tiny_config(), variants, name="s").check()


def test_sweep_file_errors_name_the_file(tmp_path):
  with pytest.raises(SweepError, match="no get_sweep"):
    load_sweep(_write_sweep(tmp_path, "empty", "x = 1\n"))
  with pytest.raises(SweepError, match=r"\(line 2\): ZeroDivisionError"):
    load_sweep(_write_sweep(tmp_path, "broken", "def get_sweep():\n  return 1 / 0\n"))
  with pytest.raises(SweepError, match="no such file"):
    load_sweep(str(tmp_path / "absent.py"))
  with pytest.raises(SweepError, match="is a folder; give a sweep file in it"):
    load_sweep(str(tmp_path))
  (tmp_path / "notes.txt").write_text(SWEEP_FILE)
  with pytest.raises(SweepError, match=r"a sweep file is Python \(a \.py file"):
    load_sweep(str(tmp_path / "notes.txt"))


def test_comparison_of_a_partial_sweep(tmp_path):
  """Without training: a variant stopped hard mid-run (its newest evaluation, a lower
  bound on its time), one not started; command-line overrides reach every variant."""
  sweep = Sweep(tiny_config(train=dict(num_train_steps=100)), [
      Variant("stopped", {"model.num_heads": 4}), Variant("waiting", {"model.d_ff": 32})],
                name="s")
  directory = tmp_path / "stopped"
  directory.mkdir()
  (directory / sweeps.STATE_FILE).write_text(json.dumps({"segments": [
      {"start": 1000.0, "seconds": 30.0}, {"start": 2000.0, "seconds": None}]}))
  records = [{"step": 10, "time": 1010.0, "train/loss": 3.0},
             {"step": 20, "time": 1020.0, "eval/loss": 2.5, "eval/perplexity": 12.0},
             {"step": 30, "time": 2012.0, "train/loss": 2.0},
             {"step": 40, "time": 2015.0, "eval/loss": 1.5, "eval/perplexity": 4.5}]
  (directory / "metrics.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in records) + '{"step": 41, "ti')
  rows = sweeps.write_comparison(sweep, str(tmp_path), {"train.num_train_steps": 50})
  stopped, waiting = rows
  assert stopped["status"] == "partial (step 30 of 50)"
  assert (stopped["loss"], stopped["perplexity"]) == (1.5, 4.5)
  assert stopped["train_seconds"] == 30.0 + 15.0 and stopped["train_seconds_lower_bound"]
  assert stopped["curve"] == {20: 2.5, 40: 1.5}
  assert waiting["status"] == "not started" and waiting["train_seconds"] is None
  markdown = (tmp_path / "comparison.md").read_text()
  assert "train.num_train_steps=50" in markdown and ">= 45s" in markdown
  assert _png_size(str(tmp_path / "validation_loss.png")) == (900, 550)


def test_loss_plot_gives_every_variant_its_own_line():
  """Twelve variants (Table 3 has eleven and more): twelve colours, and no two lines of a
  larger sweep look the same."""
  sweep = Sweep(tiny_config(), [Variant(f"v{i}") for i in range(12)], name="twelve")
  rows = [{"variant": f"v{i}", "curve": {100: 3.0 - 0.1 * i, 200: 2.0 - 0.1 * i}}
          for i in range(12)]
  lines = sweeps.loss_figure(sweep, rows).axes[0].get_lines()
  assert [l.get_label() for l in lines] == [r["variant"] for r in rows]
  from matplotlib.colors import to_hex  # pylint: disable=g-import-not-at-top
  assert len({to_hex(l.get_color()) for l in lines}) == 12
  styles = [tuple(sweeps.line_style(i).values()) for i in range(40)]
  assert len({s[:2] for s in styles}) == 40  # (colour, line style)
  assert len({s[0] for s in styles[:20]}) == 20


def _finish(workdir, sweep, variant, overrides, metrics=None):
  """Records `variant` as finished (done) with the config `overrides` build, as run_sweep
  would, without training."""
  directory = os.path.join(workdir, variant.name)
  os.makedirs(directory)
  config = sweep.config(variant, overrides)
  metrics = metrics or {"loss": 1.25, "perplexity": 3.5}
  result = {"status": "done", "metrics": metrics, "steps": 20,
            "parameters": 1000, "config": json.loads(config.to_json()), "finished": 1.0}
  with open(os.path.join(directory, sweeps.STATE_FILE), "w", encoding="utf-8") as f:
    json.dump({"variant": variant.name, "segments": [{"start": 0.0, "seconds": 5.0}],
               "result": result}, f)


@pytest.mark.parametrize("task,metrics,cell", [
    ("classification", {"loss": 0.4, "accuracy": 0.836}, "| 0.8360 |"),
    ("translation", {"loss": 1.5, "perplexity": 4.5, "bleu": 35.123}, "| 35.12 |")])
def test_the_comparison_gives_a_fraction_four_digits_and_a_score_two(tmp_path, task, metrics,
                                                                     cell):
  """Accuracies of two seeds often differ in the third digit: 0.836 and 0.843 must not both
  read 0.84; BLEU keeps two decimals."""
  sweep = Sweep(tiny_config(task), [Variant("one")], name="digits")
  _finish(str(tmp_path), sweep, sweep.variants[0], {}, metrics)
  rows = sweeps.write_comparison(sweep, str(tmp_path))
  assert rows[0]["metric"] == list(metrics.values())[-1]
  assert cell in (tmp_path / "comparison.md").read_text()


def test_report_without_the_sweeps_flags_counts_finished_variants_and_names_the_flags(
    tmp_path):
  path, workdir = _write_sweep(tmp_path), str(tmp_path / "sweep")
  sweep = load_sweep(path)
  base, wide = sweep.variants
  # A smoke run: both variants ran with fewer steps; "wide" also with more heads.
  _finish(workdir, sweep, base, {"train.num_train_steps": 20})
  _finish(workdir, sweep, wide, {"train.num_train_steps": 20, "model.num_heads": 4})

  rows = sweeps.write_comparison(sweep, workdir)  # no flags: num_train_steps is 4
  assert [r["status"] for r in rows] == ["done", "done"]
  assert [r["loss"] for r in rows] == [1.25, 1.25]
  lines = sweeps.difference_lines(rows)
  assert lines == [
      "model.num_heads: variant wide ran with 4, the flags now give 2; "
      "--config.model.num_heads=4 builds theirs",
      "train.num_train_steps: all 2 finished variants ran with 20, the flags now give 4; "
      "--config.train.num_train_steps=20 builds theirs"]
  markdown = open(os.path.join(workdir, "comparison.md"), encoding="utf-8").read()
  assert all(f"- {line}" in markdown for line in lines)
  # With the flags they ran, nothing differs.
  matching = sweeps.write_comparison(sweep, workdir, {"train.num_train_steps": 20})
  assert sweeps.difference_lines(matching) == [lines[0]]

  result = run_main("--mode=sweep_report", f"--sweep={path}", f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "2 of 2 variants done" in result.stdout
  assert "  train.num_train_steps: all 2 finished variants ran with 20" in result.stdout
  assert "--config.model.num_heads=4 builds theirs" in result.stdout


SWEEP_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "configs", "sweeps")


@pytest.mark.parametrize("name", sorted(f[:-3] for f in os.listdir(SWEEP_DIR)
                                        if f.endswith(".py") and f != "__init__.py"))
def test_committed_sweep_files_build_valid_configs(name):
  """Every variant of every committed sweep passes the run's config checks (a typo in a
  field's value fails here, not an hour into the sweep)."""
  import train  # pylint: disable=g-import-not-at-top
  sweep = load_sweep(os.path.join(SWEEP_DIR, f"{name}.py"))
  sweep.check()
  for variant in sweep.variants:
    train.validate(sweep.config(variant), num_devices=1)


def test_since_2017_summary_pairs_seeds_and_calls_small_differences_noise():
  import importlib.util  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(SWEEP_DIR), "..", "docs", "since_2017.py")
  spec = importlib.util.spec_from_file_location("docs_since_2017", path)
  summary_module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(summary_module)

  def row(variant, loss):
    return {"variant": variant, "component": summary_module.component(variant), "loss": loss,
            "parameters": 100, "seconds": 1.0, "curve": {10: loss + 1, 20: loss}}
  rows = [row("base", 2.00), row("base_s1", 2.02), row("a", 1.99), row("a_s1", 2.01),
          row("b", 1.90), row("b_s1", 1.92), row("c", 2.10), row("c_s1", 2.12), row("d", 1.5)]
  summary = summary_module.summarize(rows, order=["base", "c"])
  assert [c["component"] for c in summary["components"]] == ["base", "c", "a", "b", "d"]
  assert summary["spread"] == pytest.approx(0.02)  # every pair differs by 0.02
  verdicts = {c["component"]: c["verdict"] for c in summary["components"]}
  assert verdicts == {"base": "", "a": "within noise", "b": "better", "c": "worse",
                      "d": "one seed: no verdict"}
  by_name = {c["component"]: c for c in summary["components"]}
  assert by_name["b"]["difference"] == pytest.approx(-0.10)
  assert by_name["a"]["curve"] == {10: pytest.approx(3.0), 20: pytest.approx(2.0)}
  table = summary_module.markdown(summary, {"b": "the better one"})
  assert "| b | the better one | 100 (+0.0%) | 1.9000, 1.9200 | 1.9100 | -0.1000 | better |" \
      in table


@pytest.mark.parametrize("content", ["", "{", "[1]", "null", '{"segments": 5}',
                                     '{"segments": [{"start": "x"}]}', '{"result": 3}',
                                     '{"result": {"metrics": {}}}'])
def test_a_damaged_sweep_json_is_named_by_the_report_and_the_sweep(tmp_path, content):
  """A variant's sweep.json emptied, cut short, or of another shape: --mode=sweep_report
  (write_comparison) and --mode=sweep (run_sweep, before any training) raise SweepError
  naming the file and what to do, not a traceback from deep in the comparison."""
  sweep = Sweep(tiny_config(), [Variant("a"), Variant("b")], name="s")
  (tmp_path / "a").mkdir()
  path = tmp_path / "a" / sweeps.STATE_FILE
  path.write_text(content, encoding="utf-8")
  for run in (lambda: sweeps.write_comparison(sweep, str(tmp_path), {}),
              lambda: sweeps.run_sweep(sweep, str(tmp_path), {})):
    with pytest.raises(SweepError, match=rf"{path} is damaged .*delete it"):
      run()
  assert path.read_text(encoding="utf-8") == content
  assert not (tmp_path / "b").exists()  # nothing trained
