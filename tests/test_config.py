"""Configs, presets, variant strings and validation: every shipped variant validates, the
paper's sizes are the paper's, and every bad value stops the run with a message that starts
with `config.<group>.<field>=<value>`."""

import itertools
import json

import ml_collections
import pytest

import config_checks
import train
from configs import default, presets

VARIANTS = list(itertools.product(default.TASKS, presets.SIZES, presets.ACCELERATORS))


def _config(variant=None, **overrides):
  """A config for `variant` with `overrides` (grouped: `model=dict(d_model=0)`, or a
  top-level field: `task="x"`) applied without ConfigDict's type checks (so a test can put
  a bool where an int belongs)."""
  values = default.get_config(variant).to_dict()
  for key, value in overrides.items():
    assert key in values, f"test bug: {key} is not a config field or group"
    if isinstance(value, dict):
      for field in value:
        assert field in values[key], f"test bug: {key}.{field} is not a config field"
      values[key].update(value)
    else:
      values[key] = value
  return ml_collections.ConfigDict(values)


def _get(config, path):
  """`config`'s value at the dotted `path` ("model.d_model", or a top-level "task")."""
  for name in path.split("."):
    config = config[name]
  return config


def _fields(values, prefix=""):
  """The dotted names of every field of the config dict `values`."""
  out = set()
  for key, value in values.items():
    if isinstance(value, dict):
      out |= _fields(value, f"{prefix}{key}.")
    else:
      out.add(prefix + key)
  return out


def test_default_config_validates():
  config = default.get_config()
  train.validate(config, num_devices=1)
  train.validate(config, num_devices=8)
  assert (config.task, config.size, config.accel) == ("translation", "tiny", "cpu")
  json.loads(config.to_json())  # train.py writes it as JSON beside the checkpoints


@pytest.mark.parametrize("task,size,accel", VARIANTS)
def test_every_variant_validates(task, size, accel):
  config = default.get_config(f"task={task},size={size},accel={accel}")
  assert (config.task, config.size, config.accel) == (task, size, accel)
  for preset in (presets.SIZES[size], presets.ACCELERATORS[accel]):
    for group, values in preset.items():
      for key, value in values.items():
        assert config[group][key] == value, (group, key)
  train.validate(config, num_devices=1)
  train.validate(config, num_devices=8)


def test_variants_share_one_set_of_fields():
  """A preset key with a typo would silently add a new field to some variants only."""
  fields = _fields(default.get_config().to_dict())
  for task, size, accel in VARIANTS:
    variant = _fields(default.get_config(f"task={task},size={size},accel={accel}").to_dict())
    assert variant == fields, (task, size, accel, variant ^ fields)


def test_variant_order_and_spaces_do_not_matter():
  a = default.get_config("task=generation,size=small,accel=gpu")
  b = default.get_config(" accel=gpu , size=small,task=generation ")
  assert a.to_dict() == b.to_dict()


@pytest.mark.parametrize("arg,names", [
    ("colour=red", ["'colour'", "task", "size", "accel"]),
    ("size=huge", ["size", "'huge'", "tiny", "big"]),
    ("accel=fpga", ["accel", "'fpga'", "gpu"]),
    ("task=summarize", ["task", "'summarize'", "translation"]),
    ("task", ["'task'", "key=value"]),
    ("size=", ["'size='", "key=value"]),
    ("=small", ["'=small'", "key=value"]),
    ("task=translation,size", ["'size'", "key=value"]),
    ("size=tiny,size=big", ["'size' is given twice", "'tiny'", "'big'"]),
])
def test_parse_variant_errors(arg, names):
  with pytest.raises(presets.VariantError) as info:
    default.get_config(arg)
  for name in names:
    assert name in str(info.value)


def test_parse_variant_direct():
  assert presets.parse_variant(None, {"a": None}) == {}
  assert presets.parse_variant("", {"a": None}) == {}
  assert presets.parse_variant("a=anything,b=x", {"a": None, "b": ("x",)}) == {
      "a": "anything", "b": "x"}
  assert issubclass(presets.VariantError, ValueError)


