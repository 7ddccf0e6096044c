"""Where a train step's time goes: a per-op profile of the project's real pmapped step.

    python -m benchmarks.profile_step --shapes=gpt2_small,paper_base_gpu --out=runs/profile
    python -m benchmarks.profile_step --shapes=generation_small_256 --cpu_devices=2
    python -m benchmarks.profile_step --shapes=gpt2_small --tiny     # a CPU rehearsal

For each shape of benchmarks/train_throughput.py it builds the step as the throughput
benchmark does (`prepare_step`: the same config, model, optimizer and pmap, a synthetic
batch), compiles and warms it, and records `--steps` steps under `jax.profiler.trace`.
It writes, under `<out>/<shape>/`:

    hlo.txt       the compiled (optimized) HLO of the step
    trace/        the profiler trace: TensorBoard's profile tab or xprof read the
                  .xplane.pb, Perfetto or chrome://tracing the perfetto_trace.json.gz
    profile.json  the tables below, per step

and prints, per step of device 0 (every pmap device runs the same program):
- the step's wall time (median of the traced steps) and how much of it the device was
  busy running XLA ops (the union of their intervals);
- each op's self time (its time minus that of ops nested in it on the same thread; a
  `while` or `conditional`, which spans its body, is listed apart), the op's kind (from its HLO:
  matmul, attention, elementwise fusion, reduction, data movement, collective, ...) and
  where in the model it comes from (the JAX op name XLA keeps as metadata: forward or
  backward, attention, feed-forward, norms, embedding and logits, optimizer update);
- the same times summed by kind and by part of the model;
- the device's longest idle intervals inside the steps, with the ops around each and
  what the other devices ran meanwhile (with several pmap devices on one host, one
  device's idle time may be the other's busy time);
- the same steps run again untraced: their time and how many cores the process kept
  busy (user and system CPU time over wall time).

Ops are the trace's events that name their HLO instruction (`hlo_op`); on a GPU the
kernels are matched to instructions the same way. Where a trace names none, every event
of the device's tracks is counted under its own name, and the report says so.
"""

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import resource
import shutil
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

if __package__ in (None, ""):  # run as a script: put the repository root on the path
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import run_record  # noqa: E402  (no JAX)

if __name__ == "__main__":  # --cpu_devices must reach XLA_FLAGS before JAX starts
  run_record.start_cpu_benchmark(sys.argv[1:])

import jax  # noqa: E402

from benchmarks import gpu_mfu, train_throughput  # noqa: E402

STEP_EVENT = "profiled_train_step"  # the StepTraceAnnotation around each traced step

# ----------------------------------------------------------------------------- the HLO


@dataclasses.dataclass
class Instruction:
  opcode: str
  calls: str = ""  # the computation a fusion (or call) runs
  target: str = ""  # a custom call's target
  op_name: str = ""  # the JAX op XLA compiled it from


_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s([a-z][a-z0-9\-]*)\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def parse_hlo(text: str) -> Tuple[Dict[str, Instruction], Dict[str, List[str]]]:
  """({instruction name: Instruction}, {computation name: the opcodes in it}) of an HLO
  module's text (`compiled.as_text()`)."""
  instructions: Dict[str, Instruction] = {}
  computations: Dict[str, List[str]] = collections.defaultdict(list)
  current = ""
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header and "=" not in line.split("(")[0]:
      current = header.group(1)
      continue
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, opcode = m.groups()
    calls, target, op_name = (_CALLS.search(line), _TARGET.search(line), _OP_NAME.search(line))
    instructions[name] = Instruction(opcode, calls.group(1) if calls else "",
                                     target.group(1) if target else "",
                                     op_name.group(1) if op_name else "")
    computations[current].append(opcode)
  return instructions, dict(computations)


_MATMUL_TARGET = re.compile(r"gemm|matmul|cublas|dot", re.I)
_ATTENTION_TARGET = re.compile(r"fmha|flash|attention|cudnn\$fmha", re.I)
_COLLECTIVE = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute",
               "all-to-all", "all-reduce-start", "all-reduce-done", "all-gather-start",
               "all-gather-done", "collective-permute-start", "collective-permute-done")
