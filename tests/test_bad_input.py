"""A catalogue of bad input to main.py, as a user would type it: wrong types, out-of-range
values, incompatible combinations, unknown fields and variants, broken config files,
missing, ragged, non-UTF-8, empty or mislabeled data files, absurd lengths and modes with
nothing to work on, for the three tasks. Each case is one real `python main.py` call,
which must exit with status 2 and one `error: ...` line that names the problem, print no
traceback, and leave its fresh workdir absent (or empty, when it existed already).

The data are small files generated in tmp_path; the task configs are the real ones
(configs/translation.py, generation.py, classification.py) pointed at them. A call costs
about two seconds, nearly all of it importing JAX and friends; each test makes its own
call (pytest-xdist spreads them over the workers).
"""

import dataclasses
import os
import random
from typing import Dict, Optional, Sequence, Tuple, Union

import pytest

from tests.cli_helpers import assert_one_error_line, run_main

# ----------------------------------------------------------------------------- good data

WORDS = {"hund": "dog", "katze": "cat", "rot": "red", "klein": "small", "haus": "house",
         "baum": "tree", "und": "and", "sieht": "sees", "der": "the"}


def _sentences(n: int, seed: int):
  """n (German, English) sentence pairs of 2-5 words."""
  rng = random.Random(seed)
  de = [" ".join(rng.choice(sorted(WORDS)) for _ in range(rng.randint(2, 5))) for _ in range(n)]
  return de, [" ".join(WORDS[w] for w in s.split()) for s in de]


def _lines(lines) -> str:
  return "".join(line + "\n" for line in lines)


def _table(rows, header=("sentence", "label")) -> str:
  return _lines(["\t".join(header)] + ["\t".join(row) for row in rows])


def _good_files(task: str) -> Dict[str, str]:
  """A small well-formed data directory of each task, as its config file expects."""
  if task == "translation":
    (train_de, train_en), (val_de, val_en) = _sentences(64, 0), _sentences(8, 1)
    return {"train.de": _lines(train_de), "train.en": _lines(train_en),
            "val.de": _lines(val_de), "val.en": _lines(val_en)}
  if task == "generation":  # about 12,000 characters: several batches of 16 x 64
    de, en = _sentences(400, 2)
    return {"input.txt": _lines(f"{a}, {b}." for a, b in zip(de, en))}
  de, en = _sentences(48, 3)
  rows = [(s, str(i % 2)) for i, s in enumerate(de + en)]
  return {"train.tsv": _table(rows[:80]), "dev.tsv": _table(rows[80:])}


# Every run points the real config file at the generated files (prepared data go under
# tmp_path), and would train for 2 steps only if a case were wrongly accepted.
# Each dict: dotted field name ("group.field") -> the flag's value.
BASE = {
    "translation": {"data.file_splits": "train=train,validation=val",
                    "model.tokenizer": "bytes", "train.num_train_steps": "2"},
    "generation": {"train.num_train_steps": "2"},
    "classification": {"data.file_splits": "train=train.tsv,validation=dev.tsv",
                       "model.tokenizer": "bytes", "model.vocab_size": "259",
                       "train.num_train_steps": "2",
                       # the SST-2 recipe's model, smaller and without SAM's second
                       # pass: a run that goes on compiles in seconds
                       "model.d_model": "32", "model.d_ff": "64", "model.num_heads": "2",
                       "optim.sam_rho": "0.0"},
}

# ----------------------------------------------------------------------------- the cases

Files = Dict[str, Union[str, bytes, None]]  # name -> content; None removes the file


@dataclasses.dataclass
class Case:
  """One bad command line; {data}, {tmp} and {workdir} in the strings are filled in."""
  id: str
  task: str  # translation, generation, classification: the config file and its data
  expect: Tuple[str, ...]  # what the error line must contain
  # --config.<k>=<v>, k a dotted field name ("train.batch_size")
  set: Dict[str, str] = dataclasses.field(default_factory=dict)
  args: Sequence[str] = ()  # other arguments
  files: Files = dataclasses.field(default_factory=dict)  # changes to the good files
  config: Optional[str] = None  # --config=... instead of configs/<task>.py
  stdin: Optional[Union[str, bytes]] = None
  existing_workdir: bool = False  # the workdir exists (empty) before the run
  overrides: bool = True  # False: no --config.<field> flags (a config without the fields)


