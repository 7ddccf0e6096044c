"""Checks a run config before any compute; the first problem stops the run with a message
that names the field, the value and what is allowed.

It sits beside train.py (floor 3) because it needs the names that models/, tasks/ and
training/ accept; main.py and train.train_and_evaluate both call `validate`.
"""

from configs import presets
from input_pipeline import local_builders, sources, synthetic
from models import attention, layers, transformer
from tasks import TASKS
from training import optimizers

DTYPES = ("float32", "bfloat16")
TOKENIZERS = {"translation": ("sentencepiece", "bytes"),
              "generation": ("chars", "bytes", "sentencepiece"),
              "classification": ("sentencepiece", "bytes")}
LM_BATCHING = ("windows", "documents")
BEST_METRICS = ("", "loss", "perplexity", "accuracy", "macro_f1", "exact_match", "bleu",
                "chrf")
TEXT_METRICS = ("bleu", "chrf")  # need real translation data
REAL_DATA_TASKS = ("translation", "generation", "classification")  # tasks on real text
NONFINITE_UPDATES = ("stop", "skip")
MAX_ATTENTION_IMAGES = 16
# The longest row a length field may ask for: one row's [length, length] attention scores
# (a head, float32) are 16 GiB there already, and longer asks fail in an allocation.
MAX_LENGTH = 65536
LENGTH_FIELDS = ("max_input_length", "max_target_length", "max_eval_length",
                 "decode_extra_length")


class ConfigError(ValueError):
  """A config value that cannot work; the message is meant for the user as is."""


def _fail(field, value, allowed):
  raise ConfigError(f"config.{field}={value!r} is invalid: {allowed}")


def _choice(config, field, allowed):
  value = config[field]
  if value not in allowed:
    _fail(field, value, f"expected one of {', '.join(map(str, allowed))}")


def _int(config, field, minimum):
  value = config[field]
  if isinstance(value, bool) or not isinstance(value, int):
    _fail(field, value, f"expected an integer >= {minimum}")
  if value < minimum:
    _fail(field, value, f"expected an integer >= {minimum}")


def _rate(config, field, upper_inclusive=False):
  value = config[field]
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 and (
      value <= 1 if upper_inclusive else value < 1)
  if not ok:
    _fail(field, value, f"expected a number in [0, 1{']' if upper_inclusive else ')'}")


def _positive(config, field):
  value = config[field]
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
    _fail(field, value, "expected a number > 0")


