"""Incremental decoding with the key/value cache: cache set-up and greedy search.

A decoding step is a function `step_fn(cache, tokens[batch, 1]) -> (logits[batch, vocab],
cache)`; the task modules build it from a model in decode mode. The loop is a
`lax.while_loop`, so a whole decode is one jitted call with no per-token host round trip.
Beam search and sampling plug into the same step function (task issues).
"""

from typing import Any, Callable, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
StepFn = Callable[[Any, Array], Tuple[Array, Any]]


def init_cache(decode_model: nn.Module, *example_args, method=None) -> Any:
  """An all-zero cache for `decode_model` (a model built with `config.decode=True`).

  `example_args` are full-length arrays of the shapes to decode (e.g. `[batch,
  max_length]` tokens): the cache gets one slot per position. Only shapes are traced.
  """
  def init():
    return decode_model.init(jax.random.PRNGKey(0), *example_args, method=method)
  shapes = jax.eval_shape(init)["cache"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def greedy_decode(step_fn: StepFn, cache: Any, batch_size: int, max_length: int,
                  eos_id: int, prompt: Optional[Array] = None) -> Array:
  """Greedy decoding: at each position emit the most likely token other than padding (0).

  Args:
    step_fn: one decoding step (see module docstring).
    cache: the initial cache (from `init_cache`).
    batch_size: number of sequences.
    max_length: number of tokens to produce (the cache must hold at least this many).
    eos_id: a sequence is finished once it emits this token; later positions are 0.
    prompt: optional `[batch, max_length]` tokens forced at the positions where they are
      non-zero (a left-aligned, zero-padded prompt); the rest is generated.

  Returns:
    `[batch, max_length]` int32 tokens, EOS included, 0 after it.
  """
  if prompt is None:
    prompt = jnp.zeros((batch_size, max_length), jnp.int32)

  def cond(state):
    i, _, _, _, done = state
    return (i < max_length) & ~jnp.all(done)

  def body(state):
    i, cache, token, out, done = state
    logits, cache = step_fn(cache, token[:, None])
    forced = jax.lax.dynamic_index_in_dim(prompt, i, axis=1, keepdims=False)
    # Token 0 is padding, never a prediction: decoding it would feed padding back in.
    best = jnp.argmax(logits[:, 1:], axis=-1).astype(jnp.int32) + 1
    chosen = jnp.where(forced > 0, forced, best)
    chosen = jnp.where(done, 0, chosen)
    out = jax.lax.dynamic_update_index_in_dim(out, chosen, i, axis=1)
    done = done | ((chosen == eos_id) & (forced == 0))
    return i + 1, cache, chosen, out, done

  state = (jnp.array(0), cache, jnp.zeros((batch_size,), jnp.int32),
           jnp.zeros((batch_size, max_length), jnp.int32),
           jnp.zeros((batch_size,), bool))
  return jax.lax.while_loop(cond, body, state)[3]
