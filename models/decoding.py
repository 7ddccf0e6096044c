"""Incremental decoding with the key/value cache: cache set-up, greedy and beam search.

A decoding step is a function `step_fn(cache, tokens[batch, 1]) -> (logits[batch, vocab],
cache)`; the task modules build it from a model in decode mode. The loop is a
`lax.while_loop`, so a whole decode is one jitted call with no per-token host round trip.
`generate` fills positions left to right with a prompt forced where given and the rest
greedy or sampled (temperature, top-k, top-p), sliding a window over the text past the
model's context; `beam_search` keeps the k best hypotheses.
"""

from typing import Any, Callable, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.attention import MASK_VALUE

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
  return generate(step_fn, cache, batch_size, max_length, eos_id, prompt=prompt)


# ----------------------------------------------------------------------------- sampling


def top_k_mask(logits: Array, k: int) -> Array:
  """True for the `k` largest logits of each row (ties at the k-th value all kept);
  k = 0 keeps everything. `[..., vocab]` -> bool `[..., vocab]`."""
  if k <= 0 or k >= logits.shape[-1]:
    return jnp.ones(logits.shape, bool)
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  return logits >= kth


def top_p_mask(logits: Array, p: float) -> Array:
  """Nucleus sampling: True for the smallest set of most likely tokens whose probabilities
  add up to at least `p` (the most likely token always; p = 1 keeps every token with
  non-zero probability). `[..., vocab]` -> bool `[..., vocab]`."""
  if p >= 1.0:
    return jnp.ones(logits.shape, bool)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  order = jnp.argsort(-probs, axis=-1)
  sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
  # A token is kept when the tokens ranked above it hold less than p.
  before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
  keep_sorted = before < p
  inverse = jnp.argsort(order, axis=-1)
  return jnp.take_along_axis(keep_sorted, inverse, axis=-1)


def sampling_picker(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    greedy: bool = False,
                    never: Tuple[int, ...] = (0,)) -> Callable[[Array, Array], Array]:
  """`pick(logits[batch, vocab], keys) -> tokens[batch]` for `generate`.

  Greedy takes the argmax; otherwise logits / temperature are restricted to the top-k and
  then the top-p tokens and sampled, row b with `keys[b]` (`keys` `[batch]` keys, or one
  key that is split into one per row). The ids in `never` (padding, and ids a tokenizer
  reserves) are never picked.
  """
  if not greedy and not temperature > 0:
    raise ValueError(f"sampling needs a temperature > 0, got {temperature}; use greedy "
                     f"decoding for the most likely tokens")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")

  def pick(logits, keys):
    logits = logits.astype(jnp.float32).at[:, list(never)].set(MASK_VALUE)
    if greedy:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    keep = top_k_mask(logits, top_k) & top_p_mask(logits, top_p)
    logits = jnp.where(keep, logits, MASK_VALUE)
    if jnp.ndim(keys) == 1:  # one raw key for the batch
      keys = jax.random.split(keys, logits.shape[0])
    # One key a row: a row's sample does not depend on which rows share its batch.
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)

  return pick


