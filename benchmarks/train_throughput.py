"""Training throughput and MFU of the real pmapped train step, on one local device.

    python -m benchmarks.train_throughput                       # the default group (~6 min)
    python -m benchmarks.train_throughput --shapes=nanogpt,wmt_small --steps=3
    python -m benchmarks.train_throughput --shapes=families,bf16,variants   # (~15 min)
    python benchmarks/train_throughput.py --shapes=list         # the groups and shapes
    python -m benchmarks.train_throughput --output=runs/throughput.json
    python -m benchmarks.train_throughput --shapes=nanogpt --cpu_devices=2 --peer=nanogpt

`--shapes` takes shape names and group names (GROUPS): `default` is the 64-token set of
BENCHMARKS.md's first table; `families` is each task family (translation enc-dec,
generation decoder-only, classification encoder-only) at the tiny, small and base presets
at length 256; `bf16` repeats small and base generation and translation with bfloat16
compute; `variants` holds base-size rows with one knob changed (no dropout, blockwise
attention, remat, scanned layers); `all` is every shape. A shape that needs a feature the
code does not have yet (`Shape.optional`) is skipped, with the reason, when it comes from
a group, and stops the run when named.

For each shape it builds the task and model from `configs/default.py` plus overrides,
creates the state with `train_steps.create_state`, and times `train_steps.compile_steps`'s pmapped
train step (Adam, gradient clipping, the non-finite guard: everything a real step does) on a
synthetic int32 batch `[1, batch, length]` of random non-zero tokens, so every position is
a real token (no padding). It reports the compile time (first call, blocked), the second
call (it compiles again, see `run_shape`), the median step time (each step blocked;
`--rounds` rounds of at least `--steps` steps, after `--warmup` more), tokens per second,
model FLOPs per step (`model_flops`), achieved FLOP/s and MFU against a peak measured in
the same run: the median time of a jitted float32 `[n, n] @ [n, n]` matmul. Rows with
bfloat16 compute are still divided by that float32 peak (the question they answer is
whether bfloat16 trains faster than float32 here); a bfloat16 matmul peak is measured as
well when such a row runs, and reported next to it.

`--cpu_devices=N` splits the host into N pmap devices (main.py's config.compute.cpu_devices;
set before JAX starts) and each step's batch over them: `[N, batch / N, length]`.
`--peer=nanogpt` measures nanoGPT beside the rows that have a peer (`Shape.peer`:
the nanoGPT CPU shapes; benchmarks/peers.py runs its train.py at the same shape), once
before the first row and once after the last, and reports our tokens/s over the peer's
faster measurement.

Nothing here asserts a timing. Two asserts guard the numbers: the FLOP formula's matmul
parameter count must equal the model's (`check_matmul_parameters`), and the step's loss
weight must equal batch x length (every token real; batch for classification, whose loss
weighs examples). A third guard checks that the model was built with the shape's model
knobs (`check_model_knobs`), so a knob that the task does not pass to the model yet
cannot produce a row that silently measures the default model.
"""

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time
import warnings
from typing import Any, Dict, List, Optional

if __package__ in (None, ""):  # run as a script: put the repository root on the path
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import run_record  # noqa: E402  (no JAX)

if __name__ == "__main__":  # --cpu_devices must reach XLA_FLAGS before JAX starts
  run_record.start_cpu_benchmark(sys.argv[1:])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import peers  # noqa: E402
import tasks  # noqa: E402
import train  # noqa: E402
from configs import default as default_config  # noqa: E402
from configs import presets  # noqa: E402
from models import TransformerConfig, attention  # noqa: E402
from training import optimizers, reporting  # noqa: E402
from training import steps as train_steps  # noqa: E402

# CPU buffers cannot be donated; train_steps.compile_steps donates the state for accelerators.
warnings.filterwarnings("ignore", message="Some donated buffers were not usable")


# ----------------------------------------------------------------------------- shapes


@dataclasses.dataclass(frozen=True)
class Shape:
  """One benchmarked configuration.

  `overrides` are config fields (bare names, `{"d_model": 128}`: `field_group` finds each
  one's group) set after the `size` preset; `vocab_size` replaces the
  synthetic vocabulary (16) when non-zero. Generation reads only `tgt_length`,
  classification only `src_length` (its inputs).
  """
  name: str
  task: str  # "translation" (enc-dec), "generation" (decoder-only), "classification"
  size: str  # the preset of configs/presets.py applied first
  batch: int
  tgt_length: int  # target length (translation) or sequence length (generation); 0 else
  src_length: int = 0  # source length (translation) or input length (classification)
  vocab_size: int = 0  # 0 = the synthetic vocabulary of input_pipeline.synthetic
  overrides: Dict[str, Any] = dataclasses.field(default_factory=dict)
  reference: str = ""  # what the reference numbers are for
  ref_mfu: Optional[float] = None  # percent
  ref_tokens_per_sec: Optional[float] = None
  note: str = ""
  # Needs a feature that may be missing (a config knob the model does not read yet, an
  # attention implementation not registered yet): a group skips it when it is missing.
  optional: bool = False
  peer: str = ""  # "nanogpt_cpu": --peer=nanogpt measures nanoGPT at this shape beside it


# nanoGPT's shakespeare_char CPU command: pre-norm, GELU, learned positions, tied output.
_NANOGPT = dict(num_decoder_layers=4, num_heads=4, d_model=128, d_ff=512, dropout_rate=0.0,
                norm_placement="pre", positional_encoding="learned", activation="gelu",
                tie_output=True)
