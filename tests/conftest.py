"""Test set-up, applied before jax is imported: 8 fake CPU devices, quick LLVM code
generation, a compilation cache, and the repo root on sys.path."""

import os
import shutil
import sys
import tempfile

import pytest

# XLA's CPU collectives abort after 40 s waiting for a device thread: on a loaded 2-core
# machine 8 fake devices can take that long (main.py raises it the same way).
# The suite compiles hundreds of small programs, and LLVM's optimisation of the generated
# CPU code is most of each compile: at level 0 the suite takes about a fifth less CPU time.
# The level can change float rounding (which multiply-adds become fused ones), so the
# tests' own main.py subprocesses keep it too: they drop only the device count
# (benchmarks.run_record.cpu_device_flags(0, ...)), and a run in a subprocess stays
# bitwise comparable with one in the test. main.py and the benchmarks keep the default.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_backend_optimization_level=0"
                           " --xla_force_host_platform_device_count=8"
                           " --xla_cpu_collective_call_warn_stuck_timeout_seconds=120"
                           " --xla_cpu_collective_call_terminate_timeout_seconds=600").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests build the same train/eval/decode programs again (each train_and_evaluate call
# makes fresh functions); a persistent cache, fresh for this session, compiles each once.
# The session that makes it (pytest's main process; xdist workers and the tests'
# subprocesses inherit the variable) deletes it at the end (pytest_sessionfinish).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jax-cache-")
  _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]
else:
  _OWN_CACHE = None
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_sessionfinish(session, exitstatus):
  """Deletes the compilation cache this session made (tens of MB a run)."""
  del session, exitstatus
  if _OWN_CACHE:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
  """Drops jax's caches of compiled programs after each test module.

  Each program XLA:CPU loads maps a few regions of memory for its code, and jax's caches
  keep every pmapped function and its program alive until they are cleared
  (train.train_and_evaluate clears them itself; many tests build steps without it). A
  worker running half the suite reached Linux's default limit of 65,530 memory maps a
  process (vm.max_map_count) near the end and died in XLA's compiler with a segmentation
  fault. A module's programs are rarely needed by the next module, and the persistent
  compilation cache above gives back those that are, without compiling."""
  yield
  import jax  # pylint: disable=import-outside-toplevel  (after XLA_FLAGS is set above)
  jax.clear_caches()
