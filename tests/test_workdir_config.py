"""A workdir remembers how it was made: every mode on an existing workdir starts from the
config training saved there (config.json), with the command line's --config.<group>.<field>
flags on it where they may change; a model field is refused. Real `python main.py` runs on a
tiny fr->en translation run trained with non-default data and model fields."""

import json
import os
import shutil

import pytest

from tests.cli_helpers import assert_one_error_line, run_main

WORDS = {"chien": "dog", "chat": "cat", "rouge": "red", "grand": "big", "maison": "house",
         "arbre": "tree", "et": "and", "voit": "sees"}
SOURCES = ["chien voit chat", "grand arbre et maison rouge", "chat rouge", "maison",
           "arbre et chien", "chat voit grand chien", "rouge et grand", "chien"]


def write_lines(path, lines):
  with open(path, "w", encoding="utf-8") as f:
    f.write("".join(line + "\n" for line in lines))


def write_corpus(directory, sizes):
  """fr-en files `{stem}.fr`, `{stem}.en` of `sizes[stem]` lines each."""
  os.makedirs(directory, exist_ok=True)
  for stem, n in sizes.items():
    fr = [SOURCES[i % len(SOURCES)] for i in range(n)]
    write_lines(os.path.join(directory, f"{stem}.fr"), fr)
    write_lines(os.path.join(directory, f"{stem}.en"),
                [" ".join(WORDS[w] for w in line.split()) for line in fr])


