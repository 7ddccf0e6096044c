"""MFU of the base Transformer's bfloat16 train step on a GPU: against the card's published
dense bfloat16 peak and against a bfloat16 matmul measured in the same run.

    python benchmarks/gpu_mfu.py                        # on a GPU (benchmarks/gpu_check.sh)
    python benchmarks/gpu_mfu.py --dropout=0 --batch=64 --output=runs/gpu_mfu.json
    python benchmarks/gpu_mfu.py --tiny                 # a smoke test of the code path (CPU)
    python benchmarks/gpu_mfu.py --shapes=gpu --peer=nanogpt   # GPT-2 small against nanoGPT

`--shapes` times named shapes of benchmarks/train_throughput.py instead (the group `gpu`:
GPT-2 small at batch 12 and 32, the paper's base model at 128 x 256/256), one row each.
`--peer=nanogpt` runs nanoGPT's bench.py (benchmarks/peers.py: GPT-2 small, batch 12,
torch.compile, bfloat16 autocast) before the first row and after the last, and reports
our tokens/s over its faster run for the rows whose shape names it as their peer.

The step is the real one: benchmarks/train_throughput.py's `run_shape` builds the task
from configs/default.py (`--task` at `--size`, default the paper's base translation model;
its preset dropout unless `--dropout`), sets bfloat16 compute and the fused attention path
(cuDNN on GPU) as the `gpu` preset does, and times `steps.compile_steps`'s pmapped step
(forward, backward, clipping, Adam) on one device over random non-zero tokens, `--batch`
rows of `--length` source and target tokens, vocabulary `--vocab_size`. Model FLOPs are
`train_throughput.model_flops` (6 per matmul weight per token, plus attention; PaLM
appendix B); the FLOP formula is checked against the model's parameters there.

Peaks: (a) the published dense (no sparsity) bfloat16 tensor-core rate of the card, looked
up from its name in PUBLISHED_BF16_PEAK (vendor datasheets; None for a card not listed);
(b) a jitted bfloat16 `[n, n] @ [n, n]` (`--peak_size`, 8192) measured here: `--peak_calls`
calls dispatched back to back and blocked once, so dispatch gaps do not count; the median
of `--peak_rounds` such rounds. Nothing here asserts a timing.
"""

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

if __package__ in (None, ""):  # run as a script: put the repository root on the path
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import peers, train_throughput  # noqa: E402

# Dense bfloat16 tensor-core FLOP/s from NVIDIA's datasheets (their headline figures are
# with 2:4 sparsity, twice these). Matched in order against the device name, so the more
# specific names come first ("H100 PCIe" before "H100").
PUBLISHED_BF16_PEAK: Tuple[Tuple[str, float, str], ...] = (
    ("GH200", 989.4e12, "GH200 (H100 SXM compute)"),
    ("H200 NVL", 835.6e12, "H200 NVL"),
    ("H200", 989.4e12, "H200 SXM"),
    ("H100 NVL", 835.6e12, "H100 NVL"),
    ("H100 PCIe", 756.5e12, "H100 PCIe"),
    ("H100", 989.4e12, "H100 SXM"),
    ("A100", 312.0e12, "A100"),
    ("L40S", 362.1e12, "L40S"),
    ("L4", 121.0e12, "L4"),
)


def published_peak(device_name: str) -> Tuple[Optional[float], str]:
  """(FLOP/s, which card it is for) for a device name, or (None, "") if not listed."""
  for key, flops, label in PUBLISHED_BF16_PEAK:
    if key.lower() in device_name.lower():
      return flops, label
  return None, ""


def gpu_name() -> str:
  """The card's name from nvidia-smi when there is one, else jax's device kind."""
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20, check=True).stdout
    if out.strip():
      return out.strip().splitlines()[0]
  except (OSError, subprocess.SubprocessError):
    pass
  return jax.devices()[0].device_kind


def measure_bf16_matmul(n: int, calls: int, rounds: int) -> Dict[str, Any]:
  """FLOP/s of a jitted bfloat16 [n, n] @ [n, n] (2 n^3 FLOPs), `calls` back to back a round
  (blocked once at the end), median over `rounds`."""
  key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
  # Random values: all-zero operands run measurably faster on some cards (less power).
  a = jax.random.normal(key_a, (n, n), jnp.bfloat16)
  b = jax.random.normal(key_b, (n, n), jnp.bfloat16)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()
  per_call = []
  for _ in range(rounds):
    start = time.perf_counter()
    outs = [matmul(a, b) for _ in range(calls)]
    jax.block_until_ready(outs)
    per_call.append((time.perf_counter() - start) / calls)
    del outs
  seconds = statistics.median(per_call)
  return {"n": n, "calls_per_round": calls, "rounds": rounds, "dtype": "bfloat16",
          "median_s": seconds, "round_s": per_call, "flops_per_sec": 2.0 * n**3 / seconds}


