"""Host memory: keep the memory XLA:CPU frees between steps in the process.

XLA:CPU allocates a step's intermediate buffers with the C library's malloc and frees them
when the step ends. glibc's malloc gives each thread its own arena, serves large blocks
with mmap and returns freed memory to the kernel, so every step maps its hundreds of
megabytes of temporaries afresh and page-faults them in (and the kernel zeroes them) one
4 KiB page at a time. On the 2-vCPU machine of BENCHMARKS.md that cost a quarter of a
small preset's train step: about 118,000 page faults a step at generation small, length
256 (section "Issue 15 on the CPU: the host allocator").

`keep_freed_memory` sets three glibc malloc options (mallopt(3)) so that freed blocks
stay in the process and the next step reuses them: one arena for all threads, no mmap
for large blocks (they come from the heap instead), and no trimming of the heap's top.
The resident set then stays at the step's peak instead of rising and falling each step.
It must run before the threads that allocate start (JAX's backends), since a thread keeps
the arena it first got. Imports nothing from JAX.
"""

import ctypes
import ctypes.util
import sys

# mallopt(3) parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
# The largest trim threshold mallopt takes (an int): the heap's top is returned to the
# kernel only when more than this much of it is free.
_NEVER_TRIM = 2**31 - 1


def _glibc():
  """The C library when it is glibc (it has mallopt and gnu_get_libc_version), else None."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement
    return libc
  except (OSError, AttributeError):  # musl and others: no mallopt parameters to set
    return None


def keep_freed_memory() -> bool:
  """Sets glibc malloc to keep freed memory for reuse (see the module docstring).

  Returns whether it was set: False where the C library is not glibc (macOS, musl), where
  nothing changes. Process-wide and not undone; calling it twice is harmless.
  """
  libc = _glibc()
  if libc is None:
    return False
  results = [libc.mallopt(M_ARENA_MAX, 1), libc.mallopt(M_MMAP_MAX, 0),
             libc.mallopt(M_TRIM_THRESHOLD, _NEVER_TRIM)]
  return all(r == 1 for r in results)
