"""Will a batch and its step fit in memory? An estimate from the config, before any work.

A batch size far too large for the machine would otherwise build its first batch for
minutes, host memory climbing, until the system kills the run. `check_fits` compares what
the config implies with what the machine has and refuses with one ConfigError line that
names the field, the estimate and the limit.

The estimate is a lower bound on purpose (it never refuses a run that would fit). It counts:

host, per process
  - the batches held at once: the one being assembled plus the prefetched ones
    (config.data.data_prefetch for training; `batching.iterate`'s 4 for evaluation), each
    `rows x (sum of the padded field lengths) x 4 bytes` (int32; packed batches have a
    segmentation and a position field per sequence field);
  - the examples of the batch being assembled as Python objects (a dict of small numpy
    arrays each: at least `EXAMPLE_BYTES` per example and `FIELD_BYTES` per field).
device, each (a pmapped step holds a replica of everything per device)
  - parameters, a lower bound: embeddings `vocab x d_model` once (shared and tied) and
    max(num_encoder_layers, num_decoder_layers) blocks of self-attention and feed-forward
    (a translation model has both stacks; biases, norms and positions are left out);
  - training: their gradients and the optimizer's two moments (Adam, AdamW), all float32;
  - the batches on the device (config.data.device_prefetch ahead, and the one in use;
    each of them config.train.steps_per_call batches);
  - activations kept for the backward pass of one micro-batch (batch / devices /
    grad_accum_steps rows), in the compute dtype, per counted block: the block input, q,
    k, v, the attention output, the feed-forward hidden layer, and (reference attention
    only) the `[heads, length, length]` attention weights; with config.compute.remat
    "full" only the block inputs and one block's activations; plus the float32 logits
    `rows x length x vocab`. Evaluation: a forward pass, one block and the logits.
On a CPU the devices share the host's memory, so their estimate is added to the host's.

The limits: the host's available memory (MemAvailable in /proc/meminfo, or
sysconf(SC_AVPHYS_PAGES); a cgroup v2 memory.max lowers it), and each device's
`memory_stats()["bytes_limit"]` where JAX reports one (GPU, TPU). Where a limit is not
known, nothing is refused.
"""

import dataclasses
import os
from typing import Mapping, Optional, Sequence

from config_checks import fail

GIB = 1024**3
INT32 = 4
FLOAT32 = 4
EXAMPLE_BYTES = 64  # a small dict (sys.getsizeof of an empty one)
FIELD_BYTES = 112  # a numpy array's header (sys.getsizeof of an empty one)
ITERATE_PREFETCH = 4  # batching.iterate's default prefetch buffer (evaluation)


@dataclasses.dataclass(frozen=True)
class Need:
  """Bytes a phase needs: `host` per process, `device` per device; `parts` says what."""
  host: int
  device: int
  parts: str


def _gib(n: float) -> str:
  if n >= 100 * GIB:
    return f"{n / GIB:,.0f} GiB"
  return f"{n / GIB:.3g} GiB" if n >= GIB / 100 else f"{n / 1024**2:.3g} MiB"


def parameter_count(config, vocab_size: int) -> int:
  """A lower bound on the model's parameters (see the module docstring)."""
  m = config.model
  head_dim = m.head_dim or m.d_model // m.num_heads
  attention = 4 * m.d_model * m.num_heads * head_dim
  feed_forward = 2 * m.d_model * m.d_ff
  blocks = max(m.num_encoder_layers, m.num_decoder_layers)
  return vocab_size * m.d_model + blocks * (attention + feed_forward)


def _activations(config, rows: int, length: int, vocab_size: int, backward: bool) -> int:
  """Bytes of one micro-batch's activations on a device (see the module docstring)."""
  m, c = config.model, config.compute
  width = 2 if c.dtype == "bfloat16" else 4
  head_dim = m.head_dim or m.d_model // m.num_heads
  tokens = rows * length
  per_block = tokens * (m.d_model + 3 * m.num_heads * head_dim + m.d_model + m.d_ff) * width
  if c.attention_impl == "reference":
    per_block += rows * m.num_heads * length * length * width
  blocks = max(m.num_encoder_layers, m.num_decoder_layers)
  if not backward:
    kept = per_block
  elif c.remat == "full":
    kept = blocks * tokens * m.d_model * width + per_block
  else:
    kept = blocks * per_block
  return kept + tokens * vocab_size * FLOAT32


def _rows_bytes(rows: int, lengths: Mapping[str, int], packed: bool) -> int:
  return rows * sum(lengths.values()) * (3 if packed else 1) * INT32


