"""Decoding speed through the key/value cache: greedy, sampling and beam search.

    python -m benchmarks.decoding_speed                          # every row (~10-15 min, 2 cores)
    python -m benchmarks.decoding_speed --quick                  # a smoke test, under a minute
    python -m benchmarks.decoding_speed --models=lm_small,mt_small --modes=greedy,beam
    python -m benchmarks.decoding_speed --accel=gpu --output=runs/decoding_speed.json
    python -m benchmarks.decoding_speed --models=lm_base --modes=greedy --kv_heads=0,2,1

Rows: each model (`--models`: the decoder-only LM and the encoder-decoder translation model
at the small and base presets of configs/default.py, randomly initialised) x each mode
(`--modes`: greedy, sampling at temperature 1 and top-k 0, beam search with `--beam` 4) x
each batch size (`--batches`, 1 and 32). Every row decodes `--new_tokens` tokens a row
through the cache, in the code paths the tasks use:

- lm greedy / sample: `GenerationTask.generate` (tasks/generation.py) with no prompt;
- lm beam: the same cached step fed to `decoding.beam_search` (the LM task itself has no
  beam path);
- mt greedy / beam: `TranslationTask.predict` (tasks/translation.py), which encodes the
  source (`--src_length` random non-zero tokens) and decodes with greedy_decode or
  beam_search; the encoder pass is part of the timed call;
- mt sample: predict's step function fed to `decoding.generate` with the sampling picker
  (the task has no sampling path).

Random weights emit EOS at random, which would stop rows early and inflate tokens/s, so
the task's EOS id is set to `vocab_size`, an id no picker or beam can produce: every row
runs to the end, and the script asserts that the number of non-zero output tokens is
exactly batch x new tokens (x beam for the LM's beam search, which returns every
hypothesis). Padding (0) is never picked, as in the tasks.

It also checks that a decode is one jitted program with no per-token host round trip: the
decode function is traced once into a jaxpr that must hold a `while` loop (or a `scan`)
whose body holds the model's matmuls (a Python loop over tokens would unroll into the
jaxpr instead), and no host callback primitive anywhere. It is compiled ahead of time (`jit(...).trace`,
`.lower`, `.compile`; that time is "compile s", with the persistent compilation cache
off), and each timed decode is one call of that compiled executable (the calls are
counted: `dispatches_per_decode`), made under `jax.transfer_guard("disallow")`, which
refuses any implicit host -> device copy of its inputs.

Timing: "first call s" is the first call after compiling (blocked). Then each of
`--rounds` rounds makes enough calls to last `--min_round_seconds` (at least one), each
call blocked; a round's time is its mean per call, and "decode ms" is the median over
rounds. tokens/s = batch x new tokens / decode time (output tokens); "row tokens/s"
counts every row the step function runs (batch x beam for beam search). Nothing here
asserts a timing.
"""

import argparse
import collections
import dataclasses
import math
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List

if __package__ in (None, ""):  # run as a script: put the repository root on the path
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import run_record  # noqa: E402
import tasks  # noqa: E402
from configs import default as default_config  # noqa: E402
from models import decoding  # noqa: E402
from training import reporting  # noqa: E402

MODELS = {  # name -> (task, size preset)
    "lm_small": ("generation", "small"),
    "lm_base": ("generation", "base"),
    "mt_small": ("translation", "small"),
    "mt_base": ("translation", "base"),
}
MODES = ("greedy", "sample", "beam")
FAMILY = {"generation": "decoder-only", "translation": "enc-dec"}


@dataclasses.dataclass(frozen=True)
class Row:
  """One measured configuration."""
  model: str  # a key of MODELS
  mode: str  # greedy, sample or beam
  batch: int
  beam: int  # hypotheses per example (1 unless mode is beam)


# ----------------------------------------------------------------------------- set-up


def build_task(model: str, accel: str, new_tokens: int, src_length: int, vocab_size: int,
               kv_heads: int = 0):
  """The task of `model` at its preset, with a `vocab_size` vocabulary, a context of
  `new_tokens` (the decode length), `kv_heads` key/value heads and an EOS id no decoder
  can produce."""
  task_name, size = MODELS[model]
  config = default_config.get_config(f"task={task_name},size={size},accel={accel}")
  with config.unlocked():
    config.data.max_target_length = new_tokens
    config.data.max_input_length = src_length
    config.model.num_kv_heads = kv_heads
  task = tasks.get_task(config)
  task.vocab_size = vocab_size
  task.model = task.build_model(decode=False)
  # Ids are 0 .. vocab_size - 1: no picker and no beam can emit this one, so no row stops
  # before `new_tokens` (the tasks read `eos_id` when they build the decode).
  task.eos_id = vocab_size
  return task


