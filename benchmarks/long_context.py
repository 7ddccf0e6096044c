"""Memory and time against sequence length: reference vs blockwise attention.

    python -m benchmarks.long_context                      # 256 ... 16384 tokens (~25 min)
    python -m benchmarks.long_context --lengths=256,1024 --modes=train --quick
    python -m benchmarks.long_context --output=results/long_context/long_context.json \\
        --plot=results/long_context/memory_time.png

The model is the base decoder-only LM of `configs/default.py:task=generation,size=base`
(6 layers, d_model 512, 8 heads, d_ff 2048, dropout 0.1, post-norm, float32) with a
256-token vocabulary, at batch 1. For each length, attention implementation and mode, a
fresh child process (so that its peak resident memory is its own):

- builds the real steps of `train_steps.compile_steps`: "train" is the pmapped train step
  (forward, backward, clipping, Adam), "infer" the eval step (forward and loss);
- asks XLA for the compiled program's memory (`memory_analysis`: arguments, outputs and
  temporaries) and does not run it when that exceeds `--max_gib` (this machine has 24 GiB;
  running it would swap or be killed), reporting the estimate instead;
- otherwise runs it: the first call (compile + one step), then the median of `--steps`
  timed steps, and the process's peak resident memory (`ru_maxrss`).

Nothing here asserts a timing. The run asserts that every token of the batch is scored.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any, Dict, List

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import run_record  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_LENGTHS = (256, 512, 1024, 2048, 4096, 8192, 16384)
VOCAB = 256
GIB = 2**30


def _rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # KiB on Linux


def child(length: int, impl: str, mode: str, steps: int, block: int, max_gib: float,
          remat: str) -> Dict[str, Any]:
  """One measurement, in this (fresh) process."""
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import train_throughput  # pylint: disable=g-import-not-at-top
  from configs import default, presets  # pylint: disable=g-import-not-at-top
  from training import optimizers  # pylint: disable=g-import-not-at-top
  from training import steps as train_steps  # pylint: disable=g-import-not-at-top
  warnings.filterwarnings("ignore", message="Some donated buffers were not usable")

  config = default.get_config("task=generation,size=base")
  presets.update_groups(config, dict(
      data=dict(max_target_length=length), train=dict(batch_size=1),
      eval=dict(eval_batch_size=1),
      compute=dict(attention_impl=impl, attention_block_size=block, remat=remat)))
  task = train_throughput.build_task(config, VOCAB)
  tx = optimizers.make_optimizer(config)
  devices = jax.local_devices()[:1]
  p_train, p_eval, _ = train_steps.compile_steps(task, tx, config, devices)
  state = train_steps.create_state(task, tx, config.seed)
  p_state = train_steps.replicate(state, devices)
  del state
  batch = train_throughput.synthetic_batch(task, VOCAB, 1, seed=0)
  if mode == "train":
    args, run = (p_state, batch), p_train
  else:
    args, run = (p_state.params, batch), p_eval
  baseline_gib = _rss_gib()

  t0 = time.perf_counter()
  compiled = run.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  memory = compiled.memory_analysis()
  estimate_gib = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                  + memory.temp_size_in_bytes - memory.alias_size_in_bytes) / GIB
  row = {"length": length, "impl": impl, "mode": mode, "remat": remat, "block": block,
         "compile_s": compile_s, "xla_temp_gib": memory.temp_size_in_bytes / GIB,
         "xla_estimate_gib": estimate_gib, "baseline_rss_gib": baseline_gib}
  if estimate_gib > max_gib:
    row["ran"] = False
    return row

  def call():
    nonlocal p_state
    t = time.perf_counter()
    if mode == "train":
      p_state, metrics = p_train(p_state, batch)
      jax.block_until_ready((p_state, metrics))
    else:
      metrics = jax.block_until_ready(p_eval(p_state.params, batch))
    return time.perf_counter() - t, metrics

  first_s, metrics = call()  # jit's own compile of the same program, and one step
  assert float(metrics["weight"][0]) == length, "some tokens were not scored"
  times = [call()[0] for _ in range(steps)]
  row.update(ran=True, first_call_s=first_s, step_s=statistics.median(times),
             step_times_s=times, peak_rss_gib=_rss_gib(),
             tokens_per_sec=length / statistics.median(times))
  return row


def run_child(length, impl, mode, steps, block, max_gib, remat, timeout) -> Dict[str, Any]:
  cmd = [sys.executable, "-m", "benchmarks.long_context", "--child",
         f"--lengths={length}", f"--impls={impl}", f"--modes={mode}", f"--steps={steps}",
         f"--block={block}", f"--max_gib={max_gib}", f"--remat={remat}"]
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device, whatever the caller set
  env.setdefault("JAX_PLATFORMS", "cpu")
  started = time.perf_counter()
  try:
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    return {"length": length, "impl": impl, "mode": mode, "remat": remat, "ran": False,
            "error": f"timed out after {timeout} s"}
  lines = [l for l in done.stdout.splitlines() if l.startswith("{")]
  if done.returncode != 0 or not lines:
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return {"length": length, "impl": impl, "mode": mode, "remat": remat, "ran": False,
            "error": f"exit {done.returncode}: {' | '.join(tail)}"}
  row = json.loads(lines[-1])
  row["wall_s"] = time.perf_counter() - started
  return row


def markdown_table(rows: List[Dict[str, Any]]) -> str:
  out = ["| mode | attention | length | XLA estimate GiB | peak RSS GiB | compile s | "
         "step s | tokens/s |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    name = r["impl"] + ("" if r.get("remat", "none") == "none" else f" + remat {r['remat']}")
    if r.get("ran"):
      out.append(f"| {r['mode']} | {name} | {r['length']} | {r['xla_estimate_gib']:.2f} | "
                 f"{r['peak_rss_gib']:.2f} | {r['compile_s']:.1f} | {r['step_s']:.2f} | "
                 f"{r['tokens_per_sec']:,.0f} |")
    elif "xla_estimate_gib" in r:
      out.append(f"| {r['mode']} | {name} | {r['length']} | {r['xla_estimate_gib']:.2f} | "
                 f"not run (over the limit) | {r['compile_s']:.1f} | — | — |")
    else:
      out.append(f"| {r['mode']} | {name} | {r['length']} | — | {r.get('error', '?')} | "
                 f"— | — | — |")
  return "\n".join(out)


def plot(rows: List[Dict[str, Any]], path: str, limit_gib: float) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
  styles = {"reference": "tab:red", "blockwise": "tab:blue"}
  for (impl, mode) in sorted({(r["impl"], r["mode"]) for r in rows}):
    sel = sorted((r for r in rows if r["impl"] == impl and r["mode"] == mode
                  and "xla_estimate_gib" in r), key=lambda r: r["length"])
    dash = "-" if mode == "train" else "--"
    color = styles.get(impl, "gray")
    ran = [r for r in sel if r.get("ran")]
    ax_mem.plot([r["length"] for r in sel], [r["xla_estimate_gib"] for r in sel], dash,
                color=color, marker="o", mfc="none",
                label=f"{impl} {mode}: XLA estimate")
    if ran:
      ax_mem.plot([r["length"] for r in ran], [r["peak_rss_gib"] for r in ran], dash,
                  color=color, marker="s", alpha=0.5, label=f"{impl} {mode}: peak RSS")
      ax_time.plot([r["length"] for r in ran], [r["step_s"] for r in ran], dash,
                   color=color, marker="o", label=f"{impl} {mode}")
  ax_mem.axhline(limit_gib, color="k", lw=0.8, ls=":")
  ax_mem.text(max(r["length"] for r in rows), limit_gib * 1.1,
              f"{limit_gib:g} GiB (this machine)", fontsize=8, ha="right")
  for ax, title, ylabel in ((ax_mem, "memory", "GiB"), (ax_time, "time per step", "s")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length (tokens, batch 1)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"base decoder-only LM: {title}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)))
  parser.add_argument("--impls", default="reference,blockwise")
  parser.add_argument("--modes", default="train,infer")
  parser.add_argument("--steps", type=int, default=3, help="timed steps (median)")
  parser.add_argument("--long_steps", type=int, default=1,
                      help="timed steps from 8192 tokens on (a step takes a minute)")
  parser.add_argument("--block", type=int, default=512, help="attention_block_size")
  parser.add_argument("--remat", default="none")
  parser.add_argument("--max_gib", type=float, default=20.0,
                      help="do not run programs XLA says need more than this")
  parser.add_argument("--timeout", type=int, default=900, help="seconds per measurement")
  parser.add_argument("--quick", action="store_true", help="short lengths, 1 step")
  parser.add_argument("--output", default="")
  parser.add_argument("--plot", default="")
  parser.add_argument("--replot", default="", help="only draw --plot from this JSON output")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  lengths = [int(x) for x in args.lengths.split(",")]
  impls, modes = args.impls.split(","), args.modes.split(",")
  if args.replot:
    with open(args.replot, encoding="utf-8") as f:
      plot(json.load(f)["rows"], args.plot, limit_gib=24.0)
    return
  if args.child:
    print(json.dumps(child(lengths[0], impls[0], modes[0], args.steps, args.block,
                           args.max_gib, args.remat)))
    return
  if args.quick:
    lengths, args.steps, args.long_steps = [n for n in lengths if n <= 1024][:2], 1, 1
  started = datetime.datetime.now(datetime.timezone.utc)
  rows = []
  for mode in modes:
    for impl in impls:
      for length in lengths:
        steps = args.long_steps if length >= 8192 else args.steps
        row = run_child(length, impl, mode, steps, args.block, args.max_gib, args.remat,
                        args.timeout)
        rows.append(row)
        print(json.dumps(row), flush=True)
  table = markdown_table(rows)
  print(table)
  result = {"started": started.isoformat(timespec="seconds"),
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                        "load_before_after": os.getloadavg()},
            "args": vars(args), "rows": rows, "markdown": table}
  if args.output:
    run_record.write_json(args.output, result)
  if args.plot:
    plot(rows, args.plot, limit_gib=24.0)


if __name__ == "__main__":
  run_record.start_with_huge_pages()
  main()
