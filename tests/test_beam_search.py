"""Beam search: greedy at beam 1, exact scores, length penalty, length limits, cache moves."""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import decoding
from models.transformer import DecoderOnly, EncoderDecoder
from tests.model_fixtures import init_params, tiny_model_config

PAD, EOS, A, B = 0, 1, 2, 3  # the hand-built models' vocabulary
NO_EOS = -1  # never produced: every hypothesis runs to max_length

# Shapes shared with test_decoding.py.
SOURCE = jnp.array([[3, 4, 5, 6, 7, 8, 2, 9, 0], [9, 2, 2, 5, 0, 0, 0, 0, 0]])
TARGET = jnp.array([[5, 6, 7, 8, 9, 4], [1, 2, 3, 4, 4, 6]])
TOKENS = jnp.array([[3, 4, 5, 6, 7, 8], [9, 2, 2, 5, 1, 4]])  # decoder-only


def log_softmax_without_padding(logits):
  """The distribution beam search ranks by: padding excluded, the rest renormalised."""
  logits = np.asarray(logits, np.float64).copy()
  logits[..., PAD] = -np.inf
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def score(log_probs, tokens, alpha):
  """sum(log_probs[t, tokens[t]]) / length_penalty over the tokens up to EOS included.

  `log_probs` is `[length, vocab]`: position t's distribution given tokens < t.
  """
  length = int(np.sum(np.asarray(tokens) != PAD))
  total = sum(log_probs[t, tokens[t]] for t in range(length))
  return total / ((5 + length) / 6) ** alpha


# ----------------------------------------------------------------------------- hand-built steps


def position_table_step(probs):
  """A step whose next-token probabilities are `probs[position, previous token]`.

  `probs` is `[length, vocab, vocab]` with no zero but the padding column. The cache holds
  only the position: a scalar leaf that beam search must leave alone.
  """
  log_probs = jnp.log(jnp.asarray(probs, jnp.float32))

  def step_fn(cache, tokens):
    position = cache["position"]
    return log_probs[position, tokens[:, 0]], {"position": position + 1}
  return step_fn, {"position": jnp.int32(0)}


def uniform_table(length):
  """Probabilities `[length, 4, 4]`, uniform over EOS, A and B everywhere."""
  probs = np.full((length, 4, 4), 1 / 3)
  probs[..., PAD] = 0.0
  return probs


def table_log_probs(probs, tokens):
  """`[length, vocab]` log-probs of the position table model along `tokens[length]`."""
  log_probs = np.log(np.maximum(probs, 1e-30))
  return log_probs[np.arange(len(tokens)), np.r_[PAD, tokens[:-1]]]


def brute_force_ranking(probs, alpha):
  """Every hypothesis finished within the table's length (padded with 0s), best first."""
  length = probs.shape[0]
  finished = [np.array(body + (EOS,) + (PAD,) * (length - 1 - n)) for n in range(length)
              for body in itertools.product([A, B], repeat=n)]
  return sorted(finished, key=lambda h: -score(table_log_probs(probs, h), h, alpha))


def history_step(table):
  """A trigram model per example that reads all but the last token from the cache.

  Logits are `table[example, token before last, last token]` (`[batch, vocab, vocab,
  vocab]`). The cache keeps each row's example and history of fed tokens: both are right
  only if beam search moves every cache row with its hypothesis.
  """
  def step_fn(cache, tokens):
    position = cache["position"]
    history = cache["history"].at[:, position].set(tokens[:, 0])
    before = jnp.where(position > 0, history[:, jnp.maximum(position - 1, 0)], 0)
    logits = table[cache["example"], before, tokens[:, 0]]
    return logits, dict(cache, history=history, position=position + 1)
  return step_fn


def history_cache(batch, beam_size, length):
  return {"example": decoding.expand_to_beams(jnp.arange(batch), beam_size),
          "history": jnp.zeros((batch * beam_size, length), jnp.int32),
          "position": jnp.int32(0)}