def generate(step_fn: StepFn, cache: Any, batch_size: int, max_length: int, eos_id: int,
             prompt: Optional[Array] = None, pick: Optional[Callable] = None,
             rng: Optional[Array] = None, limits: Optional[Array] = None,
             stop_id: int = -1, context: Optional[int] = None,
             keep: Optional[int] = None) -> Array:
  """Left-to-right generation through the cache, one jitted `lax.while_loop`.

  Step i feeds the token of position i - 1 (0, the start token, at i = 0) and fills
  position i: the prompt's token where `prompt` is non-zero, else `pick(logits, key_i)`.

  Past the context (`max_length > context`) the window slides: once the cache's `context`
  slots are full, it is rebuilt by feeding the start token and the last `keep` tokens,
  one step each, into the initial (all-zero) `cache`, so the positions restart at 0 as
  in training, and generation goes on. Position i then sees the tokens
  from `window_start(i, context, keep)` on; a rebuild costs `keep` steps and comes every
  `context - keep` tokens.

  Args:
    step_fn: one decoding step (see module docstring).
    cache: the initial cache (from `init_cache`), with room for `max_length` positions
      (`context` when given).
    batch_size: number of sequences.
    max_length: positions to fill at most.
    eos_id: a row is finished once it generates this token; later positions are 0.
    prompt: optional `[batch, max_length]` left-aligned, zero-padded prompt tokens.
    pick: `pick(logits[batch, vocab], keys[batch]) -> [batch]` (default greedy; see
      `sampling_picker`).
    rng: `[batch]` PRNG keys, one a row (position i of row b uses `fold_in(rng[b], i)`),
      or one key, from which row b's is `fold_in(rng, b)`.
    limits: optional `[batch]` int: row b stops after filling `limits[b]` positions.
    stop_id: a generated token that also finishes its row (kept in the output); -1 = none.
    context: the positions the model reads (the cache's slots; the start token takes the
      first); None = `max_length`, no sliding.
    keep: tokens a slide keeps, 1 <= keep < context (default half the context).

  Returns:
    `[batch, max_length]` int32 tokens (prompt included), 0 after the end of each row.
  """
  context = max_length if context is None else context
  keep = context // 2 if keep is None else keep
  slides = max_length > context
  if slides and not 0 < keep < context:
    raise ValueError(f"a sliding window keeps 1 to {context - 1} tokens, got keep={keep}")
  empty = cache
  if prompt is None:
    prompt = jnp.zeros((batch_size, max_length), jnp.int32)
  pick = pick or sampling_picker(greedy=True)
  rng = jax.random.PRNGKey(0) if rng is None else rng
  if jnp.ndim(rng) == 1:  # one raw key
    rng = jax.vmap(lambda b: jax.random.fold_in(rng, b))(jnp.arange(batch_size))
  limits = jnp.full((batch_size,), max_length) if limits is None else limits

  def cond(state):
    i, _, _, _, _, done = state
    return (i < max_length) & ~jnp.all(done)

  def rebuild(out, i):
    """The cache after feeding the start token and out[:, i - keep:i - 1] (the last
    token, out[:, i - 1], is the next step's)."""
    def feed(j, cache):
      before = jax.lax.dynamic_index_in_dim(out, i - keep + j - 1, axis=1, keepdims=False)
      return step_fn(cache, jnp.where(j == 0, 0, before)[:, None])[1]
    return jax.lax.fori_loop(0, keep, feed, empty)

  def body(state):
    i, fed, cache, token, out, done = state  # fed: cache slots written
    if slides:
      full = fed == context
      cache = jax.lax.cond(full, lambda: rebuild(out, i), lambda: cache)
      fed = jnp.where(full, keep, fed)
    logits, cache = step_fn(cache, token[:, None])
    forced = jax.lax.dynamic_index_in_dim(prompt, i, axis=1, keepdims=False)
    keys = jax.vmap(lambda key: jax.random.fold_in(key, i))(rng)
    chosen = jnp.where(forced > 0, forced, pick(logits, keys))
    chosen = jnp.where(done, 0, chosen)
    out = jax.lax.dynamic_update_index_in_dim(out, chosen, i, axis=1)
    generated = forced == 0
    done = done | (generated & ((chosen == eos_id) | (chosen == stop_id))) | (i + 1 >= limits)
    return i + 1, fed + 1, cache, chosen, out, done

  state = (jnp.array(0), jnp.array(0), cache, jnp.zeros((batch_size,), jnp.int32),
           jnp.zeros((batch_size, max_length), jnp.int32),
           jnp.zeros((batch_size,), bool))
  return jax.lax.while_loop(cond, body, state)[4]


def window_start(i: int, context: int, keep: int) -> int:
  """The first token position that position i sees in `generate` with a sliding window:
  0 while the context holds them all; then the window restarts every `context - keep`
  positions, from the `keep` tokens before it (with the start token, at most `context`
  positions)."""
  if i < context:
    return 0
  period = context - keep
  return (i - keep) // period * period


