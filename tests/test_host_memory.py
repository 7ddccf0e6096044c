"""training/host_memory.py: started again with glibc's malloc on transparent huge pages, a
jitted CPU computation stops page-faulting its buffers in 4 KiB at a time on every call
(what made a quarter of a small preset's train step on the 2-core machine)."""

import json
import os
import subprocess
import sys

import pytest

from training import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A child program: start again with huge pages (unless told not to), then a jitted
# `x * 2 + 1` over a 64 MiB array, its output dropped after each call; the page faults of
# each call after the first (which compiles), and the pid before and after the exec.
_CHILD = r"""
import json, os, resource, sys
sys.path.insert(0, sys.argv[1])
pids = os.environ.get("CHILD_PIDS", "")
os.environ["CHILD_PIDS"] = pids + f"{os.getpid()},"
from training import host_memory
host_memory.reexec_with_huge_pages()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: x * 2.0 + 1.0)
x = jnp.ones((16 * 1024 * 1024,), jnp.float32)
f(x).block_until_ready()
faults = []
for _ in range(8):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  y = f(x)
  y.block_until_ready()
  del y
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"faults": faults, "tunables": os.environ.get("GLIBC_TUNABLES", ""),
                  "pids": os.environ["CHILD_PIDS"], "argv": sys.argv[1:]}))
"""
PAGES = 64 * 1024 * 1024 // 4096  # 4 KiB pages of the 64 MiB output


def _child(**env_changes) -> dict:
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", "XLA_FLAGS", host_memory.OPT_OUT, "CHILD_PIDS")}
  env.update(env_changes)
  out = subprocess.run([sys.executable, "-c", _CHILD, REPO, "--an=argument"], env=env,
                       capture_output=True, text=True, check=True, timeout=300)
  return json.loads(out.stdout.strip().splitlines()[-1])


def _thp_mode() -> str:
  try:
    with open(host_memory.THP_SETTING, encoding="utf-8") as f:
      return f.read().split("[")[1].split("]")[0]
  except (OSError, IndexError):
    return "absent"


needs_huge_pages = pytest.mark.skipif(
    host_memory.huge_pages_environment({}) is None,
    reason="needs Linux, glibc and the kernel's transparent huge pages")


@needs_huge_pages
def test_started_again_with_huge_pages_a_call_no_longer_faults_its_pages_in():
  run = _child()
  assert run["tunables"] == f"{host_memory.TUNABLE}=1"
  pids = run["pids"].strip(",").split(",")
  assert len(pids) == 2 and pids[0] == pids[1], run["pids"]  # the program ran twice, one pid
  assert run["argv"] == [REPO, "--an=argument"]
  # 64 MiB in 2 MiB pages is 32 faults; the parts of a block that are not 2 MiB-aligned
  # still get small pages (about 540 faults a call here, against 16,385 without).
  assert max(run["faults"][1:]) < 0.1 * PAGES, run["faults"]
  if _thp_mode() == "madvise":
    # The control: malloc as it is maps every 64 MiB output afresh and faults it in
    # 4 KiB at a time (with huge pages "always", the kernel would hide that).
    plain = _child(**{host_memory.OPT_OUT: "0"})
    assert plain["tunables"] == "" and len(plain["pids"].strip(",").split(",")) == 1
    assert min(plain["faults"][1:]) > 0.5 * PAGES, plain["faults"]


def test_the_environment_gets_the_tunable_once_and_respects_the_user():
  env = host_memory.huge_pages_environment({"PATH": "/bin"})
  if env is None:
    pytest.skip("this machine has no glibc or no transparent huge pages")
  assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  # Other tunables are kept; a second pass (after the exec) changes nothing.
  env = host_memory.huge_pages_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  assert host_memory.huge_pages_environment(env) is None
  # The user's own choice wins, and the opt-out leaves malloc alone.
  assert host_memory.huge_pages_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None
  assert host_memory.huge_pages_environment({host_memory.OPT_OUT: "0"}) is None


def test_the_peer_runs_without_the_tunable_main_py_adds(monkeypatch):
  from benchmarks import peers  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
  assert peers.peer_environment()["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
  assert "GLIBC_TUNABLES" not in peers.peer_environment()
