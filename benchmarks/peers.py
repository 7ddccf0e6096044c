"""Peers run beside this codebase, for side-by-side figures measured in the same run.

    python -m benchmarks.peers nanogpt_cpu            # nanoGPT's CPU iteration time
    python -m benchmarks.peers nanogpt_bench          # its bench.py (a GPU with torch)
    python -m benchmarks.peers nanogpt_shakespeare    # its GPU recipe: time to loss 1.47
    python -m benchmarks.peers nanogpt_shakespeare -- --max_iters=2000   # flags for train.py

nanoGPT's files (../shared/peers/nanogpt, unmodified; see ../shared/peers/README.md) are
copied to a scratch folder, and its character-level tiny-Shakespeare data prepared there
with its own prepare.py from ../shared/data/tinyshakespeare. Nothing of it is imported here:
it runs in a subprocess, with a Python that has PyTorch (`--peer_python`, default this
one), and its printed timings are read back.

- `nanogpt_cpu_iteration`: its train.py at a shape (by default its README's CPU command:
  4 layers, 4 heads, d 128, context 64, batch 12, dropout 0, no torch.compile), for
  `iterations`; the median of the "time X ms" it prints per iteration, the first
  `skip` left out (warm-up, and iteration 0's evaluation). An iteration is its whole
  loop body: batch sampling, forward, backward, AdamW, and the loss fetched to the host.
- `nanogpt_bench`: its bench.py (GPT-2 small's shape, batch 12, context 1024, bfloat16
  autocast, torch.compile, synthetic data): the "time per iteration" it prints.
- `nanogpt_shakespeare`: its GPU tiny-Shakespeare recipe (train.py with
  config/train_shakespeare_char.py, unchanged unless flags are given): the wall time
  from the process start to each evaluation, and the first at or under a target
  validation loss.
"""

import argparse
import gzip
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)
# Where the peer's files and the text are: ../shared beside the checkout, or (on a machine
# that has only the checkout: benchmarks/gpu_check.sh) the folders these variables name.
NANOGPT = os.environ.get("PEER_NANOGPT_DIR",
                         os.path.join(REPO, "..", "shared", "peers", "nanogpt"))
SHAKESPEARE = os.environ.get("PEER_SHAKESPEARE_DIR",
                             os.path.join(REPO, "..", "shared", "data", "tinyshakespeare"))
# nanoGPT's README CPU command (its model shape and batch; iterations set by the caller).
CPU_SHAPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, dropout=0.0)


class PeerUnavailable(RuntimeError):
  """The peer cannot run here; the message says what is missing and how to get it."""


def has_torch(python: str) -> bool:
  return subprocess.run([python, "-c", "import torch"], capture_output=True,
                        check=False).returncode == 0


def prepare_nanogpt(scratch: Optional[str] = None, source: str = NANOGPT,
                    data: str = SHAKESPEARE) -> str:
  """A scratch copy of nanoGPT with its shakespeare_char data prepared; returns its folder.
  An existing copy (train.bin present) is reused."""
  if not os.path.isdir(source):
    raise PeerUnavailable(f"nanoGPT's files are not at {source} (../shared/peers/nanogpt)")
  scratch = scratch or os.path.join(tempfile.gettempdir(), "nanogpt_peer")
  prepared = os.path.join(scratch, "data", "shakespeare_char")
  if os.path.exists(os.path.join(prepared, "train.bin")):
    return scratch
  shutil.copytree(source, scratch, dirs_exist_ok=True)
  text = None
  for name, opener in (("input.txt", open), ("input.txt.gz", gzip.open)):
    if os.path.exists(os.path.join(data, name)):
      with opener(os.path.join(data, name), "rt", encoding="utf-8") as f:
        text = f.read()
      break
  if text is None:
    raise PeerUnavailable(f"no input.txt(.gz) in {data} (../shared/data/tinyshakespeare)")
  with open(os.path.join(prepared, "input.txt"), "w", encoding="utf-8") as f:
    f.write(text)
  result = subprocess.run([sys.executable, "prepare.py"], cwd=prepared, capture_output=True,
                          text=True, check=False)
  if result.returncode:
    raise PeerUnavailable(f"nanoGPT's prepare.py failed:\n{result.stderr[-2000:]}")
  return scratch


