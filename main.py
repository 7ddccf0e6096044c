r"""Entry point: pick a config, a workdir and a mode.

    python main.py --workdir=runs/demo                          # train (or resume), evaluate
    python main.py --workdir=runs/demo --mode=eval              # evaluate the newest checkpoint
    python main.py --config=configs/translation.py --workdir=runs/m30k \
        --config.data.data_dir=../shared/data/multi30k                # Multi30k de->en
    python main.py --config=configs/translation.py --workdir=runs/m30k \
        --config.data.data_dir=../shared/data/multi30k --mode=eval --split=test --checkpoint=best
    python main.py --config=configs/translation.py --workdir=runs/m30k --mode=average
    echo "Ein Mann fährt Fahrrad." | python main.py --config=configs/translation.py \
        --workdir=runs/m30k --config.data.data_dir=../shared/data/multi30k --mode=decode
    python main.py --config=configs/translation.py --workdir=runs/m30k \
        --config.data.data_dir=../shared/data/multi30k --mode=attention \
        --prompt="Ein Mann fährt Fahrrad." --reference="A man rides a bike." \
        --attention_head=cross:0:1   # heatmaps of every head in <workdir>/attention/
    python main.py --workdir=runs/demo --mode=attention --example=3  # an eval example
    python main.py --config=configs/translation.py --workdir=runs/m30k \
        --config.data.data_dir=../shared/data/multi30k --mode=head_importance  # heads ablated
    python main.py --config=configs/generation.py --workdir=runs/shakespeare  # char-level LM
    python main.py --config=configs/generation.py --workdir=runs/shakespeare \
        --mode=generate --prompt="ROMEO:" --config.decode.temperature=0.8 \
        --config.decode.num_samples=3
    python main.py --config=configs/default.py:task=generation,size=small --workdir=runs/lm
    python main.py --config=configs/classification.py --workdir=runs/sst2  # SST-2
    echo "A warm, clever film." | python main.py --config=configs/classification.py \
        --workdir=runs/sst2 --mode=predict --checkpoint=best
    python main.py --mode=sweep --sweep=configs/sweeps/sst2_seeds.py --workdir=runs/sst2_seeds
    python main.py --mode=eval --workdir=runs/sst2_seeds \
        --ensemble='runs/sst2_seeds/seed*'   # five SST-2 classifiers as one
    python main.py --workdir=runs/demo --config.train.num_train_steps=500 --config.model.d_model=128
    python main.py --mode=sweep --sweep=configs/sweeps/table3_multi30k.py \
        --workdir=runs/table3    # Table 3's ablations; --config.<field>=... on every variant
    python main.py --mode=sweep_report --sweep=configs/sweeps/table3_multi30k.py \
        --workdir=runs/table3    # the comparison of what has run so far, no training
    srun --ntasks-per-node=8 --gpus-per-node=8 python main.py --workdir=/shared/runs/x \
        --distributed           # one process per GPU (SLURM, Open MPI, TPU pod: detected)
    python main.py --workdir=runs/two --coordinator_address=10.0.0.1:1234 \
        --num_processes=2 --process_id=0   # (and --process_id=1 on the other host)

Exit status: 0 done; 2 a user error (bad config, missing, damaged or incompatible
checkpoint or data, a workdir that cannot be written, a full disk), printed as one line
without a traceback; 3 a non-finite loss (nothing bad was saved); 4 stopped by SIGTERM,
SIGINT or SIGHUP with nothing lost: training after writing a complete checkpoint of its
last step, anything else (data preparation, the first batch, evaluation, decoding) at
once, having nothing to save (rerun the same command to resume or start again); 128+N
killed by a second signal N before the checkpoint was complete (the earlier ones are
intact).
"""

import os
import re
import sys
import traceback

from absl import app, flags, logging
import ml_collections
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                               "default.py")
MODES = ("train", "eval", "decode", "generate", "predict", "average", "attention",
         "head_importance", "export")
SWEEP_MODES = ("sweep", "sweep_report")  # --sweep=FILE: configs/sweeps/__init__.py