# Flax examples/wmt: pre-norm, sinusoidal positions, ReLU, shared and tied embeddings.
_WMT = dict(norm_placement="pre", positional_encoding="sinusoidal", activation="relu",
            share_embeddings=True, tie_output=True, dropout_rate=0.0)
_WMT_SMALL = dict(_WMT, num_encoder_layers=3, num_decoder_layers=3, d_model=256, d_ff=1024,
                  num_heads=4)
_WMT_BASE = dict(_WMT, num_encoder_layers=6, num_decoder_layers=6, d_model=512, d_ff=2048,
                 num_heads=8)

SHAPES = [
    Shape("nanogpt", "generation", "tiny", batch=12, tgt_length=64, vocab_size=65,
          overrides=_NANOGPT, reference="nanoGPT, PyTorch eager CPU", ref_mfu=47.0,
          ref_tokens_per_sec=17400.0, note="char-level shakespeare shape, vocab 65",
          peer="nanogpt_cpu"),
    Shape("nanogpt_fused", "generation", "tiny", batch=12, tgt_length=64, vocab_size=65,
          overrides=dict(_NANOGPT, attention_impl="fused"), reference="nanoGPT",
          ref_mfu=47.0, ref_tokens_per_sec=17400.0, note="as nanogpt, fused attention",
          peer="nanogpt_cpu"),
    Shape("nanogpt_no_barrier", "generation", "tiny", batch=12, tgt_length=64, vocab_size=65,
          overrides=dict(_NANOGPT, grad_barrier="off", flat_allreduce=False),
          reference="nanoGPT", ref_mfu=47.0, ref_tokens_per_sec=17400.0,
          note="as nanogpt, no fusion barriers, one all-reduce per array",
          peer="nanogpt_cpu"),
    Shape("wmt_small", "translation", "small", batch=32, src_length=64, tgt_length=64,
          vocab_size=32000, overrides=_WMT_SMALL, reference="Flax WMT example, small",
          ref_mfu=37.0, note="vocab 32000 (WMT shared SentencePiece)"),
    Shape("wmt_small_v16", "translation", "small", batch=32, src_length=64, tgt_length=64,
          overrides=_WMT_SMALL, note="wmt_small with the synthetic vocab 16"),
    Shape("wmt_base", "translation", "base", batch=16, src_length=64, tgt_length=64,
          vocab_size=32000, overrides=_WMT_BASE, reference="Flax WMT example, base",
          ref_mfu=53.0, note="vocab 32000 (WMT shared SentencePiece)"),
    Shape("translation_tiny", "translation", "tiny", batch=32, src_length=64, tgt_length=64),
    Shape("translation_small", "translation", "small", batch=32, src_length=64,
          tgt_length=64),
    Shape("translation_small_fused", "translation", "small", batch=32, src_length=64,
          tgt_length=64, overrides=dict(attention_impl="fused"),
          note="as translation_small, fused attention"),
    Shape("translation_base", "translation", "base", batch=16, src_length=64, tgt_length=64),
    Shape("generation_tiny", "generation", "tiny", batch=32, tgt_length=64),
    Shape("generation_small", "generation", "small", batch=32, tgt_length=64),
    Shape("generation_base", "generation", "base", batch=16, tgt_length=64),
]
DEFAULT_SHAPES = [s.name for s in SHAPES]

# Each family at each CPU size preset, exactly as configs/presets.py defines it (post-norm,
# sinusoidal, ReLU, preset dropout: 0 for tiny, 0.1 for small and base), at length 256:
# translation 256 source / 256 target tokens, generation 256, classification 256 inputs.
# The batch shrinks with the size so that one step lasts about 0.2-5 s on 2 quiet cores
# (translation base, 8 x 256/256, is the slowest).
FAMILY_LENGTH = 256
FAMILY_BATCH = {"tiny": 64, "small": 16, "base": 8}


def _family_shape(task: str, size: str, suffix: str = "", note: str = "",
                  optional: bool = False, **overrides) -> Shape:
  length = FAMILY_LENGTH
  lengths = {"translation": dict(src_length=length, tgt_length=length),
             "generation": dict(tgt_length=length),
             "classification": dict(src_length=length, tgt_length=0)}[task]
  return Shape(f"{task}_{size}_{length}{suffix}", task, size, batch=FAMILY_BATCH[size],
               overrides=overrides, note=note, optional=optional, **lengths)


FAMILY_SHAPES = [_family_shape(task, size)
                 for task in ("translation", "generation", "classification")
                 for size in ("tiny", "small", "base")]
# bfloat16 compute, float32 parameters and optimizer state (config.compute.dtype; see DESIGN.md's
# numerics): does it pay on this CPU?
BF16_SHAPES = [_family_shape(task, size, "_bf16", "bfloat16 compute", dtype="bfloat16")
               for task in ("generation", "translation") for size in ("small", "base")]
