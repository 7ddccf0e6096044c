"""Masked-token pre-training of the classifier's encoder (config.objective="mlm") and its
use (config.init_encoder_from): BERT's masking statistics, a loss over the masked
positions alone, token dropout, a classifier that starts from the pre-trained encoder's
very arrays (and tokenizer) under a fresh head, and the errors of bad input."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import config_checks
import modes
import tasks
import train
from configs import classification as classification_config
from configs import presets
from input_pipeline import tokenizers
from tasks import masked_lm
from tests.test_classification import tiny_config, write_corpus
from tests.tiny_configs import tiny_config as tiny_digits_config

ONE_DEVICE = jax.local_devices()[:1]
VOCAB = 100


def _rows(seed=0, batch=256, length=64):
  """Random real ids with a random amount of padding at the end of each row."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(tokenizers.FIRST_ID, VOCAB, (batch, length))
  lengths = rng.integers(1, length + 1, batch)
  return jnp.asarray(np.where(np.arange(length) < lengths[:, None], ids, 0), jnp.int32)


def test_bert_masking_statistics():
  inputs = _rows()
  masked, weights = masked_lm.mask_tokens(jax.random.PRNGKey(0), inputs, 0.15, VOCAB)
  inputs, masked, chosen = np.asarray(inputs), np.asarray(masked), np.asarray(weights) > 0
  real = inputs > 0
  assert weights.dtype == jnp.float32 and not chosen[~real].any()
  assert abs(chosen.sum() / real.sum() - 0.15) < 0.01  # ~8000 real tokens
  # Positions that are not chosen keep their token (padding stays padding).
  np.testing.assert_array_equal(masked[~chosen], inputs[~chosen])
  made_mask = masked[chosen] == masked_lm.MASK_ID
  kept = masked[chosen] == inputs[chosen]
  replaced = ~made_mask & ~kept
  n = chosen.sum()
  assert abs(made_mask.sum() / n - 0.8) < 0.04
  # A random replacement may draw the token itself (1 in 97): "kept" is 0.1 + 0.1 / 97.
  assert abs(kept.sum() / n - 0.1) < 0.03 and abs(replaced.sum() / n - 0.1) < 0.03
  assert (masked[chosen][replaced] >= tokenizers.FIRST_ID).all()
  assert (masked < VOCAB).all()
  # Another key, another choice.
  _, other = masked_lm.mask_tokens(jax.random.PRNGKey(1), jnp.asarray(inputs), 0.15, VOCAB)
  assert not np.array_equal(np.asarray(other) > 0, chosen)


def test_token_dropout_masks_only_real_tokens():
  inputs = _rows(seed=1)
  dropped = np.asarray(masked_lm.drop_tokens(jax.random.PRNGKey(0), inputs, 0.3))
  inputs = np.asarray(inputs)
  changed = dropped != inputs
  assert (dropped[changed] == masked_lm.MASK_ID).all() and not changed[inputs == 0].any()
  assert abs(changed.sum() / (inputs > 0).sum() - 0.3) < 0.02


def _mlm_task(**model_fields):
  config = tiny_digits_config("classification")
  config.objective = "mlm"
  config.optim.mask_rate = 0.3
  config.model.update(model_fields)
  return config, tasks.get_task(config)


