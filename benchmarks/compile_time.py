"""Compile time of the real train step with and without scanned layers, and its step time.

    python -m benchmarks.compile_time                  # base width, 6 and 24 layers (~15 min)
    python -m benchmarks.compile_time --quick          # width 64, 2 and 4 layers (~1 min)
    python -m benchmarks.compile_time --output=runs/benchmarks/compile_time.json

For a decoder-only model (generation) and an encoder-decoder model (translation; N layers
means N encoder and N decoder layers) at the base preset's width (d_model 512, d_ff 2048,
8 heads, its dropout 0.1), with `--layers` layers (6 and 24) and `config.model.scan_layers`
False and True, it builds the task and state as train.py does and times, `--reps` times,
the two halves of compiling `train_steps.compile_steps`'s pmapped train step (Adam, clipping, the
non-finite guard: the program a run compiles):

  trace+lower s  p_train.lower(state, batch): tracing the Python model into StableHLO
  compile s      lowered.compile(): XLA's optimisation and code generation

Before each repetition `jax.clear_caches()` drops every in-memory trace and executable and
the step function is made afresh, and the persistent compilation cache is switched off for
the whole run (`disable_persistent_cache`), so every repetition compiles from nothing. The
table gives the median of the repetitions (and their range). Then the last compiled
executable runs `--steps` steps on a synthetic batch of random non-zero tokens (each step
blocked on; median), which shows what scanning costs or saves at run time.

Nothing here asserts a timing; the one assert checks that a scanned model really is one:
the model must be built with the config's scan_layers (train_throughput.check_model_knobs)
and the "param leaves" column shows the stacking (far fewer leaves with scan).
"""

import argparse
import dataclasses
import os
import statistics
import sys
import time
import warnings
from typing import Any, Dict, List, Sequence

if __package__ in (None, ""):  # run as a script: put the repository root on the path
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from benchmarks import run_record  # noqa: E402
import train  # noqa: E402
from benchmarks import train_throughput  # noqa: E402
from configs import default as default_config  # noqa: E402
from training import optimizers, reporting  # noqa: E402
from training import steps as train_steps  # noqa: E402

# CPU buffers cannot be donated; train_steps.compile_steps donates the state for accelerators.
warnings.filterwarnings("ignore", message="Some donated buffers were not usable")

FAMILIES = {"generation": "decoder-only", "translation": "enc-dec"}
# --quick: the tiny preset's width and fewer layers, aiming at about a minute on 2 quiet
# cores (2 minutes at load average 6); at this width compile time is mostly fixed cost.
QUICK = dict(size="tiny", layers="2,4", reps=1, steps=2, batch=4, length=32)


@dataclasses.dataclass(frozen=True)
class Case:
  task: str  # a key of FAMILIES
  size: str  # preset of configs/presets.py giving the width (layers are replaced)
  layers: int  # per stack: decoder layers, or encoder and decoder layers each
  scan: bool
  batch: int
  length: int  # sequence length; source and target length for translation

  @property
  def name(self) -> str:
    return f"{self.task}_{self.size}_{self.layers}L{'_scan' if self.scan else ''}"


def disable_persistent_cache() -> None:
  """Switches the persistent compilation cache off, so no compile is a disk read.

  JAX_COMPILATION_CACHE_DIR in the environment (the test suite sets one) would otherwise
  turn it on. JAX decides once per process whether the cache is used and remembers it;
  reset_cache makes it decide again under the new setting (a private function, hence the
  guard: without it the setting still holds in a process that has not compiled yet).
  """
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    from jax._src import compilation_cache  # pylint: disable=g-import-not-at-top
    compilation_cache.reset_cache()
  except (ImportError, AttributeError):
    pass