def trigram_log_probs(table, example, tokens):
  """`[length, vocab]` log-probs of each position given the tokens before it."""
  padded = np.concatenate([[0, 0], np.asarray(tokens)])
  return np.stack([log_softmax_without_padding(table[example, padded[t], padded[t + 1]])
                   for t in range(len(tokens))])


def random_trigram(seed, batch=2, vocab=6, eos_logit=0.0):
  """Random logits with a tempting padding token (which must never be emitted)."""
  table = np.random.default_rng(seed).normal(scale=2.0, size=(batch, vocab, vocab, vocab))
  table[..., PAD] = 5.0
  table[..., EOS] += eos_logit
  return jnp.asarray(table, jnp.float32)


def assert_scores_match_model(tokens, scores, log_probs_fn, alpha):
  """Every returned hypothesis scores what the model gives its tokens; best first.

  `log_probs_fn(example, beam, tokens[length])` -> `[length, vocab]` (see `score`).
  """
  tokens, scores = np.asarray(tokens), np.asarray(scores)
  for b, k in np.ndindex(scores.shape):
    empty = not np.any(tokens[b, k])  # fewer hypotheses finished than the beam holds
    expected = -np.inf if empty else score(log_probs_fn(b, k, tokens[b, k]), tokens[b, k],
                                           alpha)
    np.testing.assert_allclose(scores[b, k], expected, rtol=1e-4, err_msg=f"({b}, {k})")
  assert np.all(scores[:, :-1] >= scores[:, 1:])


def assert_well_formed(tokens, limits):
  """No padding before the end, one EOS at most, only padding after it, within the limit;
  no hypothesis twice."""
  for b in range(tokens.shape[0]):
    hypotheses = [tuple(row) for row in tokens[b] if np.any(row)]
    assert len(set(hypotheses)) == len(hypotheses), tokens[b]
  for b, k in np.ndindex(tokens.shape[:2]):
    row = list(tokens[b, k])
    length = int(np.sum(tokens[b, k] != PAD))
    assert PAD not in row[:length] and not any(row[length:]), row
    assert EOS not in row[:length - 1] and length <= limits[b], row


# ----------------------------------------------------------------------------- small pieces


def test_expand_to_beams_repeats_each_example_consecutively():
  x = jnp.array([[1, 2], [3, 4]])
  np.testing.assert_array_equal(decoding.expand_to_beams(x, 3),
                                [[1, 2], [1, 2], [1, 2], [3, 4], [3, 4], [3, 4]])


def test_length_penalty_matches_gnmt_formula():
  np.testing.assert_allclose(decoding.length_penalty(10, 0.6), 2.5 ** 0.6, rtol=1e-6)
  np.testing.assert_allclose(decoding.length_penalty(jnp.array([1, 7, 25]), 1.0),
                             [1.0, 2.0, 5.0], rtol=1e-6)
  np.testing.assert_array_equal(decoding.length_penalty(jnp.arange(1, 9), 0.0), 1.0)


# ----------------------------------------------------------------------------- hand-built models


def test_beam_search_finds_what_greedy_misses_with_exact_score():
  """A is the likeliest first token but continues badly: B EOS (.4 * .9) beats A EOS (.5 *
  .4), which greedy returns."""
  probs = uniform_table(3)
  probs[0, PAD] = [0, .1, .5, .4]
  probs[1, A] = [0, .4, .35, .25]
  probs[1, B] = [0, .9, .05, .05]
  step_fn, cache = position_table_step(probs)
  greedy = decoding.greedy_decode(step_fn, cache, 1, 3, EOS)
  np.testing.assert_array_equal(greedy, [[A, EOS, 0]])

  tokens, scores = jax.jit(lambda c: decoding.beam_search(step_fn, c, 1, 2, 3, EOS))(cache)
  np.testing.assert_array_equal(tokens, [[[B, EOS, 0], [A, EOS, 0]]])
  penalty = (7 / 6) ** 0.6
  np.testing.assert_allclose(scores, [[np.log(.4 * .9) / penalty, np.log(.5 * .4) / penalty]],
                             rtol=1e-6)


