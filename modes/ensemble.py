"""--ensemble: several trained classifiers scored and used as one, by the mean of their
class probabilities.

    python main.py --mode=eval --workdir=runs/sst2_seeds --ensemble='runs/sst2_seeds/seed*'
    echo "A warm, clever movie." | python main.py --mode=predict \\
        --workdir=runs/sst2_seeds --ensemble=runs/sst2_a,runs/sst2_b

Each member is an ordinary classifier workdir, opened as --mode=eval and --mode=predict open
one (its saved config with the command line's --config.<field> flags, its own tokenizer,
the checkpoint that --checkpoint and --step name), so members may differ in seed,
vocabulary or shape. They must share the classes, and for eval the data: every member
scores the same examples with the same labels, or the ensemble refuses. Members are opened
one at a time, so memory holds one model. --workdir receives the ensemble's report.

    evaluate_ensemble(configs, members, workdir, ...)   --mode=eval
    predict_ensemble_lines(configs, members, lines)     --mode=predict
    member_dirs(patterns)                               the --ensemble list, globs expanded
"""

import glob
import math
import os
import time
from typing import Dict, List, Optional, Sequence

import jax
import ml_collections
import numpy as np

import train
from errors import UserError
from modes import evaluate
from modes.lines import LinePredictor
from modes.run import open_run
from modes.workdir_config import CONFIG_FILE
from tasks import classification_metrics
from training import steps

# The floor of a probability whose logarithm is taken (the ensemble's loss): a member
# certain of the wrong class gives an ensemble probability of 0 only if all are.
_TINY = 1e-12


class EnsembleError(UserError, ValueError):
  """Members that cannot form an ensemble: missing, not classifiers, or disagreeing on the
  classes or the data."""


def member_dirs(patterns: Sequence[str]) -> List[str]:
  """The members' workdirs: each entry of --ensemble, a directory or a glob pattern (its
  matches in sorted order), each directory once. A pattern that matches no directory, or
  a directory without the config.json training writes, is an EnsembleError."""
  members = []
  for pattern in patterns:
    pattern = pattern.strip()
    if not pattern:
      continue
    matches = sorted(p for p in glob.glob(pattern) if os.path.isdir(p))
    if not matches:
      raise EnsembleError(f"--ensemble: {pattern!r} names no directory; give trained "
                          f"classifier workdirs, comma-separated (a glob pattern such as "
                          f"'runs/sst2_seeds/seed*' may stand for several)")
    for match in matches:
      if not os.path.isfile(os.path.join(match, CONFIG_FILE)):
        raise EnsembleError(f"--ensemble: {match} holds no {CONFIG_FILE}, so no trained run; "
                            f"train it first (--mode=train) or leave it out")
      if os.path.realpath(match) not in {os.path.realpath(m) for m in members}:
        members.append(match)
  if not members:
    raise EnsembleError("--ensemble is empty; give the workdirs of trained classifiers")
  return members


def check_members(configs: Sequence[ml_collections.ConfigDict],
                  members: Sequence[str]) -> None:
  """EnsembleError unless every member is a classifier (not a masked-token pre-training,
  whose outputs are not class probabilities)."""
  for config, member in zip(configs, members):
    if config.task != "classification" or config.objective:
      what = f"task {config.task!r}" + (f", objective {config.objective!r}"
                                        if config.objective else "")
      raise EnsembleError(f"--ensemble averages class probabilities, so every member must "
                          f"be a classifier; {member} is a run of {what}")
  if jax.process_count() > 1:
    raise EnsembleError("--ensemble runs in one process; drop --distributed")