def _user_error(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _refuse_flat_fields(argv) -> None:
  """A `--config.<field>` flag with a field name from before the fields were grouped gets
  one line naming its new place (config_flags would only say the field is unknown)."""
  from configs import default  # pylint: disable=g-import-not-at-top
  moved = default.field_groups()
  for arg in argv[1:]:
    name = arg.lstrip("-").split("=", 1)[0]
    if name.startswith("config.") and name[len("config."):] in moved:
      field = name[len("config."):]
      _user_error(f"--config.{field} is now --config.{moved[field]} (the config's fields are "
                  f"grouped: model, compute, data, optim, train, eval, decode; see "
                  f"docs/configs.md)")


_refuse_flat_fields(sys.argv)
try:  # config_flags reads --config.<field> overrides from sys.argv right here
  config_flags.DEFINE_config_file(
      "config", _DEFAULT_CONFIG,
      "Config file, optionally with a variant: path.py:key=value,...", lock_config=True)
except (KeyError, AttributeError) as e:
  while isinstance(e, BaseException) and e.args:  # KeyError inside AttributeError inside...
    e = e.args[0]
  _user_error(f"unknown config field in the overrides: {' '.join(str(e).split())}")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.")
flags.DEFINE_enum("mode", "train", MODES + SWEEP_MODES, "train: train (resuming) then evaluate; "
                  "eval: decode and score a split with a checkpoint, writing the scores "
                  "and hypotheses under <workdir>/eval; decode: translate lines of --input "
                  "to standard output; generate: continue each --prompt (or each line of "
                  "--input) with a language model, sampling as config says; predict: "
                  "classify each line of --input, printing per line the predicted label, "
                  "its probability and every class's probability, tab-separated as "
                  "'label<TAB>p<TAB>name1=p1 name2=p2 ...' (an empty line for an empty "
                  "line); attention: draw every head's attention on one input (--prompt, "
                  "a line of --input or --example) as PNGs with per-head statistics in "
                  "<workdir>/attention/; head_importance: the loss with each head removed "
                  "in turn, a table and a heatmap in <workdir>/attention/; average: "
                  "average the newest --num_average checkpoints into <workdir>/averaged; "
                  "export: write a checkpoint to --output as a Hugging Face folder "
                  "(--format=hf: GPT-2 or Marian) or raw safetensors (--format=safetensors); "
                  "sweep: train each variant of --sweep in <workdir>/<variant> (skipping "
                  "finished ones), then compare them in <workdir>/comparison.md, .csv and "
                  "validation_loss.png; sweep_report: only the comparison, of what is there.")
flags.DEFINE_integer("step", None, "eval/decode/predict/attention/head_importance: the "
                     "checkpoint step (default: newest); "
                     "average: the newest step to include.")
flags.DEFINE_enum("checkpoint", "latest", ("latest", "best", "averaged"),
                  "eval/decode/predict/attention/head_importance: which checkpoint: the "
                  "regular ones (newest or --step), the "
                  "best by config.eval.best_metric, or the --mode=average one.")
flags.DEFINE_string("split", None, "eval, head_importance: the split to score (default "
                    "config.data.eval_split).")
flags.DEFINE_string("input", "-", "decode: a text file with a sentence a line; generate: a "
                    "text file with a prompt a line (when no --prompt); predict: a text "
                    "file with a text to classify a line; attention: its first non-empty "
                    "line is drawn (when no --prompt); - = stdin.")
flags.DEFINE_multi_string("prompt", None, "generate: a prompt (repeat the flag for several; "
                          "\\n stands for a newline; an empty prompt starts from nothing); "
                          "attention: the text to draw (the first one).")
flags.DEFINE_string("reference", None, "attention, translation: the target text the decoder "
                    "reads (default: the model's own translation).")
flags.DEFINE_integer("example", None, "attention: draw example N of the eval split (its "
                     "reference included) instead of --prompt/--input text.")
flags.DEFINE_multi_string("attention_head", None, "attention: also draw this head at full "
                          "size: LAYER:HEAD (in every kind of attention) or KIND:LAYER:HEAD, "
                          "KIND one of encoder_self, decoder_self, cross; repeatable.")
flags.DEFINE_integer("num_average", 5, "average: how many of the newest checkpoints.")
flags.DEFINE_enum("format", "hf", ("hf", "safetensors"), "export: hf (a Hugging Face folder "
                  "transformers loads: GPT-2, Marian) or safetensors (any model, raw).")
flags.DEFINE_string("output", "", "export: the folder to write (must not exist).")
flags.DEFINE_list("ensemble", None, "eval, predict (classifiers): score or use the workdirs "
                  "listed (comma-separated; a glob pattern such as runs/x/seed* stands for "
                  "its matches) as one classifier, by the mean of their class "
                  "probabilities; each keeps its own saved config and tokenizer, and "
                  "--checkpoint/--step pick each one's checkpoint. The eval report goes to "
                  "<workdir>/eval/ (modes/ensemble.py).")
flags.DEFINE_string("sweep", None, "sweep/sweep_report: the sweep file (configs/sweeps/*.py): "
                    "a base config and its variants; --config.<field>=<value> flags apply "
                    "to every variant.")
flags.DEFINE_bool("distributed", False, "train/eval in several processes (jax.distributed), "
                  "the cluster detected from the environment: SLURM, Open MPI or a Cloud TPU "
                  "pod slice; the three flags below, when given, override what is detected.")
flags.DEFINE_string("coordinator_address", None, "Several processes: host:port of process 0's "
                    "coordinator service, the same in every process.")
flags.DEFINE_integer("num_processes", None, "Several processes: how many take part.")
flags.DEFINE_integer("process_id", None, "Several processes: this one's index, 0 to "
                     "num_processes - 1.")
flags.DEFINE_bool("verbose", False, "Log as absl does: every line with its prefix (time, "
                  "thread, file:line), what libraries log, the whole config (as does -v 1, "
                  "with debug lines too). Default: plain lines, library messages left out, "
                  "the config fields that differ from the defaults.")
flags.DEFINE_bool("help_config", False, "Print every config field with its comment, "
                  "grouped, and exit.")
flags.mark_flags_as_required(["workdir"])

# `--help`: a short usage (absl's would list every flag of every module: --helpfull).
_MODE_SUMMARIES = {
    "train": "train, resuming from the newest checkpoint, then evaluate (the default)",
    "eval": "score a split (--split) with a checkpoint; reports in <workdir>/eval",
    "decode": "translate each line of --input (default: standard input)",
    "generate": "continue each --prompt (or line of --input) with a language model",
    "predict": "classify each line of --input: the label and every class's probability",
    "attention": "draw every head's attention on one input into <workdir>/attention",
    "head_importance": "the loss with each head removed in turn, a table and a heatmap",
    "average": "average the newest --num_average checkpoints into <workdir>/averaged",
    "export": "write a checkpoint to --output: Hugging Face (--format=hf) or safetensors",
    "sweep": "train each variant of --sweep=FILE in <workdir>/<variant>, compare them",
    "sweep_report": "compare what a sweep has run so far (no training)",
}
_USAGE = """\
usage: python main.py --workdir=DIR [--mode=MODE] [--config=FILE[:VARIANT]]
                      [--config.GROUP.FIELD=VALUE ...] [flags]

The Transformer of "Attention Is All You Need": train it, evaluate it, decode, generate
and classify with it, look at its attention. A workdir keeps a run: checkpoints,
config.json, metrics (tensorboard --logdir DIR); a mode on an existing workdir starts from
its config.

modes (--mode=):
{modes}

examples:
  python main.py --workdir=runs/demo                    # the demo: a few minutes on a CPU
  python main.py --workdir=runs/demo --mode=eval        # score its newest checkpoint
  python main.py --config=configs/translation.py --workdir=runs/m30k \\
      --config.data.data_dir=../shared/data/multi30k    # Multi30k de->en
  echo "Ein Mann fährt Fahrrad." | python main.py --workdir=runs/m30k --mode=decode
  python main.py --config=configs/default.py:task=generation,size=small --workdir=runs/lm
  python main.py --workdir=runs/demo --config.train.num_train_steps=500
  python main.py --config=configs/generation.py --workdir=runs/gpt2 \\
      --config.init_from=models/gpt2                    # fine-tune a downloaded GPT-2

more:
  --help_config   every config field with its comment, grouped (docs/configs.md)
  --helpfull      every flag (the modes' own: --split, --checkpoint, --prompt, ...)
  --verbose       the whole config and every library's log lines, absl's prefixes kept
  README.md and docs/ explain the rest

exit status: 0 done; 2 a user error (one line "error: ..."); 3 a non-finite loss;
4 stopped by a signal, nothing lost (run the same command again to resume).
"""


def _read_input(path: str):
  """The lines of --input (a file, or standard input for -), read as UTF-8."""
  if path == "-":
    data = sys.stdin.buffer.read()  # bytes: the text stream's decoding depends on the locale
    try:
      return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
      _user_error(f"standard input: cannot read it as UTF-8 text ({e}); convert it first, "
                  f"e.g. with iconv -f latin1 -t utf-8")
  try:
    with open(path, encoding="utf-8") as f:
      return f.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    _user_error(f"--input={path}: cannot read it as UTF-8 text ({e})")


def _one_line(error: BaseException) -> str:
  """A config or flag error as one line (config_flags embeds tracebacks in its messages)."""
  lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
  if any(line.startswith("Traceback") for line in lines):
    lines = lines[-1:]  # the exception line at the end of the embedded traceback
  return re.sub(r"^[\w.]*(Error|Exception): ", "", " ".join(lines))


def _parse_flags(argv):
  """absl's flag parsing, with bad flags, overrides of fields the config lacks and config
  files that fail to load (config_flags lets their own errors through) as user errors."""
  _answer_help(argv)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # config_flags wraps a config file's ValueError in one
    origin, where = _raised_in_config(argv, e)
    _user_error(_one_line(e) if origin is None else _config_failure(origin, where))
  except Exception as e:  # pylint: disable=broad-except
    origin, where = _raised_in_config(argv, e)
    inner = e
    while not where and isinstance(inner, (KeyError, AttributeError)) and inner.args:
      if isinstance(inner, KeyError):  # ml_collections: an override's unknown field path
        _user_error(f"unknown config field in the overrides: "
                    f"{' '.join(str(inner.args[0]).split())}")
      inner = inner.args[0]
    _user_error(_config_failure(origin or e, where))


def _answer_help(argv) -> None:
  """--help (-h, -?, --helpshort): the short usage; --help_config: the config's fields;
  --helpfull: absl's list of every flag. Each printed to standard output, exit 0, before
  any other flag is checked (no --workdir needed)."""
  names = {arg.split("=", 1)[0].lstrip("-") for arg in
           (argv[1:argv.index("--")] if "--" in argv else argv[1:])}
  try:
    if names & {"help", "h", "?", "helpshort"}:
      modes = "\n".join(f"  {mode:<16} {_MODE_SUMMARIES[mode]}"
                        for mode in MODES + SWEEP_MODES)
      print(_USAGE.format(modes=modes), end="", flush=True)
    elif "help_config" in names:
      from configs import default, field_docs  # pylint: disable=g-import-not-at-top
      print(field_docs.help_text(default.get_config()), flush=True)
    elif "helpfull" in names:
      app.usage(shorthelp=False, writeto_stdout=True)
      sys.stdout.flush()
    else:
      return
  except BrokenPipeError:  # `--help_config | head`: the reader has seen enough
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
  sys.exit(0)


def _config_failure(error: BaseException, where: str) -> str:
  """The line of a config file that failed to load: a UserError's message as it is (a bad
  variant says what to change), anything else with its type and `where`."""
  from errors import UserError  # pylint: disable=g-import-not-at-top
  if isinstance(error, UserError):
    return _one_line(error)
  kind = "" if isinstance(error, OSError) else f"{type(error).__name__}: "  # no such file
  return f"cannot load --config: {kind}{_one_line(error)}{where}"


def _config_path(argv) -> str:
  """The absolute path of the config file --config names (its variant left out)."""
  paths = [a.split("=", 1)[1] for a in argv[1:] if a.startswith(("--config=", "-config="))]
  return os.path.abspath((paths[-1] if paths else _DEFAULT_CONFIG).split(":", 1)[0])


def _raised_in_config(argv, error: BaseException):
  """(the exception of `error`'s chain that the config file's own code raised, ' (<config
  file>, line N)' of the last line of that file in its traceback), or (None, ''). The
  chain is followed because config_flags re-raises a config file's ValueError (and
  others) as its own error, from the original."""
  path = _config_path(argv)
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    lines = [f.lineno for f in traceback.extract_tb(error.__traceback__)
             if os.path.abspath(f.filename) == path]
    if lines:
      return error, f" ({path}, line {lines[-1]})"
    error = error.__cause__ or error.__context__
  return None, ""


def _load_config():
  """The config, loaded (lazily, by config_flags) from the file named by --config."""
  try:
    config = flags.FLAGS.config
    if isinstance(config, ml_collections.ConfigDict):  # else refused below
      config.to_json()  # forces the lazy load here, where errors are caught
  except Exception as e:  # pylint: disable=broad-except  # a broken config file
    origin, where = _raised_in_config(sys.argv, e)
    _user_error(_config_failure(origin or e, where))
  _check_config_fields(config)
  return config


def _refuse_preset_labels(mode: str) -> None:
  """`--config.size=...` and `--config.accel=...` would relabel the config without applying
  the preset: one line naming the variant string that does (configs/presets.py)."""
  from configs import presets  # pylint: disable=g-import-not-at-top
  from errors import UserError  # pylint: disable=g-import-not-at-top
  given = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith(("--config=", "-config="))]
  path = (given[-1] if given else os.path.relpath(_DEFAULT_CONFIG)).split(":", 1)[0]
  try:
    presets.refuse_label_overrides(config_flags.get_override_values(flags.FLAGS["config"]),
                                   None if mode in SWEEP_MODES else path)
  except UserError as e:
    _user_error(str(e))


