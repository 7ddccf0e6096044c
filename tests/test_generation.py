"""Language modelling on real text, end to end: the sampling filters (top-k, top-p), the
picker (greedy, temperature, never padding) and the generation loop (prompts kept, rows
ended by EOS, a stop token or a length limit); cached generation equal to recomputing the
whole prefix; perplexity and bits per character over every token of the held-out split; a
tiny character-level run on a memorised poem read from a local text file, then generated
from, evaluated and driven through the command line; bad prompts, sampling settings and
data refused in one line; and the shipped generation configs."""

import glob
import json
import math
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

import modes
import tasks
import train
from configs import default
from configs import generation as generation_configs
from configs import presets
from input_pipeline import batching, tokenizers
from models import decoding
from training import optimizers, steps
from tests.cli_helpers import assert_one_error_line, run_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_DEVICE = jax.local_devices()[:1]

# Every character follows from the ~15 before it, so a tiny model memorises the text and
# greedy generation from a prompt must reproduce it.
POEM = ("twinkle twinkle little star\n"
        "how i wonder what you are\n"
        "up above the world so high\n"
        "like a diamond in the sky\n")
TEXT = POEM * 40  # 4.3 KB: the last 10% (428 characters) is held out as validation

# The tiny run ({group: {field: value}}): every field here is also passed to the command
# line as --config.<group>.<field>.
TINY = dict(
    data=dict(dataset="files", file_splits="train=train.txt", validation_fraction=0.1,
              max_target_length=32),
    model=dict(tokenizer="chars", vocab_size=128, d_model=32, d_ff=64, num_heads=2,
               num_decoder_layers=2, num_encoder_layers=0),
    train=dict(batch_size=16, num_train_steps=300, log_every_steps=50,
               checkpoint_every_steps=150),
    eval=dict(eval_batch_size=16, eval_every_steps=150, num_decode_batches=1,
              num_print_examples=1),
    optim=dict(learning_rate=5e-3, warmup_steps=20),
    decode=dict(eval_prompt_length=8, max_new_tokens=16))


def write_text(directory, text=TEXT, name="train.txt"):
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
    f.write(text)
  return str(directory)


def tiny_config(data_dir, tfds_dir, **overrides):
  """TINY on the text in `data_dir`; `overrides` are grouped like TINY:
  `tiny_config(d, t, train=dict(num_train_steps=14))`."""
  c = default.get_config("task=generation")
  presets.update_groups(c, TINY)
  presets.update_groups(c, dict(data=dict(data_dir=str(data_dir),
                                          tfds_data_dir=str(tfds_dir))))
  presets.update_groups(c, overrides)
  return c


def with_fields(config, **overrides):
  """A copy of `config` with some fields changed; `overrides` are grouped:
  `with_fields(config, decode=dict(greedy=True))`."""
  c = config.copy_and_resolve_references()
  presets.update_groups(c, overrides)
  return c


def cli_flags(config, workdir):
  """The command-line flags that give `config` (built by tiny_config) in main.py."""
  fields = {(group, field) for group, values in TINY.items() for field in values}
  fields |= {("data", "data_dir"), ("data", "tfds_data_dir")}
  return ["--config=configs/default.py:task=generation", f"--workdir={workdir}",
          *(f"--config.{g}.{k}={config[g][k]}" for g, k in sorted(fields))]