def test_length_penalty_decides_between_short_and_long():
  """A EOS (.25) beats B B B EOS (.21) on the plain sum; alpha 0.6 favours the long one.
  Both agree with a brute-force ranking of every finished hypothesis."""
  probs = uniform_table(4)
  probs[0, PAD] = [0, .02, .5, .48]
  probs[1, A] = [0, .5, .3, .2]
  probs[1:3, B] = [0, .1, .2, .7]
  probs[3, B] = [0, .9, .05, .05]
  step_fn, cache = position_table_step(probs)
  search = jax.jit(lambda alpha: decoding.beam_search(step_fn, cache, 1, 2, 4, EOS, alpha))
  for alpha, winner in [(0.0, [A, EOS, 0, 0]), (0.6, [B, B, B, EOS])]:
    np.testing.assert_array_equal(brute_force_ranking(probs, alpha)[0], winner)
    tokens, scores = search(alpha)
    np.testing.assert_array_equal(tokens[0, 0], winner, err_msg=f"alpha {alpha}")
    assert_scores_match_model(tokens, scores, lambda b, k, t: table_log_probs(probs, t), alpha)


def test_beam_one_is_greedy_even_when_the_penalty_favours_a_longer_hypothesis():
  """Greedy takes A (.65) over EOS (.3) and goes on to A A A EOS. An EOS that ranks
  outside the beam never finishes, and a full beam stops the search, so beam 1 returns
  greedy's hypothesis at every alpha, although a lone EOS scores higher at alpha 0."""
  probs = uniform_table(4)
  probs[0, PAD] = [0, .3, .65, .05]
  probs[1:3, A] = [0, .2, .67, .13]
  probs[3, A] = [0, .95, .025, .025]
  step_fn, cache = position_table_step(probs)
  greedy = np.asarray(jax.jit(lambda: decoding.greedy_decode(step_fn, cache, 1, 4, EOS))())
  np.testing.assert_array_equal(greedy[0], [A, A, A, EOS])
  np.testing.assert_array_equal(brute_force_ranking(probs, 0.0)[0], [EOS, 0, 0, 0])
  search = jax.jit(lambda alpha: decoding.beam_search(step_fn, cache, 1, 1, 4, EOS, alpha))
  for alpha in (0.0, 0.6):
    tokens, scores = search(alpha)
    np.testing.assert_array_equal(tokens[0, 0], greedy[0], err_msg=f"alpha {alpha}")
    assert_scores_match_model(tokens, scores, lambda b, k, t: table_log_probs(probs, t), alpha)


def test_wide_beam_equals_exhaustive_search():
  """32 beams over A, B and EOS for 4 positions prune nothing (at most 24 candidates a
  step, all ranked within the beam): the result is all 15 finished hypotheses ranked as
  brute force ranks them, then empty slots (never a hypothesis through padding). Early
  stopping must not cut off a later, better hypothesis."""
  @jax.jit
  def search(probs, alpha):
    step_fn, cache = position_table_step(probs)
    return decoding.beam_search(step_fn, cache, 1, 32, 4, EOS, alpha)

  rng = np.random.default_rng(0)
  for alpha in [0.0, 0.6, 2.0]:
    for _ in range(3):
      probs = np.zeros((4, 4, 4))
      probs[..., 1:] = rng.dirichlet(np.ones(3), size=(4, 4))
      tokens, scores = search(probs, alpha)
      np.testing.assert_array_equal(tokens[0, :15], brute_force_ranking(probs, alpha))
      np.testing.assert_array_equal(tokens[0, 15:], 0)
      assert_scores_match_model(tokens, scores, lambda b, k, t: table_log_probs(probs, t),
                                alpha)


