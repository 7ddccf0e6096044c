"""The training input pipeline on the real corpora: its throughput, and what it costs the step.

    python -m benchmarks.input_pipeline          # the three corpora (~7 min on 2 cores, est.)
    python -m benchmarks.input_pipeline --quick           # smoke test, under a minute
    python -m benchmarks.input_pipeline --corpora=sst2 --threads=0,2,4 --rounds=5
    python -m benchmarks.input_pipeline --data_root=/path/to/data --output=runs/pipeline.json

Corpora (read in place from `--data_root`, default ../shared/data beside the repository):
multi30k (de-en translation, packed 64 x 64 rows, sentencepiece 8000), tinyshakespeare
(character LM, windows of 64), sst2 (classification, padded to 64, sentencepiece 2000),
each with its config file's recipe (configs/translation.py, generation.py,
classification.py) and batch size (64, 16, 64).

(a) The pipeline alone. A run reads and tokenizes the training split once, in memory
(`prepare`, timed with its parts: reading the records, tokenizing), then cuts every batch
from those arrays. `tokenize per pass` is what tokenizing again on every epoch would add
per batch (the tokenize time over the batches of an epoch), the cost the in-memory cache
saves. Batches/s and real (non-padding) tokens/s of the training iterator
(`batching.iterate`, as train.py reads it) are the median of `--rounds` rounds of
`--seconds` each, for each grain thread count in `--threads` (0 = read in the calling
thread); `first batch` is the first batch of a fresh iterator (the first epoch's shuffle
and packing).

(b) What the step sees. The config's model trains on one local device in a loop like
train.py's (no blocking between steps, blocked at the end of each round), fed by
  constant   one pre-made batch already on the device (the step alone),
  pipeline   the real pipeline with the config's data_threads, data_prefetch and
             device_prefetch (by default 2, 4, 2),
  no ahead   the real pipeline read in the loop (0, 0, 0): nothing prepared ahead.
Modes alternate round by round; the step time is the median over `--step_rounds` rounds
of round time over `--steps`. `pipeline - constant` is the pipeline's cost the step sees.

`--quick` shrinks everything for a smoke test (1 layer, d_model 32, batch 8, sentencepiece
1000 trained on 5000 sentences, 1 short round): its numbers say nothing about the recipes.
Nothing here asserts a timing. Runs that share the machine make the numbers noisy: the
load average before and after is printed.
"""

import argparse
import contextlib
import functools
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Dict, List, Tuple

if __package__ in (None, ""):  # run as a script: put the repository root on the path
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import run_record  # noqa: E402
import tasks  # noqa: E402
import train  # noqa: E402
from configs import classification, generation, presets, translation  # noqa: E402
from input_pipeline import batching, sources, tokenizers  # noqa: E402
from training import optimizers, reporting  # noqa: E402
from training import steps as train_steps  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# CPU buffers cannot be donated; train_steps.compile_steps donates the state for accelerators.
warnings.filterwarnings("ignore", message="Some donated buffers were not usable")

# corpus -> (config module, the corpus's folder under --data_root)
CORPORA = {"multi30k": (translation, "multi30k"),
           "tinyshakespeare": (generation, "tinyshakespeare"),
           "sst2": (classification, "sst2")}
# --quick: a 1-layer model, small batches, and sentencepiece trained on a sample to a
# smaller vocabulary (seconds instead of minutes on 2 cores).
QUICK = dict(model=dict(d_model=32, d_ff=64, num_heads=2, head_dim=0),
             train=dict(batch_size=8))
QUICK_SENTENCEPIECE = dict(model=dict(vocab_size=1000),
                           data=dict(tokenizer_max_sentences=5000))
MODES = ("constant", "pipeline", "no ahead")


def build_config(corpus: str, data_root: str, tfds_data_dir: str, quick: bool):
  """The corpus's recipe config (its model shrunk in quick mode), validated."""
  module, folder = CORPORA[corpus]
  config = module.get_config()
  config.data.data_dir = os.path.join(data_root, folder)
  config.data.tfds_data_dir = tfds_data_dir
  if quick:
    presets.update_groups(config, QUICK)
    if config.model.tokenizer == "sentencepiece":
      presets.update_groups(config, QUICK_SENTENCEPIECE)
    config.model.num_encoder_layers = min(config.model.num_encoder_layers, 1)
    config.model.num_decoder_layers = min(config.model.num_decoder_layers, 1)
  train.validate(config, num_devices=1)
  return config


