"""What every benchmark prints and saves about its run: the load on the machine, and its
results as JSON with the date and the JAX version and backend."""

import datetime
import json
import os
import platform
from typing import Any, Dict, Sequence


def machine_line(devices: str = "") -> str:
  """The JAX version, backend, `devices` (what the run used, if worth saying), CPUs."""
  import jax  # pylint: disable=g-import-not-at-top
  parts = [f"jax {jax.__version__}", f"backend {jax.default_backend()}", devices,
           f"{os.cpu_count()} CPU(s)", platform.processor() or platform.machine()]
  return ", ".join(p for p in parts if p)


def load_line(before: Sequence[float], after: Sequence[float]) -> str:
  """The load averages around a run: other work on a 2-core machine skews every timing."""
  show = lambda xs: " ".join(f"{x:.2f}" for x in xs)  # noqa: E731
  return f"load average (1/5/15 min): {show(before)} before, {show(after)} after"


def write_json(path: str, payload: Dict[str, Any]) -> None:
  """Writes `payload` to `path` (creating its folder) with the date, jax and backend."""
  import jax  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  record = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "jax": jax.__version__, "backend": jax.default_backend(), **payload}
  with open(path, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=2)