def _ensemble_members(file_config):
  """--ensemble: [(member workdir, its config)], each config resolved as --mode=eval
  resolves a workdir's (modes/workdir_config.py); [] without the flag."""
  if not flags.FLAGS.ensemble:
    return []
  from errors import UserError  # pylint: disable=g-import-not-at-top
  from modes import ensemble, workdir_config  # pylint: disable=g-import-not-at-top
  try:
    members = [(member, workdir_config.resolve_config(
        member, file_config, config_flags.get_override_values(flags.FLAGS["config"]),
        explicit_file=flags.FLAGS["config"].present))
               for member in ensemble.member_dirs(flags.FLAGS.ensemble)]
  except UserError as e:
    _user_error(str(e))
  for _, config in members:
    _apply_pretrained(config)
  return members


def _workdir_config(file_config):
  """The config of every mode but the sweeps: the one saved in an existing --workdir with
  the --config.<field> flags on it, unless --config=FILE is given (modes/workdir_config.py)."""
  from errors import UserError  # pylint: disable=g-import-not-at-top
  from modes import workdir_config  # pylint: disable=g-import-not-at-top
  try:
    return workdir_config.resolve_config(
        flags.FLAGS.workdir, file_config, config_flags.get_override_values(flags.FLAGS["config"]),
        explicit_file=flags.FLAGS["config"].present)
  except UserError as e:
    _user_error(str(e))


