"""Language-model benchmarks: the nanoGPT tiny-Shakespeare comparison and generation speed.

    python benchmarks/generation.py nanogpt --output=/tmp/nanogpt.json
    python benchmarks/generation.py nanogpt --variant=recipe=fast
    python benchmarks/generation.py nanogpt --variant=recipe=fast --peer   # nanoGPT beside it
    python benchmarks/generation.py speed --variant=size=nanogpt --batches=1,16

nanogpt: trains configs/generation.py (tiny Shakespeare, nanoGPT's CPU model shape) in a
      subprocess through main.py, exactly as a user would, and reads the run's
      metrics.jsonl: validation loss (nats per character, the whole held-out last 10%)
      against wall time since the process started (imports, data, compilation and
      evaluations included), training tokens/s (median over log intervals, the one with
      compilation excluded), the wall time at which validation loss first reaches
      --target, and the best validation loss; then, from the final checkpoint, the
      validation loss without the first position of each window (predicted without
      context; nanoGPT's targets always have some). Extra `--config.<group>.<field>=y` overrides
      pass through. `--peer` then runs nanoGPT's README CPU recipe (benchmarks/peers.py;
      its train.py, 2,000 iterations of 12 x 64 characters) and reports its process wall
      time, final validation loss, and our time to --target over its wall time.
speed: tokens/s of sampling with and without the key/value cache (the uncached path
      recomputes the whole prefix for every new token), at each batch size: one jitted
      call generates `--new_tokens` tokens a row after a one-token prompt (EOS is never
      sampled, so every row runs to the end); the median of `--repeats` timed calls
      after a compiling call, on one device, with freshly initialised parameters (the
      speed does not depend on their values).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def run_nanogpt(args, overrides):
  """Trains once in a subprocess; returns the curve and the summary figures."""
  workdir = args.workdir or tempfile.mkdtemp(prefix="nanogpt-")
  command = [sys.executable, os.path.join(REPO, "main.py"),
             f"--config={os.path.join(REPO, 'configs', 'generation.py')}"
             + (f":{args.variant}" if args.variant else ""),
             f"--workdir={workdir}"] + overrides
  start = time.time()
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
  total = time.time() - start
  if result.returncode:
    sys.exit(f"training failed ({result.returncode}):\n{result.stderr[-3000:]}")
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  curve = [{"step": r["step"], "wall_s": r["time"] - start, "val_loss": r["eval/loss"],
            "bits_per_char": r.get("eval/bits_per_char")}
           for r in records if "eval/loss" in r]
  train = [r for r in records if "train/tokens_per_sec" in r]
  reached = next((p for p in curve if p["val_loss"] <= args.target), None)
  final = next((r for r in records if "final/loss" in r), None)
  positions = loss_without_first_positions(workdir, overrides, args.variant)
  return {
      "final_val_loss_by_position": positions,
      "command": " ".join(command[1:]), "workdir": workdir, "process_wall_s": total,
      "tokens_per_sec_median": statistics.median(r["train/tokens_per_sec"]
                                                 for r in train[1:]),
      "target": args.target,
      "reached_target_at": reached,
      "best_val_loss": min(p["val_loss"] for p in curve),
      "final_val_loss": final["final/loss"] if final else None,
      "curve": curve,
  }


def loss_without_first_positions(workdir, overrides, variant=""):
  """The final checkpoint's validation loss over every window position but the first.

  Our windows score each token once, the first of each window without context; nanoGPT's
  targets always have at least one character before them. This is the like-for-like loss.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  import numpy as np

  import modes.run
  from benchmarks import run_record
  from configs import generation

  config = run_record.load_config(generation.__file__ + (f":{variant}" if variant else ""),
                                  overrides)
  run = modes.run.open_run(config, workdir)
  task = run.task
  _, params = run.restore()
  length = config.data.max_target_length
  windows = np.stack([np.pad(w["inputs"], (0, length - len(w["inputs"])))
                      for w in task.data_source("eval")])

  @jax.jit
  def nll(tokens):
    logits = task.model.apply({"params": params}, tokens)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]

  losses = np.concatenate([np.asarray(nll(windows[i:i + 256]))
                           for i in range(0, len(windows), 256)])
  real = windows > 0
  return {"all_positions": float(losses[real].mean()),
          "without_first": float(losses[:, 1:][real[:, 1:]].mean()),
          "first_position": float(losses[:, 0][real[:, 0]].mean())}


# nanoGPT's README CPU command (../shared/peers/README.md), flags after its config file.
NANOGPT_EVAL_ITERS = 20
NANOGPT_CPU_RECIPE = ["--device=cpu", "--compile=False", f"--eval_iters={NANOGPT_EVAL_ITERS}",
                      "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4",
                      "--n_head=4", "--n_embd=128", "--max_iters=2000",
                      "--lr_decay_iters=2000", "--dropout=0.0"]


def run_peer(args):
  """nanoGPT's README CPU recipe, run once after ours (benchmarks/peers.py)."""
  from benchmarks import peers  # pylint: disable=g-import-not-at-top
  folder = peers.prepare_nanogpt()
  return peers.nanogpt_shakespeare(folder, args.peer_python, args.target,
                                   flags=NANOGPT_CPU_RECIPE)