def validate(config, num_devices: int = 1) -> None:
  """Raises ConfigError for the first invalid field of `config` (an ml_collections config)."""
  _choice(config, "task", tuple(TASKS))
  _dataset(config)
  _choice(config, "size", tuple(presets.SIZES))
  _choice(config, "accel", tuple(presets.ACCELERATORS))
  _choice(config, "dtype", DTYPES)
  _choice(config, "attention_impl", attention.IMPLEMENTATIONS)
  _choice(config, "remat", transformer.REMAT_POLICIES)
  _choice(config, "dropout_rng", layers.DROPOUT_RNGS)
  _int(config, "attention_block_size", 1)
  if not isinstance(config.get("scan_layers", False), bool):
    _fail("scan_layers", config.model.scan_layers, "expected True or False")
  _choice(config, "norm_placement", transformer.NORM_PLACEMENTS)
  _choice(config, "positional_encoding", layers.POSITIONAL_ENCODINGS)
  _choice(config, "activation", tuple(layers.ACTIVATIONS))
  _choice(config, "pooling", transformer.POOLINGS)
  _choice(config, "optimizer", optimizers.OPTIMIZERS)
  _choice(config, "schedule", optimizers.SCHEDULES)
  _choice(config, "nonfinite_updates", NONFINITE_UPDATES)
  _int(config, "max_skipped_updates", 0)
  _int(config, "signal_check_every_steps", 1)
  if not isinstance(config.get("allow_config_change", False), bool):
    _fail("allow_config_change", config.train.allow_config_change, "expected True or False")
  if config.data.dataset == "synthetic":
    allowed = (synthetic.CLASSIFICATION_TASKS if config.task == "classification"
               else synthetic.SEQ2SEQ_TASKS)
    _choice(config, "synthetic_task", allowed)

  for field in ("d_model", "d_ff", "num_heads", "batch_size", "eval_batch_size",
                "num_train_steps", "log_every_steps", "eval_every_steps",
                "checkpoint_every_steps", "keep_checkpoints", "grad_accum_steps",
                "min_digits", "max_digits", "max_input_length", "max_target_length",
                "num_eval_examples"):
    _int(config, field, 1)
  for field in ("head_dim", "warmup_steps", "num_print_examples", "seed", "shuffle_seed",
                "cpu_devices", "num_attention_images", "head_importance_batches",
                "data_threads", "data_prefetch", "device_prefetch", "profile_steps"):
    _int(config, field, 0)
  needs_encoder = config.task in ("translation", "classification")
  needs_decoder = config.task in ("translation", "generation")
  _int(config, "num_encoder_layers", 1 if needs_encoder else 0)
  _int(config, "num_decoder_layers", 1 if needs_decoder else 0)
  for field in ("dropout_rate", "attention_dropout_rate", "label_smoothing", "adam_b1",
                "adam_b2", "weight_decay"):
    _rate(config, field)
  for field in ("learning_rate", "adam_eps", "layer_norm_epsilon"):
    _positive(config, field)
  if config.optim.max_grad_norm < 0:
    _fail("max_grad_norm", config.optim.max_grad_norm, "expected a number >= 0 (0 = no clipping)")

  if config.model.head_dim == 0 and config.model.d_model % config.model.num_heads:
    _fail("num_heads", config.model.num_heads,
          f"it must divide d_model={config.model.d_model} (or set config.model.head_dim explicitly)")
  if config.model.positional_encoding == "sinusoidal" and config.model.d_model % 2:
    _fail("d_model", config.model.d_model, "sinusoidal positions need an even d_model")
  if config.compute.attention_impl != "reference" and config.optim.attention_dropout_rate > 0:
    _fail("attention_impl", config.compute.attention_impl,
          f"the {config.compute.attention_impl} path has no attention dropout; set "
          f"attention_dropout_rate=0 or use attention_impl='reference'")
  if config.optim.optimizer != "adamw" and config.optim.weight_decay > 0:
    _fail("weight_decay", config.optim.weight_decay, "weight decay needs optimizer='adamw'")
  if config.eval.num_attention_images > MAX_ATTENTION_IMAGES:
    _fail("num_attention_images", config.eval.num_attention_images,
          f"expected at most {MAX_ATTENTION_IMAGES} (each is drawn at every evaluation)")
  if config.data.min_digits > config.data.max_digits:
    _fail("min_digits", config.data.min_digits, f"must be <= max_digits={config.data.max_digits}")

  # Synthetic records: seq2seq "x EOS"; LM "x SEP f(x) EOS"; classification "x".
  if config.data.dataset == "synthetic":
    need = {"translation": ("max_input_length", config.data.max_digits + 1),
            "generation": ("max_target_length", 2 * config.data.max_digits + 2),
            "classification": ("max_input_length", config.data.max_digits)}[config.task]
    field, length = need
    if config[field] < length:
      _fail(field, config[field], f"examples of max_digits={config.data.max_digits} need "
                                  f"at least {length} tokens")
    if config.task == "translation" and config.data.max_target_length < config.data.max_digits + 1:
      _fail("max_target_length", config.data.max_target_length,
            f"examples of max_digits={config.data.max_digits} need at least "
            f"{config.data.max_digits + 1} tokens")

  _decoding(config)
  _generation(config)
  for field in LENGTH_FIELDS:
    if isinstance(config[field], int) and config[field] > MAX_LENGTH:
      _fail(field, config[field], f"expected at most {MAX_LENGTH} tokens (a row's attention "
                                  f"scores grow with its length squared)")
  per_update = num_devices * config.train.grad_accum_steps
  if config.train.batch_size % per_update:
    _fail("batch_size", config.train.batch_size,
          f"it must be divisible by devices x grad_accum_steps = {num_devices} x "
          f"{config.train.grad_accum_steps} = {per_update}")
  if config.eval.eval_batch_size % num_devices:
    _fail("eval_batch_size", config.eval.eval_batch_size,
          f"it must be divisible by the number of devices ({num_devices})")