def _note_missing_accelerator(config) -> None:
  """config.accel=gpu or tpu on a machine without one: one line, and the run goes on."""
  import jax  # pylint: disable=g-import-not-at-top
  from configs import presets  # pylint: disable=g-import-not-at-top
  note = presets.missing_accelerator(config, jax.default_backend())
  if note and jax.process_index() == 0:
    logging.warning(note)


def _fields_of(config, prefix: str = "") -> set:
  """The dotted names of a config's leaf fields ("train.batch_size")."""
  out = set()
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out |= _fields_of(value, f"{prefix}{key}.")
    else:
      out.add(prefix + key)
  return out


def _check_config_fields(config) -> None:
  """A config file's get_config must return a ConfigDict with exactly the fields of
  configs/default.py: a missing field would fail deep in the run, and an unknown one (a
  typo such as train.num_train_step) would be ignored without a word."""
  from configs import default  # pylint: disable=g-import-not-at-top
  path = _config_path(sys.argv)
  if not isinstance(config, ml_collections.ConfigDict):
    _user_error(f"cannot load --config: get_config() of {path} returned a value "
                f"of type {type(config).__name__}, not an ml_collections.ConfigDict")
  wanted, given = _fields_of(default.get_config()), _fields_of(config)
  for what, names in (("lacks", wanted - given), ("has unknown", given - wanted)):
    if names:
      shown = ", ".join(sorted(names)[:8]) + (", ..." if len(names) > 8 else "")
      _user_error(f"the config of {path} {what} field(s) {shown}; a config has exactly "
                  f"the fields of configs/default.py (build it from its get_config)")