@pytest.mark.parametrize("embed_dim", [0, 6])
def test_the_mlm_loss_scores_the_masked_positions_only(embed_dim):
  """The loss (whose logits are projected at the masked positions only) equals the
  cross-entropy of the full model's logits summed over the masked positions; the gradient
  of a row with no masked token is zero. With embeddings narrower than d_model
  (model.embed_dim), the parameters hold the classifier's and the projection back to the
  embeddings' width."""
  config, task = _mlm_task(embed_dim=embed_dim)
  assert isinstance(task, tasks.MaskedLMTask)
  params = jax.jit(task.init_params)(jax.random.PRNGKey(0))  # op by op takes seconds
  assert ("token_proj" in params) == bool(embed_dim) and "head" in params
  inputs = _rows(seed=2, batch=8, length=config.data.max_input_length) % task.vocab_size
  inputs = jnp.where(inputs > 0, jnp.maximum(inputs, tokenizers.FIRST_ID), 0)
  batch = {"inputs": inputs, "label": jnp.zeros(8, jnp.int32)}
  sums = jax.jit(lambda p: task.loss(p, batch, None, train=False))(params)
  masked, targets, weights = jax.jit(lambda b: task.corrupt(b, None))(batch)
  logits = jax.jit(lambda p: task.model.apply({"params": p}, masked, token_logits=True))(params)
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
  assert float(sums["weight"]) == float(weights.sum()) > 0
  np.testing.assert_allclose(sums["loss"], jnp.sum(nll * weights), rtol=1e-5)
  # A row whose tokens are all padding but one that is not masked: no gradient at all.
  lone = {"inputs": jnp.zeros_like(inputs).at[:, 0].set(5), "label": batch["label"]}
  key = jax.random.PRNGKey(3)
  _, _, lone_weights = jax.jit(task.corrupt)(lone, jax.random.fold_in(key, 1))
  grads = jax.jit(jax.grad(lambda p: task.loss(p, lone, key, train=True)["loss"]))(params)
  rows_without_mask = float(jnp.sum(lone_weights)) == 0
  norm = float(jax.tree_util.tree_reduce(lambda a, x: a + jnp.sum(jnp.abs(x)), grads, 0.0))
  assert (norm == 0.0) == rows_without_mask


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """(corpus dir, tfds dir, workdir) of a 40-step masked-token run on labeled text."""
  root = tmp_path_factory.mktemp("mlm")
  write_corpus(root / "corpus")
  config = tiny_config(root / "corpus", root / "tfds",
                       train=dict(num_train_steps=40, checkpoint_every_steps=40),
                       eval=dict(eval_every_steps=20, best_metric=""))
  config.objective = "mlm"
  config.optim.mask_rate = 0.3
  workdir = str(root / "mlm")
  metrics = train.train_and_evaluate(config, workdir, devices=ONE_DEVICE)
  return root / "corpus", root / "tfds", workdir, config, metrics


def test_pretraining_lowers_the_masked_token_loss(pretrained):
  _, _, workdir, config, metrics = pretrained
  run = modes.run.open_run(config, workdir, devices=ONE_DEVICE, split="eval")
  _, trained = run.restore()
  fresh = jax.jit(run.task.init_params)(jax.random.PRNGKey(0))
  batch = run.task.data.examples("eval")[:32]
  inputs = np.zeros((32, config.data.max_input_length), np.int32)
  for row, example in zip(inputs, batch):
    row[:len(example["inputs"])] = example["inputs"]
  batch = {"inputs": jnp.asarray(inputs), "label": jnp.zeros(32, jnp.int32)}
  loss = jax.jit(lambda p: run.task.loss(p, batch, None, train=False))
  before, after = loss(fresh), loss(trained)
  assert float(after["loss"]) < 0.8 * float(before["loss"])
  assert "perplexity" in metrics and "macro_f1" not in metrics


def test_the_classifier_starts_from_the_pretrained_encoder(pretrained, tmp_path):
  corpus, tfds_dir, source, mlm_config, _ = pretrained
  config = tiny_config(corpus, tfds_dir)
  config.init_encoder_from = source
  task = tasks.get_task(config, str(tmp_path / "cls"))
  assert type(task) is tasks.ClassificationTask
  with open(os.path.join(source, "tokenizer.model"), "rb") as a, \
       open(tmp_path / "cls" / "tokenizer.model", "rb") as b:
    assert a.read() == b.read()  # the encoder's ids, kept in this workdir
  rng = jax.random.PRNGKey(7)
  params = task.initial_params(rng)
  _, saved = modes.run.open_run(mlm_config, source, devices=ONE_DEVICE).restore()
  fresh = jax.jit(task.init_params)(rng)
  jax.tree.map(np.testing.assert_array_equal, params["encoder"], saved["encoder"])
  jax.tree.map(np.testing.assert_array_equal, params["head"], fresh["head"])
  assert not np.allclose(params["encoder"]["embed"]["embedding"],
                         fresh["encoder"]["embed"]["embedding"])
  # Outside training (eval, predict) the workdir's own checkpoint is what counts.
  assert np.array_equal(tasks.get_task(config, str(tmp_path / "cls"), training=False)
                        .initial_params(rng)["encoder"]["embed"]["embedding"],
                        fresh["encoder"]["embed"]["embedding"])


