"""--mode=eval: score a split with a checkpoint, write the scores and predictions."""

import json
import os
import re
import time
from typing import Dict, Optional, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

import files
import train
from modes.run import open_run
from training import steps


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        devices: Optional[Sequence[jax.Device]] = None,
                        step: Optional[int] = None, split: Optional[str] = None,
                        checkpoint: str = "latest") -> Dict[str, float]:
  """Restores a checkpoint of `workdir` (modes.run.Run.restore), decodes and scores the
  whole `split` (default config.data.eval_split), writes the scores (JSON) and, for tasks
  that produce text, the predictions (one per line, in dataset order) under
  <workdir>/eval/, and prints a table. Returns the metrics."""
  split = split or config.data.eval_split
  run = open_run(config, workdir, devices, split=split)
  step, params = run.restore(checkpoint, step)
  if jax.process_index() == 0:  # the reports' place, tried before the compute
    check_report_place(workdir)
  _, p_eval, p_predict = steps.compile_steps(run.task, run.tx, config, run.devices)
  start = time.perf_counter()
  counts = []  # real examples of each batch whose loss is scored (every batch, here)

  def counting_eval(params, batch):
    counts.append(real_examples(batch))
    return p_eval(params, batch)

  evaluator = train.Evaluator(run.task, counting_eval, p_predict, run.eval_dataset,
                              split=split)
  metrics, records = evaluator.run(
      f"evaluation of the {checkpoint} checkpoint on {split}", step,
      steps.replicate(params, run.devices), num_examples=config.eval.num_print_examples,
      decode_batches=train.final_decode_batches(run.task, config))
  examples = sum(counts)
  if jax.process_count() > 1:  # each process scored its rows of every batch
    examples = int(np.sum(multihost_utils.process_allgather(np.int64(examples))))
  if jax.process_index() == 0:
    _report(run, split, checkpoint, step, metrics, records, time.perf_counter() - start,
            examples)
  return metrics


def real_examples(batch) -> int:
  """The examples of a host batch (`[devices, rows, length]` arrays) that are not padding:
  rows whose `inputs` hold a token. An evaluation batch holds one example a row."""
  inputs = np.asarray(batch["inputs"])
  return int(np.sum(inputs.reshape(-1, inputs.shape[-1]).any(axis=-1)))


def report_name(split: str) -> str:
  """`split` as a part of a report's file name. The split was checked against the
  dataset's splits already (opening its data); this keeps any name from becoming a path:
  tfds slices stay readable (train[:10%]), a path separator or other character becomes '_',
  and a leading '.' too (no hidden file, no '..')."""
  name = re.sub(r"[^\w.\[\]:%+=-]", "_", split)
  return "_" + name[1:] if name.startswith(".") else name


def check_report_place(workdir: str) -> None:
  """WriteError unless <workdir>/eval/, where the reports go, can be written."""
  files.check_writable(os.path.join(workdir, "eval"))


def _report(run, split: str, checkpoint: str, step: int, metrics, records,
            seconds: float, examples: int) -> None:
  """Writes <workdir>/eval/<split>-<checkpoint>-step<N>.json (and the predictions file)
  and prints the table. `examples`: how many the loss scored (the whole split); the
  predictions may cover fewer (config.eval.final_decode_batches), said as
  `predicted_examples`."""
  task, config = run.task, run.config
  stem = os.path.join(run.workdir, "eval", f"{report_name(split)}-{checkpoint}-step{step}")
  predicted = len(records) if records and len(records) != examples else None
  report = {"split": split, "checkpoint": checkpoint, "step": step,
            "examples": examples,
            **({} if predicted is None else {"predicted_examples": predicted}),
            "seconds": seconds, "metrics": metrics,
            "beam_size": config.decode.beam_size,
            "length_penalty": config.decode.length_penalty,
            **task.score_details(), **task.eval_report(records)}
  records.sort(key=lambda r: r["index"])
  heading = (f"{split} ({checkpoint} checkpoint, step {step}, {examples} examples"
             + ("" if predicted is None else f", predictions on {predicted}") + ")")
  write_report(task, stem, report, metrics, records, heading)


def write_report(task, stem: str, report: dict, metrics, records, heading: str) -> None:
  """Writes `report` to <stem>.json and the task's predictions file of `records` (sorted
  by index) beside it, each atomically; prints `heading`, the metrics, the task's signatures
  and summary tables, and where the files are."""
  predictions = task.prediction_file(records)
  if predictions:
    key, suffix, text = predictions
    files.write_atomically(stem + suffix, text)
    report[key] = stem + suffix
  files.write_atomically(stem + ".json", json.dumps(report, indent=2) + "\n")
  width = max(len(k) for k in metrics)
  print(heading)
  for k, v in metrics.items():
    print(f"  {k:<{width}}  {v:10.4f}")
  for name, signature in task.score_details().get("signatures", {}).items():
    print(f"  {name} signature: {signature}")
  for name, text in task.summary_texts(records).items():
    print(f"{name}:\n{text}")
  print(f"scores: {stem}.json" +
        (f"  {predictions[0]}: {stem}{predictions[1]}" if predictions else ""))
