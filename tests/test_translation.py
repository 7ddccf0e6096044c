"""Translation on real text, end to end: a generated parallel corpus (German words mapped
word by word to English through a fixed dictionary) read from local files, trained on at
the byte level with packing, then scored (BLEU, chrF), decoded, averaged and evaluated
through the same functions and command line a user runs; SentencePiece tokenizers kept in
the workdir; broken data refused in one line; a tfds dataset by name (mock data) with the
language direction reversed; and the packed training stream of the task."""

import collections
import gzip
import json
import os
import random
import sys

import jax
import numpy as np
import pytest
import sacrebleu
import tensorflow_datasets as tfds

import modes
import tasks
import train
from configs import presets, translation
from input_pipeline import sources, tokenizers
from training import checkpointing, optimizers, steps
from tests.cli_helpers import assert_one_error_line, run_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_DEVICE = jax.local_devices()[:1]

# "German" -> "English", word by word in the same order: learnable at the byte level in a
# few hundred steps, and exactly scorable (a perfect model reproduces the reference).
WORDS = {"hund": "dog", "katze": "cat", "rot": "red", "groß": "big", "klein": "small",
         "haus": "house", "baum": "tree", "und": "and", "sieht": "sees", "der": "the"}
SIZES = {"train": 400, "val": 40, "test": 30}


def sentence_pairs(n, seed):
  """n (German, English) pairs of 2-5 words."""
  rng = random.Random(seed)
  de = [" ".join(rng.choice(sorted(WORDS)) for _ in range(rng.randint(2, 5)))
        for _ in range(n)]
  return de, [" ".join(WORDS[w] for w in s.split()) for s in de]


def write_lines(path, lines, gz=False):
  data = "".join(line + "\n" for line in lines).encode("utf-8")
  if gz:
    with gzip.open(str(path) + ".gz", "wb") as f:
      f.write(data)
  else:
    with open(path, "wb") as f:
      f.write(data)


def write_corpus(directory, sizes=None):
  """`{stem}.{de,en}` files (train.en gzipped); returns {stem: (de lines, en lines)}."""
  os.makedirs(directory, exist_ok=True)
  corpus = {}
  for seed, (stem, n) in enumerate((sizes or SIZES).items()):
    de, en = sentence_pairs(n, seed)
    write_lines(os.path.join(directory, f"{stem}.de"), de)
    write_lines(os.path.join(directory, f"{stem}.en"), en, gz=stem == "train")
    corpus[stem] = (de, en)
  return corpus


# The tiny run ({group: {field: value}}): every field here is also passed to the command
# line as --config.<group>.<field>.
TINY = dict(
    model=dict(tokenizer="bytes", d_model=64, d_ff=128, num_heads=4, num_encoder_layers=1,
               num_decoder_layers=1),
    data=dict(dataset="files", file_splits="train=train,validation=val,test=test",
              max_input_length=48, max_target_length=48, max_eval_length=40,
              pack_examples=True),
    decode=dict(decode_extra_length=8, beam_size=2),
    optim=dict(learning_rate=5e-3, warmup_steps=30, schedule="cosine"),
    train=dict(batch_size=16, num_train_steps=500, log_every_steps=50,
               checkpoint_every_steps=125, keep_checkpoints=5),
    eval=dict(eval_batch_size=32, eval_every_steps=250, num_decode_batches=1,
              num_print_examples=2, best_metric="bleu", num_attention_images=0))


def tiny_config(corpus_dir, tfds_dir, **overrides):
  """TINY on the files in `corpus_dir`; `overrides` are grouped like TINY:
  `tiny_config(d, t, model=dict(vocab_size=40), train=dict(num_train_steps=2))`."""
  c = translation.get_config()
  presets.update_groups(c, TINY)
  presets.update_groups(c, dict(data=dict(data_dir=str(corpus_dir),
                                          tfds_data_dir=str(tfds_dir))))
  presets.update_groups(c, overrides)
  return c


def cli_flags(config, workdir):
  """The command-line flags that give `config` (built by tiny_config) in main.py."""
  fields = {(group, field) for group, values in TINY.items() for field in values}
  fields |= {("data", "data_dir"), ("data", "tfds_data_dir"), ("model", "vocab_size"),
             ("data", "language_pair")}
  return ["--config=configs/translation.py", f"--workdir={workdir}",
          *(f"--config.{g}.{k}={config[g][k]}" for g, k in sorted(fields))]