def test_max_lengths_force_eos_at_each_examples_limit():
  """EOS is unlikely, so the best hypotheses run to their example's limit and end there in
  EOS, scored at EOS's own probability (a forced end is not free: a hypothesis may still
  end earlier); the tempting padding token is never emitted."""
  table = random_trigram(0, eos_logit=-4.0)
  limits = jnp.array([2, 5], jnp.int32)
  tokens, scores = jax.jit(lambda cache: decoding.beam_search(
      history_step(table), cache, 2, 3, 6, EOS, max_lengths=limits))(history_cache(2, 3, 6))
  tokens = np.asarray(tokens)
  assert_well_formed(tokens, limits)
  lengths = np.sum(tokens != PAD, axis=-1)  # [batch, beam]
  assert np.all(tokens[np.arange(2)[:, None], np.arange(3), lengths - 1] == EOS)  # finished
  np.testing.assert_array_equal(lengths[:, 0], limits)
  assert_scores_match_model(tokens, scores, lambda b, k, t: trigram_log_probs(table, b, t), 0.6)


def test_unfinished_example_returns_its_alive_beams():
  """With no EOS ever produced, the beams come back unfinished, scored at full length."""
  table = random_trigram(1)
  tokens, scores = decoding.beam_search(history_step(table), history_cache(2, 2, 5), 2, 2, 5,
                                        NO_EOS)
  assert np.all(np.asarray(tokens) > 0)
  assert_scores_match_model(tokens, scores, lambda b, k, t: trigram_log_probs(table, b, t), 0.6)


def test_cache_rows_follow_their_hypotheses():
  """The trigram model reads its example and older token from the cache: if cache rows were
  not moved with the beams, a hypothesis would be scored on another's history."""
  table = random_trigram(2)
  tokens, scores = jax.jit(lambda cache: decoding.beam_search(
      history_step(table), cache, 2, 4, 6, EOS, alpha=1.0))(history_cache(2, 4, 6))
  tokens = np.asarray(tokens)
  assert_well_formed(tokens, [6, 6])
  assert_scores_match_model(tokens, scores, lambda b, k, t: trigram_log_probs(table, b, t), 1.0)


def test_pmap_over_examples_equals_one_device():
  """One example per device (its cache rows and limit) gives what the whole batch gives."""
  table = random_trigram(3)
  limits = jnp.array([3, 5], jnp.int32)

  def search(cache, limits):
    return decoding.beam_search(history_step(table), cache, limits.shape[0], 3, 5, EOS,
                                max_lengths=limits)
  cache = history_cache(2, 3, 5)
  tokens, scores = jax.jit(search)(cache, limits)
  # Each device gets its example's rows and its own copy of the scalar position.
  split_cache = jax.tree.map(lambda x: x.reshape(2, 3, *x.shape[1:]) if x.ndim
                             else jnp.stack([x, x]), cache)
  split_tokens, split_scores = jax.pmap(search)(split_cache, limits.reshape(2, 1))
  np.testing.assert_array_equal(split_tokens.reshape(tokens.shape), tokens)
  np.testing.assert_allclose(split_scores.reshape(scores.shape), scores, rtol=1e-6)


# ----------------------------------------------------------------------------- real models


@dataclasses.dataclass(frozen=True)
class ModelSearch:
  """A tiny model's cached step over `batch * beam_size` rows, and its full forward pass."""
  step_fn: object  # (cache, tokens[rows, 1]) -> (logits[rows, vocab], cache)
  cache: dict
  full_fn: object  # teacher-forced logits: targets [rows, length] -> [rows, length, vocab]