def _ragged() -> Files:
  _, en = _sentences(64, 0)
  return {"train.en": _lines(en[:-1])}


def _bad_utf8_text() -> Files:
  lines = _good_files("generation")["input.txt"].encode("utf-8").split(b"\n")
  lines[4] = b"der hund \xe4 sieht"  # a Latin-1 byte, not UTF-8
  return {"input.txt": b"\n".join(lines)}


def _dev_rows(*rows) -> Files:
  return {"dev.tsv": _table(list(rows))}


def _train_rows_plus(label: str, count: int) -> Files:
  """The good training table with `count` more rows labeled `label` (a typo among 0/1)."""
  de, en = _sentences(48, 3)
  rows = [(s, str(i % 2)) for i, s in enumerate(de + en)][:80]
  return {"train.tsv": _table(rows + [(f"a film number {i}", label) for i in range(count)])}


def _held_out_characters() -> Files:
  """Text whose last lines (in the held-out last 10%) have characters found nowhere before."""
  lines = _good_files("generation")["input.txt"].splitlines()
  lines[-5] = "der hund ~ sieht die Ω katze"
  return {"input.txt": _lines(lines)}


CASES = [
    # -- wrong types (the flag parser's own messages)
    Case("batch_size_not_an_int", "translation", ("--config.train.batch_size=abc", "int"),
         set={"train.batch_size": "abc"}),
    Case("learning_rate_not_a_number", "translation",
         ("--config.optim.learning_rate=fast", "float"), set={"optim.learning_rate": "fast"}),
    Case("greedy_not_a_bool", "generation", ("--config.decode.greedy=maybe", "boolean"),
         set={"decode.greedy": "maybe"}),
    Case("num_heads_fractional", "classification", ("--config.model.num_heads=4.5", "int"),
         set={"model.num_heads": "4.5"}),
    # -- out-of-range values
    Case("dropout_negative", "translation", ("config.optim.dropout_rate=-0.1", "[0, 1)"),
         set={"optim.dropout_rate": "-0.1"}),
    Case("dropout_above_one", "classification", ("config.optim.dropout_rate=1.5", "[0, 1)"),
         set={"optim.dropout_rate": "1.5"}),
    Case("num_heads_not_dividing_d_model", "generation",
         ("config.model.num_heads=3", "divide d_model=128"), set={"model.num_heads": "3"}),
    Case("batch_not_divisible_by_devices", "generation",
         ("config.train.batch_size=15", "divisible by devices", "= 2 x 1"),
         set={"train.batch_size": "15"}),
    Case("cpu_devices_negative", "generation", ("config.compute.cpu_devices=-1", "integer >= 0"),
         set={"compute.cpu_devices": "-1"}),
    Case("beam_size_zero", "translation", ("config.decode.beam_size=0", "integer >= 1"),
         set={"decode.beam_size": "0"}),
    Case("top_p_above_one", "generation", ("config.decode.top_p=1.5", "(0, 1]"),
         set={"decode.top_p": "1.5"}),
    Case("learning_rate_zero", "classification", ("config.optim.learning_rate=0.0", "> 0"),
         set={"optim.learning_rate": "0"}),
    Case("max_grad_norm_nan", "translation", ("config.optim.max_grad_norm=nan", ">= 0"),
         set={"optim.max_grad_norm": "nan"}),
    Case("num_average_zero", "translation", ("--num_average=0", "integer >= 1"),
         args=("--mode=average", "--num_average=0")),
    Case("workdir_empty", "generation", ("--workdir is empty",), args=("--workdir=",)),
    # -- incompatible combinations
    Case("chars_tokenizer_for_translation", "translation",
         ("config.model.tokenizer='chars'", "sentencepiece, bytes"),
         set={"model.tokenizer": "chars"}),
    Case("sentencepiece_type_unknown", "classification",
         ("config.model.sentencepiece_type='char'", "unigram, bpe, word"),
         set={"model.tokenizer": "sentencepiece", "model.sentencepiece_type": "char"}),
    Case("lm_batching_unknown", "generation",
         ("config.data.lm_batching='sentences'", "windows, documents"),
         set={"data.lm_batching": "sentences"}),
    Case("bleu_as_best_metric_of_classification", "classification",
         ("config.eval.best_metric='bleu'", "translation on real text only"),
         set={"eval.best_metric": "bleu"}),
    Case("packing_for_classification", "classification",
         ("config.data.pack_examples=True", "padded rows"),
         set={"data.pack_examples": "True", "data.length_bucket": "0"}),
    Case("length_buckets_with_packing", "classification",
         ("config.data.length_bucket=16", "packed rows"), set={"data.pack_examples": "True"}),
    Case("fused_attention_with_attention_dropout", "classification",
         ("config.compute.attention_impl='fused'", "attention_dropout_rate=0"),
         set={"compute.attention_impl": "fused"}),
    Case("weight_decay_without_adamw", "translation",
         ("config.optim.weight_decay=0.1", "optimizer='adamw'"), set={"optim.weight_decay": "0.1"}),
    Case("separate_vocabularies_with_shared_embeddings", "translation",
         ("config.model.share_embeddings=True", "shared_vocab=False"),
         set={"model.shared_vocab": "False"}),
    Case("same_language_on_both_sides", "translation",
         ("config.data.language_pair='de-de'", "two different language codes"),
         set={"data.language_pair": "de-de"}),
    Case("held_out_validation_beside_a_validation_file", "generation",
         ("config.data.validation_fraction=0.1", "no validation split"),
         set={"data.file_splits": "train=input.txt,validation=input.txt"}),
    Case("eval_prompt_as_long_as_the_context", "generation",
         ("config.decode.eval_prompt_length=64", "shorter than max_target_length=64"),
         set={"decode.eval_prompt_length": "64"}),
    Case("eval_split_not_a_file_split", "classification",
         ("config.data.eval_split='test'", "not a split of config.data.file_splits",
          "train, validation"),
         set={"data.eval_split": "test"}),
    Case("label_column_is_the_text_column", "classification",
         ("config.data.label_feature='sentence'", "differ from text_feature"),
         set={"data.label_feature": "sentence"}),
    Case("decode_mode_on_a_classifier", "classification",
         ("--mode=decode translates text", "config.task='classification'"),
         args=["--mode=decode"], stdin="a fine film\n"),
    # -- unknown fields, variants and flags; broken config files
    Case("unknown_config_field", "translation",
         ("unknown config field in the overrides", "'num_layers'"), set={"model.num_layers": "3"}),
    Case("unknown_size_variant", "translation", ("size='huge'", "tiny, small, base, big"),
         config="configs/translation.py:size=huge"),
    Case("variant_without_value", "generation", ("item 'dataset'", "key=value"),
         config="configs/generation.py:dataset"),
    Case("config_file_missing", "translation",
         ("cannot load --config", "configs/no_such_task.py", "No such file"),
         config="configs/no_such_task.py"),
    Case("config_file_raises_on_import", "translation",
         ("cannot load --config", "RuntimeError: no config here",
          "{tmp}/broken_config.py, line 1"), config="{tmp}/broken_config.py"),
    Case("config_file_without_get_config", "translation",
         ("cannot load --config", "has no attribute 'get_config'"),
         config="{tmp}/empty_config.py"),
    # config_flags re-raises a ValueError as its own flag error: the file and line are
    # found in the chain of exceptions.
    Case("config_file_raises_value_error", "translation",
         ("cannot load --config", "ValueError: no size 'xl'",
          "{tmp}/value_error_config.py, line 3"), config="{tmp}/value_error_config.py"),
    Case("config_file_raises_key_error", "translation",
         ("cannot load --config", "KeyError: 'layers'", "{tmp}/key_error_config.py, line 2"),
         config="{tmp}/key_error_config.py"),
    Case("config_file_with_a_mistyped_field", "translation",
         ("{tmp}/typo_config.py has unknown field(s) train.num_train_step",
          "fields of configs/default.py"), config="{tmp}/typo_config.py"),
    Case("config_file_returning_a_dict", "translation",
         ("get_config() of {tmp}/dict_config.py", "type dict",
          "not an ml_collections.ConfigDict"), config="{tmp}/dict_config.py",
         overrides=False),
    Case("unknown_mode", "translation", ("--mode=tune", "train|eval"), args=["--mode=tune"]),
    Case("positional_argument", "translation", ("unexpected arguments: extra", "--flags"),
         args=["extra"]),
    # -- missing data, files and checkpoints
    Case("data_dir_missing", "translation",
         ("{data}/nowhere: no such data directory (config.data.data_dir)",),
         set={"data.data_dir": "{data}/nowhere"}),
    Case("data_dir_empty", "classification", ("config.data.data_dir=''", "needs the directory"),
         set={"data.data_dir": ""}),
    Case("data_dir_without_the_files", "generation",
         ("{data}/input.txt: no such file", "has no files"), files={"input.txt": None}),
    Case("one_side_of_a_split_missing", "translation",
         ("{data}/val.en: no such file", "has val.de"), files={"val.en": None}),
    Case("predict_input_missing", "classification",
         ("--input={tmp}/nothing.txt", "No such file"),
         args=["--mode=predict", "--input={tmp}/nothing.txt"]),
    Case("eval_without_checkpoints", "translation",
         ("no latest checkpoint in {workdir}/checkpoints", "train first"),
         args=["--mode=eval"]),
    Case("predict_in_an_empty_workdir", "classification",
         ("no label names at {workdir}/labels.json", "train first"),
         args=["--mode=predict"], stdin="a fine film\n", existing_workdir=True),
    Case("generate_without_a_prompt", "generation", ("--mode=generate: no prompt",),
         args=["--mode=generate"], stdin=""),
    Case("average_without_checkpoints", "translation",
         ("no checkpoints in {workdir}/checkpoints", "train first"), args=["--mode=average"]),
    Case("generate_in_a_fresh_workdir", "generation",
         ("no tokenizer at {workdir}/tokenizer.json", "train first"),
         args=["--mode=generate", "--prompt=der hund"]),
    Case("eval_split_unknown", "translation",
         ("split 'nosuch' is not in config.data.file_splits",),
         args=["--mode=eval", "--split=nosuch"]),
    # A split name is checked against the data's splits (synthetic digits too) before a
    # report is named after it, and never becomes a path.
    Case("eval_split_unknown_on_synthetic_digits", "translation",
         ("split 'nosuch'", "the synthetic digits have the splits train, validation"),
         config="configs/default.py", args=["--mode=eval", "--split=nosuch"]),
    Case("eval_split_with_a_path_on_synthetic_digits", "generation",
         ("split '../../escape'", "train, validation"),
         config="configs/default.py:task=generation",
         args=["--mode=eval", "--split=../../escape"]),
    Case("head_importance_split_with_a_path", "translation",
         ("split '../escape' is not in config.data.file_splits",),
         args=["--mode=head_importance", "--split=../escape"]),
    Case("eval_split_of_synthetic_digits", "translation",
         ("config.data.eval_split='test'", "train, validation"),
         config="configs/default.py", set={"data.eval_split": "test"}),
    Case("file_split_named_with_a_path", "classification",
         ("config.data.file_splits=", "split name '../dev'"),
         set={"data.file_splits": "train=train.tsv,../dev=dev.tsv",
              "data.eval_split": "../dev"}),
    Case("split_flag_in_train_mode", "translation",
         ("--split is for --mode=eval, --mode=head_importance", "--mode=train would ignore it"),
         args=["--split=test"]),
    Case("prompt_flag_in_eval_mode", "generation",
         ("--prompt is for --mode=generate, --mode=attention", "--mode=eval"),
         args=["--mode=eval", "--prompt=der hund"]),
    Case("decode_input_not_utf8", "translation",
         ("--input={tmp}/input.de", "cannot read it as UTF-8", "0xff"),
         args=["--mode=decode", "--input={tmp}/input.de"]),
    Case("decode_stdin_not_utf8", "translation",
         ("standard input: cannot read it as UTF-8", "0xe9"),
         args=["--mode=decode"], stdin=b"der hund\nsieht \xe9 die katze\n"),
    Case("prompt_not_utf8", "generation", ("--prompt=", "is not UTF-8 text"),
         args=["--mode=generate", "--prompt=caf\udce9"]),
    # -- broken data files
    Case("ragged_parallel_files", "translation",
         ("parallel files of different lengths", "{data}/train.de has 64 lines",
          "{data}/train.en has 63 lines"), files=_ragged()),
    # The character vocabulary comes from the training text; the run stops before saving it.
    Case("characters_only_in_the_held_out_text", "generation",
         ("split 'validation' (the held-out last 10% of the 'train' text)",
          "'~' (U+007E) first in line", "'Ω' (U+03A9)", "training split 'train' lacks",
          "config.model.tokenizer='bytes'"),
         files=_held_out_characters(), existing_workdir=True),
    Case("max_skipped_fraction_above_one", "translation",
         ("config.train.max_skipped_fraction=1.5", "[0, 1]"),
         set={"train.max_skipped_fraction": "1.5"}),
    Case("invalid_utf8_text", "generation",
         ("{data}/input.txt, line 5: not valid UTF-8", "0xe4"), files=_bad_utf8_text()),
    Case("corrupt_gzip_file", "translation",
         ("{data}/train.en.gz: cannot read it", "Not a gzipped file"),
         files={"train.en": None, "train.en.gz": b"plain text, not gzip\n"}),
    Case("empty_training_files", "translation", ("{data}/train.de: the file is empty",),
         files={"train.de": "", "train.en": ""}),
    Case("whitespace_only_text", "generation", ("{data}/input.txt: the file is empty",),
         files={"input.txt": " \n\n\t\n"}),
    Case("table_with_a_header_only", "classification",
         ("{data}/train.tsv", "has a header", "no rows"), files={"train.tsv": _table([])}),
    Case("table_without_a_header", "classification",
         ("{data}/train.tsv, line 1 (header)", "no column 'sentence'"),
         files={"train.tsv": _lines(["a fine film\t1", "a dull film\t0"])}),
    # SentencePiece here: its model is trained and saved in the workdir unless the dev
    # labels are checked first.
    Case("label_outside_the_training_labels", "classification",
         ("{data}/dev.tsv, line 3", "label '2'", "not one of the training labels (0, 1)"),
         set={"model.tokenizer": "sentencepiece", "model.vocab_size": "60"},
         files=_dev_rows(("a fine film", "1"), ("a dull film", "2"))),
    Case("label_not_a_number", "classification",
         ("{data}/dev.tsv, line 2", "label 'positive'", "does not parse as an integer"),
         files=_dev_rows(("a fine film", "positive"), ("a dull film", "0"))),
    Case("empty_label", "classification",
         ("{data}/dev.tsv, line 2", "empty label in column 'label'"),
         files=_dev_rows(("a fine film", " "), ("a dull film", "0"))),
    Case("mistyped_training_label", "classification",
         ("{data}/train.tsv: label 'positive' has 1 training example(s) (line(s) 82)",
          "fewer than config.data.min_class_examples=10", "'0': 40, '1': 40, 'positive': 1"),
         files=_train_rows_plus("positive", 1), existing_workdir=True),
    Case("min_class_examples_zero", "classification",
         ("config.data.min_class_examples=0", "integer >= 1"),
         set={"data.min_class_examples": "0"}),
    Case("one_class_only", "classification",
         ("{data}/train.tsv", "every training label is '1'", "at least two classes"),
         files={"train.tsv": _table([("a fine film", "1"), ("a good film", "1")])}),
    Case("row_with_a_stray_tab", "classification",
         ("{data}/train.tsv, line 3", "3 fields", "header (line 1) has 2"),
         files={"train.tsv": _table([("a fine film", "1"), ("a dull\tfilm", "0")])}),
    Case("csv_with_an_unclosed_quote", "classification",
         ("{data}/train.csv, line 2: cannot parse the row", "unexpected end of data"),
         set={"data.file_splits": "train=train.csv,validation=dev.tsv"},
         files={"train.csv": 'sentence,label\n"a fine film,1\na dull film,0\n'}),
    Case("table_without_a_known_extension", "classification",
         ("{data}/train.txt", "column delimiter", ".tsv or .csv"),
         set={"data.file_splits": "train=train.txt,validation=dev.tsv"},
         files={"train.txt": _table([("a fine film", "1"), ("a dull film", "0")])}),
    # -- absurd lengths
    Case("max_target_length_zero", "translation",
         ("config.data.max_target_length=0", "integer >= 1"), set={"data.max_target_length": "0"}),
    Case("max_target_length_a_billion", "generation",
         ("config.data.max_target_length=1000000000", "at most 65536 tokens"),
         set={"data.max_target_length": "1000000000"}),
    Case("max_input_length_a_billion", "classification",
         ("config.data.max_input_length=1000000000", "at most 65536 tokens"),
         set={"data.max_input_length": "1000000000"}),
    Case("max_eval_length_one", "translation", ("config.data.max_eval_length=1", "integer >= 2"),
         set={"data.max_eval_length": "1"}),
    Case("context_longer_than_the_text", "generation",
         ("fewer than one batch of 4 windows of 4096", "config.data.max_target_length=4096"),
         # (small batches: 16 or 128 rows of 4096 need about 17 GiB and more by the memory
         # check's estimate, which then refuses first on a machine with less free memory)
         set={"data.max_target_length": "4096", "train.batch_size": "4",
              "eval.eval_batch_size": "4"}),
    Case("every_example_longer_than_the_rows", "translation",
         ("no training example fits config.data.max_input_length=2 and max_target_length=2",),
         set={"data.max_input_length": "2", "data.max_target_length": "2"}),
]

