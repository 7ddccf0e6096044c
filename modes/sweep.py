"""Ablation sweeps: train a sweep's variants one after another and compare them.

    run_sweep(sweep, workdir)         train each variant in <workdir>/<variant name>/
                                      (resuming it, skipping finished ones), then compare
    write_comparison(sweep, workdir)  the comparison of what is there, without training:
                                      comparison.md, comparison.csv, validation_loss.png

A sweep (configs/sweeps/) is a base config and named variants of it. Each variant's
directory is an ordinary workdir (checkpoints, metrics.jsonl, config.json) plus sweep.json,
the runner's record: the wall-clock segments of its runs and, once it has finished, its
result (final metrics, parameter count, the config it ran). A variant with a result is
never trained again; delete its directory to redo it.
"""

import contextlib
import csv
import io
import json
import math
import os
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import jax
from absl import logging

import files
import tasks
import train
from config_checks import ConfigError
from errors import WriteError
from configs.sweeps import (Sweep, SweepError, Variant, config_differences,
                            field_differences, format_overrides)
from training import reporting, workdir_lock

STATE_FILE = "sweep.json"
PLOT_SIZE = (9.0, 5.5)  # inches at PLOT_DPI: a 900 x 550 pixel image
PLOT_DPI = 100
# The loss plot's lines: variant i gets colour i % 20 (matplotlib's ten, then ten of other
# hues), line style i // 10 (solid for the first ten, dashed for the next) and marker
# i % 7, so the first twenty variants have twenty colours and the first forty are
# distinct (colour, style) pairs.
PLOT_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
               "#7f7f7f", "#bcbd22", "#17becf",
               "#000000", "#000080", "#800000", "#b8860b", "#e600e6", "#008080", "#6b8e23",
               "#fa8072", "#66cc00", "#8000ff")
PLOT_STYLES = ("-", "--", ":", "-.")
PLOT_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


# ----------------------------------------------------------------------------- records