def build_config(case: Case):
  """The run config of `case` (validated): the preset's width, then the case's depth."""
  config = default_config.get_config(f"task={case.task},size={case.size},accel=cpu")
  if "scan_layers" not in config.model and case.scan:
    raise SystemExit("configs/default.py has no scan_layers field yet; run with --scan=no")
  with config.unlocked():
    config.model.num_decoder_layers = case.layers
    config.model.num_encoder_layers = case.layers
    if "scan_layers" in config.model:
      config.model.scan_layers = case.scan
    config.train.batch_size = case.batch
    config.data.max_target_length = case.length
    config.data.max_input_length = case.length
    # The synthetic digit lengths only have to pass validation: the batch is random tokens.
    config.data.max_digits = min(config.data.max_digits, (case.length - 2) // 2)
    config.data.min_digits = min(config.data.min_digits, config.data.max_digits)
  train.validate(config, num_devices=1)
  return config


def run_case(case: Case, reps: int, steps: int, seed: int) -> Dict[str, Any]:
  """Compiles `case`'s train step `reps` times from a cleared cache, then times `steps`
  steps of the last executable; returns one result row."""
  config = build_config(case)
  task = train_throughput.build_task(config, 0)
  if case.scan:  # a model that ignored the knob would time the unscanned program
    knobs = train_throughput.Shape(case.name, case.task, case.size, case.batch, case.length,
                                   overrides={"scan_layers": True})
    train_throughput.check_model_knobs(knobs, config, task)
  tx = optimizers.make_optimizer(config)
  state = train_steps.create_state(task, tx, config.seed)
  devices = jax.local_devices()[:1]
  p_state = train_steps.replicate(state, devices)
  leaves = len(jax.tree.leaves(state.params))
  params = reporting.count_parameters(state.params)
  del state
  batch = train_throughput.synthetic_batch(task, task.vocab_size, case.batch, seed)

  lower_s, compile_s = [], []
  compiled = None
  for _ in range(reps):
    jax.clear_caches()
    p_train, _, _ = train_steps.compile_steps(task, tx, config, devices)  # a fresh function
    t0 = time.perf_counter()
    lowered = p_train.lower(p_state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    lower_s.append(t1 - t0)
    compile_s.append(t2 - t1)

  def step() -> float:
    nonlocal p_state
    t = time.perf_counter()
    p_state, metrics = compiled(p_state, batch)
    jax.block_until_ready((p_state, metrics))
    return time.perf_counter() - t

  first_step_s = step()  # the first run of an executable pays for allocations
  step_times = [step() for _ in range(steps)]
  return {
      "case": case.name, "task": case.task, "family": FAMILIES[case.task],
      "size": case.size, "layers": case.layers, "scan_layers": case.scan,
      "d_model": config.model.d_model, "d_ff": config.model.d_ff,
      "num_heads": config.model.num_heads,
      "dropout_rate": config.optim.dropout_rate, "batch": case.batch, "length": case.length,
      "params": params, "param_leaves": leaves,
      "lower_s": statistics.median(lower_s), "compile_s": statistics.median(compile_s),
      "lower_s_all": lower_s, "compile_s_all": compile_s,
      "total_s": statistics.median(a + b for a, b in zip(lower_s, compile_s)),
      "first_step_s": first_step_s, "step_s": statistics.median(step_times),
      "step_s_all": step_times,
  }


def markdown_table(rows: List[Dict[str, Any]]) -> str:
  head = ("| family | layers | scan | params | param leaves | batch x length | "
          "trace+lower s | compile s (range) | lower+compile s | step ms |")
  lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
  for r in rows:
    lengths = (f"{r['batch']} x {r['length']}/{r['length']}" if r["family"] == "enc-dec"
               else f"{r['batch']} x {r['length']}")
    layers = f"{r['layers']}+{r['layers']}" if r["family"] == "enc-dec" else f"{r['layers']}"
    spread = (f" ({min(r['compile_s_all']):.1f}-{max(r['compile_s_all']):.1f})"
              if len(r["compile_s_all"]) > 1 else "")
    lines.append(
        f"| {r['family']} | {layers} | {'yes' if r['scan_layers'] else 'no'} | "
        f"{r['params'] / 1e6:.2f}M | {r['param_leaves']} | {lengths} | "
        f"{r['lower_s']:.1f} | {r['compile_s']:.1f}{spread} | {r['total_s']:.1f} | "
        f"{r['step_s'] * 1e3:.1f} |")
  return "\n".join(lines)


def _ints(text: str) -> List[int]:
  return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help=f"a smoke run: {', '.join(f'{k}={v}' for k, v in QUICK.items())}")
  parser.add_argument("--tasks", default="generation,translation",
                      help="comma-separated: generation (decoder-only), translation (enc-dec)")
  parser.add_argument("--size", default="base", help="preset giving the width")
  parser.add_argument("--layers", default="6,24", help="comma-separated layer counts")
  parser.add_argument("--scan", default="both", choices=("both", "no", "yes"),
                      help="scan_layers False, True or both")
  parser.add_argument("--reps", type=int, default=3, help="compilations per case (median)")
  parser.add_argument("--steps", type=int, default=3, help="timed steps per case (median)")
  parser.add_argument("--batch", type=int, default=8, help="rows per step")
  parser.add_argument("--length", type=int, default=64, help="sequence (source, target) length")
  parser.add_argument("--seed", type=int, default=0, help="synthetic batch tokens")
  parser.add_argument("--output", default="", help="also write the results as JSON here")
  if parser.parse_args(argv).quick:  # QUICK replaces the defaults; explicit flags still win
    parser.set_defaults(**QUICK)
  return parser.parse_args(argv)


def cases_of(args) -> List[Case]:
  task_names = [t.strip() for t in args.tasks.split(",") if t.strip()]
  unknown = [t for t in task_names if t not in FAMILIES]
  if unknown:
    raise SystemExit(f"unknown tasks {unknown}; choose from {', '.join(FAMILIES)}")
  scans: Sequence[bool] = {"both": (False, True), "no": (False,), "yes": (True,)}[args.scan]
  return [Case(t, args.size, n, s, args.batch, args.length)
          for t in task_names for n in _ints(args.layers) for s in scans]


def main(argv=None):
  args = parse_args(argv)
  disable_persistent_cache()
  cases = cases_of(args)
  start = time.perf_counter()
  load_before = os.getloadavg()
  rows = []
  for case in cases:
    row = run_case(case, args.reps, args.steps, args.seed)
    rows.append(row)
    print(f"{case.name}: trace+lower {row['lower_s']:.1f} s, compile {row['compile_s']:.1f} s, "
          f"step {row['step_s'] * 1e3:.1f} ms", file=sys.stderr, flush=True)
  total_s = time.perf_counter() - start
  load_after = os.getloadavg()

  print("\n" + run_record.machine_line() + "; persistent compilation cache "
        f"{'on' if jax.config.jax_enable_compilation_cache else 'off'}")
  print(run_record.load_line(load_before, load_after))
  print(f"median of {args.reps} compilation(s) per case, each after jax.clear_caches(); "
        f"step ms: median of {args.steps} steps.\n")
  print(markdown_table(rows))
  print(f"\ntotal time {total_s:.0f} s")
  if args.output:
    run_record.write_json(args.output, {
        "args": vars(args),
        "persistent_cache": bool(jax.config.jax_enable_compilation_cache),
        "load_before": load_before, "load_after": load_after, "total_s": total_s,
        "rows": rows})
  return rows


if __name__ == "__main__":
  run_record.start_with_huge_pages()
  main()