def run_speed(args):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  import numpy as np

  import tasks
  from configs import default, generation, presets
  from models import decoding

  config = generation.get_config(args.variant)
  # The speed needs shapes only: a synthetic-data task of the same model shape.
  base = default.get_config("task=generation")
  presets.update_groups(base, {
      "model": {k: config.model[k] for k in (
          "num_decoder_layers", "d_model", "d_ff", "num_heads", "head_dim", "norm_placement",
          "activation", "positional_encoding", "tie_output")},
      "data": {"max_target_length": config.data.max_target_length},
      "compute": {k: config.compute[k] for k in ("attention_impl", "dtype")}})
  base.data.max_digits = min(base.data.max_digits, (base.data.max_target_length - 2) // 2)
  task = tasks.get_task(base)
  task.vocab_size = args.vocab_size
  task.model = task.build_model()
  params = task.init_params(jax.random.PRNGKey(0))
  length = min(base.data.max_target_length, args.new_tokens + 1)
  sampler = decoding.sampling_picker(temperature=1.0)

  def picker(logits, rng):  # never EOS: every row generates to the end
    return sampler(logits.at[:, task.eos_id].set(decoding.MASK_VALUE), rng)

  rows = []
  for batch in [int(b) for b in args.batches.split(",")]:
    prompt = jnp.zeros((batch, length), jnp.int32).at[:, 0].set(5)
    for cached in (True, False):
      fn = jax.jit(lambda p, x, r, cached=cached: task.generate(p, x, r, cached=cached,
                                                                 picker=picker))
      out = fn(params, prompt, jax.random.PRNGKey(0)).block_until_ready()
      assert int((np.asarray(out) > 0).sum()) == batch * length, "a row stopped early"
      times = []
      for i in range(args.repeats):
        t = time.perf_counter()
        fn(params, prompt, jax.random.PRNGKey(i + 1)).block_until_ready()
        times.append(time.perf_counter() - t)
      seconds = statistics.median(times)
      rows.append({"batch": batch, "cached": cached, "new_tokens": length - 1,
                   "seconds": seconds, "tokens_per_sec": batch * (length - 1) / seconds})
      print(f"batch {batch:3d}  {'cache   ' if cached else 'no cache'}  "
            f"{length - 1} new tokens  {seconds * 1e3:8.1f} ms  "
            f"{rows[-1]['tokens_per_sec']:10,.0f} tokens/s", flush=True)
  return {"variant": args.variant, "context": base.data.max_target_length, "rows": rows,
          "device": str(jax.devices()[0])}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("nanogpt")
  p.add_argument("--target", type=float, default=1.88)
  p.add_argument("--variant", default="", help="of configs/generation.py, e.g. recipe=fast")
  p.add_argument("--workdir", default="")
  p.add_argument("--output", default="")
  p.add_argument("--peer", action="store_true",
                 help="also run nanoGPT's README CPU recipe and compare wall times")
  p.add_argument("--peer_python", default=sys.executable, help="a Python with PyTorch")
  s = sub.add_parser("speed")
  s.add_argument("--variant", default="size=nanogpt")
  s.add_argument("--batches", default="1,16")
  s.add_argument("--new_tokens", type=int, default=63)
  s.add_argument("--vocab_size", type=int, default=68)  # tiny Shakespeare's characters + 3
  s.add_argument("--repeats", type=int, default=5)
  s.add_argument("--output", default="")
  args, rest = parser.parse_known_args()
  if args.command == "nanogpt":
    result = run_nanogpt(args, rest)
    for point in result["curve"]:
      print(f"step {point['step']:5d}  {point['wall_s']:7.1f} s  val loss "
            f"{point['val_loss']:.4f}")
    hit = result["reached_target_at"]
    print(f"tokens/s (median): {result['tokens_per_sec_median']:,.0f}")
    print(f"val loss {args.target} reached: " + (
        f"step {hit['step']} at {hit['wall_s']:.1f} s" if hit else "no"))
    print(f"best val loss {result['best_val_loss']:.4f}; process wall "
          f"{result['process_wall_s']:.1f} s")
    by = result["final_val_loss_by_position"]
    print(f"final val loss {by['all_positions']:.4f} over all positions, "
          f"{by['without_first']:.4f} without the first of each window "
          f"(first alone: {by['first_position']:.4f})")
    if args.peer:
      result["peer"] = run_peer(args)
      peer = result["peer"]
      last = peer["curve"][-1] if peer["curve"] else None
      print(f"nanoGPT's CPU recipe: process wall {peer['process_wall_s']:.1f} s, final val "
            f"loss {last['val_loss'] if last else float('nan'):.4f} (its {NANOGPT_EVAL_ITERS}"
            f"-batch estimate)" + (f"; ours to {args.target} / its wall: "
                                   f"{hit['wall_s'] / peer['process_wall_s']:.2f}" if hit else ""))
  else:
    if rest:
      parser.error(f"unknown arguments {rest}")
    result = run_speed(args)
  if args.output:
    with open(args.output, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