def evaluate_ensemble(configs: Sequence[ml_collections.ConfigDict], members: Sequence[str],
                      workdir: str, devices: Optional[Sequence[jax.Device]] = None,
                      step: Optional[int] = None, split: Optional[str] = None,
                      checkpoint: str = "latest") -> Dict[str, float]:
  """Scores the whole `split` (default the first member's config.data.eval_split) with
  each member's checkpoint, then with the mean of their class probabilities. Writes
  <workdir>/eval/<split>-ensemble-<checkpoint>[-step<N>].json (the ensemble's metrics, every
  member's, and the members' mean) with the ensemble's predictions beside it, prints the
  table, and returns the ensemble's metrics (`ensemble_metrics`; the members' are
  computed the same way from their own probabilities, so all their losses compare)."""
  check_members(configs, members)
  split = split or configs[0].data.eval_split
  files_checked = False
  start = time.perf_counter()
  task, reference, probabilities, rows = None, None, [], []
  for config, member in zip(configs, members):
    run = open_run(config, member, devices, split=split)
    member_step, params = run.restore(checkpoint, step)
    if not files_checked:  # the report's place, tried before the first member's compute
      evaluate.check_report_place(workdir)
      files_checked = True
    _, p_eval, p_predict = steps.compile_steps(run.task, run.tx, config, run.devices)
    _, _, records = train.evaluate(
        run.task, p_eval, p_predict, steps.replicate(params, run.devices),
        run.eval_dataset, split, title=f"{member} ({checkpoint}, step {member_step}) on {split}")
    records.sort(key=lambda r: r["index"])
    if task is None:
      task, reference = run.task, records
    _check_same_examples(task, reference, run.task, records, members[0], member)
    probabilities.append(np.array([r["probabilities"] for r in records], np.float64))
    rows.append({"workdir": member, "step": member_step,
                 "metrics": ensemble_metrics(run.task, records)})
    del params, p_eval, p_predict  # one member's model in memory at a time
  mean = np.mean(probabilities, axis=0)
  names = task.label_names
  records = [dict(r, predicted=names[int(np.argmax(p))], probabilities=[float(v) for v in p])
             for r, p in zip(reference, mean)]
  metrics = ensemble_metrics(task, records)
  member_mean = {k: float(np.mean([row["metrics"][k] for row in rows])) for k in metrics}
  report = {"split": split, "checkpoint": checkpoint, "examples": len(records),
            "seconds": time.perf_counter() - start, "metrics": metrics,
            "combination": "mean of the members' class probabilities",
            "members": rows, "member_mean": member_mean, **task.eval_report(records)}
  stem = os.path.join(workdir, "eval", f"{evaluate.report_name(split)}-ensemble-{checkpoint}"
                      + ("" if step is None else f"-step{step}"))
  lines = [f"{split}: ensemble of {len(members)} ({checkpoint} checkpoints, "
           f"{len(records)} examples)"]
  width = max(len(m) for m in list(members) + ["members, mean"])
  for row in rows:
    lines.append(f"  {row['workdir']:<{width}}  step {row['step']:>7}  "
                 + "  ".join(f"{k} {v:.4f}" for k, v in row["metrics"].items()))
  lines.append(f"  {'members, mean':<{width}}  {'':>12}  "
               + "  ".join(f"{k} {v:.4f}" for k, v in member_mean.items()))
  evaluate.write_report(task, stem, report, metrics, records, "\n".join(lines))
  return metrics


def ensemble_metrics(task, records: List[dict]) -> Dict[str, float]:
  """accuracy and macro_f1 of the records' predictions, and loss: the mean of
  -ln p(true class) under their probabilities (no label smoothing, which the training
  loss of a smoothed recipe includes)."""
  ids = {name: i for i, name in enumerate(task.label_names)}
  scores = classification_metrics.scores(task.confusion(records))
  loss = float(np.mean([-math.log(max(r["probabilities"][ids[r["label"]]], _TINY))
                        for r in records])) if records else 0.0
  return {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"], "loss": loss}


def _check_same_examples(task, reference: List[dict], other_task, records: List[dict],
                         first: str, member: str) -> None:
  """EnsembleError unless `member` scored the examples `first` did: the same classes in
  the same order, the same example indices with the same true labels."""
  if list(other_task.label_names) != list(task.label_names):
    raise EnsembleError(f"--ensemble: {member} has the classes {other_task.label_names}, "
                        f"{first} has {task.label_names}; members must share their classes")
  if len(records) != len(reference):
    raise EnsembleError(f"--ensemble: {member} scored {len(records)} examples, {first} "
                        f"{len(reference)}; members must score the same data (check "
                        f"config.data and config.eval.final_decode_batches)")
  for mine, theirs in zip(records, reference):
    if mine["index"] != theirs["index"] or mine["label"] != theirs["label"]:
      raise EnsembleError(
          f"--ensemble: {member} and {first} differ on example {theirs['index']} "
          f"(labels {mine['label']!r} and {theirs['label']!r}); members must score the "
          f"same data (check config.data.data_dir and the split)")


def predict_ensemble_lines(configs: Sequence[ml_collections.ConfigDict],
                           members: Sequence[str], lines: List[str],
                           devices: Optional[Sequence[jax.Device]] = None,
                           checkpoint: str = "latest",
                           step: Optional[int] = None) -> List[str]:
  """--mode=predict with an ensemble: per line the class of the members' mean
  probabilities, written as one member's --mode=predict writes it (an empty line stays
  empty)."""
  check_members(configs, members)
  import modes  # pylint: disable=g-import-not-at-top  # the package, imported by now
  for config in configs:  # text to label: not the synthetic digits
    modes.check_mode_fits(config, "predict")
  task, first, total = None, None, None
  for config, member in zip(configs, members):
    run = open_run(config, member, devices)
    _, params = run.restore(checkpoint, step)
    outputs = LinePredictor(run, params).outputs(lines, f"--mode=predict ({member})")
    if task is None:
      task, first = run.task, member
      total = [None if o is None else np.zeros_like(o, np.float64) for o in outputs]
    elif list(run.task.label_names) != list(task.label_names):
      raise EnsembleError(f"--ensemble: {member} has the classes {run.task.label_names}, "
                          f"{first} has {task.label_names}; members must share their classes")
    total = [None if t is None else t + o for t, o in zip(total, outputs)]
  return ["" if t is None else task.render_line(t / len(members)) for t in total]