@contextlib.contextmanager
def timed_calls(owners: List[Any], name: str, totals: Dict[str, float], key: str):
  """Adds the seconds spent in `owner.<name>` (for each owner that defines it itself) to
  `totals[key]` while the block runs."""
  saved = [(o, o.__dict__[name]) for o in owners if name in o.__dict__]

  def wrap(function: Callable) -> Callable:
    @functools.wraps(function)
    def timed(*args, **kwargs):
      t0 = time.perf_counter()
      try:
        return function(*args, **kwargs)
      finally:
        totals[key] = totals.get(key, 0.0) + time.perf_counter() - t0
    return timed

  for owner, function in saved:
    setattr(owner, name, wrap(function))
  try:
    yield totals
  finally:
    for owner, function in saved:
      setattr(owner, name, function)


def real_tokens(batch) -> int:
  """Non-padding tokens of a batch's sequence fields (what train.py's tok/s counts)."""
  return int(sum(np.count_nonzero(np.asarray(batch[k])) for k in ("inputs", "targets")
                 if k in batch))


def rate(iterator, seconds: float) -> Dict[str, float]:
  """Batches and real tokens per second read from `iterator` for about `seconds`."""
  batches, tokens = 0, 0
  t0 = time.perf_counter()
  while True:
    tokens += real_tokens(next(iterator))
    batches += 1
    elapsed = time.perf_counter() - t0
    if elapsed >= seconds:
      return {"batches_per_sec": batches / elapsed, "tokens_per_sec": tokens / elapsed}


def measure_pipeline(corpus: str, config, workdir: str, threads: List[int], rounds: int,
                     seconds: float) -> Tuple[Dict[str, Any], Any]:
  """Part (a) for one corpus: (its result row, the task, reused by part (b))."""
  t0 = time.perf_counter()
  tasks.get_task(config, workdir)  # builds the tokenizer once (saved in the workdir)
  tokenizer_s = time.perf_counter() - t0
  # A second task loads that tokenizer, with nothing read or tokenized yet: what a
  # resumed run (or any run with a tokenizer) pays before its first batch.
  parts: Dict[str, float] = {}
  with timed_calls([sources], "read_all", parts, "read_s"), \
      timed_calls([tokenizers.Tokenizer, tokenizers.SentencePieceTokenizer], "encode_batch",
                  parts, "tokenize_s"):
    t0 = time.perf_counter()
    task = tasks.get_task(config, workdir)
    dataset = task.train_dataset(config.train.batch_size, 1)
    prepare_s = time.perf_counter() - t0
  examples = task.data_source("train")
  epoch_tokens = int(sum(len(e[k]) for e in examples for k in ("inputs", "targets")
                         if k in e))

  t0 = time.perf_counter()
  first = next(batching.iterate(dataset, num_threads=0, prefetch=0))
  first_batch_s = time.perf_counter() - t0
  by_threads = {}
  for n in threads:
    iterator = batching.iterate(dataset, num_threads=n, prefetch=4 if n else 0)
    next(iterator)  # thread start-up and the first epoch's packing, not the steady rate
    runs = [rate(iterator, seconds) for _ in range(rounds)]
    iterator.close()  # its threads stop reading ahead (they would slow what comes next)
    by_threads[n] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
  tokens_per_batch = by_threads[threads[0]]["tokens_per_sec"] / by_threads[threads[0]][
      "batches_per_sec"]
  batches_per_epoch = epoch_tokens / max(tokens_per_batch, 1.0)
  lengths = "/".join(str(v.shape[-1]) for k, v in first.items()
                     if k in ("inputs", "targets"))
  row = {"corpus": corpus, "task": config.task, "batch_size": config.train.batch_size,
         "lengths": lengths, "batching": _batching(config),
         "tokenizer": f"{config.model.tokenizer} {task.vocab_size}",
         "tokenizer_s": tokenizer_s,
         "prepare_s": prepare_s, "read_s": parts.get("read_s", 0.0),
         "tokenize_s": parts.get("tokenize_s", 0.0), "epoch_tokens": epoch_tokens,
         "batches_per_epoch": batches_per_epoch,
         "tokenize_per_pass_ms_per_batch": 1e3 * parts.get("tokenize_s", 0.0)
         / max(batches_per_epoch, 1.0),
         "first_batch_s": first_batch_s, "tokens_per_batch": tokens_per_batch,
         "by_threads": by_threads}
  return row, task


def _batching(config) -> str:
  if config.task == "generation" and config.data.lm_batching == "windows":
    return "windows"
  return "packed" if config.data.pack_examples else "padded"