@pytest.mark.parametrize("size,d_model,d_ff,heads,dropout", [
    ("base", 512, 2048, 8, 0.1),
    ("big", 1024, 4096, 16, 0.3),
])
def test_paper_sizes(size, d_model, d_ff, heads, dropout):
  """Table 3 of the paper; the peak rate is that of the paper's schedule (section 5.3)."""
  config = default.get_config(f"size={size}")
  assert config.model.num_encoder_layers == config.model.num_decoder_layers == 6
  assert (config.model.d_model, config.model.d_ff, config.model.num_heads) == (
      d_model, d_ff, heads)
  assert config.model.d_model // config.model.num_heads == 64  # d_k = d_v = 64 in both
  assert config.optim.dropout_rate == dropout
  assert config.optim.warmup_steps == 4000
  assert config.optim.learning_rate == pytest.approx(d_model**-0.5 * 4000**-0.5, rel=1e-12)
  assert config.optim.schedule == "rsqrt"
  assert (config.optim.adam_b1, config.optim.adam_b2, config.optim.adam_eps) == (
      0.9, 0.98, 1e-9)
  assert default.get_config().optim.label_smoothing == 0.1  # translation: epsilon_ls = 0.1


@pytest.mark.parametrize("accel", ["gpu", "tpu"])
def test_accelerator_presets(accel):
  config = default.get_config(f"accel={accel}")
  assert config.compute.dtype == "bfloat16"
  assert config.compute.attention_impl == "fused"
  assert config.optim.attention_dropout_rate == 0.0  # the fused path has none
  cpu = default.get_config("accel=cpu")
  assert (cpu.compute.dtype, cpu.compute.attention_impl) == ("float32", "reference")


def test_fused_with_attention_dropout_is_invalid_by_design():
  config = _config("accel=gpu", optim=dict(attention_dropout_rate=0.1))
  with pytest.raises(config_checks.ConfigError, match=r"^config\.compute\.attention_impl='fused'"):
    train.validate(config)
  # ... while the reference path accepts attention dropout.
  train.validate(_config("accel=gpu", optim=dict(attention_dropout_rate=0.1),
                              compute=dict(attention_impl="reference")))


