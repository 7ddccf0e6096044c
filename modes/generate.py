"""--mode=generate: continue prompts with a language model's checkpoint, sampling as
config.decode says (a family that is a `tasks.base.TextGenerator`)."""

import zlib
from typing import List, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

import tasks
from modes.lines import require_text_family
from modes.run import open_run
from training import preemption


def generate_text(config: ml_collections.ConfigDict, workdir: str, prompts: List[str],
                  checkpoint: str = "latest", step: Optional[int] = None) -> List[List[str]]:
  """Continues each prompt config.decode.num_samples times with a checkpoint of `workdir`,
  sampling as the config says (temperature, top_k, top_p, greedy, max_new_tokens,
  stop_text, sample_seed). Returns, per prompt, its samples as text (the prompt included).
  One jitted call per batch of config.eval.eval_batch_size rows."""
  require_text_family(config, "generate",
                      lambda family: issubclass(family, tasks.base.TextGenerator))
  # (main.py checks this before reading the prompts; callers from Python get it here)
  run = open_run(config, workdir, jax.local_devices()[:1])  # one jitted call, no pmap
  _, params = run.restore(checkpoint, step)
  return sample(run, params, prompts)


def sample(run, params, prompts: List[str]) -> List[List[str]]:
  """`generate_text` on an opened run and its restored (host) params (api.Model too)."""
  task, config = run.task, run.config
  d = config.decode
  encoded = task.encode_prompts(prompts)
  stop_id = task.stop_id()
  context = config.data.max_target_length
  longest = max(len(p) for p in encoded)
  # Past the model's context the window slides (decoding.generate; docs/generation.md).
  length = longest + d.max_new_tokens
  if length > context:
    logging.info("%d tokens in all, more than the model's context of %d "
                 "(config.data.max_target_length): the window slides, keeping %d tokens "
                 "at each slide", length, context, context // 2)
  rows = [p for p in encoded for _ in range(d.num_samples)]
  prompt = np.zeros((len(rows), length), np.int32)
  for r, tokens in enumerate(rows):
    prompt[r, :len(tokens)] = tokens
  limits = np.array([len(t) + d.max_new_tokens for t in rows], np.int32)

  @jax.jit
  def generate(params, prompt, rng, limits):
    return task.generate(params, prompt, rng, limits, stop_id=stop_id)

  # A key per (prompt text, sample number): a prompt's samples do not depend on the other
  # prompts of the call or on the batching.
  seed = jax.random.PRNGKey(d.sample_seed)
  keys = jnp.stack([jax.random.fold_in(jax.random.fold_in(seed, zlib.crc32(p.encode())), j)
                    for p in prompts for j in range(d.num_samples)])
  size = config.eval.eval_batch_size
  outputs = []
  for start in range(0, len(rows), size):
    preemption.check("--mode=generate")
    tokens = generate(params, prompt[start:start + size], keys[start:start + size],
                      limits[start:start + size])
    outputs += [task.detokenize(t) for t in np.asarray(tokens)]
  n = d.num_samples
  return [outputs[i * n:(i + 1) * n] for i in range(len(prompts))]
