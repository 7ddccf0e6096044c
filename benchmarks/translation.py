"""Translation benchmarks on a trained workdir: BLEU against training time, decoding speed,
and training throughput with and without packing.

    # after: python main.py --config=configs/translation.py --workdir=runs/m30k_de_en \\
    #            --config.data.data_dir=../shared/data/multi30k
    python benchmarks/translation.py bleu --workdir=runs/m30k_de_en \\
        --steps=500,1000,1400,1500 --greedy_steps=1400 --average=5 --average_until=1400,1500
    python benchmarks/translation.py decode --workdir=runs/m30k_de_en
    python benchmarks/translation.py packing --data_dir=../shared/data/multi30k

bleu: sacreBLEU (cased, 13a, detokenized) and chrF on the test split for the checkpoints
      of the given steps with beam 4 (and greedy at `--greedy_steps`), and for averages
      of `--average` checkpoints ending at each of `--average_until`; the training time
      of each step comes from the run's
      metrics.jsonl (wall clock since the run started, evaluations included).
decode: sentences/s and tokens/s of greedy and beam-4 decoding of the test split (or its
      first `--batches` batches): the median of `--repeats` timed passes after a compiling
      pass, on one device.
packing: real (non-padding) training tokens/s with packed rows and with one example per
      padded row, measured side by side (the median over logging intervals, compilation
      excluded).
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import tasks  # noqa: E402
import modes  # noqa: E402
import modes.run  # noqa: E402
import train  # noqa: E402
from configs import default as default_config  # noqa: E402
from configs import presets  # noqa: E402
from configs import translation as translation_config  # noqa: E402
from input_pipeline import batching  # noqa: E402
from training import steps  # noqa: E402


def load_config(workdir: str):
  """The config a workdir was trained with (its config.json)."""
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    saved = json.load(f)
  config = translation_config.get_config()
  # Grouped fields (a workdir written before the groups has flat ones: regrouped); a name
  # this config lacks is a KeyError instead of a field that would be silently added.
  presets.update_groups(config, default_config.group_flat_config(saved))
  return config


def run_start(workdir: str) -> float:
  """When the run started: its tokenizer's training (or config.json's writing if the
  tokenizer was given); preparing the data files once before that is not counted."""
  paths = [os.path.join(workdir, n) for n in ("tokenizer.model", "config.json")]
  return min(os.path.getmtime(p) for p in paths if os.path.exists(p))


def step_times(workdir: str):
  """step -> seconds since the run started, from the progress records."""
  start = run_start(workdir)
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: r["time"] - start for r in records if "train/loss" in r}


def bleu_table(args):
  config = load_config(args.workdir)
  times = step_times(args.workdir)
  rows = []
  averages = [int(s) for s in args.average_until.split(",") if s] or [None]
  for checkpoint, step in [("latest", int(s)) for s in args.steps.split(",")] + (
      [("averaged", s) for s in averages] if args.average else []):
    if checkpoint == "averaged":
      step = modes.average_checkpoints(config, args.workdir, args.average, last_step=step)
    row = {"checkpoint": checkpoint, "step": step, "minutes": times.get(step, float("nan")) / 60}
    greedy = str(step) in args.greedy_steps.split(",")
    for beam in (4, 1) if greedy else (4,):
      with config.unlocked():
        config.decode.beam_size = beam
      metrics = modes.evaluate_checkpoint(config, args.workdir, split=args.split,
                                          step=None if checkpoint == "averaged" else step,
                                          checkpoint=checkpoint)
      row[f"bleu_beam{beam}"] = metrics["bleu"]
      row[f"chrf_beam{beam}"] = metrics["chrf"]
      row[f"loss_beam{beam}"] = metrics["loss"]
    rows.append(row)
  print(f"\n| checkpoint | step | training minutes | {args.split} BLEU beam 4 | BLEU greedy "
        f"| chrF beam 4 | {args.split} loss |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    name = (f"average of {args.average} up to {r['step']}" if r["checkpoint"] == "averaged"
            else "single")
    greedy = f"{r['bleu_beam1']:.1f}" if "bleu_beam1" in r else "—"
    print(f"| {name} | {r['step']} | {r['minutes']:.1f} | {r['bleu_beam4']:.1f} | "
          f"{greedy} | {r['chrf_beam4']:.1f} | {r['loss_beam4']:.3f} |")


def decode_speed(args):
  config = load_config(args.workdir)
  devices = jax.local_devices()[:1]
  run = modes.run.open_run(config, args.workdir, devices)
  task = run.task
  _, params = run.restore()
  params = steps.replicate(params, devices)
  examples = task.data_source(args.split)
  print(f"{args.split}: {len(examples)} sentences, decoded in batches of "
        f"{config.eval.eval_batch_size} ({args.batches or 'all'} batches)")
  for beam in (1, 4):
    with config.unlocked():
      config.decode.beam_size = beam
    task = tasks.get_task(config, args.workdir, training=False)
    p_predict = jax.pmap(task.predict, axis_name=train.AXIS, devices=devices)
    dataset = batching.batched_dataset(examples, batch_size=config.eval.eval_batch_size,
                                       num_devices=1, lengths=task.eval_lengths,
                                       shuffle=False)
    batches = list(batching.iterate(dataset, limit=args.batches or None))
    times, tokens = [], 0
    for attempt in range(args.repeats + 1):
      start = time.perf_counter()
      outputs = [np.asarray(p_predict(params, b)) for b in batches]
      if attempt:
        times.append(time.perf_counter() - start)
      tokens = sum(int((o > 0).sum()) for o in outputs)
    seconds = float(np.median(times))
    sentences = sum(int((b["inputs"][0] > 0).any(-1).sum()) for b in batches)
    print(f"beam {beam}: {sentences / seconds:.1f} sentences/s, {tokens / seconds:.0f} "
          f"output tokens/s ({seconds:.1f} s for the split; times {np.round(times, 2)})")


def packing_throughput(args):
  results = {}
  for packed in (True, False):
    config = translation_config.get_config()
    with config.unlocked():
      config.data.data_dir = args.data_dir
      config.data.pack_examples = packed
      config.train.num_train_steps = args.steps
      config.train.log_every_steps = args.steps // 4
      config.eval.eval_every_steps = config.train.checkpoint_every_steps = 10 ** 6
      config.eval.best_metric = ""
      config.eval.num_decode_batches = 1
      config.eval.eval_batch_size = 8
      config.eval.num_print_examples = 0
    with tempfile.TemporaryDirectory() as workdir:
      train.train_and_evaluate(config, workdir, devices=jax.local_devices()[:1],
                               final_evaluation=False)
      with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f if "train/loss" in line]
    rates = [r["train/tokens_per_sec"] for r in records[1:]]  # the first has compilation
    results["packed" if packed else "padded"] = float(np.median(rates))
    print(f"{'packed' if packed else 'padded'}: {np.median(rates):,.0f} real tokens/s "
          f"(intervals {np.round(rates, 0)})")
  print(f"packing speed-up: {results['packed'] / results['padded']:.2f}x")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  bleu = sub.add_parser("bleu")
  bleu.add_argument("--workdir", required=True)
  bleu.add_argument("--steps", default="400,800,1200,1600")
  bleu.add_argument("--average", type=int, default=5)
  bleu.add_argument("--average_until", default="",
                    help="newest steps of the averages, e.g. 1400,1500; default the newest")
  bleu.add_argument("--split", default="test")
  bleu.add_argument("--greedy_steps", default="", help="steps also decoded greedily")
  decode = sub.add_parser("decode")
  decode.add_argument("--workdir", required=True)
  decode.add_argument("--split", default="test")
  decode.add_argument("--repeats", type=int, default=2)
  decode.add_argument("--batches", type=int, default=0, help="decode this many; 0 = all")
  pack = sub.add_parser("packing")
  pack.add_argument("--data_dir", required=True)
  pack.add_argument("--steps", type=int, default=40)
  args = parser.parse_args()
  {"bleu": bleu_table, "decode": decode_speed, "packing": packing_throughput}[args.command](args)


if __name__ == "__main__":
  main()