def tiny_version(shape: "train_throughput.Shape") -> "train_throughput.Shape":
  """`shape` shrunk to a smoke test that runs in seconds on a CPU: one layer of d 32,
  batch 2, 16 tokens, vocabulary 64; everything else as the shape says."""
  overrides = dict(shape.overrides, num_encoder_layers=1, num_decoder_layers=1, d_model=32,
                   d_ff=64, num_heads=2)
  return dataclasses.replace(shape, batch=2, vocab_size=64, overrides=overrides,
                             src_length=16 if shape.src_length else 0,
                             tgt_length=16 if shape.tgt_length else 0)


def shapes_of(args) -> List["train_throughput.Shape"]:
  """The shapes `--shapes` names (groups expanded), or the one of --task/--size/..."""
  if not args.shapes:
    return [shape_of(args)]
  names, skipped = train_throughput.select_shapes(args.shapes)
  for name, why in skipped:
    print(f"skipping {name}: {why}", file=sys.stderr, flush=True)
  shapes = [train_throughput.SHAPES_BY_NAME[n] for n in names]
  return [tiny_version(s) for s in shapes] if args.tiny else shapes


def shape_of(args) -> "train_throughput.Shape":
  overrides = {"dtype": "bfloat16", "attention_impl": args.attention_impl}
  if args.dropout is not None:
    overrides["dropout_rate"] = args.dropout
  lengths = {"translation": dict(src_length=args.length, tgt_length=args.length),
             "generation": dict(tgt_length=args.length)}[args.task]
  return train_throughput.Shape(
      f"{args.task}_{args.size}_bf16", args.task, args.size, batch=args.batch,
      vocab_size=args.vocab_size, overrides=overrides, note="gpu_mfu", **lengths)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--task", default="translation", choices=("translation", "generation"))
  parser.add_argument("--size", default="base", help="size preset of configs/presets.py")
  parser.add_argument("--batch", type=int, default=128, help="rows a step")
  parser.add_argument("--length", type=int, default=256, help="source and target tokens")
  parser.add_argument("--vocab_size", type=int, default=32000)
  parser.add_argument("--dropout", type=float, default=None,
                      help="dropout_rate; default: the size preset's (0.1 for base)")
  parser.add_argument("--attention_impl", default="fused")
  parser.add_argument("--shapes", default="",
                      help="train_throughput shape or group names (e.g. gpu) instead of "
                           "--task/--size/--batch/...")
  parser.add_argument("--peer", choices=("", "nanogpt"), default="",
                      help="also run nanoGPT's bench.py beside the rows that name it")
  parser.add_argument("--peer_python", default=sys.executable,
                      help="a Python with PyTorch (and a GPU) for the peer")
  parser.add_argument("--steps", type=int, default=10, help="timed steps a round (minimum)")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--min_round_seconds", type=float, default=1.0)
  parser.add_argument("--peak_size", type=int, default=8192)
  parser.add_argument("--peak_calls", type=int, default=20)
  parser.add_argument("--peak_rounds", type=int, default=5)
  parser.add_argument("--tiny", action="store_true",
                      help="smoke test: tiny model, batch 2 x 16, vocab 64, 256 matmul")
  parser.add_argument("--output", default="", help="also write the results as JSON here")
  args = parser.parse_args(argv)
  if args.tiny:
    args.size, args.batch, args.length, args.vocab_size = "tiny", 2, 16, 64
    args.steps, args.rounds, args.warmup, args.min_round_seconds = 2, 2, 1, 0.0
    args.peak_size, args.peak_calls, args.peak_rounds = 256, 4, 3
  return args