_MOVEMENT = ("copy", "copy-start", "copy-done", "transpose", "slice", "dynamic-slice",
             "dynamic-update-slice", "concatenate", "pad", "gather", "scatter", "bitcast",
             "broadcast", "reshape", "iota")
_CONTROL = ("while", "conditional", "call", "async-start", "async-done", "tuple",
            "get-tuple-element", "parameter", "constant")


def op_kind(name: str, instructions: Dict[str, Instruction],
            computations: Dict[str, List[str]]) -> str:
  """What an executed op is: matmul, attention, elementwise fusion, reduction, data
  movement, collective, control, or its opcode; "unknown" when the HLO lacks it."""
  inst = instructions.get(name)
  if inst is None:
    base = re.sub(r"[.\-]?\d+$", "", name)
    if _MATMUL_TARGET.search(base) or "ynn" in base:
      return "matmul"
    return "unknown"
  if inst.opcode in ("dot", "convolution"):
    return "matmul"
  if inst.opcode == "custom-call":
    if _ATTENTION_TARGET.search(inst.target):
      return "attention (fused kernel)"
    if _MATMUL_TARGET.search(inst.target):
      return "matmul"
    return f"custom call {inst.target}"
  if inst.opcode in _COLLECTIVE:
    return "collective"
  if inst.opcode in ("fusion", "call"):
    inside = set(computations.get(inst.calls, ()))
    if inside & {"dot", "convolution"}:
      return "matmul (fused)"
    if "custom-call" in inside:
      return "custom call (fused)"
    if inside & {"reduce", "reduce-window"}:
      return "reduction (fused)"
    if inside and inside <= set(_MOVEMENT) | {"parameter", "tuple", "get-tuple-element"}:
      return "data movement (fused)"
    return "elementwise (fused)"
  if inst.opcode in ("reduce", "reduce-window"):
    return "reduction"
  if inst.opcode in _MOVEMENT:
    return "data movement"
  if inst.opcode in _CONTROL:
    return "control"
  return inst.opcode


# Parts of the model, from the JAX op name XLA keeps (first match wins).
_PARTS = (("optimizer update", re.compile(r"(^|/)cond(/|$)|optax|adam|scale_by")),
          ("gradient all-reduce", re.compile(r"psum|pmean")),
          ("norms", re.compile(r"norm/")),
          ("attention", re.compile(r"attention/")),
          ("feed-forward", re.compile(r"/ffn/|/mlp/")),
          ("embedding and logits", re.compile(r"embed|logits|attend")),
          ("loss", re.compile(r"cross_entropy|log_softmax|logsumexp|loss")))


def model_part(op_name: str) -> str:
  """(direction) part of the model, e.g. "backward attention", from a JAX op name."""
  for part, pattern in _PARTS:
    if pattern.search(op_name):
      break
  else:
    part = "other (loss, clipping, glue)" if op_name else "no op name"
  if part in ("optimizer update", "gradient all-reduce") or not op_name:
    return part
  direction = ("backward " if "transpose(jvp(" in op_name else
               "forward " if "jvp(" in op_name else "")
  return direction + part


# ----------------------------------------------------------------------------- the trace


def read_trace(trace_dir: str) -> List[dict]:
  """The events of the newest Perfetto/Chrome trace under `trace_dir`."""
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
                 + glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                             recursive=True), key=os.path.getmtime)
  if not paths:
    raise SystemExit(f"no trace written under {trace_dir}")
  with gzip.open(paths[-1], "rt", encoding="utf-8") as f:
    data = json.load(f)
  return data["traceEvents"] if isinstance(data, dict) else data


def _union(intervals: List[Tuple[float, float]]) -> float:
  total, end = 0.0, float("-inf")
  for a, b in sorted(intervals):
    if b > end:
      total += b - max(a, end)
      end = b
  return total


