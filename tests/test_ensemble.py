"""--ensemble (modes/ensemble.py): several classifier workdirs scored and used as one by the
mean of their class probabilities. Checked against each member's own --mode=eval and
--mode=predict output: the ensemble's probabilities are their mean, its scores are those of
its predictions, an ensemble of one is its member, members with different vocabularies
each read the text with their own tokenizer, and members that cannot be averaged (other
classes, other data, not classifiers, missing) are refused by name."""

import csv
import json
import math
import os

import jax
import numpy as np
import pytest

import modes
import train
from configs import default
from errors import UserError
from modes import ensemble
from tasks import classification_metrics
from tests.cli_helpers import assert_one_error_line, run_main
from tests.test_classification import tiny_config, write_corpus, write_table
from training import checkpointing

ONE_DEVICE = jax.local_devices()[:1]
# No evaluation while training: the tests evaluate the members themselves.
STEPS = dict(train=dict(num_train_steps=40, checkpoint_every_steps=40),
             eval=dict(eval_every_steps=1000))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Two classifiers of one corpus (seed 0 with 40 sentencepiece pieces, seed 1 with 32),
  trained 40 steps so that their probabilities still differ, and a third on the same
  texts with other class names (yes/no)."""
  root = tmp_path_factory.mktemp("ensemble")
  corpus = write_corpus(root / "corpus")
  other = root / "other"
  other.mkdir()
  renamed = {"positive": "yes", "negative": "no"}
  for stem in ("train", "dev"):
    write_table(other / f"{stem}.tsv", ["sentence", "label"],
                [[s, renamed[l]] for s, l in corpus[stem]], gz=stem == "train")
  write_table(other / "test.tsv", ["index", "sentence"],
              [[str(i), s] for i, s in enumerate(corpus["test"])])
  configs = {"a": tiny_config(root / "corpus", root / "tfds", seed=0, **STEPS),
             "b": tiny_config(root / "corpus", root / "tfds", seed=1,
                              model=dict(vocab_size=32), **STEPS),
             "c": tiny_config(other, root / "tfds_other", **STEPS)}
  dirs = {}
  for name, config in configs.items():
    dirs[name] = str(root / f"run_{name}")
    train.train_and_evaluate(config, dirs[name], devices=ONE_DEVICE, final_evaluation=False)
  return root, corpus, configs, dirs


def _member_eval(config, workdir):
  """(metrics, the predictions TSV's rows) of the member's own --mode=eval."""
  metrics = modes.evaluate_checkpoint(config, workdir, devices=ONE_DEVICE)
  report = sorted(f for f in os.listdir(os.path.join(workdir, "eval")) if
                  f.startswith("validation-latest") and f.endswith(".json"))[-1]
  with open(os.path.join(workdir, "eval", report)) as f:
    predictions = json.load(f)["predictions"]
  with open(predictions, encoding="utf-8") as f:
    return metrics, list(csv.DictReader(f, delimiter="\t"))


def _probabilities(rows):
  return np.array([[float(r["p(negative)"]), float(r["p(positive)"])] for r in rows])


def test_the_ensemble_is_the_mean_of_its_members(runs, tmp_path):
  _, corpus, configs, dirs = runs
  members = [dirs["a"], dirs["b"]]
  own = [_member_eval(configs[n], dirs[n]) for n in ("a", "b")]
  metrics = ensemble.evaluate_ensemble([configs["a"], configs["b"]], members,
                                       str(tmp_path / "ens"), devices=ONE_DEVICE)
  stem = tmp_path / "ens" / "eval" / "validation-ensemble-latest"
  report = json.load(open(f"{stem}.json"))
  with open(f"{stem}.predictions.tsv", encoding="utf-8") as f:
    rows = list(csv.DictReader(f, delimiter="\t"))
  # Every dev sentence once, in order, with its label; the probabilities are the mean of
  # the members' own (their files round to 6 decimals).
  assert [(r["text"], r["label"]) for r in rows] == corpus["dev"]
  expected = (_probabilities(own[0][1]) + _probabilities(own[1][1])) / 2
  np.testing.assert_allclose(_probabilities(rows), expected, atol=2e-6)
  # The members disagree somewhere (else this test would not tell a mean from a copy).
  assert (np.argmax(_probabilities(own[0][1]), 1)
          != np.argmax(_probabilities(own[1][1]), 1)).any() or not np.allclose(
              _probabilities(own[0][1]), _probabilities(own[1][1]), atol=1e-3)
  # Its scores are its predictions' scores, computed here from the file.
  labels = [r["label"] for r in rows]
  predicted = ["positive" if p[1] > p[0] else "negative" for p in expected]
  ids = {"negative": 0, "positive": 1}
  matrix = classification_metrics.confusion_matrix([ids[l] for l in labels],
                                                   [ids[p] for p in predicted], 2)
  assert metrics["accuracy"] == pytest.approx(np.trace(matrix) / len(rows))
  assert metrics["macro_f1"] == pytest.approx(classification_metrics.scores(matrix)["macro_f1"])
  loss = np.mean([-math.log(p[ids[l]]) for p, l in zip(expected, labels)])
  assert metrics["loss"] == pytest.approx(loss, rel=1e-4)
  assert report["confusion_matrix"] == matrix.tolist()
  # Each member's own scores, as its --mode=eval gives them, its loss unsmoothed like the
  # ensemble's (the recipe's eval loss is label-smoothed), and their mean.
  for row, (mine, mine_rows) in zip(report["members"], own):
    assert row["metrics"]["accuracy"] == pytest.approx(mine["accuracy"])
    assert row["metrics"]["macro_f1"] == pytest.approx(mine["macro_f1"])
    assert row["metrics"]["loss"] == pytest.approx(np.mean(
        [-math.log(p[ids[r["label"]]]) for p, r in zip(_probabilities(mine_rows), mine_rows)]),
        rel=1e-4)
  assert report["member_mean"]["accuracy"] == pytest.approx(
      (own[0][0]["accuracy"] + own[1][0]["accuracy"]) / 2)
  assert [m["workdir"] for m in report["members"]] == members


def test_an_ensemble_of_one_is_its_member(runs, tmp_path):
  _, _, configs, dirs = runs
  mine, rows = _member_eval(configs["b"], dirs["b"])
  metrics = ensemble.evaluate_ensemble([configs["b"]], [dirs["b"]], str(tmp_path),
                                       devices=ONE_DEVICE)
  assert metrics["accuracy"] == pytest.approx(mine["accuracy"])
  assert metrics["macro_f1"] == pytest.approx(mine["macro_f1"])
  with open(tmp_path / "eval" / "validation-ensemble-latest.predictions.tsv") as f:
    np.testing.assert_allclose(_probabilities(list(csv.DictReader(f, delimiter="\t"))),
                               _probabilities(rows), atol=1e-6)
  # --step names the step of every member, and the report says which.
  again = ensemble.evaluate_ensemble([configs["b"]], [dirs["b"]], str(tmp_path),
                                     devices=ONE_DEVICE, step=40)
  assert again == metrics
  assert (tmp_path / "eval" / "validation-ensemble-latest-step40.json").exists()
  with pytest.raises(checkpointing.CheckpointError, match="no checkpoint of step 7 in .*"
                                                          "it has steps 40"):
    ensemble.evaluate_ensemble([configs["b"]], [dirs["b"]], str(tmp_path),
                               devices=ONE_DEVICE, step=7)


def _parsed(line):
  label, _, classes = line.split("\t")
  return label, np.array([float(item.split("=")[1]) for item in classes.split()])


def test_predict_lines_average_members_with_their_own_tokenizers(runs):
  _, _, configs, dirs = runs
  lines = ["the film was superb", "", "a terrible plot", "quite dull but fine actor"]
  a = modes.predict_lines(configs["a"], dirs["a"], lines, devices=ONE_DEVICE)
  b = modes.predict_lines(configs["b"], dirs["b"], lines, devices=ONE_DEVICE)
  both = ensemble.predict_ensemble_lines([configs["a"], configs["b"]], [dirs["a"], dirs["b"]],
                                         lines, devices=ONE_DEVICE)
  assert both[1] == "" and len(both) == len(lines)
  for i in (0, 2, 3):
    label, p = _parsed(both[i])
    mean = (_parsed(a[i])[1] + _parsed(b[i])[1]) / 2
    np.testing.assert_allclose(p, mean, atol=1.5e-4)  # each printed to 4 decimals
    assert label == ("positive" if mean[1] > mean[0] else "negative")


def test_members_must_share_classes_and_data():
  with pytest.raises(ensemble.EnsembleError, match="differ on example 3"):
    ensemble._check_same_examples(  # pylint: disable=protected-access
        _Task(), [{"index": i, "label": "a"} for i in range(5)], _Task(),
        [{"index": i, "label": "b" if i == 3 else "a"} for i in range(5)], "x", "y")
  with pytest.raises(ensemble.EnsembleError, match="scored 4 examples, x 5"):
    ensemble._check_same_examples(  # pylint: disable=protected-access
        _Task(), [{"index": i, "label": "a"} for i in range(5)], _Task(),
        [{"index": i, "label": "a"} for i in range(4)], "x", "y")


class _Task:
  label_names = ["a", "b"]


def test_members_with_other_classes_are_refused(runs, tmp_path):
  _, _, configs, dirs = runs
  with pytest.raises(ensemble.EnsembleError, match=r"run_c has the classes \['no', 'yes'\]"):
    ensemble.evaluate_ensemble([configs["a"], configs["c"]], [dirs["a"], dirs["c"]],
                               str(tmp_path), devices=ONE_DEVICE)
  with pytest.raises(ensemble.EnsembleError, match="share their classes"):
    ensemble.predict_ensemble_lines([configs["a"], configs["c"]], [dirs["a"], dirs["c"]],
                                    ["good"], devices=ONE_DEVICE)


def test_only_classifiers_form_an_ensemble(runs):
  _, _, configs, _ = runs
  mlm = configs["a"].copy_and_resolve_references()
  mlm.objective = "mlm"
  with pytest.raises(ensemble.EnsembleError, match="objective 'mlm'"):
    ensemble.check_members([configs["a"], mlm], ["a", "pre"])
  digits = default.get_config("task=classification")  # synthetic digit strings: no text
  with pytest.raises(UserError, match="--mode=predict labels text"):
    ensemble.predict_ensemble_lines([configs["a"], digits], ["a", "digits"], ["good"])


def test_member_dirs_expand_globs_once_each_and_name_what_is_missing(runs, tmp_path):
  root, _, _, dirs = runs
  assert ensemble.member_dirs([str(root / "run_*")]) == [dirs["a"], dirs["b"], dirs["c"]]
  assert ensemble.member_dirs([dirs["b"], str(root / "run_[ab]"), ""]) == [dirs["b"],
                                                                         dirs["a"]]
  with pytest.raises(ensemble.EnsembleError, match="names no directory"):
    ensemble.member_dirs([str(tmp_path / "nothing*")])
  (tmp_path / "empty").mkdir()
  with pytest.raises(ensemble.EnsembleError, match="holds no config.json"):
    ensemble.member_dirs([str(tmp_path / "empty")])


def test_command_line_eval_with_a_glob_and_refusals(runs, tmp_path):
  root, _, configs, dirs = runs
  # No --config: each member runs with the config saved in its workdir.
  result = run_main("--mode=eval", f"--workdir={tmp_path / 'ens'}",
                    f"--ensemble={root / 'run_[ab]'}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "validation: ensemble of 2 (latest checkpoints" in result.stdout
  assert dirs["a"] in result.stdout and dirs["b"] in result.stdout
  report = json.load(open(tmp_path / "ens" / "eval" / "validation-ensemble-latest.json"))
  assert [m["workdir"] for m in report["members"]] == [dirs["a"], dirs["b"]]
  # Each member keeps its own saved model (b: 32 pieces, seed 1).
  assert report["members"][1]["metrics"]["accuracy"] == pytest.approx(
      modes.evaluate_checkpoint(configs["b"], dirs["b"], devices=ONE_DEVICE)["accuracy"])
  assert_one_error_line(run_main("--mode=train", f"--workdir={tmp_path / 'x'}",
                                 f"--ensemble={dirs['a']}"),
                        "--ensemble is for --mode=eval, --mode=predict")
  assert_one_error_line(run_main("--mode=eval", f"--workdir={tmp_path / 'x'}",
                                 f"--ensemble={tmp_path / 'none'}"),
                        "names no directory")