def measure_steps(task, config, rounds: int, steps: int) -> Dict[str, Any]:
  """Part (b): seconds per step fed by a constant device batch, by the pipeline with
  everything read ahead, and by the pipeline read in the loop."""
  devices = jax.local_devices()[:1]
  tx = optimizers.make_optimizer(config)
  state = train_steps.create_state(task, tx, config.seed)
  params = reporting.count_parameters(state.params)
  p_train, _, _ = train_steps.compile_steps(task, tx, config, devices)
  p_state = train_steps.replicate(state, devices)
  del state
  dataset = task.train_dataset(config.train.batch_size, 1)
  constant = jax.device_put(dataset[0], train_steps.device_sharding(devices))
  ahead = {"pipeline": (config.data.data_threads, config.data.data_prefetch,
                        config.data.device_prefetch),
           "no ahead": (0, 0, 0)}
  warmup = 2
  # One iterator per mode for all its rounds, as a run has one: the start-up (threads,
  # the first epoch's packing) is paid in the warm-up, later epochs' inside the rounds.
  iterators, feeds = [], {"constant": iter([(constant, None)] * (warmup + rounds * steps))}
  for mode, (threads, prefetch, size) in ahead.items():
    iterators.append(batching.iterate(dataset, num_threads=threads, prefetch=prefetch))
    feeds[mode] = train_steps.prefetch_to_devices(iterators[-1], devices, size,
                                            warmup + rounds * steps)

  def run(mode: str, count: int) -> float:
    nonlocal p_state
    t0 = time.perf_counter()
    for _ in range(count):
      batch, _ = next(feeds[mode])
      p_state, metrics = p_train(p_state, batch)
    jax.block_until_ready((p_state, metrics))
    return (time.perf_counter() - t0) / count

  for mode in MODES:  # compiles (host and device inputs are compiled apart) and warms up
    run(mode, warmup)
  times: Dict[str, List[float]] = {mode: [] for mode in MODES}
  for _ in range(rounds):
    for mode in MODES:
      times[mode].append(run(mode, steps))
  for iterator in iterators:
    iterator.close()
  step_s = {mode: statistics.median(t) for mode, t in times.items()}
  return {"params": params, "steps_per_round": steps, "step_s": step_s,
          "round_step_s": times, "pipeline_settings": ahead["pipeline"],
          "pipeline_cost_s": step_s["pipeline"] - step_s["constant"],
          "no_ahead_cost_s": step_s["no ahead"] - step_s["constant"]}


# ----------------------------------------------------------------------------- report


def pipeline_table(rows: List[Dict[str, Any]], threads: List[int]) -> str:
  head = ("| corpus | batching | batch x lengths | tokenizer | prepare s (read, tokenize) | "
          "first batch ms | tokenize per pass ms/batch | "
          + " | ".join(f"batches/s, {n} threads | tokens/s, {n} threads" for n in threads)
          + " |")
  lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
  for r in rows:
    rates = " | ".join(f"{r['by_threads'][n]['batches_per_sec']:,.0f} | "
                       f"{r['by_threads'][n]['tokens_per_sec']:,.0f}" for n in threads)
    lines.append(
        f"| {r['corpus']} | {r['batching']} | {r['batch_size']} x {r['lengths']} | "
        f"{r['tokenizer']} | {r['prepare_s']:.2f} ({r['read_s']:.2f}, "
        f"{r['tokenize_s']:.2f}) | {1e3 * r['first_batch_s']:.1f} | "
        f"{r['tokenize_per_pass_ms_per_batch']:.2f} | {rates} |")
  return "\n".join(lines)