def _load_sweep():
  """(the --sweep file's Sweep, the --config.<field> overrides) for the sweep modes, else
  (None, None). The sweep file holds the base config; the overrides, typed by config_flags
  against the default config (every config has its fields), apply to every variant."""
  mode, path = flags.FLAGS.mode, flags.FLAGS.sweep
  if mode not in SWEEP_MODES:
    if path:
      _user_error(f"--sweep is for --mode={' and --mode='.join(SWEEP_MODES)}")
    return None, None
  if not path:
    _user_error(f"--mode={mode} needs --sweep=FILE, e.g. configs/sweeps/table3_multi30k.py")
  if flags.FLAGS["config"].present:
    _user_error(f"--mode={mode} takes the base config from the --sweep file; drop --config= "
                f"(--config.<field>=<value> flags still apply to every variant)")
  if mode == "sweep_report" and not os.path.isdir(flags.FLAGS.workdir):
    _user_error(f"--workdir={flags.FLAGS.workdir}: no such directory (no sweep ran there)")
  from configs import sweeps as sweep_files  # pylint: disable=g-import-not-at-top
  overrides = config_flags.get_override_values(flags.FLAGS["config"])
  try:
    sweep = sweep_files.load_sweep(path)
    sweep.check(overrides)
  except sweep_files.SweepError as e:
    _user_error(str(e))
  return sweep, overrides


def _attention_text(config):
  """--mode=attention: the text to draw (the first --prompt, else the first non-empty line
  of --input), or None with --example; one-line errors for flags that do not fit."""
  f = flags.FLAGS
  import tasks  # pylint: disable=g-import-not-at-top
  family = tasks.TASKS.get(config.task)
  if (f.reference is not None
      and getattr(family, "attention_fields", {}).get("decoder") != "targets"):
    _user_error(f"--reference is for translation (the decoder's target text); "
                f"config.task={config.task!r}")
  if f.example is not None:
    if f.prompt is not None or f.reference is not None:
      _user_error("--example=N draws an eval example as it is; drop --prompt and --reference")
    return None
  if f.prompt is not None:
    if not f.prompt[0].strip():
      _user_error("--prompt is empty: give the text to draw")
    return f.prompt[0].replace("\\n", "\n")
  lines = [line for line in _read_input(f.input) if line.strip()]
  if not lines:
    _user_error("--mode=attention: no input; give --prompt=TEXT, a line on --input or "
                "--example=N (an eval example)")
  return lines[0]


def _set_cpu_devices(config) -> None:
  """config.compute.cpu_devices > 0: XLA's host platform gets that many devices, so the pmapped
  step runs data-parallel over the CPU cores (one device per core) instead of splitting
  each small matmul between them. Set before JAX starts its backends; the GPU and TPU
  backends ignore it."""
  count = config.compute.cpu_devices
  if isinstance(count, bool) or not isinstance(count, int) or count < 0:
    _user_error(f"config.compute.cpu_devices={count!r} is invalid: expected an integer >= 0")
  if count:
    flag = f"--xla_force_host_platform_device_count={count}"
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")]
    given = {f.split("=", 1)[0].lstrip("-") for f in kept}
    timeouts = [f"--{name}={seconds}" for name, seconds in CPU_COLLECTIVE_TIMEOUTS.items()
                if count > 1 and name not in given]
    os.environ["XLA_FLAGS"] = " ".join(kept + [flag] + timeouts)


