"""--mode=attention and --mode=head_importance: look inside a checkpoint's attention
(inspection/attention_maps.py does the analysis and drawing)."""

import os
from typing import Optional, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

import files
import train
from input_pipeline import batching
from input_pipeline.local_builders import DataError
from inspection import attention_maps
from modes.evaluate import report_name
from modes.run import open_run
from training import steps


def attention_report(config: ml_collections.ConfigDict, workdir: str,
                     text: Optional[str] = None, reference: Optional[str] = None,
                     example: Optional[int] = None, heads: Sequence[str] = (),
                     checkpoint: str = "latest", step: Optional[int] = None):
  """Draws the attention of a checkpoint of `workdir` on one input: `text` (for
  translation with the target `reference`, or else the model's own translation) or
  example number `example` of the eval split. Writes into <workdir>/attention/<checkpoint>-
  step<N>-<name>/ an overview, a grid of the heads of every layer of every kind, a
  full-size map for each of `heads` ('LAYER:HEAD' or 'KIND:LAYER:HEAD') and the per-head
  statistics (stats.txt, stats.json). Returns (the paths written, the statistics table)."""
  run = open_run(config, workdir, jax.local_devices()[:1])  # one example, no pmap
  task = run.task
  available = attention_maps.require_attention(task)
  single = [h for spec in heads for h in attention_maps.parse_head(spec, available)]
  step, params = run.restore(checkpoint, step)
  if example is not None:
    source = task.data_source("eval")
    if not 0 <= example < len(source):
      raise DataError(f"--example={example}: the eval split ({config.data.eval_split}) has "
                      f"examples 0 to {len(source) - 1}")
    fields = set(task.attention_fields.values())
    chosen = {f: np.asarray(v) for f, v in source[example].items() if f in fields}
    name = f"example{example}"
  else:
    chosen = task.attention_example(text or "", reference)
    name = attention_maps.directory_name(text or "")
  if not np.asarray(chosen["inputs"]).any():
    raise DataError("nothing to draw: the input has no tokens")
  files.check_writable(os.path.join(workdir, "attention"))  # before the compute
  maps = attention_maps.example_maps(task, params, [chosen])[0]
  directory = os.path.join(workdir, "attention", f"{checkpoint}-step{step}-{name}")
  about = {"checkpoint": checkpoint, "step": step, "text": text, "reference": reference,
           "example": example}
  paths = attention_maps.write_maps(maps, directory, single, about)
  return paths, attention_maps.stats_table(maps.stats())


def head_importance(config: ml_collections.ConfigDict, workdir: str,
                    devices: Optional[Sequence[jax.Device]] = None,
                    checkpoint: str = "latest", step: Optional[int] = None,
                    split: Optional[str] = None):
  """Removes each attention head of a checkpoint of `workdir` in turn (its output zeroed
  before W^O) and scores the loss (the unsmoothed negative log-likelihood per token) on
  the first config.eval.head_importance_batches batches of `split` (0 = all; default
  config.data.eval_split). Writes <workdir>/attention/head_importance-<split>-<checkpoint>-
  step<N>.md (heads sorted by the loss increase), .csv, .json and .png (layers x heads).
  Returns (loss with every head, {kind: [layers, heads] increase}, the paths)."""
  split = split or config.data.eval_split
  run = open_run(config, workdir, devices, split=split)
  shapes = attention_maps.require_attention(run.task)
  step, params = run.restore(checkpoint, step)
  files.check_writable(os.path.join(workdir, "attention"))  # before the compute
  p_masked = steps.compile_masked_eval(run.task, run.devices)
  params = steps.replicate(params, run.devices)
  batches = list(batching.iterate(run.eval_dataset,
                                  limit=config.eval.head_importance_batches or None))

  def loss_of(masks):
    tree = attention_maps.head_mask_tree(masks)
    sums = train.sum_dicts([jax.tree.map(lambda x: x[0], s) for s in
                            jax.device_get([p_masked(params, b, tree) for b in batches])])
    return sums["nll"] / max(sums["weight"], 1.0)

  logging.info("head importance: the loss of %d batches of %s with every head, then with "
               "each of %d heads removed ...", len(batches), split,
               sum(layers * heads for layers, heads in shapes.values()))
  baseline, increase = attention_maps.head_importance(shapes, loss_of)  # logs its progress
  about = {"split": split, "checkpoint": checkpoint, "step": step, "batches": len(batches)}
  paths = attention_maps.write_importance(
      os.path.join(workdir, "attention"),
      f"head_importance-{report_name(split)}-{checkpoint}-step{step}",
      baseline, increase, about)
  return baseline, increase, paths
