"""One table from the JSON files benchmarks/gpu_check.sh writes (issue 15's figures).

    python benchmarks/gpu_report.py runs/gpu_check

Reads gpu_mfu.json (the train step per shape, MFU, nanoGPT's bench.py), loop_speed.json
(the loop against its pure step), recipe_ours.json / recipe_nanogpt.json (time to the
tiny-Shakespeare target) and profile/profiles.json (where the step's time goes, by kind of
op) from the folder; a missing file is named, not guessed.
"""

import json
import os
import sys
from typing import Any, Dict, List, Optional


def _read(folder: str, name: str) -> Optional[Dict[str, Any]]:
  path = os.path.join(folder, name)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _pct(x: Optional[float]) -> str:
  return "n/a" if x is None else f"{100 * x:.1f}%"


def table(folder: str) -> List[str]:
  """Markdown lines: | measure | ours | peer | ratio |."""
  lines = ["| measure | ours | nanoGPT | ours / nanoGPT |", "|---|---|---|---|"]
  missing = []
  mfu = _read(folder, "gpu_mfu.json")
  if mfu:
    lines.insert(0, f"{mfu.get('device', '?')}, jax {mfu.get('jax', '?')}, {mfu.get('date', '')}"
                 f"; bf16 matmul {mfu['measured_peak_flops_per_sec'] / 1e12:.0f} TFLOP/s "
                 f"measured, published peak "
                 + (f"{mfu['published_peak_flops_per_sec'] / 1e12:.0f}"
                    if mfu.get("published_peak_flops_per_sec") else "unknown") + "\n")
    for row in mfu.get("rows", [mfu.get("row")]):
      peer = row.get("peer_tokens_per_sec")
      speed = row["tokens_per_sec"]
      peer_cells = f"{peer:,.0f} | {speed / peer:.2f}x" if peer else " | "
      lines.append(f"| step tokens/s, {row['shape']} ({row['batch']} rows) | {speed:,.0f} | "
                   f"{peer_cells} |")
      lines.append(f"| MFU, {row['shape']} (published peak; measured matmul) | "
                   f"{_pct(row.get('mfu_published'))}; {_pct(row.get('mfu_measured'))} | | |")
  else:
    missing.append("gpu_mfu.json")
  loop = _read(folder, "loop_speed.json")
  if loop:
    for row in loop["rows"]:
      lines.append(f"| loop steps/s, steps_per_call {row['steps_per_call']} (pure step "
                   f"{row['pure_step_s'] * 1e3:.2f} ms) | {row['loop']['steps_per_sec']:.1f} "
                   f"= {_pct(row['loop_over_pure'])} of 1 / pure step | | |")
  else:
    missing.append("loop_speed.json")
  ours, peer = _read(folder, "recipe_ours.json"), _read(folder, "recipe_nanogpt.json")
  if ours or peer:
    target = (ours or peer)["target"]
    mine = ours and ours.get("reached_target_at")
    theirs = peer and peer.get("reached")
    cell = lambda r: (f"{r['wall_s']:.0f} s (step {r['step']})" if r  # noqa: E731
                      else "not reached")
    ratio = f"{mine['wall_s'] / theirs['wall_s']:.2f}x time" if mine and theirs else ""
    lines.append(f"| tiny Shakespeare GPU recipe, wall time to validation {target} | "
                 f"{cell(mine) if ours else 'not run'} | {cell(theirs) if peer else 'not run'} "
                 f"| {ratio} |")
  else:
    missing.append("recipe_ours.json, recipe_nanogpt.json")
  profiles = _read(folder, os.path.join("profile", "profiles.json"))
  if profiles:
    for p in profiles["profiles"]:
      kinds = ", ".join(f"{k['kind']} {_pct(k['share_of_op_time'])}" for k in p["kinds"][:5])
      busy = f"{_pct(p['busy_ms'] / p['step_ms'])} busy" if p.get("step_ms") else ""
      lines.append(f"| profile, {p['shape']}: step {p['step_ms'] or 0:.2f} ms, {busy}; op "
                   f"time by kind | {kinds} | | |")
  else:
    missing.append("profile/profiles.json")
  if missing:
    lines.append(f"\nnot in {folder}: {', '.join(missing)}")
  return lines


if __name__ == "__main__":
  print("\n".join(table(sys.argv[1] if len(sys.argv) > 1 else "runs/gpu_check")))