# Several CPU devices: XLA ends the process ("Termination timeout for all reduce ...
# Expected 2 threads to join the rendezvous", exit 134) when one device thread waits at a
# collective of the pmapped step for more than 40 s (its default; a warning at 20 s), which
# happens on a loaded machine (a 2-core host shared with other jobs). A generous limit
# here; a value given in XLA_FLAGS wins. The flags are XLA's DebugOptions (jaxlib 0.10.2;
# xla/debug_options_flags.cc); an XLA that lacks them stops at start-up on XLA_FLAGS.
CPU_COLLECTIVE_TIMEOUTS = {"xla_cpu_collective_call_warn_stuck_timeout_seconds": 120,
                           "xla_cpu_collective_call_terminate_timeout_seconds": 600}


_PROCESS_FLAGS = ("coordinator_address", "num_processes", "process_id")


def _start_processes(mode: str) -> None:
  """--distributed or the explicit process flags: joins this process to the others with
  jax.distributed, before anything touches JAX's devices (the pmapped steps then span
  every process's devices). Bad values are user errors, checked before connecting."""
  f = flags.FLAGS
  given = [name for name in _PROCESS_FLAGS if getattr(f, name) is not None]
  if not f.distributed and not given:
    return
  if mode not in ("train", "eval"):
    _user_error(f"--mode={mode} runs in one process; --distributed and "
                f"--{', --'.join(_PROCESS_FLAGS)} are for --mode=train and --mode=eval")
  if not f.distributed and len(given) < len(_PROCESS_FLAGS):
    missing = [name for name in _PROCESS_FLAGS if name not in given]
    _user_error(f"--{' and --'.join(missing)} missing: several processes need "
                f"--{', --'.join(_PROCESS_FLAGS)}, or --distributed to detect them from "
                f"the cluster (SLURM, Open MPI, TPU pod slice)")
  address, count, index = f.coordinator_address, f.num_processes, f.process_id
  if address is not None and not re.fullmatch(r"[^\s:]+:\d+|\[[0-9a-fA-F:.]+\]:\d+",
                                              address):
    _user_error(f"--coordinator_address={address!r} is invalid: expected host:port, "
                f"e.g. 10.0.0.1:1234")
  if count is not None and count < 1:
    _user_error(f"--num_processes={count} is invalid: expected an integer >= 1")
  if index is not None and (index < 0 or (count is not None and index >= count)):
    allowed = f"0 to {count - 1}" if count is not None else "an integer >= 0"
    _user_error(f"--process_id={index} is invalid: expected {allowed} "
                f"(--num_processes={count})")
  import jax  # pylint: disable=g-import-not-at-top
  # Cross-process collectives between CPU devices need an implementation (gloo over TCP,
  # jax's default today); the GPU and TPU backends ignore it.
  if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(coordinator_address=address, num_processes=count,
                               process_id=index)
  except Exception as e:  # pylint: disable=broad-except  # no cluster found, no coordinator
    hint = (" (no SLURM, Open MPI or TPU pod slice detected? give --coordinator_address, "
            "--num_processes and --process_id)" if f.distributed and not given else "")
    _user_error(f"cannot start the multi-process runtime (jax.distributed): "
                f"{_one_line(e)}{hint}")


def _lines_mode(mode, config, workdir):
  """decode, predict: a line out for each line in."""
  import modes  # pylint: disable=g-import-not-at-top
  run = {"decode": modes.decode_lines, "predict": modes.predict_lines}[mode]
  modes.check_mode_fits(config, mode)
  lines = _read_input(flags.FLAGS.input)
  for line in run(config, workdir, lines, step=flags.FLAGS.step,
                  checkpoint=flags.FLAGS.checkpoint):
    print(line, flush=True)


def _ensemble_mode(mode, members, workdir):
  """eval, predict with --ensemble (modes/ensemble.py)."""
  from modes import ensemble  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  dirs, configs = [m for m, _ in members], [c for _, c in members]
  if mode == "eval":
    ensemble.evaluate_ensemble(configs, dirs, workdir, step=f.step, split=f.split,
                               checkpoint=f.checkpoint)
    return
  for line in ensemble.predict_ensemble_lines(configs, dirs, _read_input(f.input),
                                              checkpoint=f.checkpoint, step=f.step):
    print(line, flush=True)


