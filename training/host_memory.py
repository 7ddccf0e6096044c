"""Host memory: transparent huge pages for the buffers XLA:CPU allocates with malloc.

XLA:CPU allocates a step's intermediate buffers with the C library's malloc and frees them
when the step ends. glibc maps each large block afresh (mmap) and unmaps it when freed, so
every step page-faults its temporaries in again, and the kernel zeroes them, one 4 KiB
page at a time: about 118,000 faults a step at the generation small preset (16 x 256
tokens), a quarter of its time on the 2-vCPU machine of BENCHMARKS.md. glibc 2.35+ can
ask the kernel for transparent huge pages (2 MiB) for the memory malloc maps
(madvise(MADV_HUGEPAGE); the tunable `glibc.malloc.hugetlb=1`), which cuts the faults
512-fold. The C library reads its tunables only when a process starts, so
`reexec_with_huge_pages` starts this program again, in the same process (exec), with the
tunable added to GLIBC_TUNABLES. main.py and the CPU benchmarks call it first thing.

Why not the other malloc settings: one malloc arena with no mmap and no trimming
(mallopt) removes the faults as well, but it serialises the threads' allocations and
slowed the small steps by up to a quarter (BENCHMARKS.md, "The host allocator").

Nothing changes where the C library is not glibc, where the kernel's transparent huge
pages are off (/sys/kernel/mm/transparent_hugepage/enabled: never), where
GLIBC_TUNABLES already sets `glibc.malloc.hugetlb`, or with
TRANSFORMER_HUGE_PAGES=0 in the environment. Imports nothing from JAX.
"""

import os
import platform
import sys
from typing import List, Mapping, Optional

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "TRANSFORMER_HUGE_PAGES"  # "0": leave malloc as it is
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def _kernel_allows_huge_pages() -> bool:
  """The kernel's transparent huge page mode is "always" or "madvise" (not "never")."""
  try:
    with open(THP_SETTING, encoding="utf-8") as f:
      return "[never]" not in f.read()
  except OSError:
    return False


def _tunables(environ: Mapping[str, str]) -> List[str]:
  """The `name=value` items of GLIBC_TUNABLES."""
  return [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]


def asks_for_huge_pages(environ: Mapping[str, str]) -> bool:
  """Whether a process with `environ` has malloc ask for transparent huge pages."""
  return f"{TUNABLE}=1" in _tunables(environ)


def without_huge_pages(environ: Mapping[str, str]) -> dict:
  """`environ` without the tunable this module adds (for another program, such as a peer
  benchmark, that should run as its own users run it)."""
  env = dict(environ)
  kept = [t for t in _tunables(environ) if t != f"{TUNABLE}=1"]
  if kept:
    env["GLIBC_TUNABLES"] = ":".join(kept)
  else:
    env.pop("GLIBC_TUNABLES", None)
  return env


def huge_pages_environment(environ: Mapping[str, str]) -> Optional[dict]:
  """The environment to start again with (`environ` with the tunable appended to
  GLIBC_TUNABLES), or None when there is nothing to do (see the module docstring)."""
  if environ.get(OPT_OUT, "1") == "0":
    return None
  tunables = _tunables(environ)
  if any(item.split("=", 1)[0] == TUNABLE for item in tunables):
    return None  # set already: by us before the exec, or by the user
  if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
    return None
  if not _kernel_allows_huge_pages():
    return None
  env = dict(environ)
  env["GLIBC_TUNABLES"] = ":".join(tunables + [f"{TUNABLE}=1"])
  return env


def reexec_with_huge_pages() -> None:
  """Starts this program again in this process, with `glibc.malloc.hugetlb=1`, unless
  there is nothing to do. Call it before anything with side effects (files, threads,
  JAX): the command line runs again from its start, with the same pid and arguments."""
  env = huge_pages_environment(os.environ)
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  # orig_argv is the interpreter's own command line, so `python -m pkg.module` runs as a
  # module again (sys.argv would name the module's file instead).
  os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)