def expand_to_beams(x: Array, beam_size: int) -> Array:
  """Repeats each row `beam_size` times in a row: `[batch, ...]` -> `[batch * beam_size, ...]`.

  Row `b * beam_size + k` is beam k of example b: the layout `beam_search` expects of its
  cache and of whatever per-example input its step function reads (e.g. the encoding).
  """
  return jnp.repeat(x, beam_size, axis=0)


def length_penalty(length, alpha: float) -> Array:
  """The GNMT length penalty `((5 + length) / 6) ** alpha` (Wu et al. 2016); 1 for alpha 0.

  Hypotheses are ranked by sum(log-probs) / length_penalty: alpha > 0 offsets the plain
  sum's preference for short outputs.
  """
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def _take_beams(x: Array, beams: Array) -> Array:
  """`x[b, beams[b]]` for each example: `[batch, n, ...]`, `[batch, k]` -> `[batch, k, ...]`."""
  return jax.vmap(lambda rows, index: rows[index])(x, beams)


def _searching(i, alive_log_probs: Array, finished_scores: Array, alpha: float) -> Array:
  """Whether some example of a beam search may still improve. An example is done once its
  finished set is full and its best alive hypothesis, scored at its current length, is no
  better than the worst finished one (the usual heuristic; it makes beam size 1 exactly
  greedy), or once nothing is alive. Both sets are sorted best first."""
  full = jnp.isfinite(finished_scores[:, -1])
  best_alive = alive_log_probs[:, 0] / length_penalty(i, alpha)
  done = full & (best_alive <= finished_scores[:, -1])
  return ~jnp.all(done | ~jnp.isfinite(alive_log_probs[:, 0]))


def _next_log_probs(logits: Array, i, max_lengths: Array, eos_id: int) -> Array:
  """Log-probabilities `[batch, beam, vocab]` of the tokens at position `i`, -inf where a
  token may not go: padding never, and at an example's last position only EOS, at its own
  probability (a forced end is not made free). Disallowed candidates are impossible, not
  merely unlikely: with a small vocabulary they would otherwise fill the beam."""
  token_ids = jnp.arange(logits.shape[-1])
  # Padding is never a prediction, so the distribution is over the other tokens.
  log_probs = jax.nn.log_softmax(
      jnp.where(token_ids > 0, logits.astype(jnp.float32), MASK_VALUE), axis=-1)
  allowed = (token_ids > 0) & ((i != max_lengths - 1)[:, None] | (token_ids == eos_id))
  return jnp.where(allowed[:, None, :], log_probs, -jnp.inf)