def _generate_mode(config, workdir):
  import modes  # pylint: disable=g-import-not-at-top
  modes.check_mode_fits(config, "generate")
  prompts = ([p.replace("\\n", "\n") for p in flags.FLAGS.prompt]
             if flags.FLAGS.prompt is not None else _read_input(flags.FLAGS.input))
  if not prompts:
    _user_error("--mode=generate: no prompt; give --prompt=TEXT or lines on --input")
  samples = modes.generate_text(config, workdir, prompts, step=flags.FLAGS.step,
                                checkpoint=flags.FLAGS.checkpoint)
  for i, texts in enumerate(samples, 1):
    for j, text in enumerate(texts, 1):
      print(f"--- prompt {i}, sample {j}\n{text}", flush=True)


def _inspection_mode(mode, config, workdir):
  """attention, head_importance."""
  import modes  # pylint: disable=g-import-not-at-top
  from inspection import attention_maps  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if mode == "attention":
    paths, table = modes.attention_report(
        config, workdir, text=_attention_text(config), reference=f.reference,
        example=f.example, heads=f.attention_head or (), step=f.step, checkpoint=f.checkpoint)
    print(f"{table}\nwrote:\n" + "\n".join(paths), flush=True)
    return
  baseline, increase, paths = modes.head_importance(config, workdir, step=f.step,
                                                    split=f.split, checkpoint=f.checkpoint)
  print(f"{attention_maps.importance_markdown(baseline, increase, limit=10)}\nwrote:\n"
        + "\n".join(paths), flush=True)


def _run_mode(mode, config, workdir, sweep, overrides):
  import modes  # pylint: disable=g-import-not-at-top
  import train  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if mode == "train":
    train.train_and_evaluate(config, workdir)
  elif mode == "eval":
    modes.evaluate_checkpoint(config, workdir, step=f.step, split=f.split,
                              checkpoint=f.checkpoint)
  elif mode in ("decode", "predict"):
    _lines_mode(mode, config, workdir)
  elif mode == "generate":
    _generate_mode(config, workdir)
  elif mode in ("attention", "head_importance"):
    _inspection_mode(mode, config, workdir)
  elif mode in SWEEP_MODES:
    from modes import sweep as sweeps  # pylint: disable=g-import-not-at-top
    rows = (sweeps.run_sweep(sweep, workdir, overrides) if mode == "sweep" else
            sweeps.write_comparison(sweep, workdir, overrides))
    print(f"sweep {sweep.name}: {sum(r['status'] == 'done' for r in rows)} of {len(rows)} "
          f"variants done; comparison in {os.path.join(workdir, 'comparison.md')}, "
          f"comparison.csv and validation_loss.png", flush=True)
    for line in sweeps.difference_lines(rows):  # finished variants that ran other flags
      print(f"  {line}", flush=True)
  elif mode == "export":
    from modes import export  # pylint: disable=g-import-not-at-top
    print(export.export(config, workdir, f.output, f.format, f.checkpoint, f.step), flush=True)
  else:
    step = modes.average_checkpoints(config, workdir, f.num_average, last_step=f.step)
    print(f"averaged the newest {f.num_average} checkpoints (up to step {step}) "
          f"into {os.path.join(workdir, 'averaged')}")


_RESTORING = ("eval", "decode", "generate", "predict", "attention", "head_importance",
              "export")
# The modes that read each flag: given to another mode, it would be ignored without a word
# (--mode=train --split=test trains and evaluates config.data.eval_split).
_MODE_FLAGS = {
    "step": _RESTORING + ("average",), "checkpoint": _RESTORING,
    "split": ("eval", "head_importance"), "input": ("decode", "generate", "predict",
                                                    "attention"),
    "prompt": ("generate", "attention"), "reference": ("attention",),
    "example": ("attention",), "attention_head": ("attention",), "num_average": ("average",),
    "format": ("export",), "output": ("export",), "ensemble": ("eval", "predict"),
}


def _refuse_flags_of_other_modes(mode: str) -> None:
  for name, modes in _MODE_FLAGS.items():
    if flags.FLAGS[name].present and mode not in modes:
      _user_error(f"--{name} is for --mode={', --mode='.join(modes)}; --mode={mode} would "
                  f"ignore it")


def _refuse_text_flags_not_utf8() -> None:
  """--prompt and --reference arrive as the shell passed their bytes; those that are not
  UTF-8 reach Python as lone surrogates, which no tokenizer can encode."""
  for name in ("prompt", "reference"):
    values = flags.FLAGS[name].value
    for value in values if isinstance(values, list) else [values] if values else []:
      try:
        value.encode("utf-8")
      except UnicodeEncodeError:
        shown = value.encode("utf-8", "surrogateescape")
        _user_error(f"--{name}={shown!r} is not UTF-8 text; give it in UTF-8 (a terminal "
                    f"or file in another encoding: convert it, e.g. with iconv -t utf-8)")