def lm_beam_search(task, params, batch: int, beam: int, length: int) -> jax.Array:
  """GenerationTask.generate's cached step over batch x beam rows, fed to beam_search.
  Returns `[batch, beam, length]` tokens."""
  decoder = task.build_model(decode=True)
  cache = decoding.init_cache(decoder, jnp.zeros((batch * beam, length), jnp.int32))
  decoder_params = task.decode_params(params)  # scanned layers unstacked, as generate does

  def step(cache, token):
    logits, state = decoder.apply({"params": decoder_params, "cache": cache}, token,
                                  mutable=["cache"])
    return logits[:, -1], state["cache"]

  tokens, _ = decoding.beam_search(step, cache, batch, beam, length, task.eos_id,
                                   alpha=task.config.decode.length_penalty)
  return tokens


def mt_sample(task, params, inputs: jax.Array, rng: jax.Array, pick: Callable) -> jax.Array:
  """TranslationTask.predict's encoder pass and cached step, fed to `decoding.generate`
  with a sampling picker. `[batch, src_length]` -> `[batch, decode_length]` tokens."""
  batch_size, max_length = inputs.shape[0], task.decode_length
  encoded = task.model.apply({"params": params}, inputs, method="encode")
  decoder = task.build_model(decode=True)
  cache = decoding.init_cache(decoder, inputs, jnp.zeros((batch_size, max_length), jnp.int32))
  decoder_params = task.decode_params(params)  # scanned layers unstacked, as predict does

  def step(cache, tokens):
    logits, state = decoder.apply({"params": decoder_params, "cache": cache}, encoded,
                                  inputs, tokens, method="decode", mutable=["cache"])
    return logits[:, -1], state["cache"]

  return decoding.generate(step, cache, batch_size, max_length, task.eos_id, pick=pick,
                           rng=rng)


def decode_function(task, row: Row, new_tokens: int) -> Callable:
  """`decode(params, inputs, rng) -> tokens` for `row`: the whole decode, to be jitted.

  `inputs` is the `[batch, src_length]` source (translation) or a `[batch, new_tokens]`
  all-zero prompt (generation: nothing forced).
  """
  sampler = decoding.sampling_picker(temperature=1.0, top_k=0)
  if task.name == "generation":
    if row.mode == "beam":
      return lambda params, inputs, rng: lm_beam_search(task, params, row.batch, row.beam,
                                                        new_tokens)
    picker = sampler if row.mode == "sample" else decoding.sampling_picker(greedy=True)
    return lambda params, inputs, rng: task.generate(params, inputs, rng, picker=picker)
  if row.mode == "sample":
    return lambda params, inputs, rng: mt_sample(task, params, inputs, rng, sampler)

  def predict(params, inputs, rng):
    del rng  # greedy and beam search are deterministic
    # predict reads beam_size when it is traced, which is right below.
    task.config.decode.beam_size = row.beam
    return task.predict(params, {"inputs": inputs})
  return predict


def example_inputs(task, row: Row, new_tokens: int, src_length: int, seed: int):
  if task.name == "generation":
    return jnp.zeros((row.batch, new_tokens), jnp.int32)
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(1, task.vocab_size, (row.batch, src_length)), jnp.int32)


# ----------------------------------------------------------------------------- checks


def _sub_jaxprs(value):
  """The jaxprs inside an equation parameter (a jaxpr, closed jaxpr, or a tuple of them)."""
  if hasattr(value, "eqns"):
    yield value
  elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
    yield value.jaxpr
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def primitive_counts(jaxpr) -> collections.Counter:
  """How often each primitive occurs in `jaxpr`, nested jaxprs (loops, calls) included."""
  counts = collections.Counter()
  for eqn in jaxpr.eqns:
    counts[eqn.primitive.name] += 1
    for value in eqn.params.values():
      for sub in _sub_jaxprs(value):
        counts.update(primitive_counts(sub))
  return counts


def _loop_bodies(eqn):
  """The jaxprs a loop equation runs every iteration (while: body and condition; scan: its
  body), or () for any other equation."""
  if eqn.primitive.name == "while":
    return (eqn.params["body_jaxpr"].jaxpr, eqn.params["cond_jaxpr"].jaxpr)
  if eqn.primitive.name == "scan":
    return (eqn.params["jaxpr"].jaxpr,)
  return ()