def snapshot(directory):
  """{path: (size, mtime)} of every file under `directory`."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      stat = os.stat(path)
      out[path] = (stat.st_size, stat.st_mtime_ns)
  return out


def tensorboard_scalars(workdir):
  """{(tag, step): value} of the scalars in <workdir>/tensorboard (TFRecord framing:
  length (8 bytes), crc (4), data, crc (4))."""
  found = {}
  for path in glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*")):
    with open(path, "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        if value.HasField("simple_value"):
          found[(value.tag, event.step)] = value.simple_value
  return found


# ----------------------------------------------------------------------------- filters


# Probabilities 0.5, 0.2, 0.15, 0.1, 0.05 at shuffled ids; ranked ids: 1, 3, 4, 0, 2.
PROBS = np.array([0.1, 0.5, 0.05, 0.2, 0.15])
LOGITS = jnp.log(jnp.asarray(PROBS, jnp.float32))


def kept(mask):
  return set(np.flatnonzero(np.asarray(mask)).tolist())


@pytest.mark.parametrize("p, ids", [
    (0.6, {1, 3}), (0.7, {1, 3}), (0.71, {1, 3, 4}), (0.9, {1, 3, 4, 0}),
    (1.0, {0, 1, 2, 3, 4}), (1e-6, {1}), (0.5, {1}), (0.50001, {1, 3})])
def test_top_p_keeps_the_smallest_most_likely_set_reaching_p(p, ids):
  assert kept(decoding.top_p_mask(LOGITS, p)) == ids
  # Row by row in a batch, and unchanged by a shift of the logits (same distribution).
  batch = jnp.stack([LOGITS, LOGITS[::-1] + 3.0])
  mask = np.asarray(decoding.top_p_mask(batch, p))
  assert kept(mask[0]) == ids
  assert kept(mask[1]) == {4 - i for i in ids}


@pytest.mark.parametrize("k, ids", [(1, {1}), (2, {1, 3}), (3, {1, 3, 4}), (0, {0, 1, 2, 3, 4}),
                                    (5, {0, 1, 2, 3, 4}), (9, {0, 1, 2, 3, 4})])
def test_top_k_keeps_the_k_largest_logits(k, ids):
  assert kept(decoding.top_k_mask(LOGITS, k)) == ids
  mask = np.asarray(decoding.top_k_mask(jnp.stack([LOGITS, -LOGITS]), k))
  assert kept(mask[0]) == ids
  expected_reversed = set(np.argsort(PROBS)[:k].tolist()) if 0 < k < 5 else ids
  assert kept(mask[1]) == expected_reversed


# ----------------------------------------------------------------------------- picker


def draws(pick, logits, n, seed=0):
  """`n` picks from the single row `logits`, each with its own key: `[n]` ids."""
  keys = jax.random.split(jax.random.PRNGKey(seed), n)
  return np.asarray(jax.jit(jax.vmap(lambda key: pick(logits[None], key)[0]))(keys))


def test_greedy_picks_the_argmax_other_than_padding():
  logits = jax.random.normal(jax.random.PRNGKey(0), (16, 9)) * 3.0
  logits = logits.at[::2, 0].set(100.0)  # padding is the most likely id in half the rows
  picked = np.asarray(decoding.sampling_picker(greedy=True)(logits, jax.random.PRNGKey(1)))
  np.testing.assert_array_equal(picked, np.argmax(np.asarray(logits)[:, 1:], axis=-1) + 1)
  # Greedy ignores the sampling knobs; top_k=1 sampling is greedy too.
  for pick in (decoding.sampling_picker(temperature=0.0, greedy=True),
               decoding.sampling_picker(temperature=5.0, top_k=1)):
    np.testing.assert_array_equal(np.asarray(pick(logits, jax.random.PRNGKey(2))), picked)


def test_sampling_never_picks_padding_or_a_filtered_token():
  # Padding is the most likely id by far; the filters count only the others.
  logits = jnp.concatenate([jnp.array([20.0]), LOGITS])  # ids 1..5 hold PROBS
  for pick, allowed in ((decoding.sampling_picker(), {1, 2, 3, 4, 5}),
                        (decoding.sampling_picker(top_k=2), {2, 4}),
                        (decoding.sampling_picker(top_p=0.71), {2, 4, 5}),
                        (decoding.sampling_picker(top_k=3, top_p=0.6), {2, 4}),
                        (decoding.sampling_picker(temperature=10.0, top_k=3), {2, 4, 5}),
                        # top-p applies to the tempered distribution (0.5 -> ~1 at 0.1)
                        (decoding.sampling_picker(temperature=0.1, top_p=0.6), {2})):
    picked = draws(pick, logits, 2000)
    assert set(picked.tolist()) == allowed  # nothing else, and every kept id can occur


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.5, 1.0), (2.0, 1.0),
                                                (1.0, 0.71)])
def test_sampling_frequencies_follow_the_softmax_at_the_temperature(temperature, top_p):
  logits = jnp.concatenate([jnp.array([3.0]), LOGITS])  # id 0 (padding) is never drawn
  pick = decoding.sampling_picker(temperature=temperature, top_p=top_p)
  picked = draws(pick, logits, 20000, seed=3)
  expected = np.asarray(jax.nn.softmax(LOGITS / temperature), np.float64)
  if top_p < 1:  # 0.5 + 0.2 + 0.15, renormalised
    expected = np.where(PROBS >= 0.15, expected, 0.0) / np.sum(PROBS[PROBS >= 0.15])
  frequencies = np.bincount(picked, minlength=6) / len(picked)
  assert frequencies[0] == 0
  np.testing.assert_allclose(frequencies[1:], expected, atol=0.015)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=0.0), "temperature > 0"), (dict(temperature=-1.0), "temperature > 0"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=-0.1), "top_p")])
def test_picker_refuses_bad_settings(kwargs, message):
  with pytest.raises(ValueError, match=message):
    decoding.sampling_picker(**kwargs)


# ----------------------------------------------------------------------------- the loop


VOCAB = 12


def counting_step(cache, tokens):
  """A fake model: after the token fed, t, it predicts t + 1 (1 after VOCAB - 1 and after
  the start token 0)."""
  token = tokens[:, 0]
  following = jnp.where(token == 0, 1, token % (VOCAB - 1) + 1)
  return jax.nn.one_hot(following, VOCAB) * 10.0, cache


def run_loop(prompt, eos_id=-5, length=10, **kwargs):
  """decoding.generate of counting_step after the prompts (lists); eos_id -5: no EOS."""
  padded = np.zeros((len(prompt), length), np.int32)
  for r, row in enumerate(prompt):
    padded[r, :len(row)] = row
  return np.asarray(decoding.generate(counting_step, 0, len(prompt), length, eos_id,
                                      prompt=jnp.asarray(padded), **kwargs)).tolist()


def test_generate_keeps_the_prompt_and_continues_from_its_last_token():
  out = run_loop([[], [7], [4, 9, 2]])
  assert out == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
                 [7, 8, 9, 10, 11, 1, 2, 3, 4, 5],
                 [4, 9, 2, 3, 4, 5, 6, 7, 8, 9]]


def test_generate_threads_the_cache_through_the_steps():
  def position_step(cache, tokens):
    """Predicts the (1-based) number of the position it fills, from the cache alone."""
    del tokens
    return jax.nn.one_hot(jnp.full((2,), cache + 1), VOCAB) * 10.0, cache + 1

  out = decoding.generate(position_step, 0, 2, 6, -5, prompt=jnp.array(
      [[5, 5, 0, 0, 0, 0], [0] * 6], jnp.int32))
  assert np.asarray(out).tolist() == [[5, 5, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]]


def test_generate_ends_rows_at_eos_stop_id_and_limits():
  # EOS (6) ends a generated row and is kept, zeros after; rows end independently.
  assert run_loop([[], [8], [5]], eos_id=6) == [
      [1, 2, 3, 4, 5, 6, 0, 0, 0, 0],
      [8, 9, 10, 11, 1, 2, 3, 4, 5, 6],
      [5, 6, 0, 0, 0, 0, 0, 0, 0, 0]]
  # An EOS written in the prompt is the user's text, not the end of the row.
  assert run_loop([[6, 6]], eos_id=6)[0] == [6, 6, 7, 8, 9, 10, 11, 1, 2, 3]
  # stop_id ends a row like EOS does.
  assert run_loop([[], [9]], eos_id=100, stop_id=3) == [
      [1, 2, 3, 0, 0, 0, 0, 0, 0, 0],
      [9, 10, 11, 1, 2, 3, 0, 0, 0, 0]]
  # limits[b]: row b fills at most that many positions, prompt included.
  assert run_loop([[], [4, 5], [7]], limits=jnp.array([3, 5, 10])) == [
      [1, 2, 3, 0, 0, 0, 0, 0, 0, 0],
      [4, 5, 6, 7, 8, 0, 0, 0, 0, 0],
      [7, 8, 9, 10, 11, 1, 2, 3, 4, 5]]


def sliding_starts(length, context, keep):
  """The first position each position sees, worked out step by step (the oracle of
  decoding.window_start): a window may hold context - 1 tokens after the start token;
  when the next one would not fit, it keeps its last `keep`."""
  starts, start = [], 0
  for i in range(length):
    if i - start == context:
      start = i - keep
    starts.append(start)
  return starts


def window_sum_step(context):
  """A fake model that predicts 1 + (the sum of the tokens in its cache) mod (VOCAB - 1):
  its prediction depends on exactly which tokens the cache holds. The cache is the
  `[batch, context]` tokens fed and how many; a write past the end would be lost."""
  def step(cache, tokens):
    fed, count = cache
    fed = jax.lax.dynamic_update_index_in_dim(fed, tokens[:, 0], count, axis=1)
    following = jnp.sum(fed, axis=1) % (VOCAB - 1) + 1
    return jax.nn.one_hot(following, VOCAB) * 10.0, (fed, count + 1)
  return step


@pytest.mark.parametrize("context, keep, length", [(6, 3, 20), (5, 1, 13), (5, 4, 16),
                                                   (8, 4, 8)])
def test_generate_slides_its_window_past_the_context(context, keep, length):
  prompt = np.zeros((3, length), np.int32)
  prompt[1, :2] = [4, 9]
  prompt[2, :4] = [3, 3, 7, 2]
  empty = (jnp.zeros((3, context), jnp.int32), jnp.array(0))
  out = np.asarray(decoding.generate(window_sum_step(context), empty, 3, length, -5,
                                     prompt=jnp.asarray(prompt), context=context,
                                     keep=keep))
  starts = sliding_starts(length, context, keep)
  assert [decoding.window_start(i, context, keep) for i in range(length)] == starts
  # The reference: each position from the sum of the tokens of its window, from scratch.
  expected = prompt.copy()
  for i in range(length):
    for r in range(3):
      if not prompt[r, i]:
        expected[r, i] = expected[r, starts[i]:i].sum() % (VOCAB - 1) + 1
  np.testing.assert_array_equal(out, expected)


def test_generate_refuses_a_window_that_keeps_nothing_or_everything():
  for keep in (0, 6):
    with pytest.raises(ValueError, match="keeps 1 to 5 tokens"):
      decoding.generate(counting_step, 0, 1, 10, -5, context=6, keep=keep)


# ----------------------------------------------------------------------------- the task


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """The poem as a local text file, and a tfds directory to prepare it in (shared)."""
  root = tmp_path_factory.mktemp("generation")
  return write_text(root / "text"), str(root / "tfds")


@pytest.fixture(scope="module")
def random_model(corpus, tmp_path_factory):
  """(task, random params) of the tiny character-level model on the poem."""
  task = tasks.get_task(tiny_config(*corpus), str(tmp_path_factory.mktemp("random")))
  return task, task.init_params(jax.random.PRNGKey(0))


def prompts_of(task, lengths, length=32):
  """`[len(lengths), length]` left-aligned, zero-padded prompts: row r holds `lengths[r]`
  characters of the poem, starting at a different place in each row."""
  prompt = np.zeros((len(lengths), length), np.int32)
  for r, n in enumerate(lengths):
    prompt[r, :n] = task.data.tokenizer.encode(POEM[9 * r:9 * r + n])
  return prompt


def without_eos(pick):
  """`pick` that never chooses EOS, so every row is generated to its full length."""
  return lambda logits, rng: pick(logits.at[:, tokenizers.EOS_ID].set(-1e9), rng)


def generations(task, params, prompt, picker, seeds=(0,)):
  """{(cached, seed): tokens} of task.generate for both cache settings."""
  out = {}
  for cached in (True, False):
    run = jax.jit(lambda p, x, r, cached=cached: task.generate(p, x, r, cached=cached,
                                                                picker=picker))
    for seed in seeds:
      out[cached, seed] = np.asarray(run(params, prompt, jax.random.PRNGKey(seed)))
  return out


def assert_prompts_kept_and_rows_filled(tokens, prompt):
  real = prompt > 0
  np.testing.assert_array_equal(tokens[real], prompt[real])
  assert np.all(tokens > 0)  # without EOS, every position after the prompt is generated


def test_cached_generation_equals_recomputing_the_prefix_greedy(random_model):
  task, params = random_model
  prompt = prompts_of(task, (0, 1, 5, 12, 31))
  out = generations(task, params, prompt, without_eos(decoding.sampling_picker(greedy=True)))
  assert_prompts_kept_and_rows_filled(out[True, 0], prompt)
  np.testing.assert_array_equal(out[True, 0], out[False, 0])


def test_cached_sampling_equals_recomputing_and_follows_the_seed(random_model):
  task, params = random_model
  prompt = prompts_of(task, (0, 3, 3, 12))
  prompt[2] = prompt[1]  # two rows with the same prompt get different samples
  out = generations(task, params, prompt, without_eos(decoding.sampling_picker()),
                    seeds=(0, 1))
  assert_prompts_kept_and_rows_filled(out[True, 0], prompt)
  np.testing.assert_array_equal(out[True, 0], out[False, 0])
  np.testing.assert_array_equal(out[True, 1], out[False, 1])
  assert not np.array_equal(out[True, 1][1], out[True, 1][2])
  # A different seed gives different text in every row (each has >= 20 sampled tokens).
  assert all(not np.array_equal(a, b) for a, b in zip(out[True, 0], out[True, 1]))
  run = jax.jit(lambda p, x, r: task.generate(p, x, r, picker=without_eos(
      decoding.sampling_picker())))
  np.testing.assert_array_equal(run(params, prompt, jax.random.PRNGKey(0)), out[True, 0])


def cropped_window_reference(task, params, prompt, picker, rng, keep):
  """Generation past the context without the cache or decoding.generate: each position
  is picked from the logits of a fresh full forward pass over its cropped window (the
  tokens from `sliding_starts` on, then filler 1s that causality hides), with the key
  decoding.generate gives position i of row b."""
  rows, length = prompt.shape
  context = task.config.data.max_target_length
  forward = jax.jit(lambda p, x: task.model.apply({"params": p}, x))
  out = np.array(prompt)
  for i, start in enumerate(sliding_starts(length, context, keep)):
    window = np.ones((rows, context), np.int32)
    window[:, :i - start] = out[:, start:i]
    logits = forward(params, window)[:, i - start]
    keys = jnp.stack([jax.random.fold_in(jax.random.fold_in(rng, b), i)
                      for b in range(rows)])
    picked = np.asarray(picker(logits, keys))
    out[:, i] = np.where(prompt[:, i] > 0, prompt[:, i], picked)
  return out


@pytest.mark.parametrize("greedy", [True, False])
def test_generation_past_the_context_equals_recomputing_the_cropped_window(random_model,
                                                                           greedy):
  task, params = random_model
  context = task.config.data.max_target_length  # 32 (float32 compute)
  length = 3 * context + 5  # five slides of the 32-token window, keeping 16
  prompt = prompts_of(task, (0, 4, 20), length=length)
  picker = without_eos(decoding.sampling_picker(greedy=greedy))
  rng = jax.random.PRNGKey(3)
  cached = jax.jit(lambda p, x, r: task.generate(p, x, r, picker=picker))(params, prompt, rng)
  reference = cropped_window_reference(task, params, prompt, picker, rng, context // 2)
  assert_prompts_kept_and_rows_filled(np.asarray(cached), prompt)
  np.testing.assert_array_equal(cached, reference)
  uncached = jax.jit(lambda p, x, r: task.generate(p, x, r, cached=False, picker=picker))
  np.testing.assert_array_equal(uncached(params, prompt, rng), reference)


def test_perplexity_is_exp_of_the_mean_token_loss_over_the_whole_split(random_model):
  task, params = random_model
  cut = int(len(TEXT) * 0.9)
  assert task.data.documents("train") == [TEXT[:cut]]  # the last 10% is held out, as nanoGPT
  assert task.data.documents("validation") == [TEXT[cut:]]
  stream = task.data.stream("validation")
  assert len(stream) == len(TEXT) - cut + 1  # + the document's EOS

  # Direct: every window of the split through the model, NLL of every token.
  windows = [w["inputs"] for w in task.data_source("eval")]
  np.testing.assert_array_equal(np.concatenate(windows), stream)  # no gap, no overlap
  apply = jax.jit(lambda p, x: task.model.apply({"params": p}, x))
  nll = 0.0
  for tokens in windows:
    logits = np.asarray(apply(params, tokens[None])[0], np.float64)
    log_probs = logits - np.log(np.sum(np.exp(logits), axis=-1, keepdims=True))
    nll -= np.sum(log_probs[np.arange(len(tokens)), tokens])
  mean_nll = nll / len(stream)

  # Through train.evaluate on 4 devices, 2 rows each (the last batch partly empty).
  devices = jax.local_devices()[:4]
  tx = optimizers.make_optimizer(task.config)
  _, p_eval, p_predict = steps.compile_steps(task, tx, task.config, devices)
  dataset = task.eval_dataset("eval", 8, len(devices))
  replicated = steps.replicate(params, devices)
  metrics, _, _ = train.evaluate(task, p_eval, p_predict, replicated, dataset,
                                 decode_batches=0)
  sums = [jax.tree.map(lambda x: float(x[0]), p_eval(replicated, b))
          for b in batching.iterate(dataset)]
  assert len(sums) == 2 and len(windows) < 16
  assert sum(s["weight"] for s in sums) == len(stream)
  assert sum(s["characters"] for s in sums) == len(stream)  # one character a token
  assert 2.0 < mean_nll < 5.0  # a random model: about log(vocab)
  assert metrics["loss"] == pytest.approx(mean_nll, rel=1e-5)
  assert metrics["perplexity"] == pytest.approx(math.exp(mean_nll), rel=1e-5)
  assert metrics["bits_per_char"] == pytest.approx(mean_nll / math.log(2), rel=1e-5)
  assert metrics["bits_per_token"] == pytest.approx(mean_nll / math.log(2), rel=1e-5)


# ----------------------------------------------------------------------------- one tiny run


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
  """One tiny run on the poem (300 steps, evaluations and checkpoints at 150 and 300),
  shared by the tests of generation, eval mode and the command line."""
  config = tiny_config(*corpus)
  workdir = str(tmp_path_factory.mktemp("lm") / "run")
  metrics = train.train_and_evaluate(config, workdir, devices=ONE_DEVICE)
  return {"config": config, "workdir": workdir, "metrics": metrics}


def test_tiny_run_memorises_the_poem(trained):
  metrics, workdir = trained["metrics"], trained["workdir"]
  vocab = 3 + len(set(TEXT))
  assert {"loss", "accuracy", "perplexity", "bits_per_char", "bits_per_token"} <= set(metrics)
  assert metrics["loss"] < 0.1 * math.log(vocab), metrics
  assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]), rel=1e-6)
  assert metrics["bits_per_char"] == pytest.approx(metrics["loss"] / math.log(2), rel=1e-6)
  with open(os.path.join(workdir, "tokenizer.json"), encoding="utf-8") as f:
    assert json.load(f)["characters"] == sorted(set(TEXT))
  scalars = tensorboard_scalars(workdir)
  assert scalars[("final/perplexity", 300)] == pytest.approx(metrics["perplexity"], rel=1e-5)
  assert ("eval/bits_per_char", 150) in scalars
  losses = [scalars[("train/loss", s)] for s in range(50, 301, 50)]
  assert losses[-1] < losses[0] / 5, losses


def generate(trained, prompts, eval_batch_size=None, **decode):
  """Samples with the trained run's config, its `config.decode` fields set from `decode`
  (and `config.eval.eval_batch_size` from `eval_batch_size` when given)."""
  fields = dict(decode=decode)
  if eval_batch_size is not None:
    fields["eval"] = dict(eval_batch_size=eval_batch_size)
  return modes.generate_text(with_fields(trained["config"], **fields), trained["workdir"],
                             prompts)


def test_generate_text_samples_follow_the_seed(trained):
  # Empty and "twinkle " prompts are ambiguous for the model, so samples vary with the seed.
  prompts = ["", "twinkle ", "how i wonder"]
  first = generate(trained, prompts, num_samples=3, temperature=1.0, max_new_tokens=12)
  assert [len(samples) for samples in first] == [3, 3, 3]
  for prompt, samples in zip(prompts, first):
    for text in samples:
      assert text.startswith(prompt) and len(text) <= len(prompt) + 12, (prompt, text)
  assert generate(trained, prompts, num_samples=3, temperature=1.0, max_new_tokens=12) == first
  other = generate(trained, prompts, num_samples=3, temperature=1.0, max_new_tokens=12,
                   sample_seed=1)
  assert other != first
  # Each (prompt, sample) has its own key: a prompt's samples do not change with the other
  # prompts of the call or with the batching.
  alone = generate(trained, ["twinkle "], num_samples=3, temperature=1.0, max_new_tokens=12)
  assert alone == [first[1]]
  one_row_batches = generate(trained, prompts, num_samples=3, temperature=1.0,
                             max_new_tokens=12, eval_batch_size=1)
  assert one_row_batches == first


def test_greedy_generation_continues_the_memorised_text(trained):
  prompts = ["how i wonder", "up above the world", "like a"]
  texts = generate(trained, prompts, greedy=True, temperature=0.0, max_new_tokens=14)
  for prompt, (text,) in zip(prompts, texts):
    start = POEM.index(prompt)
    assert text == TEXT[start:start + len(prompt) + 14], (prompt, text)
  # Past the 32-character context the window slides, keeping 16 characters: enough for
  # the memorised text to go on. stop_text ends a sample after that character.
  long_prompt = TEXT[:31]  # the longest prompt the context takes
  (long,), (longer,) = generate(trained, [long_prompt, "twinkle twinkle"], greedy=True,
                                max_new_tokens=90)
  assert long == TEXT[:31 + 90]  # max_new_tokens new characters, past the context
  assert longer == TEXT[:15 + 90]
  (stopped,), = generate(trained, ["how i"], greedy=True, max_new_tokens=26, stop_text="\n")
  assert stopped == "how i wonder what you are\n"


def test_eval_mode_writes_the_perplexity_of_the_checkpoint(trained, capsys):
  metrics = modes.evaluate_checkpoint(trained["config"], trained["workdir"],
                                      devices=ONE_DEVICE)
  path = os.path.join(trained["workdir"], "eval", "validation-latest-step300.json")
  with open(path, encoding="utf-8") as f:
    report = json.load(f)
  assert report["step"] == 300 and report["split"] == "validation"
  # Language modelling writes no per-example records; the examples scored are the
  # validation text's windows: 428 characters and EOS in windows of 32 tokens.
  assert report["examples"] == math.ceil((428 + 1) / 32) == 14
  assert "predicted_examples" not in report
  assert "validation (latest checkpoint, step 300, 14 examples)" in capsys.readouterr().out
  assert report["metrics"] == pytest.approx(metrics)
  for name in ("perplexity", "bits_per_char", "loss"):  # the same params, the same split
    assert metrics[name] == pytest.approx(trained["metrics"][name], rel=1e-5)


# ----------------------------------------------------------------------------- command line


def test_main_generate_prints_each_sample_of_each_prompt(trained):
  config, workdir = trained["config"], trained["workdir"]
  prompts = ["how i", "twinkle "]
  result = run_main(*cli_flags(config, workdir), "--mode=generate", *(f"--prompt={p}"
                                                                     for p in prompts),
                    "--config.decode.num_samples=2", "--config.decode.max_new_tokens=10")
  assert result.returncode == 0, result.stderr[-3000:]
  samples = generate(trained, prompts, num_samples=2, max_new_tokens=10)
  assert result.stdout == "".join(f"--- prompt {i}, sample {j}\n{text}\n"
                                  for i, texts in enumerate(samples, 1)
                                  for j, text in enumerate(texts, 1))
  assert all(text.startswith(p) for p, texts in zip(prompts, samples) for text in texts)


def _character_outside_the_vocabulary(trained, data_dir):
  del data_dir
  return trained["workdir"], ["--mode=generate", "--prompt=Twinkle"], [
      "outside the character vocabulary", "'T' (U+0054)"]


def _prompt_filling_the_context(trained, data_dir):
  del data_dir  # 32 characters leave no room to generate (31 do; see the greedy test)
  return trained["workdir"], ["--mode=generate", "--prompt=how", f"--prompt={POEM[:32]}"], [
      "prompt 2 has 32 tokens", "context is 32 tokens (config.data.max_target_length)"]


def _zero_temperature_sampling(trained, data_dir):
  del data_dir
  return trained["workdir"], ["--mode=generate", "--prompt=how", "--config.decode.temperature=0"], [
      "config.decode.temperature=0", "sampling needs a number > 0", "greedy"]


def _top_p_above_one(trained, data_dir):
  del data_dir
  return trained["workdir"], ["--mode=generate", "--prompt=how", "--config.decode.top_p=1.5"], [
      "config.decode.top_p=1.5", "(0, 1]"]


def _empty_text_file(trained, data_dir):
  del trained
  write_text(data_dir, "")
  return None, [], [f"{os.path.join(data_dir, 'train.txt')}: the file is empty"]


def _missing_text_file(trained, data_dir):
  del trained
  return None, ["--config.data.file_splits=train=missing.txt"], [
      f"{os.path.join(data_dir, 'missing.txt')}: no such file"]


def _generate_on_synthetic_data(trained, data_dir):
  del trained, data_dir
  return None, ["--mode=generate", "--prompt=12", "--config.data.dataset=synthetic"], [
      "--mode=generate continues text", "config.data.dataset='synthetic'"]


@pytest.mark.parametrize("make", [_character_outside_the_vocabulary,
                                  _prompt_filling_the_context, _zero_temperature_sampling,
                                  _top_p_above_one, _empty_text_file, _missing_text_file,
                                  _generate_on_synthetic_data],
                         ids=lambda f: f.__name__[1:])
def test_main_refuses_bad_input_in_one_line_writing_nothing(trained, tmp_path, make):
  """Against the trained workdir (left exactly as it was) or a fresh one (not created),
  with a fresh data directory whose preparation must not have started."""
  data_dir = str(tmp_path / "text")
  write_text(data_dir)
  workdir, args, expected = make(trained, data_dir)
  workdir = workdir or str(tmp_path / "run")
  config = tiny_config(data_dir, tmp_path / "tfds")
  before = snapshot(workdir)
  result = run_main(*cli_flags(config, workdir), *args)
  assert_one_error_line(result, *expected)
  assert snapshot(workdir) == before
  # tfds may note its builder's config (.config/), but no data was prepared.
  assert [p for p in snapshot(tmp_path / "tfds") if "/.config/" not in p] == []


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("variant", [None, "dataset=tiny_shakespeare", "dataset=lm1b",
                                     "tokenizer=bytes", "tokenizer=sentencepiece",
                                     "size=small", "dataset=lm1b,size=small,accel=gpu",
                                     "recipe=fast", "recipe=gpu"])
def test_generation_configs_validate(variant):
  c = generation_configs.get_config(variant)
  train.validate(c)
  assert (c.task == "generation" and c.model.num_encoder_layers == 0
          and c.data.dataset != "synthetic")
  assert c.optim.label_smoothing == 0.0  # perplexity is of the real distribution


def test_default_generation_config_is_nanogpt_on_the_shared_shakespeare():
  c = generation_configs.get_config()
  assert os.path.normpath(c.data.data_dir) == os.path.normpath(
      os.path.join(REPO, "..", "shared", "data", "tinyshakespeare"))
  assert (c.data.dataset, c.data.file_splits, c.data.validation_fraction) == (
      "files", "train=input.txt", 0.1)
  assert (c.model.num_decoder_layers, c.model.num_heads, c.model.d_model,
          c.data.max_target_length) == (4, 4, 128, 64)
  assert (c.model.tokenizer, c.data.lm_batching, c.optim.dropout_rate) == (
      "chars", "windows", 0.0)


def test_generation_config_variants_change_what_they_name():
  assert generation_configs.get_config("tokenizer=bytes").model.vocab_size == 259
  lm1b = generation_configs.get_config("dataset=lm1b")
  assert (lm1b.data.dataset, lm1b.model.tokenizer, lm1b.data.eval_split) == (
      "lm1b", "sentencepiece", "test")
  assert lm1b.data.lm_batching == "documents" and lm1b.data.pack_examples
  assert (generation_configs.get_config("dataset=tiny_shakespeare").data.dataset
          == "tiny_shakespeare")
  small = generation_configs.get_config("size=small")
  assert (small.model.d_model == presets.SIZES["small"]["model"]["d_model"]
          and small.size == "small")
  assert generation_configs.get_config("accel=gpu").compute.dtype == "bfloat16"
  # nanoGPT's GPU recipe (config/train_shakespeare_char.py), on the gpu preset by default.
  gpu = generation_configs.get_config("recipe=gpu")
  assert (gpu.accel, gpu.compute.dtype, gpu.compute.cpu_devices) == ("gpu", "bfloat16", 0)
  assert (gpu.model.num_decoder_layers, gpu.model.num_heads, gpu.model.d_model,
          gpu.data.max_target_length, gpu.train.batch_size, gpu.train.num_train_steps) == (
              6, 6, 384, 256, 64, 5000)
  assert (gpu.optim.dropout_rate, gpu.optim.learning_rate, gpu.optim.adam_b2,
          gpu.optim.weight_decay) == (0.2, 1e-3, 0.99, 0.1)
  assert generation_configs.get_config("recipe=gpu,accel=cpu").compute.dtype == "float32"
  with pytest.raises(presets.VariantError, match="dataset='nope' is unknown"):
    generation_configs.get_config("dataset=nope")