assert len({c.id for c in CASES}) == len(CASES)

# ----------------------------------------------------------------------------- running them

CONFIG_FILES = {  # broken config files the cases name, written in tmp
    "value_error_config.py": 'def get_config():\n  size = "xl"\n'
                             '  raise ValueError(f"no size {size!r}")\n',
    "key_error_config.py": 'def get_config():\n  return {}["layers"]\n',
    "typo_config.py": "from configs import default\n\n\ndef get_config():\n"
                      "  c = default.get_config()\n  c.train.num_train_step = 2\n  return c\n",
    "dict_config.py": 'def get_config():\n  return {"task": "translation"}\n',
}


def _write(directory, files: Files) -> None:
  os.makedirs(directory, exist_ok=True)
  for name, content in files.items():
    path = os.path.join(directory, name)
    if content is None:
      os.remove(path)
    elif isinstance(content, bytes):
      with open(path, "wb") as f:
        f.write(content)
    else:
      with open(path, "w", encoding="utf-8") as f:
        f.write(content)


def _run(case: Case, tmp) -> dict:
  """Writes the case's files under `tmp` and runs its main.py command line."""
  tmp = str(tmp)
  data, workdir = os.path.join(tmp, "data"), os.path.join(tmp, "run")
  _write(data, _good_files(case.task))
  _write(data, case.files)
  _write(tmp, {"broken_config.py": 'raise RuntimeError("no config here")\n',
               "empty_config.py": '"""A config file without get_config."""\n',
               **CONFIG_FILES,
               "input.de": b"der hund\nsieht \xff die katze\n"})
  if case.existing_workdir:
    os.makedirs(workdir)

  def fill(text):
    return text.format(data=data, tmp=tmp, workdir=workdir)

  overrides = {"data.data_dir": data, "data.tfds_data_dir": os.path.join(tmp, "tfds"),
               **BASE[case.task], **case.set} if case.overrides else {}
  args = [f"--config={fill(case.config or f'configs/{case.task}.py')}",
          f"--workdir={workdir}", *(f"--config.{k}={fill(v)}" for k, v in overrides.items()),
          *map(fill, case.args)]
  return {"result": run_main(*args, stdin=case.stdin), "workdir": workdir,
          "expect": [fill(text) for text in case.expect]}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_main_refuses_bad_input_in_one_line_writing_nothing(case, tmp_path):
  run = _run(case, tmp_path)
  result, workdir = run["result"], run["workdir"]
  line = assert_one_error_line(result, *run["expect"])
  print(line)
  assert "Traceback" not in result.stdout
  if case.existing_workdir:
    assert os.listdir(workdir) == []
  else:
    assert not os.path.exists(workdir), sorted(os.listdir(workdir))