def test_a_missing_or_mismatched_encoder_run_is_refused(pretrained, tmp_path):
  corpus, tfds_dir, source, _, _ = pretrained
  config = tiny_config(corpus, tfds_dir)
  config.init_encoder_from = str(tmp_path / "nothing")
  with pytest.raises(masked_lm.EncoderInitError, match=r"init_encoder_from=.*nothing: no run "
                                                       r"there .*--config.objective=mlm"):
    tasks.get_task(config, str(tmp_path / "a"))
  config = tiny_config(corpus, tfds_dir, model=dict(d_model=48))
  config.init_encoder_from = source
  with pytest.raises(masked_lm.EncoderInitError,
                     match=r"another model \(model.d_model: 32 there, 48 here\)"):
    tasks.get_task(config, str(tmp_path / "b"))


def test_an_encoder_is_refused_under_another_tokenizer(pretrained, tmp_path):
  """The encoder's embedding rows are its tokenizer's ids: a classifier that would read
  with another tokenizer (here config.data.tokenizer_path, a tokenizer trained on other
  text) is refused before training, naming init_encoder_from; allow_config_change lets
  it through."""
  corpus, tfds_dir, source, _, _ = pretrained
  write_corpus(tmp_path / "c2", seed=1)
  other = tasks.get_task(tiny_config(tmp_path / "c2", tmp_path / "tfds2"),
                         str(tmp_path / "other"))
  assert other.data.tokenizer_fingerprint() != tasks.get_task(
      tiny_config(corpus, tfds_dir), source, training=False).data.tokenizer_fingerprint()
  config = tiny_config(corpus, tfds_dir)
  config.init_encoder_from = source
  config.data.tokenizer_path = str(tmp_path / "other" / "tokenizer.model")
  task = tasks.get_task(config, str(tmp_path / "cls"))
  with pytest.raises(tokenizers.TokenizerError,
                     match=r"tokenizer.model\) is not the one the checkpoint in "
                           r"config.init_encoder_from=.*mlm was trained with .* new --workdir"
                     ) as excinfo:
    task.initial_params(jax.random.PRNGKey(0))
  print(excinfo.value)
  config.train.allow_config_change = True
  params = tasks.get_task(config, str(tmp_path / "cls2")).initial_params(jax.random.PRNGKey(0))
  assert "encoder" in params


@pytest.mark.parametrize("overrides, field", [
    (dict(objective="bert"), "objective='bert'"),
    (dict(task="translation", objective="mlm"), "objective='mlm'"),
    (dict(task="generation", init_encoder_from="/x"), "init_encoder_from='/x'"),
    (dict(optim=dict(token_dropout=1.0)), "optim.token_dropout=1.0"),
    (dict(optim=dict(mask_rate=0.0)), "optim.mask_rate=0.0"),
    (dict(data=dict(length_bucket=-1)), "data.length_bucket=-1"),
    (dict(task="translation", data=dict(length_bucket=16, pack_examples=True)),
     "data.length_bucket=16"),
])
def test_bad_fields_are_named(overrides, field):
  config = tiny_digits_config(overrides.pop("task", "classification"))
  for key, value in overrides.items():
    if isinstance(value, dict):
      config[key].update(value)
    else:
      config[key] = value
  with pytest.raises(config_checks.ConfigError, match=rf"^config\.{field} is invalid"):
    train.validate(config)


def test_an_mlm_workdir_refuses_predict_mode(pretrained):
  _, _, workdir, config, _ = pretrained
  with pytest.raises(masked_lm.EncoderInitError, match="not a classifier"):
    modes.predict_lines(config, workdir, ["a film"], devices=ONE_DEVICE)


def test_the_recipes_are_sst2_cpu_ones():
  with pytest.raises(presets.VariantError, match=r"recipe=mlm is a recipe of SST-2's CPU"):
    classification_config.get_config("recipe=mlm,dataset=imdb")