# (variant, overrides, num_devices, field, substring of the message)
INVALID = [
    ("unknown_task", None, dict(task="summarize"), 1, "task", "translation"),
    # Non-finite floats are not numbers of any range.
    ("learning_rate_inf", None, dict(optim=dict(learning_rate=float("inf"))), 1,
     "optim.learning_rate", "> 0"),
    ("adam_eps_nan", None, dict(optim=dict(adam_eps=float("nan"))), 1, "optim.adam_eps", "> 0"),
    ("max_grad_norm_nan", None, dict(optim=dict(max_grad_norm=float("nan"))), 1,
     "optim.max_grad_norm", ">= 0"),
    ("max_grad_norm_inf", None, dict(optim=dict(max_grad_norm=float("inf"))), 1,
     "optim.max_grad_norm", ">= 0"),
    ("length_penalty_inf", None, dict(decode=dict(length_penalty=float("inf"))), 1,
     "decode.length_penalty", ">= 0"),
    ("temperature_inf", "task=generation", dict(decode=dict(temperature=float("inf"))), 1,
     "decode.temperature", "> 0"),
    ("layer_norm_epsilon_inf", None, dict(model=dict(layer_norm_epsilon=float("inf"))), 1,
     "model.layer_norm_epsilon", "> 0"),
    ("dropout_nan", None, dict(optim=dict(dropout_rate=float("nan"))), 1, "optim.dropout_rate",
     "[0, 1)"),
    ("empty_dataset", None, dict(data=dict(dataset="")), 1, "data.dataset", "synthetic"),
    ("classification_without_a_text_feature", "task=classification",
     dict(data=dict(dataset="imdb_reviews", text_feature="")), 1,
     "data.text_feature", "name of a feature"),
    ("classification_chars_tokenizer", "task=classification",
     dict(data=dict(dataset="imdb_reviews"), model=dict(tokenizer="chars")), 1,
     "model.tokenizer", "sentencepiece"),
    ("macro_f1_for_translation", None,
     dict(eval=dict(best_metric="macro_f1")), 1, "eval.best_metric", "classification only"),
    ("files_without_data_dir", None,
     dict(data=dict(dataset="files")), 1, "data.data_dir", "directory"),
    ("one_language", None,
     dict(data=dict(dataset="files", data_dir="/x", language_pair="de")), 1,
     "data.language_pair", "two different"),
    ("eval_split_not_in_file_splits", None,
     dict(data=dict(dataset="files", data_dir="/x", eval_split="dev")), 1,
     "data.eval_split", "file_splits"),
    # Split names are checked against the data's splits and never become paths.
    ("eval_split_of_synthetic_digits", None, dict(data=dict(eval_split="test")), 1,
     "data.eval_split", "expected one of train, validation"),
    ("split_name_with_a_path", None,
     dict(data=dict(dataset="files", data_dir="/x", eval_split="../out",
                    file_splits="train=train,../out=val")), 1,
     "data.file_splits", "split name '../out'"),
    ("min_class_examples_zero", "task=classification",
     dict(data=dict(dataset="files", data_dir="/x", min_class_examples=0)), 1,
     "data.min_class_examples", "integer >= 1"),
    ("max_skipped_fraction_above_one", None, dict(train=dict(max_skipped_fraction=1.5)), 1,
     "train.max_skipped_fraction", "[0, 1]"),
    ("separate_vocab_shared_embeddings", None,
     dict(data=dict(dataset="files", data_dir="/x"), model=dict(shared_vocab=False)), 1,
     "model.share_embeddings", "shared_vocab=False"),
    ("unknown_tokenizer", None,
     dict(data=dict(dataset="files", data_dir="/x"), model=dict(tokenizer="words")), 1,
     "model.tokenizer", "sentencepiece"),
    ("beam_zero", None, dict(decode=dict(beam_size=0)), 1, "decode.beam_size", ">= 1"),
    ("negative_length_penalty", None,
     dict(decode=dict(length_penalty=-0.5)), 1, "decode.length_penalty", ">= 0"),
    ("bleu_on_synthetic", None,
     dict(eval=dict(best_metric="bleu")), 1, "eval.best_metric", "real text"),
    ("unknown_best_metric", None,
     dict(eval=dict(best_metric="rouge")), 1, "eval.best_metric", "bleu"),
    ("unknown_size", None, dict(size="huge"), 1, "size", "tiny"),
    ("unknown_accel", None, dict(accel="fpga"), 1, "accel", "gpu"),
    ("bad_dtype", None, dict(compute=dict(dtype="float16")), 1, "compute.dtype", "bfloat16"),
    ("unknown_attention_impl", None,
     dict(compute=dict(attention_impl="flash")), 1, "compute.attention_impl", "reference"),
    ("unknown_schedule", None, dict(optim=dict(schedule="step")), 1, "optim.schedule", "rsqrt"),
    ("unknown_optimizer", None, dict(optim=dict(optimizer="lamb")), 1, "optim.optimizer", "adamw"),
    ("unknown_norm_placement", None,
     dict(model=dict(norm_placement="sandwich")), 1, "model.norm_placement", "pre"),
    ("unknown_positional_encoding", None,
     dict(model=dict(positional_encoding="alibi")), 1, "model.positional_encoding", "sinusoidal"),
    ("heads_not_dividing", None, dict(model=dict(num_heads=3)), 1, "model.num_heads", "d_model=64"),
    ("zero_d_model", None, dict(model=dict(d_model=0)), 1, "model.d_model", ">= 1"),
    ("negative_d_ff", None, dict(model=dict(d_ff=-4)), 1, "model.d_ff", ">= 1"),
    ("zero_d_ff", None, dict(model=dict(d_ff=0)), 1, "model.d_ff", ">= 1"),
    ("zero_num_train_steps", None,
     dict(train=dict(num_train_steps=0)), 1, "train.num_train_steps", ">= 1"),
    ("zero_batch_size", None, dict(train=dict(batch_size=0)), 1, "train.batch_size", ">= 1"),
    ("negative_warmup", None, dict(optim=dict(warmup_steps=-1)), 1, "optim.warmup_steps", ">= 0"),
    ("negative_data_threads", None,
     dict(data=dict(data_threads=-1)), 1, "data.data_threads", ">= 0"),
    ("float_device_prefetch", None,
     dict(data=dict(device_prefetch=2.0)), 1, "data.device_prefetch", "integer"),
    ("negative_profile_steps", None,
     dict(train=dict(profile_steps=-5)), 1, "train.profile_steps", ">= 0"),
    ("dropout_one", None, dict(optim=dict(dropout_rate=1.0)), 1, "optim.dropout_rate", "[0, 1)"),
    ("dropout_negative", None,
     dict(optim=dict(dropout_rate=-0.1)), 1, "optim.dropout_rate", "[0, 1)"),
    ("label_smoothing_one", None,
     dict(optim=dict(label_smoothing=1.0)), 1, "optim.label_smoothing", "[0, 1)"),
    ("batch_not_divisible_by_devices", None,
     dict(train=dict(batch_size=12)), 8, "train.batch_size", "8 x 1 = 8"),
    ("batch_not_divisible_by_accum", None,
     dict(train=dict(batch_size=64, grad_accum_steps=3)), 8, "train.batch_size", "8 x 3 = 24"),
    ("batch_not_divisible_by_accum_1dev", None,
     dict(train=dict(batch_size=10, grad_accum_steps=4)), 1,
     "train.batch_size", "grad_accum_steps"),
    ("eval_batch_not_divisible", None,
     dict(eval=dict(eval_batch_size=12)), 8, "eval.eval_batch_size", "number of devices (8)"),
    ("fused_attention_dropout", None,
     dict(compute=dict(attention_impl="fused"), optim=dict(attention_dropout_rate=0.1)), 1,
     "compute.attention_impl", "attention_dropout_rate=0"),
    ("blockwise_attention_dropout", None,
     dict(compute=dict(attention_impl="blockwise"), optim=dict(attention_dropout_rate=0.1)), 1,
     "compute.attention_impl", "attention_dropout_rate=0"),
    ("unknown_remat", None, dict(compute=dict(remat="some")), 1, "compute.remat", "matmuls"),
    ("unknown_dropout_rng", None,
     dict(optim=dict(dropout_rng="philox")), 1, "optim.dropout_rng", "threefry"),
    ("zero_attention_block", None,
     dict(compute=dict(attention_block_size=0)), 1, "compute.attention_block_size", ">= 1"),
    ("scan_layers_not_bool", None,
     dict(model=dict(scan_layers="yes")), 1, "model.scan_layers", "True or False"),
    ("weight_decay_with_adam", None,
     dict(optim=dict(weight_decay=0.01)), 1, "optim.weight_decay", "adamw"),
    ("min_above_max_digits", None,
     dict(data=dict(min_digits=5, max_digits=3)), 1, "data.min_digits", "max_digits=3"),
    ("input_too_short", None,
     dict(data=dict(max_digits=20)), 1, "data.max_input_length", "21 tokens"),
    ("translation_target_too_short", None,
     dict(data=dict(max_target_length=12)), 1, "data.max_target_length", "13 tokens"),
    ("generation_target_too_short", "task=generation",
     dict(data=dict(max_target_length=20)), 1, "data.max_target_length", "26 tokens"),
    ("classification_input_too_short", "task=classification",
     dict(data=dict(max_input_length=11)), 1, "data.max_input_length", "12 tokens"),
    ("no_encoder_for_translation", None,
     dict(model=dict(num_encoder_layers=0)), 1, "model.num_encoder_layers", ">= 1"),
    ("no_decoder_for_translation", None,
     dict(model=dict(num_decoder_layers=0)), 1, "model.num_decoder_layers", ">= 1"),
    ("no_encoder_for_classification", "task=classification",
     dict(model=dict(num_encoder_layers=0)), 1, "model.num_encoder_layers", ">= 1"),
    ("no_decoder_for_generation", "task=generation",
     dict(model=dict(num_decoder_layers=0)), 1, "model.num_decoder_layers", ">= 1"),
    ("bool_for_int", None, dict(model=dict(d_model=True)), 1, "model.d_model", "integer"),
    ("float_for_int", None, dict(train=dict(batch_size=64.0)), 1, "train.batch_size", "integer"),
    ("odd_d_model_sinusoidal", None,
     dict(model=dict(d_model=63, num_heads=3)), 1, "model.d_model", "even d_model"),
    ("classification_synthetic_reverse", "task=classification",
     dict(data=dict(synthetic_task="reverse")), 1, "data.synthetic_task", "majority"),
    ("translation_synthetic_majority", None,
     dict(data=dict(synthetic_task="majority")), 1, "data.synthetic_task", "reverse"),
    ("zero_learning_rate", None,
     dict(optim=dict(learning_rate=0.0)), 1, "optim.learning_rate", "> 0"),
    ("negative_max_grad_norm", None,
     dict(optim=dict(max_grad_norm=-1.0)), 1, "optim.max_grad_norm", ">= 0"),
    ("adam_b2_one", None, dict(optim=dict(adam_b2=1.0)), 1, "optim.adam_b2", "[0, 1)"),
    ("negative_sam_rho", None, dict(optim=dict(sam_rho=-0.05)), 1, "optim.sam_rho", ">= 0"),
    ("negative_adversarial_eps", None, dict(optim=dict(adversarial_eps=-1.0)), 1,
     "optim.adversarial_eps", ">= 0"),
    ("negative_rdrop_alpha", None, dict(optim=dict(rdrop_alpha=-0.5)), 1,
     "optim.rdrop_alpha", ">= 0"),
    ("sam_with_adversarial_training", None,
     dict(optim=dict(sam_rho=0.05, adversarial_eps=1.0)), 1, "optim.adversarial_eps",
     "set one of them to 0"),
    ("even_conv_kernel", "task=classification", dict(model=dict(conv_kernel=4)), 1,
     "model.conv_kernel", "odd width"),
    ("conv_kernel_without_encoder", "task=generation", dict(model=dict(conv_kernel=3)), 1,
     "model.conv_kernel", "no encoder"),
    ("encoder_lstm_without_encoder", "task=generation", dict(model=dict(encoder_lstm=True)),
     1, "model.encoder_lstm", "no encoder"),
    ("encoder_lstm_odd_d_model", "task=classification",
     dict(model=dict(encoder_lstm=True, d_model=63, num_heads=3, positional_encoding="none")),
     1, "model.d_model", "two directions"),
    ("sgd_momentum_one", None, dict(optim=dict(optimizer="sgd", sgd_momentum=1.0)), 1,
     "optim.sgd_momentum", "[0, 1)"),
    ("unknown_text_normalization", "task=classification",
     dict(data=dict(text_normalization="ptb")), 1, "data.text_normalization", "ptb_lower"),
    ("text_normalization_for_generation", "task=generation",
     dict(data=dict(text_normalization="lower")), 1, "data.text_normalization",
     "only classification"),
]