def _dataset(config) -> None:
  """The data fields: which dataset, where, which splits and languages, the tokenizer."""
  dataset = config.data.dataset
  if not isinstance(dataset, str) or not dataset.strip():
    _fail("dataset", dataset, "expected 'synthetic', 'files' or a tensorflow-datasets name")
  if dataset == "synthetic":
    return
  if config.task not in REAL_DATA_TASKS:
    _fail("dataset", dataset, f"task {config.task!r} trains on synthetic data only so far; "
                              f"real data is supported for {', '.join(REAL_DATA_TASKS)}")
  if dataset == "files" and not config.data.data_dir:
    _fail("data_dir", config.data.data_dir, "dataset='files' needs the directory of the files")
  if config.task == "translation":
    pair = str(config.data.language_pair).split("-")
    if len(pair) != 2 or not all(pair) or pair[0] == pair[1]:
      _fail("language_pair", config.data.language_pair,
            "expected two different language codes as source-target, e.g. 'de-en'")
  if config.task == "generation":
    _language_model_data(config)
  if config.task == "classification":
    _classification_data(config)
  if dataset == "files":
    try:  # the one parser of this field; its error names the field already
      stems = dict(sources.parse_mapping(config.data.file_splits, "file_splits"))
    except sources.DataError as e:
      raise ConfigError(str(e)) from None
    if config.task == "generation" and config.data.validation_fraction > 0:
      if "train" not in stems or "validation" in stems:
        _fail("validation_fraction", config.data.validation_fraction,
              "it holds out the end of the 'train' split as 'validation', so "
              "config.data.file_splits needs a train split and no validation split")
      stems["validation"] = "(held out)"
    for field in ("train_split", "eval_split"):
      if config[field] not in stems:
        _fail(field, config[field], f"not a split of config.data.file_splits "
                                    f"({', '.join(stems) or 'none'})")
  for field in ("train_split", "eval_split"):
    if not isinstance(config[field], str) or not config[field]:
      _fail(field, config[field], "expected a split name such as 'train' or 'validation'")
  _choice(config, "tokenizer", TOKENIZERS[config.task])
  _int(config, "vocab_size", 8)
  _int(config, "tokenizer_max_sentences", 1)
  _int(config, "max_eval_length", 2)
  if config.task == "translation" and config.model.shared_vocab is False and (
      config.model.share_embeddings):
    _fail("share_embeddings", config.model.share_embeddings,
          "separate source and target vocabularies (shared_vocab=False) need "
          "share_embeddings=False")
  if config.data.tokenizer_path:
    paths = [p for p in config.data.tokenizer_path.split(",") if p]
    if len(paths) != (1 if config.model.shared_vocab or config.task != "translation" else 2):
      _fail("tokenizer_path", config.data.tokenizer_path,
            "expected one model file with shared_vocab=True, two ('source,target') without")


def _language_model_data(config) -> None:
  """The fields of language modelling on real text."""
  _choice(config, "lm_batching", LM_BATCHING)
  _choice(config, "text_documents", local_builders.DOCUMENT_UNITS)
  _rate(config, "validation_fraction")
  if config.data.pack_examples and config.data.lm_batching == "windows":
    _fail("pack_examples", config.data.pack_examples,
          "windows of one stream are full rows already; packing applies to "
          "lm_batching='documents'")
  _int(config, "max_target_length", 2)