@functools.lru_cache(maxsize=None)
def model_search(family, beam_size):
  cfg = tiny_model_config()
  decode_cfg = dataclasses.replace(cfg, decode=True)
  if family == "encoder_decoder":
    model, decode_model = EncoderDecoder(cfg), EncoderDecoder(decode_cfg)
    params = init_params(model, SOURCE, TARGET)
    # Encode once per example, then give each beam its copy.
    encoded = decoding.expand_to_beams(
        model.apply({"params": params}, SOURCE, method=EncoderDecoder.encode), beam_size)
    source = decoding.expand_to_beams(SOURCE, beam_size)

    def apply_decode(cache, tokens):
      return decode_model.apply({"params": params, "cache": cache}, encoded, source, tokens,
                                method=EncoderDecoder.decode, mutable=["cache"])
    cache = decoding.init_cache(decode_model, source, decoding.expand_to_beams(TARGET,
                                                                               beam_size))
    full_fn = lambda y: model.apply({"params": params}, source, y)
  else:
    model, decode_model = DecoderOnly(cfg), DecoderOnly(decode_cfg)
    params = init_params(model, TOKENS)

    def apply_decode(cache, tokens):
      return decode_model.apply({"params": params, "cache": cache}, tokens, mutable=["cache"])
    cache = decoding.init_cache(decode_model, decoding.expand_to_beams(TOKENS, beam_size))
    full_fn = lambda y: model.apply({"params": params}, y)

  def step_fn(cache, tokens):
    logits, variables = apply_decode(cache, tokens)
    return logits[:, 0], variables["cache"]
  return ModelSearch(step_fn, cache, jax.jit(full_fn))


def model_log_probs(setup, tokens):
  """`[rows, length, vocab]` teacher-forced log-probs of `tokens[rows, length]`."""
  return log_softmax_without_padding(setup.full_fn(jnp.asarray(tokens)))


def model_scores(setup, tokens, alpha):
  """`[rows]` scores of `tokens[rows, length]` from the model's full forward pass."""
  return np.array([score(log_probs, t, alpha) for log_probs, t
                   in zip(model_log_probs(setup, tokens), np.asarray(tokens))])


@pytest.mark.parametrize("family", ["encoder_decoder", "decoder_only"])
def test_beam_size_one_equals_greedy(family):
  """On the real models' key/value caches, beam 1 returns greedy's tokens exactly, with
  and without EOS and length penalty, and scores them with the model's log-probs."""
  setup = model_search(family, 1)
  batch, length = TARGET.shape
  greedy = jax.jit(lambda eos: decoding.greedy_decode(setup.step_fn, setup.cache, batch,
                                                      length, eos))
  beam = jax.jit(lambda eos, alpha: decoding.beam_search(
      setup.step_fn, setup.cache, batch, 1, length, eos, alpha))
  free_run = greedy(NO_EOS)
  eos = int(free_run[0, 1])  # a token greedy emits early: some hypotheses end
  for end in (NO_EOS, eos):
    greedy_tokens = greedy(end)
    for alpha in (0.0, 0.6):
      tokens, scores = beam(end, alpha)
      np.testing.assert_array_equal(tokens[:, 0], greedy_tokens, err_msg=f"{end} {alpha}")
  tokens, scores = beam(eos, 0.6)
  assert np.any(np.asarray(tokens[:, 0]) == eos)
  np.testing.assert_allclose(scores[:, 0], model_scores(setup, tokens[:, 0], 0.6), rtol=1e-4)


def test_model_beam_scores_equal_full_forward_log_probs():
  """Beam 3 on the encoder-decoder's key/value cache: each hypothesis scores its
  teacher-forced log-probs, so cache rows (keys and values of every layer) followed it.
  (With these parameters no hypothesis ranks EOS within the beam, so the alive beams
  come back, scored at full length.)"""
  setup = model_search("encoder_decoder", 3)
  batch, length = TARGET.shape
  tokens, scores = jax.jit(lambda eos: decoding.beam_search(
      setup.step_fn, setup.cache, batch, 3, length, eos))(jnp.int32(14))
  tokens = np.asarray(tokens)
  assert_well_formed(tokens, [length] * batch)
  assert np.all(tokens > 0) and np.all(np.isfinite(scores))
  log_probs = model_log_probs(setup, tokens.reshape(-1, length)).reshape(batch, 3, length, -1)
  assert_scores_match_model(tokens, scores, lambda b, k, t: log_probs[b, k], 0.6)