def main(argv=None):
  args = parse_args(argv)
  start = time.perf_counter()
  name = gpu_name()
  published, published_for = published_peak(name)
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, device {name}",
        file=sys.stderr, flush=True)
  measured = measure_bf16_matmul(args.peak_size, args.peak_calls, args.peak_rounds)
  print(f"bfloat16 {args.peak_size}^2 matmul: {measured['flops_per_sec'] / 1e12:.1f} TFLOP/s",
        file=sys.stderr, flush=True)
  peer_runs = []
  folder = None
  if args.peer:
    try:
      folder = peers.prepare_nanogpt()
    except peers.PeerUnavailable as e:
      print(f"peer skipped: {e}", file=sys.stderr, flush=True)

  def measure_peer():
    if folder is None:
      return
    try:
      options = dict(device="cpu", compile=False, dtype="float32", batch_size=2,
                     block_size=16) if args.tiny else {}
      run = peers.nanogpt_bench(folder, args.peer_python, **options)
    except (peers.PeerUnavailable, subprocess.SubprocessError) as e:
      print(f"peer failed: {e}", file=sys.stderr, flush=True)
      return
    peer_runs.append(run)
    print(f"peer {run['peer']}: {run['iteration_ms']:.2f} ms an iteration, "
          f"{run['tokens_per_sec']:,.0f} tokens/s", file=sys.stderr, flush=True)

  measure_peer()
  rows = []
  for shape in shapes_of(args):
    row = train_throughput.run_shape(shape, args.steps, args.rounds, args.warmup,
                                     args.min_round_seconds, seed=0)
    row["peer"] = shape.peer
    rows.append(row)
    print(f"{shape.name}: step {row['step_s'] * 1e3:.2f} ms, "
          f"{row['tokens_per_sec']:,.0f} tokens/s", file=sys.stderr, flush=True)
  measure_peer()
  measured_after = measure_bf16_matmul(args.peak_size, args.peak_calls, args.peak_rounds)
  peak_measured = max(measured["flops_per_sec"], measured_after["flops_per_sec"])
  peer_best = max((r["tokens_per_sec"] for r in peer_runs), default=None)
  for row in rows:
    achieved = row["flops_per_sec"]
    row["mfu_published"] = achieved / published if published else None
    row["mfu_measured"] = achieved / peak_measured
    row["peer_tokens_per_sec"] = peer_best if row["peer"] == "nanogpt_bench" else None
  result = {
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "jax": jax.__version__, "backend": jax.default_backend(), "device": name,
      "device_kind": jax.devices()[0].device_kind, "args": vars(args),
      "published_peak_flops_per_sec": published, "published_peak_for": published_for,
      "matmul_before": measured, "matmul_after": measured_after,
      "measured_peak_flops_per_sec": peak_measured, "peer_runs": peer_runs,
      "total_s": time.perf_counter() - start, "rows": rows,
      # The single-row form of earlier versions (the first row).
      "row": rows[0], "mfu_published": rows[0]["mfu_published"],
      "mfu_measured": rows[0]["mfu_measured"],
  }
  print(f"\n{name}; jax {jax.__version__}; published dense bf16 peak: "
        + (f"{published / 1e12:.1f} TFLOP/s ({published_for})" if published else "unknown")
        + f"; measured bf16 {args.peak_size}^2 matmul: "
        f"{measured['flops_per_sec'] / 1e12:.1f} before, "
        f"{measured_after['flops_per_sec'] / 1e12:.1f} after (MFU uses the larger)\n")
  print("| shape | params | batch x lengths | vocab | dropout | attention | compile s | "
        "step ms | tokens/s | model TFLOP/step | TFLOP/s | MFU % (published) | "
        "MFU % (measured matmul) | peer tokens/s | ours / peer |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for row in rows:
    lengths = (f"{row['batch']} x {row['src_length']}/{row['tgt_length']}"
               if row["src_length"] else f"{row['batch']} x {row['tgt_length']}")
    mfu_pub = f"{100 * row['mfu_published']:.1f}" if published else "n/a"
    peer = row["peer_tokens_per_sec"]
    peer_cells = (f"{peer:,.0f} | {row['tokens_per_sec'] / peer:.2f}x" if peer else " | ")
    print(f"| {row['shape']} | {row['params'] / 1e6:.1f}M | {lengths} | "
          f"{row['vocab_size']} | {row['dropout_rate']:g} | {row['attention_impl']} | "
          f"{row['compile_s']:.1f} | {row['step_s'] * 1e3:.2f} | "
          f"{row['tokens_per_sec']:,.0f} | {row['flops_per_step'] / 1e12:.3f} | "
          f"{row['flops_per_sec'] / 1e12:.1f} | {mfu_pub} | "
          f"{100 * row['mfu_measured']:.1f} | {peer_cells} |")
  for run in peer_runs:
    print(f"peer: {run['peer']} `{run['command']}`: {run['iteration_ms']:.2f} ms, "
          f"{run['tokens_per_sec']:,.0f} tokens/s")
  print(f"\ntotal time {result['total_s']:.0f} s")
  if args.output:
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