def idle_gaps(ops: List[dict], other_ops: List[dict], step_events: List[dict],
              top: int) -> Tuple[List[dict], float]:
  """Where the device runs no op inside the traced steps: its `top` longest idle
  intervals, longest first, each with its length (ms), the op that ended before it and
  the op that started after it on this device, and the ops that other devices (other
  pmap shards) ran during it, longest overlap first; and the share of all idle time in
  which some other device was running an op (time spent waiting while it works)."""
  merged: List[List[float]] = []
  for a, b in sorted((e["ts"], e["ts"] + e["dur"]) for e in ops):
    if merged and a <= merged[-1][1]:
      merged[-1][1] = max(merged[-1][1], b)
    else:
      merged.append([a, b])
  gaps = []
  for step in step_events:
    t0, t1 = step["ts"], step["ts"] + step["dur"]
    edges = [t0] + [x for a, b in merged if b > t0 and a < t1 for x in (a, b)] + [t1]
    gaps += [(max(a, t0), min(b, t1)) for a, b in zip(edges[::2], edges[1::2])
             if min(b, t1) > max(a, t0)]
  others = [(e["ts"], e["ts"] + e["dur"], e["args"].get("hlo_op", e["name"]))
            for e in other_ops]
  total = sum(b - a for a, b in gaps)
  covered = sum(_union([(max(a, x), min(b, y)) for x, y, _ in others if x < b and y > a])
                for a, b in gaps)
  rows = []
  for a, b in sorted(gaps, key=lambda g: g[0] - g[1])[:top]:
    before = [e for e in ops if e["ts"] + e["dur"] <= a]
    after = [e for e in ops if e["ts"] >= b]
    overlap = sorted(((min(b, y) - max(a, x), name) for x, y, name in others
                      if x < b and y > a), reverse=True)
    name = lambda e: e["args"].get("hlo_op", e["name"])  # noqa: E731
    rows.append({"ms": (b - a) / 1e3,
                 "after": name(max(before, key=lambda e: e["ts"] + e["dur"])) if before else "",
                 "before": name(min(after, key=lambda e: e["ts"])) if after else "",
                 "other_devices": [n for _, n in overlap[:3]]})
  return rows, (covered / total if total else 0.0)


def self_times(events: List[dict]) -> List[Tuple[dict, float]]:
  """(event, its duration minus that of the events nested in it on its thread)."""
  out = []
  by_thread = collections.defaultdict(list)
  for e in events:
    by_thread[(e["pid"], e["tid"])].append(e)
  for thread in by_thread.values():
    thread.sort(key=lambda e: (e["ts"], -e["dur"]))
    stack: List[list] = []  # [event, end, self time]
    for e in thread:
      end = e["ts"] + e["dur"]
      while stack and stack[-1][1] <= e["ts"]:
        out.append((stack[-1][0], stack[-1][2]))
        stack.pop()
      if stack:
        stack[-1][2] -= min(e["dur"], stack[-1][1] - e["ts"])
      stack.append([e, end, float(e["dur"])])
    out += [(item[0], item[2]) for item in stack]
  return out