# Not the defaults of configs/translation.py (de-en, sentencepiece, d_model 256, the
# Multi30k directory): a mode that ignored config.json could not open this run.
TRAINING = ["--config.data.dataset=files", "--config.data.language_pair=fr-en",
            "--config.data.file_splits=train=train,validation=val",
            "--config.data.max_input_length=32", "--config.data.max_target_length=32",
            "--config.data.max_eval_length=32", "--config.model.tokenizer=bytes",
            "--config.model.d_model=32", "--config.model.d_ff=64",
            "--config.model.num_heads=2", "--config.model.num_encoder_layers=1",
            "--config.model.num_decoder_layers=1", "--config.optim.schedule=cosine",
            "--config.optim.warmup_steps=2", "--config.train.batch_size=8",
            "--config.train.num_train_steps=4", "--config.train.checkpoint_every_steps=4",
            "--config.train.log_every_steps=2", "--config.eval.eval_every_steps=100",
            "--config.eval.eval_batch_size=16", "--config.eval.num_print_examples=0",
            "--config.eval.num_attention_images=0",
            "--config.decode.beam_size=2", "--config.decode.decode_extra_length=4"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(workdir, corpus dir) of a 4-step fr->en run, trained with an explicit --config."""
  root = tmp_path_factory.mktemp("workdir_config")
  corpus = str(root / "corpus")
  write_corpus(corpus, {"train": 64, "val": 10})
  workdir = str(root / "run")
  result = run_main("--config=configs/translation.py", f"--workdir={workdir}",
                    f"--config.data.data_dir={corpus}",
                    f"--config.data.tfds_data_dir={root / 'tfds'}", *TRAINING)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, corpus


def _saved(workdir):
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    return json.load(f)


def _eval_report(workdir, result, step=4):
  assert result.returncode == 0, result.stderr[-3000:]
  path = os.path.join(workdir, "eval", f"validation-latest-step{step}.json")
  assert f"scores: {path}" in result.stdout
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def test_decode_and_eval_need_no_config(trained):
  workdir, _ = trained
  before = _saved(workdir)
  # An override equal to the saved value is no change: allowed.
  decoded = run_main(f"--workdir={workdir}", "--mode=decode", "--config.model.d_model=32",
                     stdin="chien voit chat\nmaison rouge\n")
  assert decoded.returncode == 0, decoded.stderr[-3000:]
  assert len(decoded.stdout.split("\n")) == 3  # a line out for each line in
  report = _eval_report(workdir, run_main(f"--workdir={workdir}", "--mode=eval"))
  assert report["examples"] == 10 and report["beam_size"] == 2  # the saved data, decoding
  assert _saved(workdir) == before  # read, not rewritten


def test_data_and_decode_overrides_apply(trained, tmp_path):
  workdir, _ = trained
  other = str(tmp_path / "other")
  write_corpus(other, {"train": 8, "val": 7})  # eval mode opens the train split too
  result = run_main(f"--workdir={workdir}", "--mode=eval", f"--config.data.data_dir={other}",
                    "--config.decode.beam_size=1")
  report = _eval_report(workdir, result)
  assert report["examples"] == 7 and report["beam_size"] == 1
  assert _saved(workdir)["data"]["data_dir"] != other  # the workdir's record is unchanged


@pytest.mark.parametrize("flag, expected", [
    ("--config.model.num_heads=4", "model.num_heads=2 in "),
    ("--config.data.language_pair=en-fr", "data.language_pair='fr-en' in "),
    ("--config.task=generation", "task='translation' in "),
])
def test_an_override_of_a_model_field_is_refused_in_one_line(trained, flag, expected):
  workdir, _ = trained
  result = run_main(f"--workdir={workdir}", "--mode=decode", flag, stdin="chien\n")
  assert_one_error_line(result, f"{flag} would change the model {workdir} was trained with",
                        expected, "allow_config_change=True")
  assert result.stdout == ""


def test_an_explicit_config_file_is_used_as_it_is(trained):
  """--config=FILE: that file and its flags, not config.json; its model is checked against
  the checkpoint's as before (configs/default.py's synthetic model is d_model 64)."""
  workdir, _ = trained
  result = run_main("--config=configs/default.py", f"--workdir={workdir}", "--mode=eval")
  assert_one_error_line(result, "model.d_model: 32 there, 64 now")


def test_raising_num_train_steps_on_resume_says_so_once(trained, tmp_path):
  workdir, _ = trained
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  result = run_main(f"--workdir={copy}", "--config.train.num_train_steps=6")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "resumed from the checkpoint at step 4" in result.stderr
  notes = [line for line in result.stderr.splitlines()
           if "config.train.num_train_steps raised from 4 to 6 on resume" in line]
  assert len(notes) == 1, result.stderr[-3000:]
  assert "the cosine schedule" in notes[0] and "at step 4 jumps from 0 to" in notes[0]
  saved = _saved(copy)  # the resumed run kept the saved data and model, with the new length
  assert saved["train"]["num_train_steps"] == 6
  assert saved["data"]["language_pair"] == "fr-en" and saved["model"]["d_model"] == 32


@pytest.mark.parametrize("args, expected", [
    (["--config.size=small"], "--config=configs/default.py:size=small"),
    (["--config=configs/translation.py", "--config.accel=gpu"],
     "--config=configs/translation.py:accel=gpu"),
])
def test_a_preset_label_flag_is_refused_with_the_variant_string(tmp_path, args, expected):
  result = run_main(f"--workdir={tmp_path / 'run'}", *args)
  assert_one_error_line(result, "would only relabel the config", expected)
  assert not (tmp_path / "run").exists()  # no config.json recording a size it lacks


def test_an_accelerator_preset_without_the_accelerator_says_so_once(tmp_path):
  result = run_main("--config=configs/default.py:accel=gpu", f"--workdir={tmp_path / 'run'}",
                    "--mode=eval")
  assert_one_error_line(result, "no latest checkpoint")  # it went on to the mode
  notes = [line for line in result.stderr.splitlines()
           if "config.accel=gpu, but JAX found no GPU: running on cpu" in line]
  assert len(notes) == 1, result.stderr[-3000:]


@pytest.mark.parametrize("content", ["", '{"task": "transl', "\x00\x01binary", "null", "[1, 2]",
                                     '{"task": "poetry"}', None])
def test_a_damaged_or_missing_config_json_is_named(tmp_path, content):
  """A workdir's config.json that is empty, cut short, binary, valid JSON of another
  shape, or of no task this code has, or missing beside checkpoints: a ConfigError (one
  line from main.py) naming the file and what to give instead, not a traceback and not
  a silent run on the default config."""
  from config_checks import ConfigError  # pylint: disable=import-outside-toplevel
  from configs import default  # pylint: disable=import-outside-toplevel
  from modes import workdir_config  # pylint: disable=import-outside-toplevel
  workdir = tmp_path / "run"
  (workdir / "checkpoints" / "4").mkdir(parents=True)
  if content is not None:
    (workdir / "config.json").write_text(content, encoding="utf-8")
  with pytest.raises(ConfigError, match=r"config.json|config saved in .*config.json") as e:
    workdir_config.resolve_config(str(workdir), default.get_config(), {}, False)
  assert "--config=FILE" in str(e.value)