# One knob changed on base generation (and translation for scan): what each costs or saves.
VARIANT_SHAPES = [
    _family_shape("generation", "base", "_nodrop", "dropout 0 (its RNG is not model FLOPs)",
                  dropout_rate=0.0),
    _family_shape("generation", "base", "_blockwise", "blockwise attention, blocks of 128",
                  optional=True, attention_impl="blockwise", attention_block_size=128),
    _family_shape("generation", "base", "_remat_full", "remat: recompute each block",
                  optional=True, remat="full"),
    _family_shape("generation", "base", "_remat_matmuls", "remat: save the matmul outputs",
                  optional=True, remat="matmuls"),
    _family_shape("generation", "base", "_scan", "layers under nn.scan", optional=True,
                  scan_layers=True),
    _family_shape("translation", "base", "_scan", "layers under nn.scan", optional=True,
                  scan_layers=True),
] + [_family_shape(task, "small", "_fused_qkv", "one q/k/v projection", fused_qkv=True)
     for task in ("translation", "generation", "classification")] + [
    _family_shape(task, "small", "_no_barrier", "no fusion barriers (models.layers."
                  "fusion_barrier), one all-reduce per array", grad_barrier="off",
                  flat_allreduce=False)
    for task in ("translation", "generation", "classification")]
# GPU shapes (benchmarks/gpu_mfu.py --shapes=gpu times them with MFU against the card's
# peak). GPT-2 small as nanoGPT's bench.py builds it: no biases, pre-norm, learned
# positions, GELU, tied output, dropout 0, context 1024, vocab 50304, bfloat16 compute.
_GPT2_SMALL = dict(num_decoder_layers=12, num_heads=12, d_model=768, d_ff=3072,
                   dropout_rate=0.0, norm_placement="pre", positional_encoding="learned",
                   activation="gelu", tie_output=True, biases="none", dtype="bfloat16",
                   attention_impl="fused")
GPU_SHAPES = [
    Shape("gpt2_small", "generation", "base", batch=12, tgt_length=1024, vocab_size=50304,
          overrides=_GPT2_SMALL, reference="nanoGPT bench.py (PyTorch, torch.compile)",
          peer="nanogpt_bench", note="GPT-2 small, bench.py's shape"),
    Shape("gpt2_small_b32", "generation", "base", batch=32, tgt_length=1024,
          vocab_size=50304, overrides=_GPT2_SMALL, note="GPT-2 small, batch 32"),
    Shape("paper_base_gpu", "translation", "base", batch=128, src_length=256,
          tgt_length=256, vocab_size=32000, overrides=dict(dtype="bfloat16",
                                                           attention_impl="fused"),
          note="the paper's base model, dropout 0.1, bfloat16"),
]
SHAPES = SHAPES + FAMILY_SHAPES + BF16_SHAPES + VARIANT_SHAPES + GPU_SHAPES
SHAPES_BY_NAME = {s.name: s for s in SHAPES}
GROUPS = {
    "default": DEFAULT_SHAPES,
    "families": [s.name for s in FAMILY_SHAPES],
    "bf16": [s.name for s in BF16_SHAPES],
    "variants": [s.name for s in VARIANT_SHAPES],
    "gpu": [s.name for s in GPU_SHAPES],
    "all": [s.name for s in SHAPES if s not in GPU_SHAPES],
}


def field_group(config, name: str) -> Optional[str]:
  """The group of `config` (model, compute, data, ...) holding the field `name`, or None."""
  return next((g for g in default_config.GROUPS if name in config[g]), None)