def summarize(events: List[dict], instructions: Dict[str, Instruction],
              computations: Dict[str, List[str]], steps: int, top: int) -> Dict[str, Any]:
  """The per-step tables of a trace's events (times in milliseconds)."""
  complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
  step_walls = [e["dur"] / 1e3 for e in complete if e["name"] == STEP_EVENT]
  ops = [e for e in complete if "hlo_op" in e.get("args", {})]
  source, other_ops = "hlo_op", []
  if ops:
    ordinals = {str(e["args"].get("device_ordinal", "0")) for e in ops}
    device = "0" if "0" in ordinals else sorted(ordinals)[0]
    other_ops = [e for e in ops if str(e["args"].get("device_ordinal", "0")) != device]
    ops = [e for e in ops if str(e["args"].get("device_ordinal", "0")) == device]
  else:  # no op names: every event of the device tracks, by its own name
    names = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    ops = [e for e in complete if names.get(e["pid"], "").startswith("/device:")]
    source = "device tracks (no hlo_op in the trace)"
  rows: Dict[str, dict] = {}
  for e, own in self_times(ops):
    name = e["args"].get("hlo_op", e["name"]) if source == "hlo_op" else e["name"]
    row = rows.get(name)
    if row is None:
      inst = instructions.get(name)
      op_name = inst.op_name if inst else ""
      row = rows[name] = {"op": name, "kind": op_kind(name, instructions, computations),
                          "part": model_part(op_name), "op_name": op_name,
                          "ms": 0.0, "calls": 0}
    row["ms"] += own / 1e3 / steps
    row["calls"] += 1
  for row in rows.values():
    row["calls"] /= steps
  busy = _union([(e["ts"], e["ts"] + e["dur"]) for e in ops]) / 1e3 / steps
  gaps, waiting_share = idle_gaps(ops, other_ops,
                                  [e for e in complete if e["name"] == STEP_EVENT], top)
  # A while or conditional spans its body, whose ops may run on other threads: listed
  # apart, outside the op time and the sums.
  control = sorted((r for r in rows.values() if r["kind"] == "control"),
                   key=lambda r: -r["ms"])
  ranked = sorted((r for r in rows.values() if r["kind"] != "control"),
                  key=lambda r: -r["ms"])
  total = sum(r["ms"] for r in ranked)

  def rollup(key: str) -> List[dict]:
    sums = collections.Counter()
    for r in ranked:
      sums[r[key]] += r["ms"]
    return [{key: k, "ms": v, "share_of_op_time": v / total if total else 0.0}
            for k, v in sums.most_common()]

  return {"source": source, "steps": steps,
          "step_ms": statistics.median(step_walls) if step_walls else None,
          "busy_ms": busy, "op_ms": total, "ops": ranked[:top], "num_ops": len(ranked),
          "control": control, "gaps": gaps,
          "idle_share_with_other_devices_busy": waiting_share,
          "kinds": rollup("kind"), "parts": rollup("part")}


# ----------------------------------------------------------------------------- running


def profile_shape(shape, steps: int, warmup: int, num_devices: int, out: str,
                  top: int) -> Dict[str, Any]:
  """Compiles, warms and traces `steps` steps of `shape`; writes its files under `out`."""
  prepared = train_throughput.prepare_step(shape, seed=0, num_devices=num_devices)
  p_train, p_state, batch = prepared.p_train, prepared.p_state, prepared.batch
  del prepared  # the state is donated to each step: no second reference to it
  os.makedirs(out, exist_ok=True)
  start = time.perf_counter()
  compiled = p_train.lower(p_state, batch).compile()
  hlo = compiled.as_text()
  with open(os.path.join(out, "hlo.txt"), "w", encoding="utf-8") as f:
    f.write(hlo)
  step = compiled  # the executable just compiled: the step is not compiled twice
  for _ in range(max(warmup, 1)):
    p_state, metrics = step(p_state, batch)
  jax.block_until_ready((p_state, metrics))
  compile_s = time.perf_counter() - start
  trace_dir = os.path.join(out, "trace")
  shutil.rmtree(trace_dir, ignore_errors=True)
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for i in range(steps):
      with jax.profiler.StepTraceAnnotation(STEP_EVENT, step_num=i):
        p_state, metrics = step(p_state, batch)
        jax.block_until_ready((p_state, metrics))
  # The same steps untraced: how many cores the process kept busy (user + system CPU
  # time over wall time), beside the trace's per-device view.
  usage, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  for _ in range(steps):
    p_state, metrics = step(p_state, batch)
    jax.block_until_ready((p_state, metrics))
  wall, after = time.perf_counter() - wall, resource.getrusage(resource.RUSAGE_SELF)
  cpu = {"user": after.ru_utime - usage.ru_utime, "system": after.ru_stime - usage.ru_stime}
  instructions, computations = parse_hlo(hlo)
  summary = summarize(read_trace(trace_dir), instructions, computations, steps, top)
  summary.update(untraced_step_ms=1e3 * wall / steps,
                 process_cores_busy={k: v / wall for k, v in cpu.items()})
  summary.update(shape=shape.name, devices=num_devices, batch=shape.batch,
                 compile_and_warmup_s=compile_s, hlo=os.path.join(out, "hlo.txt"),
                 trace_dir=trace_dir, device_kind=jax.devices()[0].device_kind,
                 jax_version=jax.__version__)
  run_record.write_json(os.path.join(out, "profile.json"), summary)
  return summary


