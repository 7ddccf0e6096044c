"""Running main.py as a user does (a subprocess, one CPU device), and checking its errors."""

import os
import subprocess
import sys

from benchmarks.run_record import cpu_device_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args, stdin=None, cwd=REPO):
  """`python main.py *args` with one CPU device (the tests' 8 fake devices removed);
  `stdin` text, or bytes passed as they are (its output is then decoded as UTF-8)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = cpu_device_flags(0, env.get("XLA_FLAGS", ""))
  binary = isinstance(stdin, bytes)
  result = subprocess.run([sys.executable, os.path.join(REPO, "main.py"), *args], cwd=cwd,
                          env=env, input=stdin, capture_output=True, text=not binary,
                          timeout=300)
  if binary:
    result.stdout = result.stdout.decode("utf-8", "replace")
    result.stderr = result.stderr.decode("utf-8", "replace")
  return result


def assert_one_error_line(result, *expected):
  """Exit 2, stderr ends with a single `error: ...` line holding each of `expected`."""
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1] == errors[0]
  for text in expected:
    assert text in errors[0], (text, errors[0])
  return errors[0]