def beam_search(step_fn: StepFn, cache: Any, batch_size: int, beam_size: int,
                max_length: int, eos_id: int, alpha: float = 0.6,
                max_lengths: Optional[Array] = None) -> Tuple[Array, Array]:
  """Beam search ranked by sum(log-probs) / length_penalty, with early stopping.

  Each example keeps `beam_size` alive hypotheses (sums of log-probs) and its `beam_size`
  best finished ones (ended by EOS, scored with the length penalty). A step extends every
  alive hypothesis by every token and takes the best `2 * beam_size` candidates: at most
  `beam_size` of them end in EOS (one per parent), so `beam_size` go on; an EOS candidate
  finishes only when it ranks within the best `beam_size`. With beam size 1 this is
  exactly greedy decoding.

  Args:
    step_fn: one decoding step over `batch_size * beam_size` rows (see module docstring).
    cache: the initial cache for `batch_size * beam_size` rows laid out as `expand_to_beams`
      does. Leaves with a leading row axis follow their hypotheses from step to step;
      scalar leaves (cache index, position) are shared by all rows and left as they are.
    batch_size: number of examples.
    beam_size: hypotheses kept (and returned) per example.
    max_length: most tokens per hypothesis (the cache must hold at least this many).
    eos_id: the token that ends a hypothesis.
    alpha: length penalty exponent, >= 0 (0 ranks by the plain sum of log-probs).
    max_lengths: optional `[batch]` int32, >= 1: example b has at most `max_lengths[b]`
      tokens, EOS included, and position `max_lengths[b] - 1` can only be EOS. None caps
      every example at `max_length` without forcing EOS; an example that then finished
      nothing returns its unfinished hypotheses, scored at length `max_length`.

  Returns:
    tokens: `[batch, beam_size, max_length]` int32, best first, EOS included, 0 after it.
    scores: `[batch, beam_size]` float32, sum(log-probs) / length_penalty(length incl. EOS).
      Slots left empty (fewer than `beam_size` hypotheses finished within the search) score
      -inf and hold only 0s.
  """
  rows = batch_size * beam_size
  if max_lengths is None:
    max_lengths = jnp.full((batch_size,), max_length + 1, jnp.int32)  # EOS never forced

  def cond(state):
    i, _, _, alive_log_probs, _, finished_scores = state
    return (i < max_length) & _searching(i, alive_log_probs, finished_scores, alpha)

  def body(state):
    i, cache, alive_tokens, alive_log_probs, finished_tokens, finished_scores = state
    # Each row is fed its last token; 0 is the start symbol, as in shift_right.
    last = jnp.where(i > 0, alive_tokens[:, :, jnp.maximum(i - 1, 0)], 0)
    logits, cache = step_fn(cache, last.reshape(rows, 1))
    vocab = logits.shape[-1]
    log_probs = _next_log_probs(logits.reshape(batch_size, beam_size, vocab), i,
                                max_lengths, eos_id)

    candidates = (alive_log_probs[:, :, None] + log_probs).reshape(batch_size, -1)
    top_log_probs, top = jax.lax.top_k(candidates, 2 * beam_size)  # [batch, 2 * beam]
    parents, tokens = top // vocab, top % vocab
    top_tokens = _take_beams(alive_tokens, parents).at[:, :, i].set(tokens)
    ends = tokens == eos_id

    alive_log_probs, keep = jax.lax.top_k(jnp.where(ends, -jnp.inf, top_log_probs), beam_size)
    alive_tokens = _take_beams(top_tokens, keep)
    source_rows = jnp.arange(batch_size)[:, None] * beam_size + _take_beams(parents, keep)
    cache = jax.tree.map(lambda x: x if x.ndim == 0 else x[source_rows.reshape(rows)], cache)

    # Only a candidate that ranks within the beam may finish: an EOS that is merely the
    # 5th-best continuation of a beam-4 search is not a hypothesis the beam would keep.
    finishes = ends & (jnp.arange(2 * beam_size) < beam_size)[None, :]
    new_scores = jnp.where(finishes, top_log_probs / length_penalty(i + 1, alpha), -jnp.inf)
    finished_scores, keep = jax.lax.top_k(
        jnp.concatenate([finished_scores, new_scores], axis=1), beam_size)
    finished_tokens = _take_beams(jnp.concatenate([finished_tokens, top_tokens], axis=1), keep)
    return i + 1, cache, alive_tokens, alive_log_probs, finished_tokens, finished_scores

  no_tokens = jnp.zeros((batch_size, beam_size, max_length), jnp.int32)
  # One real hypothesis (the empty one) per example; copies of it would fill the beam.
  alive_log_probs = jnp.full((batch_size, beam_size), -jnp.inf).at[:, 0].set(0.0)
  finished_scores = jnp.full((batch_size, beam_size), -jnp.inf)
  state = (jnp.array(0, jnp.int32), cache, no_tokens, alive_log_probs, no_tokens,
           finished_scores)
  return _results(*jax.lax.while_loop(cond, body, state), alpha)


def _results(i, cache, alive_tokens, alive_log_probs, finished_tokens, finished_scores,
             alpha: float) -> Tuple[Array, Array]:
  """(tokens, scores) of a finished beam search: the finished hypotheses, or the alive ones
  of an example that finished none (it ran to max_length: i == max_length)."""
  del cache
  any_finished = jnp.isfinite(finished_scores[:, :1])  # [batch, 1]
  tokens = jnp.where(any_finished[..., None], finished_tokens, alive_tokens)
  scores = jnp.where(any_finished, finished_scores, alive_log_probs / length_penalty(i, alpha))
  tokens = jnp.where(jnp.isfinite(scores)[..., None], tokens, 0)  # empty slots hold leftovers
  return tokens, scores