def test_a_mistyped_label_common_enough_to_train_is_named_in_a_warning(tmp_path):
  """A label mistyped in config.data.min_class_examples rows or more is a class: the run
  goes on (exit 0) with a warning line that names it among the others."""
  # The run only has to go on, and most of its time is compiling the train step: rows of
  # one length (no length buckets: one compilation), short (every text is under 40 bytes),
  # small batches, one block without a convolution or dropout, and no attention maps.
  case = Case("label_mixing_words_and_integers", "classification", (),
              set={"data.length_bucket": "0", "data.max_input_length": "48",
                   "train.batch_size": "16", "eval.eval_batch_size": "16",
                   "model.num_encoder_layers": "1", "model.conv_kernel": "0",
                   "optim.dropout_rate": "0.0", "optim.attention_dropout_rate": "0.0",
                   "eval.num_attention_images": "0"},
              files=_train_rows_plus("positive", 10))
  result = _run(case, tmp_path)["result"]
  assert result.returncode == 0, result.stderr[-3000:]
  warnings = [line for line in result.stderr.splitlines()
              if line.startswith("warning: ") and "train.tsv: the training labels mix" in line]
  assert len(warnings) == 1, result.stderr[-3000:]
  assert ("mix integers (0, 1) and words (positive), each a class ('0': 40, '1': 40, "
          "'positive': 10); a mistyped label?") in warnings[0]
