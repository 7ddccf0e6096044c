"""api.py: a workdir's model from Python gives what the modes give, and its scores agree
with the batched evaluation's (a different code path: padded batches through the eval
pipeline, against one row per example here)."""

import jax
import numpy as np
import pytest

import api
import modes
import train
from errors import UserError
from tests import test_generation, test_translation

ONE_DEVICE = jax.local_devices()[:1]


@pytest.fixture(scope="module")
def translation_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("api_translation")
  corpus = test_translation.write_corpus(root / "data", {"train": 200, "val": 12, "test": 8})
  config = test_translation.tiny_config(
      root / "data", root / "tfds", train=dict(num_train_steps=60, checkpoint_every_steps=60),
      eval=dict(eval_every_steps=1000, best_metric=""), optim=dict(label_smoothing=0.0))
  workdir = str(root / "run")
  train.train_and_evaluate(config, workdir, devices=ONE_DEVICE, final_evaluation=False)
  return config, workdir, corpus


def test_translate_score_and_attention_match_the_modes(translation_run):
  config, workdir, corpus = translation_run
  sources, references = corpus["val"]
  model = api.load(workdir)
  assert model.step == 60 and model.config.model.d_model == config.model.d_model
  assert model.translate(sources[:5] + [""]) == modes.decode_lines(
      config, workdir, sources[:5], devices=ONE_DEVICE) + [""]

  scores = model.score(sources, references=references)
  assert all(s["tokens"] > 0 and np.isfinite(s["loss"]) for s in scores)
  np.testing.assert_allclose([s["perplexity"] for s in scores],
                             np.exp([s["loss"] for s in scores]), rtol=1e-5)
  # The token-weighted mean over the split is the eval mode's loss (label smoothing 0).
  evaluated = modes.evaluate_checkpoint(config, workdir, devices=ONE_DEVICE,
                                        split="validation")
  mean = sum(s["loss"] * s["tokens"] for s in scores) / sum(s["tokens"] for s in scores)
  np.testing.assert_allclose(mean, evaluated["loss"], rtol=1e-4)

  maps = model.attention(sources[0], references[0])
  cross = maps.weights["cross"]
  assert cross.shape[:2] == (config.model.num_decoder_layers, config.model.num_heads)
  assert cross.shape[2:] == (len(maps.queries["cross"]), len(maps.keys["cross"]))
  np.testing.assert_allclose(cross.sum(-1), 1.0, atol=1e-5)


def test_load_applies_overrides_and_refuses_what_does_not_fit(translation_run):
  config, workdir, _ = translation_run
  model = api.load(workdir, overrides={"decode.beam_size": 1})
  assert model.config.decode.beam_size == 1
  with pytest.raises(UserError, match=r"decode\.beam_sise"):
    api.load(workdir, overrides={"decode.beam_sise": 1})
  with pytest.raises(UserError, match="score: translation needs one reference per text"):
    model.score(["ein hund"])
  with pytest.raises(UserError, match="generate needs a model of that family"):
    model.generate(["x"])
  with pytest.raises(UserError, match="no such file"):
    api.load(workdir + "-missing")
  del config


def test_generate_and_score_of_a_language_model(tmp_path):
  data = test_generation.write_text(tmp_path / "data")
  config = test_generation.tiny_config(data, tmp_path / "tfds",
                                       train=dict(num_train_steps=40),
                                       eval=dict(eval_every_steps=1000))
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir, devices=ONE_DEVICE, final_evaluation=False)
  model = api.load(workdir, overrides={"decode.num_samples": 2})
  samples = model.generate(["how ", "a"])
  config.decode.num_samples = 2
  assert samples == modes.generate_text(config, workdir, ["how ", "a"])
  assert [len(s) for s in samples] == [2, 2] and samples[0][0].startswith("how ")
  scores = model.score(["twinkle twinkle little star", "kttt"])
  assert [s["tokens"] for s in scores] == [len("twinkle twinkle little star"), 4]
  assert scores[0]["loss"] < scores[1]["loss"]  # the poem is likelier than a jumble
  with pytest.raises(UserError, match="a language model takes texts only"):
    model.score(["a"], references=["b"])
