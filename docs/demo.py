"""Runs the README's demo and records what it prints, so the README quotes a real run.

    python docs/demo.py                    # train runs/demo-record (a few minutes on a CPU),
                                           # write docs/demo_results.json, print the quotes
    python docs/demo.py --quotes           # print what the README must quote from the record
    python docs/demo.py --reparse          # record the kept output of the last run again

The demo is `python main.py --workdir=runs/demo` (configs/default.py). This script runs
that command in a fresh workdir, times it, and keeps from its output: the progress line
at step QUOTED_STEP, the evaluations' exact match at each step, the lines of the last
step's evaluations (with the first printed decode, if any) and the parameter count. It
also keeps the config fields that decide those numbers. tests/test_docs.py checks, without
training anything, that the README quotes this record (`readme_quotes`) and that the demo
config has not changed since it was made: after changing the demo, rerun this script and
paste the quotes it prints.
"""

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Any, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import files  # noqa: E402
from configs import default  # noqa: E402

RECORD = os.path.join(ROOT, "docs", "demo_results.json")
COMMAND = "python main.py --workdir=runs/demo"
QUOTED_STEP = 1500  # the progress line the README shows
OUTPUT = "demo_output.json"  # the run's printed output and time, kept in its workdir

# absl's prefix, when the output has one: "I1204 20:57:48.061405 1400804 train.py:570] "
_PREFIX = re.compile(r"^[IWEF]\d{4} [\d:.]+\s+\d+ [\w.]+:\d+\] ")
_STEP = re.compile(r"^step (\d+)/(\d+)\s")
_EVAL = re.compile(r"^(eval|final evaluation) at step (\d+): (.*)$")
_TOTAL = re.compile(r"^total\s+([\d,]+)$")

# The config fields the recorded numbers depend on: "group." is every field of a group.
# Threads, paths, file keeping and other tasks' knobs are left out.
DEMO_FIELDS = ("task", "seed", "model.", "optim.",
               "data.dataset", "data.synthetic_task", "data.min_digits", "data.max_digits",
               "data.max_input_length", "data.max_target_length", "data.max_eval_length",
               "data.num_eval_examples", "data.pack_examples", "data.shuffle_seed",
               "train.batch_size", "train.grad_accum_steps", "train.num_train_steps",
               "train.log_every_steps", "eval.eval_every_steps", "eval.num_eval_batches",
               "eval.num_decode_batches", "eval.final_decode_batches",
               "eval.num_print_examples", "decode.beam_size", "decode.length_penalty",
               "decode.decode_extra_length")


