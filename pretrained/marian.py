"""Marian (`MarianMTModel`, the Helsinki-NLP opus-mt models) <-> the encoder-decoder model.

Marian is the paper's Transformer with: post-norm, sinusoids laid out as all sines then all
cosines (`positional_encoding="sinusoidal_halves"`), embeddings scaled by sqrt(d_model)
where config.json says `scale_embedding` (the opus-mt models do), biases on every projection
(`biases="all"`), its activation (opus-mt: swish = `silu`), one embedding shared by both
languages and the output, a final logits bias (`logits_bias=True`), layer-norm epsilon
1e-5. Its Linear weights are stored `[out, in]`: transposed into Flax's kernels.

Ids (see pretrained/__init__.py): Marian's EOS is 0, unknown 1, and padding, which is also
the decoder's start symbol, is `pad_token_id` (the last id); ours are [padding, EOS,
unknown, the rest in order]. Our start symbol is our padding id, so it is Marian's too.
"""

from typing import Any, Dict, Tuple

import numpy as np

from pretrained import PretrainedError, VocabularyMap, require, unsupported_fields

ARCHITECTURE = "MarianMTModel"
ACTIVATIONS = {"swish": "silu", "silu": "silu", "gelu": "gelu_exact", "gelu_new": "gelu",
               "gelu_pytorch_tanh": "gelu", "relu": "relu"}
FIXED = dict(norm_placement="post", norm="layer", positional_encoding="sinusoidal_halves",
             biases="all", share_embeddings=True, tie_output=True, logits_bias=True,
             qk_norm=False, num_kv_heads=0, fused_qkv=False, head_dim=0, conv_kernel=0,
             encoder_lstm=False)


def _same(config: Dict[str, Any], names, path: str) -> int:
  values = {n: config.get(n) for n in names}
  if len(set(values.values())) != 1:
    raise PretrainedError(f"{path}: {values} differ; this codebase's encoder and decoder share "
                          f"one setting")
  return int(next(iter(values.values())))


def model_fields(config: Dict[str, Any], path: str) -> Dict[str, Any]:
  """config.model fields of the model in config.json."""
  if config.get("normalize_before") or config.get("normalize_embedding"):
    raise PretrainedError(f"{path}: normalize_before/normalize_embedding has no equivalent "
                          f"here")
  if config.get("share_encoder_decoder_embeddings", True) is not True or (
      config.get("decoder_vocab_size") not in (None, config.get("vocab_size"))):
    raise PretrainedError(f"{path}: separate source and target vocabularies are not imported "
                          f"(share_encoder_decoder_embeddings must be true)")
  activation = config.get("activation_function", "swish")
  if activation not in ACTIVATIONS:
    raise PretrainedError(f"{path}: activation_function={activation!r} has no equivalent here "
                          f"(known: {', '.join(ACTIVATIONS)})")
  return {**FIXED, "num_encoder_layers": int(config["encoder_layers"]),
          "num_decoder_layers": int(config["decoder_layers"]),
          "d_model": int(config["d_model"]),
          "num_heads": _same(config, ("encoder_attention_heads", "decoder_attention_heads"),
                             path),
          "d_ff": _same(config, ("encoder_ffn_dim", "decoder_ffn_dim"), path),
          "activation": ACTIVATIONS[activation],
          "scale_embeddings": bool(config.get("scale_embedding", False)),
          "layer_norm_epsilon": 1e-5}


def vocabulary(config: Dict[str, Any]) -> VocabularyMap:
  size = int(config["vocab_size"])
  pad = int(config.get("pad_token_id", size - 1))
  return VocabularyMap.build(size, pad=pad, eos=int(config.get("eos_token_id", 0)), unk=1)


def context_length(config: Dict[str, Any]) -> int:
  return int(config.get("max_position_embeddings", 512))


def _linear(weights, name, d_in, d_out, folder):
  return (require(weights, f"{name}.weight", (d_out, d_in), folder).T,
          require(weights, f"{name}.bias", (d_out,), folder))


def _attention(weights, name, d, heads, folder):
  hd = d // heads
  out = {}
  for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
    kernel, bias = _linear(weights, f"{name}.{theirs}", d, d, folder)
    out[ours] = {"kernel": kernel.reshape(d, heads, hd), "bias": bias.reshape(heads, hd)}
  kernel, bias = _linear(weights, f"{name}.out_proj", d, d, folder)
  out["out"] = {"kernel": kernel.reshape(heads, hd, d), "bias": bias}
  return out


def _norm(weights, name, d, folder):
  return {"scale": require(weights, f"{name}.weight", (d,), folder),
          "bias": require(weights, f"{name}.bias", (d,), folder)}


def _ffn(weights, name, d, d_ff, folder):
  wi, bi = _linear(weights, f"{name}.fc1", d, d_ff, folder)
  wo, bo = _linear(weights, f"{name}.fc2", d_ff, d, folder)
  return {"wi": {"kernel": wi, "bias": bi}, "wo": {"kernel": wo, "bias": bo}}