def step_table(rows: List[Dict[str, Any]]) -> str:
  head = ("| corpus | params | constant ms/step | pipeline ms/step | no ahead ms/step | "
          "pipeline - constant ms | no ahead - constant ms |")
  lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
  for r in rows:
    s = r["steps"]
    if s is None:
      continue
    t = s["step_s"]
    lines.append(
        f"| {r['corpus']} | {s['params'] / 1e6:.2f}M | {1e3 * t['constant']:.2f} | "
        f"{1e3 * t['pipeline']:.2f} | {1e3 * t['no ahead']:.2f} | "
        f"{1e3 * s['pipeline_cost_s']:+.2f} | {1e3 * s['no_ahead_cost_s']:+.2f} |")
  return "\n".join(lines)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data_root", default=os.path.join(REPO, "..", "shared", "data"),
                      help="folder holding multi30k/, tinyshakespeare/ and sst2/")
  parser.add_argument("--corpora", default=",".join(CORPORA),
                      help=f"comma-separated, from {', '.join(CORPORA)}")
  parser.add_argument("--threads", default="0,2", help="grain thread counts of part (a)")
  parser.add_argument("--rounds", type=int, default=5, help="part (a): timed rounds")
  parser.add_argument("--seconds", type=float, default=2.0,
                      help="part (a): seconds of reading per round")
  parser.add_argument("--step_rounds", type=int, default=3,
                      help="part (b): timed rounds of each mode")
  parser.add_argument("--steps", type=int, default=10,
                      help="part (b): steps per round (the Multi30k model: ~2.5 s each "
                           "on a 2-core CPU)")
  parser.add_argument("--skip_steps", action="store_true", help="part (a) only")
  parser.add_argument("--quick", action="store_true",
                      help="smoke test: tiny models, 1 round, short reads (under a minute)")
  parser.add_argument("--workdir", default="",
                      help="where the tokenizers are built (default: a temporary folder, "
                           "removed at the end)")
  parser.add_argument("--tfds_data_dir", default="",
                      help="prepared tfds data (config.data.tfds_data_dir); '' = the default")
  parser.add_argument("--output", default="", help="also write the results as JSON here")
  args = parser.parse_args(argv)
  if args.quick:
    args.rounds, args.seconds, args.step_rounds, args.steps = 1, 0.3, 1, 3
  return args


def main(argv=None):
  args = parse_args(argv)
  corpora = [c.strip() for c in args.corpora.split(",") if c.strip()]
  unknown = [c for c in corpora if c not in CORPORA]
  if unknown:
    raise SystemExit(f"unknown corpora {unknown}; choose from {', '.join(CORPORA)}")
  threads = [int(n) for n in args.threads.split(",")]
  missing = [c for c in corpora if not os.path.isdir(os.path.join(args.data_root,
                                                                  CORPORA[c][1]))]
  if missing:
    raise SystemExit(f"no {', '.join(missing)} under --data_root={args.data_root}")
  workdir = args.workdir or tempfile.mkdtemp(prefix="input_pipeline_bench_")
  start = time.perf_counter()
  load_before = os.getloadavg()
  rows = []
  try:
    for corpus in corpora:
      config = build_config(corpus, args.data_root, args.tfds_data_dir, args.quick)
      row, task = measure_pipeline(corpus, config, os.path.join(workdir, corpus), threads,
                                   args.rounds, args.seconds)
      row["steps"] = None if args.skip_steps else measure_steps(task, config,
                                                                args.step_rounds,
                                                                args.steps)
      rows.append(row)
      rates = ", ".join(f"{n} threads {row['by_threads'][n]['batches_per_sec']:,.0f}"
                        for n in threads)
      steps = row["steps"]
      print(f"{corpus}: tokenizer built in {row['tokenizer_s']:.2f} s, prepare "
            f"{row['prepare_s']:.2f} s, batches/s {rates}"
            + ("" if steps is None else ", ms/step " + ", ".join(
                f"{m} {1e3 * s:.2f}" for m, s in steps["step_s"].items())),
            file=sys.stderr, flush=True)
  finally:
    if not args.workdir:
      shutil.rmtree(workdir, ignore_errors=True)
  total_s = time.perf_counter() - start
  load_after = os.getloadavg()

  print("\n" + run_record.machine_line("1 device used")
        + (" (--quick: tiny models, 1 round: smoke numbers only)" if args.quick else ""))
  print(run_record.load_line(load_before, load_after))
  print(f"\n(a) the training iterator alone; medians of {args.rounds} round(s) of "
        f"{args.seconds:g} s\n")
  print(pipeline_table(rows, threads))
  if not args.skip_steps:
    settings = sorted({r["steps"]["pipeline_settings"] for r in rows})
    print(f"\n(b) train step on one device; medians of {args.step_rounds} round(s) of "
          f"{args.steps} steps; pipeline = data_threads, data_prefetch, device_prefetch "
          f"{' or '.join(', '.join(map(str, s)) for s in settings)}; no ahead = 0, 0, 0\n")
    print(step_table(rows))
  print(f"\ntotal time {total_s:.0f} s")
  if args.output:
    run_record.write_json(args.output, {
        "args": vars(args), "load_before": load_before, "load_after": load_after,
        "total_s": total_s, "rows": rows})


if __name__ == "__main__":
  run_record.start_with_huge_pages()
  main()
