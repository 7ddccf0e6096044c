"""What every benchmark prints and saves about its run: the load on the machine, and its
results as JSON with the date and the JAX version and backend; and a config loaded from
its file, variant and `--config.*` overrides, as main.py loads it."""

import datetime
import json
import os
import platform
from typing import Any, Dict, Sequence


def start_with_huge_pages() -> None:
  """As main.py does: start this benchmark again with glibc's malloc on transparent huge
  pages (training/host_memory.py), so its timings are those main.py's runs get;
  TRANSFORMER_HUGE_PAGES=0 in the environment measures without."""
  from training import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.reexec_with_huge_pages()


def huge_pages_line() -> str:
  """Whether this process's malloc asks for transparent huge pages."""
  from training import host_memory  # pylint: disable=g-import-not-at-top
  return ("malloc on huge pages" if host_memory.asks_for_huge_pages(os.environ)
          else "malloc without huge pages")


def machine_line(devices: str = "") -> str:
  """The JAX version, backend, `devices` (what the run used, if worth saying), CPUs, and
  whether malloc asks for huge pages."""
  import jax  # pylint: disable=g-import-not-at-top
  parts = [f"jax {jax.__version__}", f"backend {jax.default_backend()}", devices,
           f"{os.cpu_count()} CPU(s)", platform.processor() or platform.machine(),
           huge_pages_line()]
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
            "jax": jax.__version__, "backend": jax.default_backend(),
            "host_memory": huge_pages_line(), **payload}
  with open(path, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=2)


def load_config(spec: str, overrides: Sequence[str] = ()):
  """The config of `spec` ("configs/generation.py:recipe=fast": a config file, then its
  variant), with `--config.group.field=value` `overrides` applied as main.py applies them
  (the value converted to the field's type)."""
  import importlib.util  # pylint: disable=g-import-not-at-top

  path, _, variant = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("benchmark_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(variant or None)
  for item in overrides:
    if not item.startswith("--config.") or "=" not in item:
      raise SystemExit(f"{item!r}: expected --config.<group>.<field>=<value>")
    path, value = item[len("--config."):].split("=", 1)
    *groups, field = path.split(".")
    node = config
    for group in groups:
      node = node[group]
    kind = type(node[field])
    node[field] = (value in ("True", "true", "1")) if kind is bool else kind(value)
  return config


def early_int_flag(argv: Sequence[str], name: str, default: int = 0) -> int:
  """`--name=N` or `--name N` from `argv`, read before argparse (and before JAX starts)."""
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      return int(arg.split("=", 1)[1])
    if arg == f"--{name}" and i + 1 < len(argv):
      return int(argv[i + 1])
  return default


def start_cpu_benchmark(argv) -> None:
  """A CPU benchmark's start, in its `__main__` before JAX is imported: malloc on huge
  pages (`start_with_huge_pages`) and the host split into `--cpu_devices` devices."""
  start_with_huge_pages()
  os.environ["XLA_FLAGS"] = cpu_device_flags(early_int_flag(argv, "cpu_devices"),
                                             os.environ.get("XLA_FLAGS", ""))


def cpu_device_flags(count: int, flags: str) -> str:
  """XLA_FLAGS `flags` with the host split into `count` devices (main.py's
  config.compute.cpu_devices); 0 leaves the host one device."""
  kept = [f for f in flags.split() if not f.startswith("--xla_force_host_platform_device_count")]
  return " ".join(kept + ([f"--xla_force_host_platform_device_count={count}"] if count else []))