@pytest.mark.parametrize("variant,overrides,num_devices,field,expected",
                         [pytest.param(*case[1:], id=case[0]) for case in INVALID])
def test_invalid_config(variant, overrides, num_devices, field, expected):
  config = _config(variant, **overrides)
  with pytest.raises(config_checks.ConfigError) as info:
    train.validate(config, num_devices=num_devices)
  message = str(info.value)
  assert message.startswith(f"config.{field}={_get(config, field)!r} "), message
  assert expected in message, message
  if field == "model.num_heads":
    assert "d_model" in message


def test_config_error_is_a_value_error():
  assert issubclass(config_checks.ConfigError, ValueError)


@pytest.mark.parametrize("variant,overrides", [
    # explicit head_dim: heads need not divide
    (None, dict(model=dict(num_heads=3, head_dim=16))),
    (None, dict(model=dict(d_model=63, num_heads=3, positional_encoding="learned"))),
    # decoder-only needs no encoder
    ("task=generation", dict(model=dict(num_encoder_layers=0))),
    # encoder-only needs no decoder
    ("task=classification", dict(model=dict(num_decoder_layers=0))),
    (None, dict(optim=dict(optimizer="adamw", weight_decay=0.01))),
    (None, dict(optim=dict(label_smoothing=0.0, dropout_rate=0.0, warmup_steps=0,
                           max_grad_norm=0.0))),
    (None, dict(train=dict(batch_size=48, grad_accum_steps=3), eval=dict(eval_batch_size=8))),
    # 15 digits + EOS = 16 tokens: just fits
    (None, dict(data=dict(min_digits=15, max_digits=15))),
])
def test_valid_edge_cases(variant, overrides):
  eval_batch_size = overrides.get("eval", {}).get("eval_batch_size")
  train.validate(_config(variant, **overrides),
                      num_devices=8 if eval_batch_size == 8 else 1)


def test_valid_edge_case_tight_lengths():
  # The minimum lengths the messages ask for are accepted.
  train.validate(_config("task=generation",
                              data=dict(max_digits=12, max_target_length=26)))
  train.validate(_config("task=classification",
                              data=dict(max_digits=16, max_input_length=16)))