def check_one_program(jaxpr) -> Dict[str, int]:
  """Asserts the decode is one on-device loop: a top-level `while` (or `scan`) whose body
  holds the model's matmuls, and no host callback anywhere. Returns what it counted."""
  counts = primitive_counts(jaxpr)
  callbacks = sorted(name for name in counts if "callback" in name)
  assert not callbacks, f"the decode calls back to the host: {callbacks}"
  loops = [eqn for eqn in jaxpr.eqns if _loop_bodies(eqn)]
  assert loops, "the decode has no top-level loop: it is unrolled or a host loop"
  in_loops = [sum(primitive_counts(body)["dot_general"] for body in _loop_bodies(eqn))
              for eqn in loops]
  assert max(in_loops) > 0, "no matmul inside the decode loop: the model step runs outside"
  return {"while_loops_top_level": sum(e.primitive.name == "while" for e in loops),
          "loops_top_level": len(loops), "while_loops_all": counts["while"],
          "matmuls_in_loop_body": max(in_loops),
          "matmuls_outside_loops": counts["dot_general"] - sum(in_loops)}


def expected_tokens(task, row: Row, new_tokens: int) -> int:
  """Non-zero tokens a full-length decode returns."""
  every_hypothesis = task.name == "generation" and row.mode == "beam"
  return row.batch * new_tokens * (row.beam if every_hypothesis else 1)


# ----------------------------------------------------------------------------- timing


def cache_bytes(task, row: Row, new_tokens: int, src_length: int) -> int:
  """Bytes of the decoding cache for the row's batch x beam rows (shapes only)."""
  rows = row.batch * row.beam
  args = [jnp.zeros((rows, new_tokens), jnp.int32)]
  if task.name == "translation":
    args.insert(0, jnp.zeros((rows, src_length), jnp.int32))
  shapes = jax.eval_shape(task.build_model(decode=True).init, jax.random.PRNGKey(0), *args)
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes["cache"]))


def run_row(task, params, row: Row, args) -> Dict[str, Any]:
  """Compiles and times one row; returns its result."""
  new_tokens = args.new_tokens
  inputs = example_inputs(task, row, new_tokens, args.src_length, args.seed)
  rngs = [jax.random.PRNGKey(i) for i in range(64)]  # made before the transfer guard

  start = time.perf_counter()
  traced = jax.jit(decode_function(task, row, new_tokens)).trace(params, inputs, rngs[0])
  program = check_one_program(traced.jaxpr.jaxpr)
  compiled = traced.lower().compile()
  compile_s = time.perf_counter() - start
  hlo = compiled.as_text() or ""

  dispatches = 0

  def decode(i: int) -> jax.Array:
    nonlocal dispatches
    dispatches += 1
    return compiled(params, inputs, rngs[i % len(rngs)])

  t = time.perf_counter()
  out = decode(0).block_until_ready()
  first_s = time.perf_counter() - t
  tokens = np.asarray(out)
  produced = int((tokens > 0).sum())
  expected = expected_tokens(task, row, new_tokens)
  assert produced == expected, (
      f"{row}: {produced} non-zero tokens, expected {expected}: a row stopped early")
  assert tokens.shape[-1] == new_tokens, f"{row}: output shape {tokens.shape}"

  calls, round_s = 0, []
  with jax.transfer_guard("disallow"):  # an implicit copy of an input would fail here
    warm = time.perf_counter()
    decode(1).block_until_ready()
    warm = time.perf_counter() - warm
    per_round = max(1, math.ceil(args.min_round_seconds / max(warm, 1e-6)))
    for _ in range(args.rounds):
      t = time.perf_counter()
      for _ in range(per_round):
        decode(2 + calls).block_until_ready()
        calls += 1
      round_s.append((time.perf_counter() - t) / per_round)
  decodes = calls + 2
  seconds = statistics.median(round_s)
  rows = row.batch * row.beam
  return {
      "model": row.model, "family": FAMILY[task.name], "size": task.config.size,
      "mode": row.mode, "batch": row.batch, "beam": row.beam, "rows": rows,
      "new_tokens": new_tokens,
      "src_length": args.src_length if task.name == "translation" else 0,
      "vocab_size": task.vocab_size, "dtype": task.config.compute.dtype,
      "attention_impl": task.config.compute.attention_impl,
      "params": reporting.count_parameters(params),
      "kv_heads": task.config.model.num_kv_heads or task.config.model.num_heads,
      "heads": task.config.model.num_heads,
      "cache_bytes": cache_bytes(task, row, new_tokens, args.src_length),
      "compile_s": compile_s, "first_call_s": first_s, "decode_s": seconds,
      "round_s": round_s, "calls_per_round": per_round,
      "tokens_per_sec": row.batch * new_tokens / seconds,
      "row_tokens_per_sec": rows * new_tokens / seconds,
      "nonzero_tokens": produced, "dispatches_per_decode": dispatches / decodes,
      "hlo_has_while": "while" in hlo,
      **program,
  }


# ----------------------------------------------------------------------------- report