def main(argv):
  if len(argv) > 1:
    _user_error(f"unexpected arguments: {' '.join(argv[1:])} (options are --flags, e.g. "
                f"--config.train.batch_size=32)")
  if not flags.FLAGS.workdir.strip():
    _user_error("--workdir is empty: give the directory of the run (created if missing)")
  _refuse_flags_of_other_modes(flags.FLAGS.mode)
  _refuse_text_flags_not_utf8()
  _refuse_preset_labels(flags.FLAGS.mode)
  config = _load_config()
  sweep, overrides = _load_sweep()
  _set_up_output()  # after the checks above (they print; no jax import for them)
  members = _ensemble_members(config)
  if sweep is None and not members:
    config = _workdir_config(config)
    _apply_pretrained(config)
  first = (sweep.config(sweep.variants[0], overrides) if sweep is not None else
           members[0][1] if members else config)
  _set_cpu_devices(first)
  _start_processes(flags.FLAGS.mode)
  _note_missing_accelerator(first)
  from errors import UserError  # pylint: disable=g-import-not-at-top
  from training import monitors, preemption  # pylint: disable=g-import-not-at-top
  try:
    with _stop_request(flags.FLAGS.mode):
      if members:
        _ensemble_mode(flags.FLAGS.mode, members, flags.FLAGS.workdir)
      else:
        _run_mode(flags.FLAGS.mode, config, flags.FLAGS.workdir, sweep, overrides)
  except UserError as e:
    _exit(f"error: {e}", 2)
  except monitors.NonFiniteLossError as e:
    _exit(f"error: {e}", 3, together=True)  # the loss is the global batch's
  except (preemption.Preempted, preemption.Stopped) as e:
    _exit(f"stopped: {e}", preemption.EXIT_PREEMPTED, together=True)  # agreed on a step


def _apply_pretrained(config) -> None:
  """config.init_from: the folder's model fields and tokenizer (pretrained/__init__.py)."""
  from errors import UserError  # pylint: disable=g-import-not-at-top
  import pretrained  # pylint: disable=g-import-not-at-top
  try:
    pretrained.apply_to_config(config)
  except UserError as e:
    _user_error(str(e))


def _set_up_output() -> None:
  """Plain lines a person reads (training/reporting.py `plain_logs`), unless --verbose or
  absl's -v asks for everything as absl logs it."""
  if flags.FLAGS.verbose or flags.FLAGS.verbosity > 0:
    return
  from training import reporting  # pylint: disable=g-import-not-at-top
  reporting.plain_logs()


def _stop_request(mode: str):
  """The run's one stop flag (training/preemption.py) for SIGTERM, SIGINT and SIGHUP: the
  training loop finishes its step and saves; anything else (data preparation, the first
  batch, compilation, evaluation, decoding) has nothing to save and stops at once, exit 4
  either way. Several processes must stop at the same point: there a signal only sets the
  flag, which the training loop and evaluations agree on between steps and batches."""
  from training import preemption  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  several = f.distributed or any(getattr(f, name) is not None for name in _PROCESS_FLAGS)
  doing = ("preparing --mode=train (before its first step)" if mode == "train" else
           f"running --mode={mode}")
  return preemption.StopRequest(interrupt=not several, doing=doing)


def _exit(message: str, status: int, together: bool = False) -> None:
  """Prints `message` as the last line and exits at once; with `together` (an exit every
  process of a multi-process run takes at the same step), once the others reach theirs.
  The train loop has closed its checkpoints by now; what is skipped is the interpreter's
  teardown, in which tensorstore callbacks of a failed checkpoint read or write print
  'Event loop is closed' tracebacks (they can also come earlier, from tensorstore's
  threads; the message stays last)."""
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  # Other threads' last words would land after the message: stderr goes to /dev/null
  # first, and the message to a copy of the real stderr.
  real_stderr = os.dup(2)
  os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
  try:
    os.write(real_stderr, (message + "\n").encode("utf-8", "replace"))
  except OSError:  # the terminal is gone (SIGHUP): the status still says what happened
    pass
  if together:
    _leave_the_other_processes()
  os._exit(status)  # pylint: disable=protected-access


def _leave_the_other_processes() -> None:
  """jax.distributed's shutdown, which `os._exit` skips (jax registers it with atexit): a
  barrier of every process, then process 0 closes the coordination service. Without it,
  process 0 could exit while another is still between its checkpoint and its exit, and
  that process's coordination client, finding the service gone, aborts it (SIGABRT,
  exit -6 instead of 4; seen in CI). Waits at most jax's shutdown timeout (300 s)."""
  jax = sys.modules.get("jax")
  if jax is None or not jax.distributed.is_initialized():
    return
  try:
    jax.distributed.shutdown()
  except Exception:  # pylint: disable=broad-except  # another process is gone: exit anyway
    pass


def run() -> None:
  """The `transformer` command of an installed project (pyproject.toml): as `python main.py`.
  First the program starts again with glibc's malloc on transparent huge pages
  (training/host_memory.py; TRANSFORMER_HUGE_PAGES=0 leaves malloc as it is)."""
  from training import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.reexec_with_huge_pages()
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