def _flat(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def demo_config() -> Dict[str, Any]:
  """The demo's config (configs/default.py), flat: {"group.field": value}."""
  return _flat(json.loads(json.dumps(default.get_config().to_dict())))  # as the record


def config_drift(recorded: Dict[str, Any]) -> List[str]:
  """"field: recorded -> now" for each DEMO_FIELDS field of the recorded config that
  configs/default.py now sets to another value."""
  now = demo_config()

  def relevant(field):
    return any(field == d or (d.endswith(".") and field.startswith(d)) for d in DEMO_FIELDS)

  return [f"{field}: {value!r} -> {now.get(field, '(gone)')!r}"
          for field, value in sorted(_flat(recorded).items())
          if relevant(field) and now.get(field, "(gone)") != value]


def parse(output: str) -> Dict[str, Any]:
  """What the README quotes, from the demo's printed output (with or without absl's
  prefix on each line): the progress line at QUOTED_STEP, the ending (the evaluation
  lines of the last step, then the first printed decode if any), each evaluation's exact match,
  the compiled steps' speed and the parameter count."""
  lines = [_PREFIX.sub("", line.rstrip()) for line in output.splitlines()]
  progress, exact_match, evaluations, parameters = {}, {}, [], None
  for n, line in enumerate(lines):
    if _STEP.match(line):
      progress[int(_STEP.match(line).group(1))] = line
    elif _EVAL.match(line):
      _, step, values = _EVAL.match(line).groups()
      evaluations.append((n, int(step), line))
      found = re.search(r"exact_match (\S+)", values)
      if found:
        exact_match.setdefault(int(step), float(found.group(1)))
    elif _TOTAL.match(line.strip()) and parameters is None:
      parameters = int(_TOTAL.match(line.strip()).group(1).replace(",", ""))
  last = evaluations[-1][1] if evaluations else None
  ending = [line for _, step, line in evaluations if step == last]
  first = min((n for n, step, _ in evaluations if step == last), default=len(lines))
  decodes = [l.strip() for l in lines[first:] if l.strip().startswith("input:")]
  steps_per_second = [float(m.group(1)) for line in progress.values()
                      if "compil" not in line  # the first line's time includes compiling
                      for m in [re.search(r"([\d.]+) steps/s", line)] if m]
  missing = [name for name, value in (
      ("a final evaluation", any(l.startswith("final evaluation") for l in ending)),
      (f"the progress line at step {QUOTED_STEP}", progress.get(QUOTED_STEP)),
      ("the parameter count", parameters)) if not value]
  if missing:
    raise ValueError(f"the demo's output lacks {', '.join(missing)}")
  return {"progress_line": progress[QUOTED_STEP], "ending": ending + decodes[:1],
          "parameters": parameters,
          "exact_match": {str(k): v for k, v in sorted(exact_match.items())},
          "steps_per_second": [min(steps_per_second), max(steps_per_second)]}


def run(workdir: str) -> Dict[str, Any]:
  """Trains the demo in `workdir` (removed first) and returns the record. The output
  and the time are kept in `workdir` (OUTPUT) for `--reparse`."""
  shutil.rmtree(workdir, ignore_errors=True)
  start = time.time()
  done = subprocess.run([sys.executable, "main.py", f"--workdir={workdir}"], cwd=ROOT,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                        check=False)
  seconds = round(time.time() - start, 1)
  files.write_atomically(os.path.join(workdir, OUTPUT), json.dumps(
      {"wall_seconds": seconds, "date": datetime.date.today().isoformat(),
       "returncode": done.returncode, "output": done.stdout}))
  if done.returncode:
    sys.stdout.write(done.stdout[-5000:])
    raise SystemExit(f"the demo exited with status {done.returncode}")
  return reparse(workdir)


def reparse(workdir: str) -> Dict[str, Any]:
  """The record of the run that `run` kept in `workdir`."""
  with open(os.path.join(workdir, OUTPUT), encoding="utf-8") as f:
    kept = json.load(f)
  return {"command": COMMAND, "date": kept["date"], "wall_seconds": kept["wall_seconds"],
          **parse(kept["output"]), "config": demo_config()}


def percent(value: float) -> str:
  """0.832 -> '83.2%', 1.0 -> '100%'."""
  return f"{100 * value:.1f}".rstrip("0").rstrip(".") + "%"


def duration(seconds: float) -> str:
  """97.4 -> '1 min 37 s'."""
  minutes, rest = divmod(int(round(seconds)), 60)
  return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def results_cell(record: Dict[str, Any]) -> str:
  """The README's Results-table cell for the demo."""
  evals = ", ".join(f"{percent(v)} at step {s}" for s, v in record["exact_match"].items())
  speed = "-".join(sorted({f"{v:.0f}" for v in record["steps_per_second"]}, key=float))
  return (f"exact match on 1000 held-out strings: {evals}; {duration(record['wall_seconds'])} "
          f"wall clock in all ({speed} steps/s once compiled)")


def readme_quotes(record: Dict[str, Any]) -> List[str]:
  """The strings the README must contain, each taken from the record (the ending as one
  block of lines)."""
  return [record["progress_line"], "\n".join(record["ending"]),
          f"{round(record['parameters'] / 1000)}k parameters", results_cell(record)]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quotes", action="store_true",
                      help="print the quotes of the existing record; train nothing")
  parser.add_argument("--reparse", action="store_true",
                      help="record the run kept in --workdir again; train nothing")
  parser.add_argument("--workdir", default=os.path.join(ROOT, "runs", "demo-record"))
  args = parser.parse_args(argv)
  if not args.quotes:
    record = reparse(args.workdir) if args.reparse else run(args.workdir)
    files.write_atomically(RECORD, json.dumps(record, indent=1) + "\n")
    print(f"wrote {os.path.relpath(RECORD, ROOT)}")
  with open(RECORD, encoding="utf-8") as f:
    record = json.load(f)
  print("The README quotes:")
  for quote in readme_quotes(record):
    print("  " + quote)


if __name__ == "__main__":
  main()