def _classification_data(config) -> None:
  """The fields of classification on real text."""
  for field in ("text_feature", "label_feature"):
    if not isinstance(config[field], str) or not config[field].strip():
      _fail(field, config[field], "expected the name of a feature (tfds) or column (files)")
  if config.data.text_feature == config.data.label_feature:
    _fail("label_feature", config.data.label_feature, "it must differ from text_feature")
  if config.data.pack_examples:
    _fail("pack_examples", config.data.pack_examples,
          "classification examples are padded rows, one example each; set it to False")


def _generation(config) -> None:
  """Sampling fields (generate mode and the samples in the eval logs)."""
  if not isinstance(config.decode.greedy, bool):
    _fail("greedy", config.decode.greedy, "expected True or False")
  value = config.decode.temperature
  if not config.decode.greedy and (isinstance(value, bool) or not isinstance(value, (int, float))
                            or not value > 0):
    _fail("temperature", value, "sampling needs a number > 0 (set config.decode.greedy=True for "
                                "the most likely tokens)")
  value = config.decode.top_p
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
    _fail("top_p", value, "expected a number in (0, 1]")
  _int(config, "top_k", 0)
  _int(config, "max_new_tokens", 1)
  _int(config, "num_samples", 1)
  _int(config, "sample_seed", 0)
  _int(config, "num_eval_batches", 0)
  _int(config, "eval_prompt_length", 0)
  if not isinstance(config.decode.stop_text, str):
    _fail("stop_text", config.decode.stop_text, "expected a string")
  if config.task == "generation" and config.data.dataset != "synthetic" and (
      config.decode.eval_prompt_length >= config.data.max_target_length):
    _fail("eval_prompt_length", config.decode.eval_prompt_length,
          f"it must be shorter than max_target_length={config.data.max_target_length}")


def _decoding(config) -> None:
  _int(config, "beam_size", 1)
  _int(config, "decode_extra_length", 0)
  _int(config, "num_decode_batches", 0)
  value = config.decode.length_penalty
  if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
    _fail("length_penalty", value, "expected a number >= 0 (0 = no length normalisation)")
  _choice(config, "best_metric", BEST_METRICS)
  if config.eval.best_metric in TEXT_METRICS and (config.task != "translation"
                                             or config.data.dataset == "synthetic"):
    _fail("best_metric", config.eval.best_metric,
          "BLEU and chrF exist for translation on real text only")
  if config.eval.best_metric == "macro_f1" and config.task != "classification":
    _fail("best_metric", config.eval.best_metric, "macro F1 exists for classification only")


# Fields that change what the parameters compute: a checkpoint trained under other values
# would load (or fail to load) into a different model. The other fields (optimizer,
# schedule, steps, evaluation, decoding) may change between runs of one workdir.
MODEL_FIELDS = ("task", "language_pair", "tokenizer", "vocab_size", "shared_vocab",
                "num_encoder_layers", "num_decoder_layers", "d_model", "d_ff", "num_heads",
                "head_dim", "norm_placement", "positional_encoding", "fused_qkv",
                "share_embeddings", "tie_output", "activation", "pooling",
                "layer_norm_epsilon", "scan_layers")


def check_same_model(saved: dict, config, where: str) -> None:
  """Raises ConfigError when `config` differs from the config `saved` with a checkpoint
  (in `where`) in a MODEL_FIELDS field, unless config.train.allow_config_change is set."""
  changed = [f"{k}: {saved[k]!r} there, {config[k]!r} now" for k in MODEL_FIELDS
             if k in saved and k in config and saved[k] != config[k]]
  if changed and not config.get("allow_config_change", False):
    raise ConfigError(
        f"the config differs from the one the checkpoint in {where} was trained with in "
        f"model fields ({'; '.join(changed)}); use that config, another --workdir, or "
        f"--config.train.allow_config_change=True to load the checkpoint anyway")