def markdown_table(results: List[Dict[str, Any]]) -> str:
  head = ("| model | family | params | kv heads | dtype | mode | batch | rows | src | "
          "new tokens | cache MiB | compile s | first call s | decode ms | tokens/s | "
          "row tokens/s |")
  lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
  for r in results:
    mode = f"beam {r['beam']}" if r["mode"] == "beam" else r["mode"]
    lines.append(
        f"| {r['model']} | {r['family']} | {r['params'] / 1e6:.2f}M | "
        f"{r['kv_heads']} of {r['heads']} | {r['dtype']} | {mode} | "
        f"{r['batch']} | {r['rows']} | {r['src_length'] or ''} | {r['new_tokens']} | "
        f"{r['cache_bytes'] / 2**20:.2f} | {r['compile_s']:.1f} | {r['first_call_s']:.2f} | {r['decode_s'] * 1e3:.1f} | "
        f"{r['tokens_per_sec']:,.0f} | {r['row_tokens_per_sec']:,.0f} |")
  return "\n".join(lines)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default=",".join(MODELS),
                      help=f"comma-separated, of {', '.join(MODELS)}")
  parser.add_argument("--modes", default=",".join(MODES), help="greedy, sample, beam")
  parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
  parser.add_argument("--beam", type=int, default=4, help="beam size of the beam rows")
  parser.add_argument("--new_tokens", type=int, default=64, help="tokens decoded a row")
  parser.add_argument("--src_length", type=int, default=32,
                      help="source tokens of the translation model (all real)")
  parser.add_argument("--vocab_size", type=int, default=32000,
                      help="vocabulary (32000: a WMT-sized shared SentencePiece)")
  parser.add_argument("--accel", default="cpu", choices=("cpu", "gpu", "tpu"),
                      help="accelerator preset: dtype and attention implementation")
  parser.add_argument("--rounds", type=int, default=3, help="timed rounds a row")
  parser.add_argument("--min_round_seconds", type=float, default=1.0,
                      help="calls a round are raised until it lasts about this long")
  parser.add_argument("--seed", type=int, default=0, help="source tokens")
  parser.add_argument("--kv_heads", default="0",
                      help="comma-separated config.model.num_kv_heads values (0 = num_heads)")
  parser.add_argument("--quick", action="store_true",
                      help="smoke test: small models, 8 tokens, vocab 1000, 2 short rounds")
  parser.add_argument("--output", default="", help="also write the results as JSON here")
  args = parser.parse_args(argv)
  if args.quick:
    args.models, args.new_tokens, args.src_length = "lm_small,mt_small", 8, 8
    args.vocab_size, args.rounds, args.min_round_seconds = 1000, 2, 0.0
  return args


def main(argv=None):
  args = parse_args(argv)
  models = [m for m in args.models.split(",") if m]
  modes = [m for m in args.modes.split(",") if m]
  unknown = [m for m in models if m not in MODELS] + [m for m in modes if m not in MODES]
  if unknown:
    raise SystemExit(f"unknown models or modes {unknown}; models: {', '.join(MODELS)}; "
                     f"modes: {', '.join(MODES)}")
  batches = [int(b) for b in args.batches.split(",") if b]
  # Compile times are part of the result: a persistent cache would turn them into reads.
  jax.config.update("jax_enable_compilation_cache", False)

  start = time.perf_counter()
  load_before = os.getloadavg()
  results = []
  for model, kv_heads in [(m, int(k)) for m in models for k in args.kv_heads.split(",")]:
    task = build_task(model, args.accel, args.new_tokens, args.src_length, args.vocab_size,
                      kv_heads)
    params = task.init_params(jax.random.PRNGKey(0))
    for mode in modes:
      for batch in batches:
        row = Row(model, mode, batch, args.beam if mode == "beam" else 1)
        result = run_row(task, params, row, args)
        results.append(result)
        print(f"{model} ({result['kv_heads']} kv heads) {mode} batch {batch}: compile {result['compile_s']:.1f} s, "
              f"decode {result['decode_s'] * 1e3:.1f} ms, "
              f"{result['tokens_per_sec']:,.0f} tokens/s ({result['nonzero_tokens']} "
              f"tokens checked; {result['loops_top_level']} loop, "
              f"{result['matmuls_in_loop_body']} matmuls in its body, 1 dispatch a decode)",
              file=sys.stderr, flush=True)
  total_s = time.perf_counter() - start
  load_after = os.getloadavg()

  print("\n" + run_record.machine_line(f"device {jax.devices()[0].device_kind}"))
  print(run_record.load_line(load_before, load_after))
  print("tokens/s = batch x new tokens / decode time; row tokens/s counts every row the "
        "step runs (batch x beam).\n")
  print(markdown_table(results))
  print(f"\ntotal time {total_s:.0f} s")
  if args.output:
    run_record.write_json(args.output, {
        "device": jax.devices()[0].device_kind, "args": vars(args),
        "load_before": load_before, "load_after": load_after, "total_s": total_s,
        "rows": results})


if __name__ == "__main__":
  run_record.start_with_huge_pages()
  main()