def report(s: Dict[str, Any]) -> str:
  """The tables of one shape, as Markdown."""
  step = s["step_ms"]
  lines = [f"### {s['shape']} ({s['device_kind']}, {s['devices']} device(s), jax "
           f"{s['jax_version']}): {s['steps']} steps traced",
           "",
           f"step {step:.2f} ms (median); device 0 busy {s['busy_ms']:.2f} ms a step"
           + (f" ({100 * s['busy_ms'] / step:.0f}% of it)" if step else "")
           + f"; op self time {s['op_ms']:.2f} ms over {s['num_ops']} ops; source: "
           + s["source"], ""]
  if "process_cores_busy" in s:
    cores = s["process_cores_busy"]
    lines += [f"untraced, the same steps: {s['untraced_step_ms']:.2f} ms a step; the process "
              f"kept {cores['user'] + cores['system']:.2f} cores busy ({cores['user']:.2f} "
              f"user, {cores['system']:.2f} system CPU time a second of wall time)", ""]
  for key, title in (("kind", "kind"), ("part", "part of the model")):
    lines += [f"| {title} | ms a step | share of op time |", "|---|---|---|"]
    lines += [f"| {r[key]} | {r['ms']:.2f} | {100 * r['share_of_op_time']:.1f}% |"
              for r in s[key + "s"]]
    lines.append("")
  if s["control"]:
    lines += ["control ops, spanning their bodies (not in the sums): " + ", ".join(
        f"{r['op']} {r['ms']:.2f} ms" for r in s["control"][:5]), ""]
  if s.get("gaps"):
    share = 100 * s["idle_share_with_other_devices_busy"]
    lines += [f"device 0's longest idle intervals (in {share:.0f}% of its idle time another "
              "device runs an op):", "",
              "| idle ms | after | before | other devices run |", "|---|---|---|---|"]
    lines += [f"| {g['ms']:.2f} | {g['after']} | {g['before']} | "
              f"{', '.join(g['other_devices'])} |" for g in s["gaps"]]
    lines.append("")
  lines += ["| op | kind | part | ms a step | calls a step | JAX op |",
            "|---|---|---|---|---|---|"]
  for r in s["ops"]:
    where = re.sub(r"block_\d+", "block_*", r["op_name"]).replace("jit(_fun)/", "")
    lines.append(f"| {r['op']} | {r['kind']} | {r['part']} | {r['ms']:.3f} | "
                 f"{r['calls']:g} | {where[-70:]} |")
  return "\n".join(lines)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shapes", default="gpt2_small",
                      help="comma-separated shape and group names of train_throughput.py")
  parser.add_argument("--steps", type=int, default=5, help="steps traced")
  parser.add_argument("--warmup", type=int, default=2, help="untraced steps first")
  parser.add_argument("--top", type=int, default=25, help="ops listed, the costliest first")
  parser.add_argument("--cpu_devices", type=int, default=0,
                      help="split the host into this many pmap devices (set before JAX "
                           "starts); 0: one device")
  parser.add_argument("--tiny", action="store_true",
                      help="shrink each shape to a smoke test that runs in seconds on a CPU")
  parser.add_argument("--out", default="runs/profile", help="where the files go")
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  names, skipped = train_throughput.select_shapes(args.shapes)
  for name, why in skipped:
    print(f"skipping {name}: {why}", file=sys.stderr, flush=True)
  num_devices = max(args.cpu_devices, 1) if jax.default_backend() == "cpu" else 1
  summaries = []
  for name in names:
    shape = train_throughput.SHAPES_BY_NAME[name]
    if args.tiny:
      shape = gpu_mfu.tiny_version(shape)
    summary = profile_shape(shape, args.steps, args.warmup, num_devices,
                            os.path.join(args.out, name), args.top)
    print(report(summary), flush=True)
    summaries.append(summary)
  run_record.write_json(os.path.join(args.out, "profiles.json"), {"profiles": summaries})
  return summaries


if __name__ == "__main__":
  main()
