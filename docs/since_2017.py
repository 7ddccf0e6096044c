"""The table and plot of docs/since_2017.md, from a finished (or partial) since-2017 sweep.

    python main.py --mode=sweep --sweep=configs/sweeps/since_2017.py --workdir=runs/since_2017
    python docs/since_2017.py runs/since_2017 --output=results/since_2017

Rows of the sweep named `<name>` and `<name>_s<seed>` are one component trained from
several seeds. For each component the table gives the final validation loss of each seed,
their mean, the difference from the base's mean, and a verdict: a difference is "within
noise" when it is smaller than twice the seed-to-seed spread, the mean over all components
of (largest - smallest final loss across seeds); one ran from a single seed gets no verdict.
Writes `summary.md`, `summary.json` and `validation_loss.png` (the mean curve of each
component) to --output, and prints the Markdown table.
"""

import argparse
import json
import os
import re
import statistics
import sys
from typing import Any, Dict, List, Mapping, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modes import sweep as sweep_mode  # noqa: E402

SEED_SUFFIX = re.compile(r"^(?P<name>.+)_s(?P<seed>\d+)$")
NOISE_FACTOR = 2.0


def component(variant: str) -> str:
  """`modern_s1` -> `modern`; `modern` -> `modern`."""
  match = SEED_SUFFIX.match(variant)
  return match.group("name") if match else variant


def read_rows(directory: str) -> List[Dict[str, Any]]:
  """Per variant directory under `directory` that has finished: its name, final loss,
  parameter count, training seconds and validation curve."""
  rows = []
  for name in sorted(os.listdir(directory)):
    path = os.path.join(directory, name)
    state = sweep_mode.read_state(path) if os.path.isdir(path) else {}
    result = state.get("result") or {}
    if result.get("status") != "done":
      continue
    records = sweep_mode.read_metrics(path)
    seconds, _ = sweep_mode.train_seconds(state, records)
    rows.append({"variant": name, "component": component(name),
                 "loss": result["metrics"]["loss"], "parameters": result.get("parameters"),
                 "seconds": seconds, "curve": sweep_mode.loss_curve(records)})
  return rows


def summarize(rows: Sequence[Mapping[str, Any]], order: Sequence[str] = (),
              base: str = "base") -> Dict[str, Any]:
  """Groups `rows` by component (in `order`, then the rest by name) and compares each with
  `base`. Returns {"spread": ..., "components": [...]}."""
  groups: Dict[str, List[Mapping[str, Any]]] = {}
  for r in rows:
    groups.setdefault(r["component"], []).append(r)
  names = [n for n in order if n in groups] + sorted(n for n in groups if n not in order)
  ranges = [max(r["loss"] for r in g) - min(r["loss"] for r in g)
            for g in groups.values() if len(g) > 1]
  spread = statistics.mean(ranges) if ranges else None
  base_mean = statistics.mean(r["loss"] for r in groups[base]) if base in groups else None
  out = []
  for name in names:
    g = sorted(groups[name], key=lambda r: r["variant"])
    mean = statistics.mean(r["loss"] for r in g)
    diff = None if base_mean is None else mean - base_mean
    if name == base or diff is None:
      verdict = ""
    elif len(g) < 2 or spread is None:
      verdict = "one seed: no verdict"
    elif abs(diff) < NOISE_FACTOR * spread:
      verdict = "within noise"
    else:
      verdict = "better" if diff < 0 else "worse"
    out.append({"component": name, "losses": [r["loss"] for r in g], "mean": mean,
                "difference": diff, "verdict": verdict, "parameters": g[0]["parameters"],
                "seconds": statistics.mean(r["seconds"] for r in g),
                "curve": mean_curve([r["curve"] for r in g])})
  return {"spread": spread, "base": base, "components": out}


def mean_curve(curves: Sequence[Mapping[int, float]]) -> Dict[int, float]:
  """The mean loss at each step that every curve has."""
  steps = set.intersection(*(set(c) for c in curves)) if curves else set()
  return {s: statistics.mean(c[s] for c in curves) for s in sorted(steps)}


def markdown(summary: Mapping[str, Any], descriptions: Mapping[str, str]) -> str:
  base = next((c for c in summary["components"] if c["component"] == summary["base"]), None)
  lines = ["| component | what changes | parameters | final validation loss (seeds) | mean "
           "| vs base | verdict | seconds |", "|---|---|---:|---|---:|---:|---|---:|"]
  for c in summary["components"]:
    params = c["parameters"]
    if base and params and base["parameters"] and c is not base:
      params = f"{params:,} ({100 * (params / base['parameters'] - 1):+.1f}%)"
    elif params:
      params = f"{params:,}"
    diff = "" if c["difference"] is None or c is base else f"{c['difference']:+.4f}"
    lines.append(f"| {c['component']} | {descriptions.get(c['component'], '')} | {params} | "
                 f"{', '.join(f'{x:.4f}' for x in c['losses'])} | {c['mean']:.4f} | {diff} | "
                 f"{c['verdict']} | {c['seconds']:.0f} |")
  if summary["spread"] is not None:
    lines += ["", f"Seed-to-seed spread (mean over components of the range across seeds): "
              f"{summary['spread']:.4f}; a difference under {NOISE_FACTOR:g}x that, "
              f"{NOISE_FACTOR * summary['spread']:.4f}, is called within noise."]
  return "\n".join(lines) + "\n"


def plot(summary: Mapping[str, Any], path: str, title: str) -> None:
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  figure = Figure(figsize=(9, 5.5), dpi=110)
  FigureCanvasAgg(figure)
  axes = figure.add_axes((0.08, 0.1, 0.66, 0.82))
  for i, c in enumerate(summary["components"]):
    if c["curve"]:
      steps, losses = zip(*c["curve"].items())
      axes.plot(steps, losses, **sweep_mode.line_style(i), markersize=3,
                linewidth=2.5 if c["component"] in (summary["base"], "modern") else 1.2,
                label=f"{c['component']} {c['mean']:.3f}")
  axes.set_xlabel("step")
  axes.set_ylabel("validation loss (mean over seeds)")
  axes.set_title(title)
  axes.grid(True, alpha=0.3)
  axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False,
              title="final loss")
  figure.savefig(path)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("sweep_dir")
  parser.add_argument("--sweep", default=os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "sweeps",
      "since_2017.py"))
  parser.add_argument("--output", default="")
  args = parser.parse_args(argv)
  from configs.sweeps import load_sweep  # pylint: disable=g-import-not-at-top
  sweep = load_sweep(args.sweep)
  variants = sweep.variants
  order = list(dict.fromkeys(component(v.name) for v in variants))
  descriptions = {component(v.name): v.description for v in variants}
  summary = summarize(read_rows(args.sweep_dir), order)
  table = markdown(summary, descriptions)
  print(table, end="")
  if args.output:
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "summary.md"), "w", encoding="utf-8") as f:
      f.write(table)
    with open(os.path.join(args.output, "summary.json"), "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=1)
      f.write("\n")
    plot(summary, os.path.join(args.output, "validation_loss.png"),
         f"sweep {sweep.name}: each component against the paper's")


if __name__ == "__main__":
  main()