def grouped(config, overrides: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
  """Bare-name `overrides` as `{group: {field: value}}` for `presets.update_groups`; a name
  no group of `config` has is a KeyError."""
  out: Dict[str, Dict[str, Any]] = {}
  for name, value in overrides.items():
    group = field_group(config, name)
    if group is None:
      raise KeyError(f"config has no field {name!r}")
    out.setdefault(group, {})[name] = value
  return out


def build_config(shape: Shape):
  """The run config of `shape`: default.py's preset, then the shape's fields (validated)."""
  config = default_config.get_config(f"task={shape.task},size={shape.size},accel=cpu")
  with config.unlocked():
    presets.update_groups(config, grouped(config, shape.overrides))
    config.train.batch_size = shape.batch
    # The synthetic digit lengths only have to pass validation: the batch is random tokens.
    if shape.task == "translation":
      config.data.max_input_length = shape.src_length
      config.data.max_target_length = shape.tgt_length
      config.data.max_digits = min(config.data.max_digits, shape.src_length - 1,
                                   shape.tgt_length - 1)
    elif shape.task == "classification":
      config.data.max_input_length = shape.src_length
      config.data.max_digits = min(config.data.max_digits, shape.src_length)
    else:
      config.data.max_target_length = shape.tgt_length
      config.data.max_digits = min(config.data.max_digits, (shape.tgt_length - 2) // 2)
    config.data.min_digits = min(config.data.min_digits, config.data.max_digits)
  train.validate(config, num_devices=1)
  return config


def build_task(config, vocab_size: int):
  """The task of `config`, with its model rebuilt for `vocab_size` when that is non-zero.

  Task.__init__ takes the vocabulary from input_pipeline.synthetic and builds the model;
  `model_config` reads `self.vocab_size`, so setting it and rebuilding is enough (the
  decode-mode model of `predict` is built from the same attribute).
  """
  task = tasks.get_task(config)
  if vocab_size:
    task.vocab_size = vocab_size
    task.model = task.build_model(decode=False)
  return task


# Config knobs that change the model program; each must reach models.TransformerConfig.
MODEL_KNOBS = ("dtype", "attention_impl", "attention_block_size", "remat", "scan_layers",
               "fused_qkv", "grad_barrier")


def check_model_knobs(shape: Shape, config, task) -> None:
  """Stops when a model knob the shape sets did not reach the built model: its
  TransformerConfig has no such field, or holds another value."""
  model_cfg = task.model.config
  for knob in MODEL_KNOBS:
    if knob not in shape.overrides:
      continue
    group = field_group(config, knob)
    value = config[group][knob]
    if not hasattr(model_cfg, knob):
      raise ValueError(f"shape {shape.name}: models.TransformerConfig has no field {knob!r}, "
                       f"so config.{group}.{knob}={value!r} would not change the model")
    want = jnp.dtype(value) if knob == "dtype" else value
    have = jnp.dtype(getattr(model_cfg, knob)) if knob == "dtype" else getattr(model_cfg,
                                                                              knob)
    if have != want:
      raise ValueError(f"shape {shape.name}: config.{group}.{knob}={value!r} but the model "
                       f"was built with {have!r} (the task does not pass it on)")


def missing_feature(shape: Shape) -> str:
  """Why `shape` cannot run with the code as it is now, or "" when it can.

  Builds the config and the (uninitialised) model, which is cheap. Only an optional
  shape's reasons are turned into a skip by the caller; any other shape's failure should
  stop the run.
  """
  impl = shape.overrides.get("attention_impl")
  if impl is not None and impl not in attention.IMPLEMENTATIONS:
    return f"attention_impl={impl!r} is not in models.attention.IMPLEMENTATIONS"
  known = default_config.get_config()
  absent = [k for k in shape.overrides if field_group(known, k) is None]
  if absent:
    return f"configs/default.py has no field(s) {', '.join(absent)}"
  try:
    config = build_config(shape)
    check_model_knobs(shape, config, build_task(config, shape.vocab_size))
  except Exception as e:  # pylint: disable=broad-except  # a half-built feature
    return f"{type(e).__name__}: {e}"
  return ""


# ----------------------------------------------------------------------------- FLOPs


def _family(task) -> str:
  if task.name == "translation":
    return "enc-dec"
  if task.name == "generation":
    return "decoder-only"
  if task.name == "classification":
    return "encoder-only"
  raise ValueError(f"no FLOP formula for task {task.name!r}")


def matmul_parameters(cfg: TransformerConfig, family: str) -> Dict[str, int]:
  """Matmul weights of the model, from its config.

    d = d_model, A = num_heads * head_dim, F = d_ff, V_t = target vocabulary,
    C = classes.
    encoder layer:       4 d A (W^Q, W^K, W^V, W^O) + 2 d F (W_1, W_2)
    decoder layer:       8 d A (self- and cross-attention) + 2 d F;  decoder-only: 4 d A + 2 d F
    untied output layer: d V_t (`output_kernel`; 0 when tied to the embedding)
    classifier head:     d C (`head`, encoder-only; applied once per example to the pooled
                         vector)
  Everything else (embedding and position tables, norm scales, biases, the [CLS] vector)
  is not a matmul.
  """
  d, a, f = cfg.d_model, cfg.num_heads * cfg.head_dim, cfg.d_ff
  enc_layers = cfg.num_encoder_layers if family in ("enc-dec", "encoder-only") else 0
  dec_layers = cfg.num_decoder_layers if family in ("enc-dec", "decoder-only") else 0
  attention_ = 4 * d * a
  ffn = 2 * d * f
  dec_layer = (2 if family == "enc-dec" else 1) * attention_ + ffn
  encoder_only = family == "encoder-only"
  return {"encoder": enc_layers * (attention_ + ffn),
          "decoder": dec_layers * dec_layer,
          "output_kernel": 0 if cfg.tie_output or encoder_only else d * cfg.target_vocab_size,
          "head": d * cfg.num_classes if encoder_only else 0}


# Parameter leaves that are not matmul weights: embedding tables, learned position tables,
# layer-norm scales, biases, the classifier's [CLS] vector. Any other non-`kernel` leaf
# stops the benchmark (see below).
NON_MATMUL_LEAVES = ("embedding", "table", "scale", "bias", "cls")


def check_matmul_parameters(cfg: TransformerConfig, family: str, params) -> Dict[str, int]:
  """Asserts the formula's matmul weights equal the model's: its parameter count minus
  every embedding, position-table, norm and bias leaf. Returns the counts (and `total`).

  A leaf that is neither a dense `kernel` nor one of NON_MATMUL_LEAVES also fails, so a new
  kind of weight cannot slip past the FLOP formula unnoticed.
  """
  sizes: Dict[str, int] = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    name = str(getattr(path[-1], "key", path[-1]))
    sizes[name] = sizes.get(name, 0) + int(np.prod(leaf.shape))
  unknown = sorted(set(sizes) - {"kernel", *NON_MATMUL_LEAVES})
  assert not unknown, f"parameter leaves {unknown} are not covered by the FLOP formula"
  total = reporting.count_parameters(params)
  model_matmul = total - sum(sizes.get(k, 0) for k in NON_MATMUL_LEAVES)
  counts = matmul_parameters(cfg, family)
  formula = sum(counts.values())
  assert model_matmul == formula, (
      f"FLOP formula drifted from the model: it counts {formula:,} matmul parameters, the "
      f"model has {model_matmul:,} (= {total:,} minus embeddings, norms and biases)")
  return {**counts, "matmul": formula, "total": total}


def model_flops(cfg: TransformerConfig, family: str, batch: int, src_length: int,
                tgt_length: int) -> Dict[str, float]:
  """Model FLOPs of one training step (forward + backward), the PaLM appendix B way.

  A matmul with P weights applied to T tokens costs 2 P T FLOPs forward and 4 P T backward
  (gradients for its input and for its weights), so 6 P T per step. With d = d_model,
  A = num_heads * head_dim, V_t = target vocabulary, B = batch, S = source length,
  T = target (or sequence) length, per step:

    6 * P_enc * B S               encoder layers (4 d A + 2 d F each) over source tokens
  + 6 * P_dec * B T               decoder layers (8 d A + 2 d F each; 4 d A + 2 d F
                                  decoder-only) over target tokens
  + 6 * d V_t * B T               output projection (logits), counted even when tied to the
                                  embedding: the logits matmul is real compute
  + 12 * N_enc * A * S * S * B    encoder self-attention: Q K^T and probs V, 2 * 2 L_q L_k A
  + 12 * N_dec * A * T * T * B    decoder causal self-attention, the full T^2 (as PaLM
                                  counts; the reference path also computes the masked half)
  + 12 * N_dec * A * T * S * B    cross-attention (enc-dec only)

  Encoder-only (classification; S = its input length, T = 0): the encoder terms, plus
  6 * d C * B for the head on the pooled vector (C = classes; one row per example).

  Not counted: the embedding lookup and its scatter-add gradient, softmax, layer norm,
  biases, activations, residuals, dropout, pooling, the loss and the optimizer update.
  """
  d, a = cfg.d_model, cfg.num_heads * cfg.head_dim
  has_encoder = family in ("enc-dec", "encoder-only")
  has_decoder = family in ("enc-dec", "decoder-only")
  enc_dec = family == "enc-dec"
  counts = matmul_parameters(cfg, family)
  src_length = src_length if has_encoder else 0
  tgt_length = tgt_length if has_decoder else 0
  src_tokens = batch * src_length
  tgt_tokens = batch * tgt_length
  n_enc = cfg.num_encoder_layers if has_encoder else 0
  n_dec = cfg.num_decoder_layers if has_decoder else 0
  parts = {
      "encoder": 6.0 * counts["encoder"] * src_tokens,
      "decoder": 6.0 * counts["decoder"] * tgt_tokens,
      "output": 6.0 * d * cfg.target_vocab_size * tgt_tokens,
      "head": 6.0 * counts["head"] * batch,
      "encoder_attention": 12.0 * n_enc * a * src_length**2 * batch,
      "decoder_attention": 12.0 * n_dec * a * tgt_length**2 * batch,
      "cross_attention": 12.0 * n_dec * a * tgt_length * src_length * batch if enc_dec else 0.0,
  }
  parts["total"] = sum(parts.values())
  return parts


# ----------------------------------------------------------------------------- timing


def measure_peak(n: int, reps: int, dtype: str = "float32") -> Dict[str, Any]:
  """FLOP/s of a jitted `dtype` [n, n] @ [n, n] (2 n^3 FLOPs): median of `reps` timings."""
  key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(key_a, (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(key_b, (n, n), jnp.float32).astype(dtype)
  seconds = median_call_seconds(jax.jit(jnp.matmul), (a, b), reps)
  return {"n": n, "reps": reps, "dtype": dtype, "median_s": seconds,
          "flops_per_sec": 2.0 * n**3 / seconds}


def median_call_seconds(fn, args, reps: int) -> float:
  """Median seconds of `fn(*args)`, each call blocked, over `reps` calls after one warm-up
  call (which compiles)."""
  fn(*args).block_until_ready()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn(*args).block_until_ready()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def synthetic_batch(task, vocab_size: int, batch: int, seed: int) -> Dict[str, np.ndarray]:
  """Random tokens in [1, vocab) filling every position: `[1, batch, length]` int32; and
  for classification a random `label` `[1, batch]` in [0, classes)."""
  rng = np.random.default_rng(seed)
  out = {k: rng.integers(1, vocab_size, size=(1, batch, n), dtype=np.int32)
         for k, n in task.lengths.items()}
  if task.num_classes:
    out["label"] = rng.integers(0, task.num_classes, size=(1, batch), dtype=np.int32)
  return out


@dataclasses.dataclass
class PreparedStep:
  """A shape's pmapped train step, ready to call: `p_train(p_state, batch)`."""
  config: Any
  task: Any
  family: str
  counts: Dict[str, int]
  p_train: Any
  p_state: Any
  batch: Dict[str, np.ndarray]


def prepare_step(shape: Shape, seed: int, num_devices: int = 1) -> PreparedStep:
  """Builds `shape`'s task and the project's real pmapped train step for `num_devices`
  local devices (the batch split between them), with a synthetic batch; not compiled."""
  config = build_config(shape)
  task = build_task(config, shape.vocab_size)
  check_model_knobs(shape, config, task)
  family = _family(task)
  tx = optimizers.make_optimizer(config)
  state = train_steps.create_state(task, tx, config.seed)
  counts = check_matmul_parameters(task.model.config, family, state.params)
  devices = jax.local_devices()[:num_devices]
  if len(devices) < num_devices or shape.batch % num_devices:
    raise SystemExit(f"shape {shape.name}: {num_devices} devices asked, {len(devices)} "
                     f"present; the batch ({shape.batch}) must divide between them")
  p_train, _, _ = train_steps.compile_steps(task, tx, config, devices)
  p_state = train_steps.replicate(state, devices)
  batch = {k: v.reshape((num_devices, v.shape[1] // num_devices) + v.shape[2:])
           for k, v in synthetic_batch(task, task.vocab_size, shape.batch, seed).items()}
  return PreparedStep(config, task, family, counts, p_train, p_state, batch)


def run_shape(shape: Shape, steps: int, rounds: int, warmup: int, min_round_seconds: float,
              seed: int, num_devices: int = 1) -> Dict[str, Any]:
  """Builds `shape`, compiles its train step for `num_devices` local devices (the batch
  split between them) and times it; returns one result row (MFU is added by the caller,
  which owns the peak)."""
  prepared = prepare_step(shape, seed, num_devices)
  config, task, family, counts = (prepared.config, prepared.task, prepared.family,
                                  prepared.counts)
  p_train, p_state, batch = prepared.p_train, prepared.p_state, prepared.batch
  del prepared  # the state is donated to each step: no second reference to it
  cfg = task.model.config

  t0 = time.perf_counter()
  p_state, metrics = p_train(p_state, batch)
  jax.block_until_ready((p_state, metrics))
  compile_s = time.perf_counter() - t0
  # Classification weighs each example once; the sequence tasks weigh each target token.
  scored = batch["label"] if "label" in batch else batch.get("targets", batch["inputs"])
  assert float(metrics["weight"][0]) == scored.size, "some synthetic tokens were not counted"

  def timed(n: int) -> List[float]:
    nonlocal p_state
    out = []
    for _ in range(n):
      t = time.perf_counter()
      p_state, m = p_train(p_state, batch)
      jax.block_until_ready((p_state, m))
      out.append(time.perf_counter() - t)
    return out

  # Reported apart so a recompilation on the second call (a sharding mismatch between the
  # replicated state and the step's outputs) would show.
  second_call_s = timed(1)[0]
  warm = timed(max(warmup, 1))
  # Fast steps are noisy: run at least `min_round_seconds` per round.
  per_round = max(steps, math.ceil(min_round_seconds / max(min(warm), 1e-6)))
  round_times = [timed(per_round) for _ in range(rounds)]
  all_times = [t for r in round_times for t in r]
  step_s = statistics.median(all_times)

  src_len = shape.src_length if family in ("enc-dec", "encoder-only") else 0
  tgt_len = shape.tgt_length if family in ("enc-dec", "decoder-only") else 0
  flops = model_flops(cfg, family, shape.batch, src_len, tgt_len)
  # "tokens" are the sequence the task models: targets (enc-dec), the sequence
  # (decoder-only) or the inputs (encoder-only); "all" adds an enc-dec's source.
  seq_tokens = shape.batch * (src_len if family == "encoder-only" else tgt_len)
  all_tokens = shape.batch * (src_len + tgt_len)
  achieved = flops["total"] / step_s
  return {
      "shape": shape.name, "family": family, "task": shape.task, "size": shape.size,
      "devices": num_devices,
      "params": counts["total"], "params_matmul": counts["matmul"],
      "batch": shape.batch, "src_length": src_len, "tgt_length": tgt_len,
      "vocab_size": task.vocab_size, "dropout_rate": config.optim.dropout_rate,
      "attention_impl": config.compute.attention_impl,
      "norm_placement": config.model.norm_placement,
      "dtype": config.compute.dtype,  # compute; the parameters' dtypes follow (float32 for all)
      "param_dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(p_state.params)}),
      "attention_block_size": config.compute.get("attention_block_size"),
      "remat": config.compute.get("remat", "none"),
      "scan_layers": config.model.get("scan_layers", False),
      "grad_barrier": cfg.grad_barrier,
      "flat_allreduce": bool(config.compute.get("flat_allreduce", True)),
      "compile_s": compile_s, "second_call_s": second_call_s, "step_s": step_s,
      "steps_per_round": per_round,
      "round_median_s": [statistics.median(r) for r in round_times],
      "step_s_min": min(all_times), "step_s_max": max(all_times),
      "tokens_per_sec": seq_tokens / step_s, "all_tokens_per_sec": all_tokens / step_s,
      "flops_per_step": flops["total"], "flops_parts": flops,
      "flops_per_sec": achieved,
      "reference": shape.reference, "ref_mfu": shape.ref_mfu,
      "ref_tokens_per_sec": shape.ref_tokens_per_sec, "note": shape.note,
  }


# ----------------------------------------------------------------------------- report


def _lengths(r: Dict[str, Any]) -> str:
  if r["family"] == "enc-dec":
    return f"{r['batch']} x {r['src_length']}/{r['tgt_length']}"
  if r["family"] == "encoder-only":
    return f"{r['batch']} x {r['src_length']}"
  return f"{r['batch']} x {r['tgt_length']}"


def _attention(r: Dict[str, Any]) -> str:
  if r["attention_impl"] == "blockwise":
    return f"blockwise/{r['attention_block_size']}"
  return r["attention_impl"]


def _layers(r: Dict[str, Any]) -> str:
  """remat policy, scan and the CPU step options off their defaults; "-" for none."""
  parts = [f"remat {r['remat']}"] if r["remat"] != "none" else []
  parts += ["scan"] if r["scan_layers"] else []
  parts += [f"grad barrier {r['grad_barrier']}"] if r.get("grad_barrier", "auto") != "auto" else []
  parts += ["all-reduce per array"] if not r.get("flat_allreduce", True) else []
  return ", ".join(parts) or "-"


def markdown_table(rows: List[Dict[str, Any]]) -> str:
  """One line per row. The MFU column divides by the float32 matmul peak for every row,
  bfloat16 ones included; the bf16-peak column appears when a bfloat16 row ran."""
  columns = [
      ("shape", lambda r: r["shape"]),
      ("family", lambda r: r["family"]),
      ("devices", lambda r: str(r.get("devices", 1))),
      ("params", lambda r: f"{r['params'] / 1e6:.2f}M"),
      ("batch x lengths", _lengths),
      ("vocab", lambda r: str(r["vocab_size"])),
      ("dropout", lambda r: f"{r['dropout_rate']:g}"),
      ("attention", _attention),
      ("dtype", lambda r: r["dtype"]),
      ("remat/scan", _layers),
      ("compile s", lambda r: f"{r['compile_s']:.1f}"),
      ("2nd call s", lambda r: f"{r['second_call_s']:.1f}"),
      ("step ms", lambda r: f"{r['step_s'] * 1e3:.1f}"),
      ("tokens/s", lambda r: f"{r['tokens_per_sec']:,.0f}"),
      ("src+tgt tokens/s", lambda r: f"{r['all_tokens_per_sec']:,.0f}"),
      ("model GFLOP/step", lambda r: f"{r['flops_per_step'] / 1e9:.2f}"),
      ("GFLOP/s", lambda r: f"{r['flops_per_sec'] / 1e9:.1f}"),
      ("MFU % (f32 peak)", lambda r: f"{100 * r['mfu']:.1f}"),
  ]
  if any(r.get("mfu_bf16_peak") is not None for r in rows):
    columns.append(("MFU % (bf16 peak)", lambda r: "" if r.get("mfu_bf16_peak") is None
                    else f"{100 * r['mfu_bf16_peak']:.1f}"))
  columns.append(("reference MFU %", lambda r: "" if r["ref_mfu"] is None
                  else f"{r['ref_mfu']:.0f}"))
  if any(r.get("peer_tokens_per_sec") for r in rows):
    columns += [("peer tokens/s", lambda r: f"{r['peer_tokens_per_sec']:,.0f}"
                 if r.get("peer_tokens_per_sec") else ""),
                ("ours / peer", lambda r: f"{r['tokens_per_sec'] / r['peer_tokens_per_sec']:.2f}x"
                 if r.get("peer_tokens_per_sec") else "")]
  lines = ["| " + " | ".join(h for h, _ in columns) + " |",
           "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fn(r) for _, fn in columns) + " |" for r in rows]
  return "\n".join(lines)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shapes", default="default",
                      help="comma-separated shape and group names (default, families, "
                           "bf16, variants, all), or 'list' to print them")
  parser.add_argument("--steps", type=int, default=3, help="timed steps per round (minimum)")
  parser.add_argument("--rounds", type=int, default=3, help="timed rounds per shape")
  parser.add_argument("--warmup", type=int, default=1,
                      help="untimed steps after the first two calls")
  parser.add_argument("--min_round_seconds", type=float, default=1.0,
                      help="raise the steps of a round until it lasts about this long")
  parser.add_argument("--peak_size", type=int, default=1024,
                      help="n of the float32 n x n matmul that defines the peak")
  parser.add_argument("--peak_reps", type=int, default=30, help="timed peak matmuls")
  parser.add_argument("--bf16_peak", choices=("auto", "yes", "no"), default="auto",
                      help="also measure a bfloat16 matmul peak (auto: when a bfloat16 "
                           "row is selected)")
  parser.add_argument("--seed", type=int, default=0, help="synthetic batch tokens")
  parser.add_argument("--cpu_devices", type=int, default=0,
                      help="split the host into this many pmap devices and each batch over "
                           "them (0: one device; set before JAX starts)")
  parser.add_argument("--peer", choices=("", "nanogpt"), default="",
                      help="also measure nanoGPT beside the rows that have a peer")
  parser.add_argument("--peer_python", default=sys.executable,
                      help="a Python with PyTorch for the peer")
  parser.add_argument("--peer_iterations", type=int, default=60,
                      help="nanoGPT iterations a measurement (the first 10 not counted)")
  parser.add_argument("--output", default="", help="also write the results as JSON here")
  return parser.parse_args(argv)


def select_shapes(spec: str):
  """(names to run, [(name, why skipped)]) for a `--shapes` value: shape and group names,
  in order, each shape once. An optional shape whose feature is missing is skipped when a
  group brought it in, and stops the run when it was named."""
  names, named = [], set()
  for item in (n.strip() for n in spec.split(",")):
    if not item:
      continue
    if item in GROUPS:
      names += [n for n in GROUPS[item] if n not in names]
    elif item in SHAPES_BY_NAME:
      named.add(item)
      names += [item] if item not in names else []
    else:
      raise SystemExit(f"unknown shape or group {item!r}; groups: {', '.join(GROUPS)}; "
                       f"shapes: {', '.join(SHAPES_BY_NAME)}")
  run, skipped = [], []
  for name in names:
    why = missing_feature(SHAPES_BY_NAME[name]) if SHAPES_BY_NAME[name].optional else ""
    if why and name in named:
      raise SystemExit(f"shape {name} cannot run: {why}")
    if why:
      skipped.append((name, why))
    else:
      run.append(name)
  return run, skipped


def main(argv=None):
  args = parse_args(argv)
  if args.shapes == "list":
    for group, members in GROUPS.items():
      print(f"group {group}: {', '.join(members)}")
    print()
    for s in SHAPES:
      print(f"{s.name:<34} {s.task:<14} {s.note or s.size}")
    return
  names, skipped = select_shapes(args.shapes)
  for name, why in skipped:
    print(f"skipping {name}: {why}", file=sys.stderr, flush=True)

  num_devices = max(args.cpu_devices, 1)
  if len(jax.local_devices()) < num_devices:
    raise SystemExit(f"--cpu_devices={args.cpu_devices} but JAX has "
                     f"{len(jax.local_devices())} device(s): run this file as a script or "
                     f"module (it sets XLA_FLAGS before JAX starts)")
  peer_shapes = sorted({SHAPES_BY_NAME[n].peer for n in names
                        if SHAPES_BY_NAME[n].peer == "nanogpt_cpu"}) if args.peer else []
  peer_runs: Dict[str, List[Dict[str, Any]]] = {p: [] for p in peer_shapes}
  folder = peers.prepare_nanogpt() if peer_shapes else None

  def measure_peers():
    for kind in peer_shapes:
      run = peers.nanogpt_cpu_iteration(folder, args.peer_python, args.peer_iterations)
      peer_runs[kind].append(run)
      print(f"peer {run['peer']}: {run['iteration_ms']:.1f} ms an iteration, "
            f"{run['tokens_per_sec']:,.0f} tokens/s", file=sys.stderr, flush=True)

  start = time.perf_counter()
  load_before = os.getloadavg()
  measure_peers()
  # The machine may be shared: the peak is measured before every shape and once at the end,
  # and MFU uses the median of those measurements; their spread shows the noise.
  peaks = [measure_peak(args.peak_size, args.peak_reps)]
  print(f"peak (jitted float32 {args.peak_size}x{args.peak_size} matmul, median of "
        f"{args.peak_reps}): {peaks[0]['flops_per_sec'] / 1e9:.1f} GFLOP/s",
        file=sys.stderr, flush=True)
  results = []
  for i, name in enumerate(names):
    if i:
      peaks.append(measure_peak(args.peak_size, args.peak_reps))
    row = run_shape(SHAPES_BY_NAME[name], args.steps, args.rounds, args.warmup,
                    args.min_round_seconds, args.seed, num_devices)
    row["peak_before"] = peaks[-1]["flops_per_sec"]
    row["load_average_after"] = os.getloadavg()
    results.append(row)
    print(f"{name}: compile {row['compile_s']:.1f} s, 2nd call {row['second_call_s']:.1f} s, "
          f"step {row['step_s'] * 1e3:.1f} ms, "
          f"{row['flops_per_sec'] / 1e9:.1f} GFLOP/s (peak just before: "
          f"{row['peak_before'] / 1e9:.1f})", file=sys.stderr, flush=True)
  measure_peers()
  for row in results:  # against the peer's faster measurement
    runs = peer_runs.get(SHAPES_BY_NAME[row["shape"]].peer)
    if runs:
      row["peer_runs"] = runs
      row["peer_tokens_per_sec"] = max(r["tokens_per_sec"] for r in runs)
  peaks.append(measure_peak(args.peak_size, args.peak_reps))
  larger = measure_peak(2 * args.peak_size, max(args.peak_reps // 4, 3))
  peak = statistics.median(p["flops_per_sec"] for p in peaks)
  bf16 = any(r["dtype"] == "bfloat16" for r in results)
  bf16_peak = (measure_peak(args.peak_size, args.peak_reps, "bfloat16")
               if args.bf16_peak == "yes" or (args.bf16_peak == "auto" and bf16) else None)
  for row in results:
    row["mfu"] = row["flops_per_sec"] / peak
    row["mfu_bf16_peak"] = (row["flops_per_sec"] / bf16_peak["flops_per_sec"]
                            if bf16_peak and row["dtype"] == "bfloat16" else None)
  total_s = time.perf_counter() - start
  load_after = os.getloadavg()

  print("\n" + run_record.machine_line(f"{num_devices} of {len(jax.local_devices())} local "
                                       f"device(s) used"))
  print(run_record.load_line(load_before, load_after))
  spread = sorted(p["flops_per_sec"] / 1e9 for p in peaks)
  print(f"peak for MFU: jitted float32 {args.peak_size}x{args.peak_size} matmul "
        f"(2 n^3 FLOPs), {peak / 1e9:.1f} GFLOP/s = median of {len(peaks)} measurements "
        f"(each the median of {args.peak_reps} calls; range {spread[0]:.1f} - "
        f"{spread[-1]:.1f}); {larger['n']}x{larger['n']}: "
        f"{larger['flops_per_sec'] / 1e9:.1f} GFLOP/s")
  if bf16_peak:
    print(f"bfloat16 {args.peak_size}x{args.peak_size} matmul: "
          f"{bf16_peak['flops_per_sec'] / 1e9:.1f} GFLOP/s (one measurement, median of "
          f"{args.peak_reps} calls); MFU % is against the float32 peak for every row")
  print("tokens/s counts target tokens (enc-dec), sequence tokens (decoder-only) or input "
        "tokens (encoder-only); src+tgt adds an enc-dec's source tokens.\n")
  print(markdown_table(results))
  for kind, runs in peer_runs.items():
    print(f"peer ({kind}): {runs[0]['peer']}, `{runs[0]['command']}` (torch threads "
          f"{runs[0]['torch_threads']}): "
          + ", ".join(f"{r['iteration_ms']:.1f} ms ({r['tokens_per_sec']:,.0f} tokens/s)"
                      for r in runs) + " (before the first row, after the last)")
  for name, why in skipped:
    print(f"skipped {name}: {why}")
  print(f"\ntotal time {total_s:.0f} s")
  if args.output:
    run_record.write_json(args.output, {
        "args": vars(args), "peak_flops_per_sec": peak, "peaks": peaks,
        "peak_larger": larger, "peak_bf16": bf16_peak,
        "skipped": [{"shape": n, "why": w} for n, w in skipped], "peers": peer_runs,
        "load_before": load_before,
        "load_after": load_after, "total_s": total_s, "rows": results})


if __name__ == "__main__":
  main()