def training_need(config, lengths: Mapping[str, int], vocab_size: int, num_devices: int,
                  process_count: int = 1) -> Need:
  """What one training batch (config.train.batch_size) and its step need."""
  d, t = config.data, config.train
  rows = t.batch_size // process_count
  batch = _rows_bytes(rows, lengths, d.pack_examples)
  objects = rows * (EXAMPLE_BYTES + FIELD_BYTES * len(lengths))
  held = max(d.data_prefetch, 0) + 1
  host = held * batch + objects
  params = parameter_count(config, vocab_size) * FLOAT32
  state = 4 * params  # parameters, gradients, two optimizer moments
  micro_rows = max(rows // (num_devices * t.grad_accum_steps), 1)
  activations = _activations(config, micro_rows, max(lengths.values()), vocab_size,
                             backward=True)
  # Each prefetched item (and the one in use) holds the batches of one call of the step.
  on_device = (max(d.device_prefetch, 0) + 1) * t.steps_per_call * batch // num_devices
  device = state + on_device + activations
  parts = (f"host: {held} batches of {_gib(batch)} and {_gib(objects)} of examples being "
           f"batched; each device: parameters, gradients and optimizer state "
           f"{_gib(state)}, activations {_gib(activations)}, batches {_gib(on_device)}")
  return Need(host, device, parts)


def eval_need(config, lengths: Mapping[str, int], vocab_size: int, num_devices: int,
              process_count: int = 1) -> Need:
  """What one evaluation batch (config.eval.eval_batch_size) and its forward pass need
  (at the training lengths: text translation pads evaluation rows longer)."""
  rows = config.eval.eval_batch_size // process_count
  batch = _rows_bytes(rows, lengths, False)
  objects = rows * (EXAMPLE_BYTES + FIELD_BYTES * len(lengths))
  held = ITERATE_PREFETCH + 1
  params = parameter_count(config, vocab_size) * FLOAT32
  activations = _activations(config, max(rows // num_devices, 1), max(lengths.values()),
                             vocab_size, backward=False)
  parts = (f"host: {held} batches of {_gib(batch)} and {_gib(objects)} of examples being "
           f"batched; each device: parameters {_gib(params)}, activations "
           f"{_gib(activations)}")
  return Need(held * batch + objects, params + batch // num_devices + activations, parts)


def available_host_bytes() -> Optional[int]:
  """The memory this process can still take: MemAvailable (or free pages), lowered by a
  cgroup v2 limit; None where neither is known."""
  available = None
  try:
    with open("/proc/meminfo", encoding="ascii") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          available = int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  if available is None:
    try:
      available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
      return None
  try:
    with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
      limit = f.read().strip()
    with open("/sys/fs/cgroup/memory.current", encoding="ascii") as f:
      used = int(f.read().strip())
    if limit != "max":
      available = min(available, int(limit) - used)
  except (OSError, ValueError):
    pass
  return available


def device_limit_bytes(device) -> Optional[int]:
  """The device's memory as JAX reports it (GPU, TPU), or None (CPU: the host's)."""
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except  # a backend without the call
    return None
  return int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None


def check_fits(config, lengths: Mapping[str, int], vocab_size: int,
               devices: Sequence, process_count: int = 1, training: bool = True,
               host_limit: Optional[int] = -1, device_limit: Optional[int] = -1) -> None:
  """ConfigError naming config.train.batch_size (when `training`) or
  config.eval.eval_batch_size when that batch and its step cannot fit (`training_need`,
  `eval_need`). The limits are measured unless given (None: unknown, nothing refused)."""
  if host_limit == -1:
    host_limit = available_host_bytes()
  if device_limit == -1:
    device_limit = device_limit_bytes(devices[0])
  needs = [("eval.eval_batch_size", config.eval.eval_batch_size,
            eval_need(config, lengths, vocab_size, len(devices), process_count))]
  if training:
    needs.insert(0, ("train.batch_size", config.train.batch_size,
                     training_need(config, lengths, vocab_size, len(devices), process_count)))
  for field, value, need in needs:
    host = need.host + (need.device * len(devices) if device_limit is None else 0)
    where = "host memory" if device_limit is not None else "host memory (CPU devices share it)"
    if host_limit is not None and host > host_limit:
      fail(field, value, f"a batch and its step need at least {_gib(host)} of {where}, more "
                         f"than the {_gib(host_limit)} available (estimated from the config: "
                         f"{need.parts}); lower it")
    if device_limit is not None and need.device > device_limit:
      fail(field, value, f"a batch and its step need at least {_gib(need.device)} of memory "
                         f"on each device, more than its {_gib(device_limit)} (estimated "
                         f"from the config: {need.parts}); lower it")