def params_from(weights: Dict[str, np.ndarray], config: Dict[str, Any], vocab: VocabularyMap,
                max_length: int, folder: str) -> Dict[str, Any]:
  """The EncoderDecoder parameter tree (loop layout) holding Marian's weights."""
  del max_length  # sinusoids: no table
  f = model_fields(config, folder)
  d, heads, d_ff, n = f["d_model"], f["num_heads"], f["d_ff"], int(config["vocab_size"])
  p = "model." if "model.shared.weight" in weights else ""
  shared = require(weights, f"{p}shared.weight", (n, d), folder)
  bias = require(weights, "final_logits_bias", (1, n), folder)[0] if (
      "final_logits_bias" in weights) else np.zeros(n, np.float32)
  encoder, decoder = {}, {"logits_bias": vocab.rows(bias, {})}
  for i in range(f["num_encoder_layers"]):
    name = f"{p}encoder.layers.{i}"
    encoder[f"block_{i}"] = {
        "self_attention": _attention(weights, f"{name}.self_attn", d, heads, folder),
        "self_attention_norm": _norm(weights, f"{name}.self_attn_layer_norm", d, folder),
        "ffn": _ffn(weights, name, d, d_ff, folder),
        "ffn_norm": _norm(weights, f"{name}.final_layer_norm", d, folder)}
  for i in range(f["num_decoder_layers"]):
    name = f"{p}decoder.layers.{i}"
    decoder[f"block_{i}"] = {
        "self_attention": _attention(weights, f"{name}.self_attn", d, heads, folder),
        "self_attention_norm": _norm(weights, f"{name}.self_attn_layer_norm", d, folder),
        "cross_attention": _attention(weights, f"{name}.encoder_attn", d, heads, folder),
        "cross_attention_norm": _norm(weights, f"{name}.encoder_attn_layer_norm", d, folder),
        "ffn": _ffn(weights, name, d, d_ff, folder),
        "ffn_norm": _norm(weights, f"{name}.final_layer_norm", d, folder)}
  return {"shared_embed": {"embedding": vocab.rows(shared, {})}, "encoder": encoder,
          "decoder": decoder}


# ----------------------------------------------------------------------------- export


def unsupported(model: Dict[str, Any]) -> Dict[str, Any]:
  """The config.model fields of an encoder-decoder model that Marian cannot express (its
  layer norms' epsilon is fixed at 1e-5)."""
  wrong = unsupported_fields(model, FIXED, ("norm_placement", "norm", "positional_encoding",
                                            "qk_norm", "num_kv_heads", "share_embeddings",
                                            "tie_output", "conv_kernel", "encoder_lstm"),
                              ACTIVATIONS.values())
  if abs(float(model.get("layer_norm_epsilon", 1e-5)) - 1e-5) > 1e-12:
    wrong["layer_norm_epsilon"] = model["layer_norm_epsilon"]
  return wrong


def to_hf(params: Dict[str, Any], model: Dict[str, Any], vocab: VocabularyMap,
          max_length: int) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
  """(safetensors arrays, config.json) of a MarianMTModel computing what `params` does."""
  d = int(model["d_model"])
  zeros = lambda n: np.zeros(n, np.float32)  # noqa: E731

  def linear(name, part, d_in, d_out, reshape_in):
    out[f"{name}.weight"] = np.asarray(part["kernel"]).reshape(reshape_in, d_out).T
    out[f"{name}.bias"] = (np.asarray(part["bias"]).reshape(d_out) if "bias" in part
                           else zeros(d_out))

  def attention(name, att):
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
      linear(f"{name}.{theirs}", att[ours], d, d, d)
    linear(f"{name}.out_proj", att["out"], d, d, d)

  def norm(name, part):
    out[f"{name}.weight"] = np.asarray(part["scale"])
    out[f"{name}.bias"] = np.asarray(part["bias"]) if "bias" in part else zeros(d)

  def ffn(name, part):
    d_ff = part["wi"]["kernel"].shape[1]
    linear(f"{name}.fc1", part["wi"], d, d_ff, d)
    linear(f"{name}.fc2", part["wo"], d_ff, d, d_ff)

  out: Dict[str, np.ndarray] = {}
  shared = vocab.original_rows(np.asarray(params["shared_embed"]["embedding"], np.float32))
  out["model.shared.weight"] = shared
  dec = params["decoder"]
  bias = np.asarray(dec["logits_bias"]) if "logits_bias" in dec else zeros(vocab.size)
  out["final_logits_bias"] = vocab.original_rows(bias)[None]
  layers = {}
  for stack in ("encoder", "decoder"):
    blocks = sorted(int(k[len("block_"):]) for k in params[stack] if k.startswith("block_"))
    layers[stack] = len(blocks)
    for i in blocks:
      b, name = params[stack][f"block_{i}"], f"model.{stack}.layers.{i}"
      attention(f"{name}.self_attn", b["self_attention"])
      norm(f"{name}.self_attn_layer_norm", b["self_attention_norm"])
      if stack == "decoder":
        attention(f"{name}.encoder_attn", b["cross_attention"])
        norm(f"{name}.encoder_attn_layer_norm", b["cross_attention_norm"])
      ffn(name, b["ffn"])
      norm(f"{name}.final_layer_norm", b["ffn_norm"])
  activation = {"silu": "swish", "gelu_exact": "gelu", "gelu": "gelu_new", "relu": "relu"}
  n = int(shared.shape[0])
  pad, eos = (int(vocab.original[i]) for i in (0, 1))
  config = {
      "architectures": [ARCHITECTURE], "model_type": "marian", "vocab_size": n,
      "decoder_vocab_size": n, "d_model": d, "encoder_layers": layers["encoder"],
      "decoder_layers": layers["decoder"], "encoder_attention_heads": int(model["num_heads"]),
      "decoder_attention_heads": int(model["num_heads"]),
      "encoder_ffn_dim": int(model["d_ff"]), "decoder_ffn_dim": int(model["d_ff"]),
      "activation_function": activation[model["activation"]],
      "scale_embedding": bool(model.get("scale_embeddings", True)),
      "max_position_embeddings": int(max_length), "pad_token_id": pad,
      "decoder_start_token_id": pad, "eos_token_id": eos, "forced_eos_token_id": eos,
      "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
      "share_encoder_decoder_embeddings": True, "tie_word_embeddings": True,
      "normalize_embedding": False, "static_position_embeddings": True,
  }
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}, config