def read_state(directory: str) -> Dict[str, Any]:
  """A variant's sweep.json ({} when it has none). One that cannot be read, or is not
  the record this module writes, raises SweepError naming it."""
  path = os.path.join(directory, STATE_FILE)
  if not os.path.exists(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      state = json.load(f)
    problem = _state_problem(state)
  except (OSError, UnicodeDecodeError, ValueError) as e:
    problem = str(e)
  if problem:
    raise SweepError(f"{path} is damaged ({problem}); delete it to train this variant "
                     f"again (its recorded time and result are lost), or put back a copy")
  return state


def _state_problem(state) -> str:
  """What is wrong with a sweep.json's content ('' if nothing)."""
  number = (int, float)
  if not isinstance(state, dict):
    return f"a JSON {type(state).__name__}, not an object"
  segments = state.get("segments", [])
  if not isinstance(segments, list) or not all(
      isinstance(s, dict) and isinstance(s.get("start"), number)
      and isinstance(s.get("seconds"), (*number, type(None))) for s in segments):
    return "'segments' is not a list of {start, seconds}"
  result = state.get("result")
  if result is not None and not (isinstance(result, dict)
                                 and isinstance(result.get("status"), str)
                                 and isinstance(result.get("metrics", {}), dict)
                                 and isinstance(result.get("config", {}), dict)):
    return "'result' is not an object with a status, metrics and config"
  return ""


def _write_state(directory: str, state: Mapping[str, Any]) -> None:
  files.write_atomically(os.path.join(directory, STATE_FILE), json.dumps(state, indent=2) + "\n")


def read_metrics(directory: str) -> List[Dict[str, float]]:
  """The records of a variant's metrics.jsonl (a partial last line is left out)."""
  path = os.path.join(directory, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  records = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:  # a run killed while writing its last line
        pass
  return records


def train_seconds(state: Mapping[str, Any], records: Sequence[Mapping[str, float]]):
  """(seconds, complete): the wall clock of every run of the variant (setup, training,
  evaluations, checkpoints), summed over resumed segments. A segment whose end was not
  recorded (killed hard, or still running) counts up to its last metrics record, and
  `complete` is False: the sum is then a lower bound."""
  segments = state.get("segments", [])
  total, complete = 0.0, True
  for i, segment in enumerate(segments):
    if segment.get("seconds") is not None:
      total += segment["seconds"]
      continue
    complete = False
    end = segments[i + 1]["start"] if i + 1 < len(segments) else math.inf
    times = [r["time"] for r in records if segment["start"] <= r.get("time", -1) < end]
    total += max(times) - segment["start"] if times else 0.0
  return total, complete


def loss_curve(records: Sequence[Mapping[str, float]]) -> Dict[int, float]:
  """step -> validation loss: the periodic evaluations (`eval/loss`) and the final one
  (`final/loss`, the whole split), the newest record of a step winning (a resumed run
  repeats the steps after its checkpoint)."""
  curve = {}
  for key in ("eval/loss", "final/loss"):
    for r in records:
      if key in r:
        curve[int(r["step"])] = float(r[key])
  return dict(sorted(curve.items()))


# ----------------------------------------------------------------------------- running


def run_sweep(sweep: Sweep, workdir: str, overrides: Optional[Mapping[str, Any]] = None,
              devices: Optional[Sequence[jax.Device]] = None) -> List[Dict[str, Any]]:
  """Trains each variant of `sweep` in <workdir>/<name>/, in the sweep's order: the
  base config, the variant's overrides, then `overrides` (the command line's). Every
  config is checked before anything trains. A variant with a result in its sweep.json is
  skipped; one stopped earlier resumes from its checkpoint (train.train_and_evaluate). A
  variant whose loss turns non-finite is recorded as diverged and the sweep goes on; a
  user error (bad data, an incompatible checkpoint) or a stop signal ends the sweep, and
  the same command resumes it. The comparison is rewritten after each variant.

  Returns the comparison's rows."""
  sweep.check(overrides)
  devices = list(devices or jax.local_devices())
  configs = [(v, sweep.config(v, overrides)) for v in sweep.variants]
  for variant, config in configs:  # stale results and bad values stop it before any compute
    directory = os.path.join(workdir, variant.name)
    result = read_state(directory).get("result")
    if result:
      changed = config_differences(result.get("config", {}), config)
      if changed:
        raise SweepError(
            f"variant {variant.name!r} finished in {directory} with another config "
            f"({'; '.join(changed)}); delete that directory to train it again, or use "
            f"another --workdir")
      continue
    try:
      train.validate(config, num_devices=len(devices) * jax.process_count())
    except ConfigError as e:
      raise ConfigError(f"sweep variant {variant.name!r}: {e}") from None

  # One sweep per workdir (each variant's training also locks its own directory).
  lock = workdir_lock.WorkdirLock(workdir) if jax.process_index() == 0 else None
  with lock or contextlib.nullcontext():
    for index, (variant, config) in enumerate(configs, 1):
      _train_variant(sweep, workdir, overrides, devices, index, variant, config)
  return write_comparison(sweep, workdir, overrides)


def _train_variant(sweep, workdir, overrides, devices, index, variant, config) -> None:
  """Trains one variant (unless it finished earlier), records its result in its
  sweep.json and rewrites the comparison."""
  directory = os.path.join(workdir, variant.name)
  label = f"sweep {sweep.name}: variant {index}/{len(sweep.variants)} {variant.name!r}"
  state = read_state(directory)
  if state.get("result"):
    logging.info("%s finished earlier (%s in %s); skipped", label,
                 state["result"]["status"], os.path.join(directory, STATE_FILE))
    return
  logging.info("%s (%s): training in %s", label,
               format_overrides(variant.overrides) or "the base config", directory)
  state.setdefault("variant", variant.name)
  state.setdefault("segments", []).append({"start": time.time(), "seconds": None})
  _write_state(directory, state)
  start = time.perf_counter()
  try:
    metrics = train.train_and_evaluate(config, directory, devices)
    result = {"status": "done", "metrics": metrics}
  except train.NonFiniteLossError as e:
    logging.error("%s diverged: %s", label, e)
    result = {"status": "diverged", "message": str(e), "metrics": {}}
  except BaseException:
    logging.error("%s did not finish; run the same command to resume it", label)
    state["segments"][-1]["seconds"] = time.perf_counter() - start
    with contextlib.suppress(WriteError):  # the first error (maybe this disk's) is the one
      _write_state(directory, state)
    raise
  state["segments"][-1]["seconds"] = time.perf_counter() - start
  _write_state(directory, state)
  records = read_metrics(directory)
  final = [r["step"] for r in records if "final/loss" in r]
  trained = [r["step"] for r in records if any(k.startswith("train/") for k in r)]
  result.update(steps=int(final[-1] if final else max(trained, default=0)),
                parameters=count_parameters(config, directory),
                config=json.loads(config.to_json()), finished=time.time())
  state["result"] = result
  _write_state(directory, state)
  write_comparison(sweep, workdir, overrides)


def count_parameters(config, workdir: str) -> int:
  """The parameter count of `config`'s model (its tokenizer read from `workdir`), from
  shapes alone: nothing is initialised."""
  task = tasks.get_task(config, workdir, training=False)
  return reporting.count_parameters(jax.eval_shape(task.init_params, jax.random.PRNGKey(0)))


# ----------------------------------------------------------------------------- comparison


def _row(variant: Variant, config, directory: str) -> Dict[str, Any]:
  """What the comparison says of one variant (None: not known)."""
  state, records = read_state(directory), read_metrics(directory)
  result = state.get("result") or {}
  seconds, complete = train_seconds(state, records)
  row = {"variant": variant.name, "group": variant.group,
         "description": variant.description,
         "overrides": format_overrides(variant.overrides),
         "parameters": result.get("parameters"),
         "train_seconds": seconds if state.get("segments") else None,
         "train_seconds_lower_bound": not complete, "steps": result.get("steps"),
         "loss": None, "perplexity": None, "metric": None, "metric_name": None,
         "status": "not started", "differences": None}
  metrics = result.get("metrics") or {}
  if result:
    row["status"] = result["status"]
    if result["status"] == "diverged":
      row["status"] = "diverged: " + result.get("message", "").split(";")[0]
    # A finished variant is reported as it ran (its recorded config); where the flags
    # given now build another config, `difference_lines` says so.
    row["differences"] = field_differences(result.get("config", {}), config)
  elif records:  # stopped or still running: its newest evaluation
    trained = [int(r["step"]) for r in records if any(k.startswith("train/") for k in r)]
    row["steps"] = max(trained, default=0)
    row["status"] = f"partial (step {row['steps']} of {config.train.num_train_steps})"
    evals = [r for r in records if "eval/loss" in r]
    if evals:
      metrics = {k.split("/", 1)[1]: v for k, v in evals[-1].items()
                 if k in ("eval/loss", "eval/perplexity")}
  row["loss"], row["perplexity"] = metrics.get("loss"), metrics.get("perplexity")
  for name in getattr(tasks.TASKS.get(config.task), "compare_by", ()):
    if name in metrics:
      row["metric"], row["metric_name"] = metrics[name], name
      break
  row["curve"] = loss_curve(records)
  return row


def difference_lines(rows: Sequence[Dict[str, Any]]) -> List[str]:
  """One line per config field where finished variants ran with another value than the
  config the current flags build for them (which variants, both values, and the flag that
  gives what they ran); [] when every finished variant matches. A report without the
  sweep's flags (say a smoke run's --config.train.num_train_steps=20) still counts its
  finished variants as done, and says this."""
  finished = [r for r in rows if r.get("differences") is not None]
  by_field: Dict[str, List[Any]] = {}
  for r in finished:
    for field, (then, now) in r["differences"].items():
      by_field.setdefault(field, []).append((r["variant"], then, now))
  lines = []
  for field, entries in sorted(by_field.items()):
    who = (f"all {len(finished)} finished variants" if len(entries) == len(finished) else
           "variant" + "s" * (len(entries) > 1) + " " + ", ".join(v for v, _, _ in entries))
    pairs = {(json.dumps(then), json.dumps(now)) for _, then, now in entries}
    if len(pairs) == 1:
      _, then, now = entries[0]
      flag = (f"; --config.{field}={then} builds theirs" if then is not None else
              " (the field is new since they ran)")
      lines.append(f"{field}: {who} ran with {then!r}, the flags now give {now!r}{flag}")
    else:
      lines.append(f"{field}: " + "; ".join(f"{v} ran with {then!r}, the flags now give "
                                            f"{now!r}" for v, then, now in entries))
  return lines


def _number(value, digits: int) -> str:
  return "" if value is None else f"{value:.{digits}f}"


def _csv(rows: Sequence[Dict[str, Any]], metric_names: Sequence[str]) -> str:
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(["variant", "group", "description", "overrides", "parameters",
                   "train_seconds", "train_seconds_lower_bound", "steps", "val_loss",
                   "val_perplexity", *metric_names, "status"])
  for r in rows:
    writer.writerow([r["variant"], r["group"], r["description"], r["overrides"],
                     "" if r["parameters"] is None else r["parameters"],
                     _number(r["train_seconds"], 1), r["train_seconds_lower_bound"],
                     "" if r["steps"] is None else r["steps"], _number(r["loss"], 4),
                     _number(r["perplexity"], 3),
                     *[_number(r["metric"], 4) if r["metric_name"] == name else ""
                       for name in metric_names], r["status"]])
  return out.getvalue()


def _markdown(sweep: Sweep, rows: Sequence[Dict[str, Any]], metric_names: Sequence[str],
              overrides: Mapping[str, Any]) -> str:
  def cell(text) -> str:
    return str(text).replace("|", "\\|")

  header = ["variant", "group", "description", "overrides", "parameters", "train time",
            "steps", "val loss", "perplexity", *metric_names, "status"]
  lines = [f"# Sweep {sweep.name}", "",
           f"{len(rows)} variants of one base config"
           + (f"; on every variant, from the command line: {format_overrides(overrides)}"
              if overrides else "") + ".",
           "Val loss and perplexity: the final evaluation on the whole eval split (for a "
           "partial run, its newest periodic evaluation). Train time: wall clock of the "
           "variant's runs (setup, training, evaluations, checkpoints), summed over resumed "
           "runs; >= marks a lower bound (a run killed before recording its end).", "",
           "| " + " | ".join(header) + " |",
           "|" + "|".join(["---"] * 4 + ["---:"] * (len(header) - 5) + ["---"]) + "|"]
  for r in rows:
    seconds = ("" if r["train_seconds"] is None else
               (">= " if r["train_seconds_lower_bound"] else "")
               + reporting.format_duration(r["train_seconds"]))
    values = [r["variant"], r["group"], r["description"], r["overrides"] or "(base)",
              "" if r["parameters"] is None else f"{r['parameters']:,}", seconds,
              "" if r["steps"] is None else r["steps"], _number(r["loss"], 4),
              _number(r["perplexity"], 2),
              *[_number(r["metric"], 4 if abs(r["metric"]) <= 1 else 2)  # 0.8360, 35.12
                if r["metric_name"] == name else "" for name in metric_names], r["status"]]
    lines.append("| " + " | ".join(cell(v) for v in values) + " |")
  differences = difference_lines(rows)
  if differences:
    lines += ["", "Finished variants are reported as they ran (the config each recorded); "
              "these fields differ from the configs the flags of this report build:", ""]
    lines += [f"- {line}" for line in differences]
  return "\n".join(lines) + "\n"


def line_style(index: int) -> Dict[str, str]:
  """The colour, line style and marker of the loss plot's line for variant `index`."""
  n = len(PLOT_COLORS)
  return {"color": PLOT_COLORS[index % n],
          "linestyle": PLOT_STYLES[(index // 10) % len(PLOT_STYLES)],
          "marker": PLOT_MARKERS[index % len(PLOT_MARKERS)]}


def _plot(sweep: Sweep, rows: Sequence[Dict[str, Any]]) -> bytes:
  """validation_loss.png: validation loss against step, a line per variant."""
  out = io.BytesIO()
  loss_figure(sweep, rows).savefig(out, format="png", dpi=PLOT_DPI)
  return out.getvalue()


def loss_figure(sweep: Sweep, rows: Sequence[Dict[str, Any]]):
  """The matplotlib Figure of `_plot` (Agg canvas)."""
  # The Agg canvas directly: no pyplot state, no display backend.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from matplotlib.ticker import FormatStrFormatter  # pylint: disable=g-import-not-at-top

  figure = Figure(figsize=PLOT_SIZE, dpi=PLOT_DPI)
  FigureCanvasAgg(figure)
  axes = figure.add_axes((0.1, 0.1, 0.62, 0.82))
  plotted = 0
  for i, r in enumerate(rows):
    if r["curve"]:
      steps, losses = zip(*r["curve"].items())
      axes.plot(steps, losses, **line_style(i), markersize=3, label=r["variant"])
      plotted += 1
  if plotted:
    axes.set_yscale("log")  # plain numbers on its ticks, not powers of ten
    axes.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    axes.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
    axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False,
                ncol=1 if plotted <= 24 else 2)
  else:
    axes.text(0.5, 0.5, "no evaluations yet", ha="center", va="center",
              transform=axes.transAxes)
  axes.set_xlabel("step")
  axes.set_ylabel("validation loss")
  axes.set_title(f"sweep {sweep.name}: validation loss")
  axes.grid(True, which="both", alpha=0.3)
  return figure


def write_comparison(sweep: Sweep, workdir: str,
                     overrides: Optional[Mapping[str, Any]] = None) -> List[Dict[str, Any]]:
  """Writes <workdir>/comparison.md, comparison.csv and validation_loss.png from what the
  variants' directories hold now (finished, partial or absent); trains nothing. Returns
  the rows (dicts: variant, group, overrides, parameters, train_seconds, steps, loss,
  perplexity, metric and metric_name, status, curve)."""
  sweep.check(overrides)
  rows = [_row(v, sweep.config(v, overrides), os.path.join(workdir, v.name))
          for v in sweep.variants]
  metric_names = list(dict.fromkeys(r["metric_name"] for r in rows if r["metric_name"]))
  files.write_atomically(os.path.join(workdir, "comparison.md"),
                    _markdown(sweep, rows, metric_names, overrides or {}))
  files.write_atomically(os.path.join(workdir, "comparison.csv"), _csv(rows, metric_names))
  files.write_atomically(os.path.join(workdir, "validation_loss.png"), _plot(sweep, rows))
  return rows