# What nanoGPT prints (train.py, bench.py at commit 3adf61e1).
ITERATION = re.compile(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms", re.M)
EVALUATION = re.compile(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)")
BENCH = re.compile(r"time per iteration: ([\d.]+)ms")


def iteration_ms(output: str) -> List[float]:
  """The per-iteration times (ms) train.py printed, in order (log_interval=1)."""
  return [float(m.group(2)) for m in ITERATION.finditer(output)]


def evaluation(line: str) -> Optional[Dict[str, float]]:
  """{step, val_loss} of one train.py evaluation line, None for any other line."""
  match = EVALUATION.match(line)
  return match and {"step": int(match.group(1)), "val_loss": float(match.group(3))}


def peer_environment() -> Dict[str, str]:
  """This process's environment without the malloc tunable main.py adds for itself
  (training/host_memory.py): the peer runs as its own users run it."""
  from training import host_memory  # pylint: disable=g-import-not-at-top
  return host_memory.without_huge_pages(os.environ)


def _run(python: str, folder: str, args: List[str], timeout: float) -> str:
  if not has_torch(python):
    raise PeerUnavailable(f"{python} cannot import torch; the peer needs PyTorch: "
                          f"pip install -r requirements-pretrained.txt (CPU), or give "
                          f"--peer_python=<a Python with torch>")
  result = subprocess.run([python] + args, cwd=folder, capture_output=True, text=True,
                          check=False, timeout=timeout, env=peer_environment())
  if result.returncode:
    raise PeerUnavailable(f"nanoGPT {' '.join(args[:2])} failed ({result.returncode}):\n"
                          f"{result.stderr[-2000:]}")
  return result.stdout


def _flags(values: Dict[str, Any]) -> List[str]:
  return [f"--{k}={v}" for k, v in values.items()]


def nanogpt_cpu_iteration(folder: str, python: str = sys.executable, iterations: int = 60,
                          skip: int = 10, timeout: float = 600,
                          **shape) -> Dict[str, Any]:
  """nanoGPT's train.py on the CPU at `shape` (CPU_SHAPE by default): its median
  iteration time and tokens/s (module docstring)."""
  shape = {**CPU_SHAPE, **shape}
  args = ["train.py", "config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
          "--log_interval=1", "--eval_iters=1", f"--eval_interval={iterations + 1}",
          f"--max_iters={iterations}", f"--lr_decay_iters={iterations}",
          "--always_save_checkpoint=False"] + _flags(shape)
  out = _run(python, folder, args, timeout)
  times = iteration_ms(out)[skip:]
  if not times:
    raise PeerUnavailable(f"no iteration times in nanoGPT's output:\n{out[-1000:]}")
  ms = statistics.median(times)
  tokens = shape["batch_size"] * shape["block_size"]
  return {"peer": "nanoGPT train.py (PyTorch eager, CPU)", "shape": shape,
          "iterations_timed": len(times), "iteration_ms": ms,
          "iteration_ms_range": [min(times), max(times)], "tokens_per_sec": tokens / ms * 1e3,
          "command": " ".join(args), "torch_threads": _torch_threads(python)}


def _torch_threads(python: str) -> Optional[int]:
  result = subprocess.run([python, "-c", "import torch; print(torch.get_num_threads())"],
                          capture_output=True, text=True, check=False)
  return int(result.stdout) if result.returncode == 0 else None


def nanogpt_bench(folder: str, python: str = sys.executable, timeout: float = 600,
                  **options) -> Dict[str, Any]:
  """nanoGPT's bench.py (GPT-2 small, synthetic data, torch.compile by default): the time
  per iteration it prints, as tokens/s."""
  options = {"real_data": False, "compile": True, **options}
  args = ["bench.py"] + _flags(options)
  out = _run(python, folder, args, timeout)
  match = BENCH.search(out)
  if not match:
    raise PeerUnavailable(f"no 'time per iteration' in bench.py's output:\n{out[-1000:]}")
  ms = float(match.group(1))
  batch = int(options.get("batch_size", 12))
  length = int(options.get("block_size", 1024))
  return {"peer": "nanoGPT bench.py", "options": options, "iteration_ms": ms,
          "tokens_per_sec": batch * length / ms * 1e3, "command": " ".join(args)}


def nanogpt_shakespeare(folder: str, python: str = sys.executable, target: float = 1.47,
                        timeout: float = 600, flags: Sequence[str] = ()) -> Dict[str, Any]:
  """nanoGPT's GPU tiny-Shakespeare recipe (with `flags` for its train.py): (step,
  validation loss, wall seconds since the process started) at each evaluation, and the
  first at or under `target`."""
  if not has_torch(python):
    raise PeerUnavailable(f"{python} cannot import torch")
  args = ["train.py", "config/train_shakespeare_char.py"] + list(flags)
  start = time.time()
  process = subprocess.Popen([python, "-u"] + args, cwd=folder, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=peer_environment())
  curve = []
  try:
    for line in process.stdout:
      point = evaluation(line)
      if point:
        curve.append({**point, "wall_s": time.time() - start})
      if time.time() - start > timeout:
        process.kill()
        break
  finally:
    process.wait()
  reached = next((p for p in curve if p["val_loss"] <= target), None)
  if process.returncode and not curve:
    raise PeerUnavailable(f"nanoGPT's train.py failed ({process.returncode})")
  return {"peer": "nanoGPT train.py config/train_shakespeare_char.py", "flags": list(flags),
          "curve": curve, "target": target, "reached": reached,
          "returncode": process.returncode, "process_wall_s": time.time() - start,
          "command": " ".join(args)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("what", choices=("nanogpt_cpu", "nanogpt_bench", "nanogpt_shakespeare"))
  parser.add_argument("--peer_python", default=sys.executable)
  parser.add_argument("--scratch", default="", help="nanoGPT's scratch copy (reused)")
  parser.add_argument("--iterations", type=int, default=60)
  parser.add_argument("--target", type=float, default=1.47)
  parser.add_argument("--output", default="", help="also write the result as JSON here")
  args, rest = parser.parse_known_args(argv)  # the rest (after --): flags for its train.py
  args.flags = [flag for flag in rest if flag != "--"]
  folder = prepare_nanogpt(args.scratch or None)
  if args.what == "nanogpt_cpu":
    result = nanogpt_cpu_iteration(folder, args.peer_python, args.iterations)
  elif args.what == "nanogpt_bench":
    result = nanogpt_bench(folder, args.peer_python)
  else:
    result = nanogpt_shakespeare(folder, args.peer_python, args.target, flags=args.flags)
  print(json.dumps(result, indent=1))
  if args.output:
    from benchmarks import run_record  # pylint: disable=g-import-not-at-top
    run_record.write_json(args.output, result)


if __name__ == "__main__":
  try:
    main()
  except PeerUnavailable as e:
    sys.exit(f"peer unavailable: {e}")