def read_hypotheses(path):
  with open(path, encoding="utf-8") as f:
    text = f.read()
  assert text.endswith("\n")
  return text[:-1].split("\n")


def host_params(config, workdir, subdir="checkpoints", step=None):
  task = tasks.get_task(config, workdir, training=False)
  template = jax.device_get(steps.create_state(task, optimizers.make_optimizer(config),
                                               config.seed))
  checkpoints = checkpointing.Checkpointer(workdir, keep=100, subdir=subdir)
  try:
    return checkpoints.restore(template, step).params, checkpoints.all_steps()
  finally:
    checkpoints.close()


# ----------------------------------------------------------------------------- one tiny run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """One tiny packed byte-level run (500 steps, checkpoints at 125, 250, 375, 500, the
  best by BLEU kept), shared by the tests of eval, decode and average modes."""
  root = tmp_path_factory.mktemp("translation")
  corpus = write_corpus(root / "corpus")
  config = tiny_config(root / "corpus", root / "tfds")
  workdir = str(root / "run")
  metrics = train.train_and_evaluate(config, workdir, devices=ONE_DEVICE)
  return {"config": config, "workdir": workdir, "metrics": metrics, "corpus": corpus}


@pytest.fixture(scope="module")
def scored_test_split(trained):
  """Eval mode on the test split with the newest checkpoint: (metrics, report)."""
  metrics = modes.evaluate_checkpoint(trained["config"], trained["workdir"],
                                      devices=ONE_DEVICE, split="test")
  path = os.path.join(trained["workdir"], "eval", "test-latest-step500.json")
  with open(path, encoding="utf-8") as f:
    return metrics, json.load(f)


def test_tiny_packed_run_learns_to_translate(trained):
  metrics = trained["metrics"]
  assert {"bleu", "chrf", "loss", "perplexity", "accuracy"} <= set(metrics)
  # A few steps in, BLEU is ~1; seeds 0-5 of this run reach 86-95 (chrF 94-98).
  assert metrics["bleu"] > 70, metrics
  assert metrics["chrf"] > 85, metrics
  assert 1.0 <= metrics["perplexity"] < 1.5, metrics
  with open(os.path.join(trained["workdir"], "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  losses = [r["train/loss"] for r in records if "train/loss" in r]
  assert losses[-1] < losses[0] / 5, losses
  # BLEU was logged by the mid-run evaluation (first batch) and the final one.
  assert [r["step"] for r in records if "eval/bleu" in r] == [250, 500]


def test_eval_mode_writes_scores_and_hypotheses_in_file_order(trained, scored_test_split):
  metrics, report = scored_test_split
  _, en = trained["corpus"]["test"]
  assert report["split"] == "test" and report["step"] == 500
  assert report["checkpoint"] == "latest" and report["examples"] == len(en)
  assert report["metrics"] == pytest.approx(metrics)
  hyps = read_hypotheses(report["hypotheses"])
  assert len(hyps) == len(en)
  # In file order: most hypotheses are their own line's reference exactly (a shuffled file
  # would match almost none), and the scores and signatures are sacrebleu's on this file.
  assert sum(h == r for h, r in zip(hyps, en)) >= 0.6 * len(en), list(zip(hyps, en))
  for name, metric in (("bleu", sacrebleu.metrics.BLEU()), ("chrf", sacrebleu.metrics.CHRF())):
    assert metrics[name] == pytest.approx(metric.corpus_score(hyps, [en]).score, abs=1e-9)
    assert report["signatures"][name] == str(metric.get_signature())
  assert report["signatures"]["bleu"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|")
  assert metrics["bleu"] > 70


def test_eval_of_the_best_checkpoint_and_of_a_missing_step(trained):
  config, workdir = trained["config"], trained["workdir"]
  with open(os.path.join(workdir, "best", "best.json"), encoding="utf-8") as f:
    best = json.load(f)
  assert best["metric"] == "bleu"
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    logged = {r["step"]: r["eval/bleu"] for r in map(json.loads, f) if "eval/bleu" in r}
  # The best is the highest BLEU logged (the earlier step on a tie), kept on disk.
  assert best["value"] == pytest.approx(max(logged.values()))
  assert logged[best["step"]] == pytest.approx(best["value"])
  _, best_steps = host_params(config, workdir, subdir="best")
  assert best_steps == [best["step"]]

  result = run_main(*cli_flags(config, workdir), "--mode=eval", "--split=validation",
                    "--checkpoint=best")
  assert result.returncode == 0, result.stderr[-3000:]
  path = os.path.join(workdir, "eval", f"validation-best-step{best['step']}.json")
  assert f"scores: {path}" in result.stdout
  with open(path, encoding="utf-8") as f:
    report = json.load(f)
  assert report["checkpoint"] == "best" and report["step"] == best["step"]
  assert report["split"] == "validation" and report["examples"] == 40
  if best["step"] == 500:  # the final evaluation scored the whole split with these params
    assert report["metrics"]["bleu"] == pytest.approx(trained["metrics"]["bleu"], abs=1e-6)

  with pytest.raises(checkpointing.CheckpointError,
                     match=r"no checkpoint of step 123 in .*it has steps 125, 250, 375, 500"):
    modes.evaluate_checkpoint(config, workdir, devices=ONE_DEVICE, step=123)
  result = run_main(*cli_flags(config, workdir), "--mode=eval", "--step=123")
  assert_one_error_line(result, "no checkpoint of step 123",
                        "it has steps 125, 250, 375, 500")


def test_decode_mode_one_line_per_input_line(trained, scored_test_split, tmp_path):
  config, workdir = trained["config"], trained["workdir"]
  de, _ = trained["corpus"]["test"]
  eval_hyps = read_hypotheses(scored_test_split[1]["hypotheses"])
  lines = [de[0], "", de[3], de[1], "", de[7]]
  expected = [eval_hyps[0], "", eval_hyps[3], eval_hyps[1], "", eval_hyps[7]]

  in_process = modes.decode_lines(config, workdir, lines, devices=ONE_DEVICE)
  assert in_process == expected
  assert all(expected[i] for i in (0, 2, 3, 5))

  text = "".join(line + "\n" for line in lines)
  from_stdin = run_main(*cli_flags(config, workdir), "--mode=decode", stdin=text)
  assert from_stdin.returncode == 0, from_stdin.stderr[-3000:]
  assert from_stdin.stdout.split("\n") == expected + [""]  # one line each, newline-ended

  path = tmp_path / "input.de"
  path.write_text(text, encoding="utf-8")
  from_file = run_main(*cli_flags(config, workdir), "--mode=decode", f"--input={path}")
  assert from_file.returncode == 0, from_file.stderr[-3000:]
  assert from_file.stdout == from_stdin.stdout


def test_average_mode_is_the_mean_of_the_newest_checkpoints(trained):
  config, workdir = trained["config"], trained["workdir"]
  assert modes.average_checkpoints(config, workdir, 3) == 500
  averaged, steps = host_params(config, workdir, subdir="averaged")
  assert steps == [500]
  regular = [host_params(config, workdir, step=s)[0] for s in (250, 375, 500)]
  for got, *each in zip(jax.tree.leaves(averaged), *map(jax.tree.leaves, regular),
                        strict=True):
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, np.mean(np.stack(each).astype(np.float64), 0),
                               rtol=1e-6, atol=1e-7)
  # Not trivially one of them.
  assert not np.allclose(jax.tree.leaves(averaged)[0], jax.tree.leaves(regular[-1])[0])
  checkpoints = checkpointing.Checkpointer(workdir, keep=1, subdir="averaged")
  try:
    assert checkpoints.restore_config()["averaged_steps"] == [250, 375, 500]
  finally:
    checkpoints.close()

  with pytest.raises(checkpointing.CheckpointError,
                     match=r"has 4 checkpoint\(s\) \(125, 250, 375, 500\), fewer than the 5"):
    modes.average_checkpoints(config, workdir, 5)
  _, still = host_params(config, workdir, subdir="averaged")
  assert still == [500]  # the failed call left the average in place

  metrics = modes.evaluate_checkpoint(config, workdir, devices=ONE_DEVICE, split="test",
                                      checkpoint="averaged")
  assert os.path.exists(os.path.join(workdir, "eval", "test-averaged-step500.json"))
  assert metrics["bleu"] > 50, metrics  # a working model (this seed: 87; latest: 86)


# ----------------------------------------------------------------------------- tokenizers


def test_sentencepiece_model_is_saved_in_the_workdir_and_reused(tmp_path, monkeypatch):
  write_corpus(tmp_path / "corpus", {"train": 300, "val": 8, "test": 8})
  config = tiny_config(tmp_path / "corpus", tmp_path / "tfds",
                       model=dict(tokenizer="sentencepiece", vocab_size=40),
                       train=dict(num_train_steps=2, checkpoint_every_steps=2),
                       eval=dict(eval_every_steps=100), decode=dict(beam_size=1))
  workdir = tmp_path / "run"
  # (no final evaluations: eval mode below reads the saved tokenizer)
  train.train_and_evaluate(config, str(workdir), devices=ONE_DEVICE, final_evaluation=False)
  model = workdir / "tokenizer.model"
  stamp, data = model.stat().st_mtime_ns, model.read_bytes()
  assert tokenizers.load_tokenizer(str(model)).vocab_size == 40

  def retrain(*args, **kwargs):
    raise AssertionError("the saved tokenizer was retrained")
  monkeypatch.setattr(tokenizers, "train_sentencepiece", retrain)
  monkeypatch.setattr(tokenizers, "_train", retrain)
  config.train.num_train_steps = 4
  train.train_and_evaluate(config, str(workdir), devices=ONE_DEVICE, final_evaluation=False)
  assert sorted(host_params(config, str(workdir))[1]) == [2, 4]  # it did resume and train
  modes.evaluate_checkpoint(config, str(workdir), devices=ONE_DEVICE, split="test")
  assert model.stat().st_mtime_ns == stamp and model.read_bytes() == data

  # A workdir without the tokenizer: eval refuses, naming the file, and writes nothing.
  fresh = tmp_path / "fresh"
  with pytest.raises(tokenizers.TokenizerError, match=r"no tokenizer at .*tokenizer\.model"):
    modes.evaluate_checkpoint(config, str(fresh), devices=ONE_DEVICE)
  assert not fresh.exists()
  fresh.mkdir()
  result = run_main(*cli_flags(config, fresh), "--mode=eval")
  assert_one_error_line(result, f"no tokenizer at {fresh / 'tokenizer.model'}")
  assert list(fresh.iterdir()) == []


# ----------------------------------------------------------------------------- broken data


def _unequal_lengths(d):
  write_lines(d / "train.en", sentence_pairs(SIZES["train"], 0)[1][:-1], gz=True)
  return {}, ["parallel files of different lengths", "train.de has 400 lines",
              "train.en.gz has 399 lines"]


def _invalid_utf8(d):
  lines = (d / "val.de").read_bytes().split(b"\n")
  lines[2] = b"hund \xff katze"
  (d / "val.de").write_bytes(b"\n".join(lines))
  return {}, [f"{d / 'val.de'}, line 3: not valid UTF-8"]


def _empty_line(d):
  en = sentence_pairs(SIZES["test"], 2)[1]
  write_lines(d / "test.en", en[:4] + [""] + en[5:])
  return {}, [f"{d / 'test.en'}, line 5: empty line"]


def _missing_split_file(d):
  os.remove(d / "test.en")
  return {}, [f"{d / 'test.en'}: no such file", "has test.de"]


def _language_not_in_files(d):
  del d
  return {"data": {"language_pair": "de-fr"}}, ["train.fr: no such file",
                                                 "has train.de, train.en.gz"]


def _vocab_too_small(d):
  del d
  return {"model": {"tokenizer": "sentencepiece", "vocab_size": 16}}, [
      "vocab_size 16 is too small", "raise config field `vocab_size` to at least 23"]


def _vocab_too_large(d):
  del d
  return {"model": {"tokenizer": "sentencepiece", "vocab_size": 500}}, [
      "vocab_size 500 is too large", "at most 43"]


def _missing_data_dir(d):
  return {"data": {"data_dir": str(d / "nowhere")}}, [
      f"{d / 'nowhere'}: no such data directory (config.data.data_dir)"]


@pytest.mark.parametrize("make", [_unequal_lengths, _invalid_utf8, _empty_line,
                                  _missing_split_file, _language_not_in_files,
                                  _vocab_too_small, _vocab_too_large, _missing_data_dir],
                         ids=lambda f: f.__name__[1:])
def test_main_refuses_broken_data_in_one_line(tmp_path, make):
  corpus = tmp_path / "corpus"
  write_corpus(corpus)
  overrides, expected = make(corpus)
  config = tiny_config(corpus, tmp_path / "tfds", **overrides)
  workdir = tmp_path / "run"
  result = run_main(*cli_flags(config, workdir))
  assert_one_error_line(result, *expected)
  assert not workdir.exists()  # no checkpoint, no tokenizer: nothing to mistake for a run


# ----------------------------------------------------------------------------- tfds by name


def test_tfds_dataset_by_name_with_the_direction_reversed(tmp_path):
  config = tiny_config("", tmp_path / "tfds",
                       data=dict(dataset="wmt14_translate/de-en", language_pair="en-de",
                                 pack_examples=True, max_input_length=64,
                                 max_target_length=64, max_eval_length=64),
                       train=dict(num_train_steps=3, checkpoint_every_steps=3),
                       eval=dict(eval_every_steps=100, best_metric=""),
                       decode=dict(beam_size=1))
  with tfds.testing.mock_data(num_examples=6):
    raw = sources.tfds_builder("wmt14_translate/de-en", str(tmp_path / "tfds"))
    raw = raw.as_data_source("train")
    raw = [{k: sources.as_text(raw[i][k]) for k in ("de", "en")} for i in range(len(raw))]
    task = tasks.get_task(config, str(tmp_path / "run"))
    examples = task.data_source("train")
    assert len(examples) == len(raw) == 6
    assert all(r["en"] != r["de"] for r in raw)
    for example in examples:
      text = raw[int(example["index"])]
      assert task.data.source_tokenizer.decode(example["inputs"]) == text["en"]
      assert task.data.target_tokenizer.decode(example["targets"]) == text["de"]
      assert example["inputs"][-1] == example["targets"][-1] == tokenizers.EOS_ID
    metrics = train.train_and_evaluate(config, str(tmp_path / "run"), devices=ONE_DEVICE)
  assert np.isfinite(metrics["loss"]) and "bleu" in metrics
  assert host_params(config, str(tmp_path / "run"))[1] == [3]
  assert "tensorflow" not in sys.modules


# ----------------------------------------------------------------------------- packing


def test_packed_training_stream_holds_each_kept_example_once_per_epoch(tmp_path):
  """Through the task: tokenized, EOS-terminated, filtered to the row lengths, packed.
  (tests/test_text_data.py checks PackedBatches alone on random examples.)"""
  corpus = write_corpus(tmp_path / "corpus", {"train": 120, "val": 4, "test": 4})
  config = tiny_config(tmp_path / "corpus", tmp_path / "tfds",
                       data=dict(max_input_length=20, max_target_length=18))
  task = tasks.get_task(config, str(tmp_path / "run"))
  encode = tokenizers.ByteTokenizer().encode
  pairs = [(tuple(encode(d).tolist()) + (tokenizers.EOS_ID,),
            tuple(encode(e).tolist()) + (tokenizers.EOS_ID,))
           for d, e in zip(*corpus["train"])]
  kept = collections.Counter(p for p in pairs if len(p[0]) <= 20 and len(p[1]) <= 18)
  assert 40 < sum(kept.values()) < len(pairs) - 20  # the filter drops some, keeps most

  dataset = task.train_dataset(batch_size=8, num_devices=2)
  found, k = collections.Counter(), 0
  while sum(found.values()) < sum(kept.values()):
    batch = dataset[k]
    k += 1
    assert batch["inputs"].shape == (2, 4, 20) and batch["targets"].shape == (2, 4, 18)
    for r in range(8):
      row = {key: value.reshape(8, -1)[r] for key, value in batch.items()}
      segments = {}
      for field in ("inputs", "targets"):
        seg, pos = row[f"{field}_segmentation"], row[f"{field}_position"]
        assert np.all((row[field] > 0) == (seg > 0))
        ids = sorted(set(seg[seg > 0].tolist()))
        for s in ids:
          np.testing.assert_array_equal(pos[seg == s], np.arange(np.sum(seg == s)))
        segments[field] = [tuple(row[field][seg == s].tolist()) for s in ids]
      assert len(segments["inputs"]) == len(segments["targets"])
      found.update(zip(segments["inputs"], segments["targets"]))
  assert found == kept  # none lost, none twice, none too long, pairs kept together
