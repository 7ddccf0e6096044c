"""GPT-2 (`GPT2LMHeadModel`, any size) <-> the decoder-only model.

GPT-2 is the decoder-only Transformer with: layer norm before each sublayer and after the
last block (`norm_placement="pre"`), learned positions, the tanh GELU (`activation="gelu"`),
biases on every projection (`biases="all"`), embeddings not scaled by sqrt(d_model)
(`scale_embeddings=False`), the output tied to the token embedding, layer-norm epsilon
1e-5. Its Conv1D weights are stored `[in, out]`, as Flax's kernels; the fused `c_attn`
splits into W^Q, W^K, W^V.

Ids (see pretrained/__init__.py): ours are [padding, <|endoftext|>, unknown, GPT-2's ids
0..n-2]. GPT-2 starts a text after <|endoftext|>, so our start symbol (id 0, the input
before the first token) gets that token's embedding; ids 0 and 2 stand for no token of
GPT-2, and `mask_special_logits=True` keeps them out of every softmax (a constant, which
fine-tuning cannot move), so the imported model's distributions over GPT-2's tokens are
GPT-2's. An export drops those two rows; the start symbol then becomes <|endoftext|> again
(after fine-tuning, the two embeddings may differ: `start_symbol_drift` measures it).
"""

from typing import Any, Dict, Tuple

import numpy as np

from pretrained import (NEW, PretrainedError, VocabularyMap, never_predicted, require,
                        unsupported_fields)

ARCHITECTURE = "GPT2LMHeadModel"
# Hugging Face's activation names -> ours.
ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu_fast": "gelu",
               "gelu": "gelu_exact", "relu": "relu", "silu": "silu", "swish": "silu"}
# What GPT-2's architecture fixes, as config.model fields.
FIXED = dict(num_encoder_layers=0, norm_placement="pre", norm="layer",
             positional_encoding="learned", biases="all", tie_output=True,
             scale_embeddings=False, logits_bias=False, qk_norm=False, num_kv_heads=0,
             fused_qkv=False, head_dim=0)
# An import's ids 0 and 2 stand for no GPT-2 token: masked out of every softmax.
IMPORTED = dict(FIXED, mask_special_logits=True)


def _prefix(weights: Dict[str, np.ndarray]) -> str:
  return "transformer." if "transformer.wte.weight" in weights else ""


def model_fields(config: Dict[str, Any], path: str) -> Dict[str, Any]:
  """config.model fields of the model in config.json."""
  for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
               "add_cross_attention"):
    if config.get(flag):
      raise PretrainedError(f"{path}: {flag}=true has no equivalent in this codebase's model")
  if config.get("scale_attn_weights", True) is not True:
    raise PretrainedError(f"{path}: scale_attn_weights=false has no equivalent here")
  activation = config.get("activation_function", "gelu_new")
  if activation not in ACTIVATIONS:
    raise PretrainedError(f"{path}: activation_function={activation!r} has no equivalent here "
                          f"(known: {', '.join(ACTIVATIONS)})")
  d_model = int(config["n_embd"])
  return {**IMPORTED, "num_decoder_layers": int(config["n_layer"]), "d_model": d_model,
          "num_heads": int(config["n_head"]), "d_ff": int(config.get("n_inner") or 4 * d_model),
          "activation": ACTIVATIONS[activation],
          "layer_norm_epsilon": float(config.get("layer_norm_epsilon", 1e-5))}


def vocabulary(config: Dict[str, Any]) -> VocabularyMap:
  size = int(config["vocab_size"])
  eos = config.get("eos_token_id")
  eos = size - 1 if eos is None or not 0 <= int(eos) < size else int(eos)
  return VocabularyMap.build(size, pad=None, eos=eos, unk=None)


def context_length(config: Dict[str, Any]) -> int:
  return int(config.get("n_positions", 1024))


def _norm(weights, name, d, folder):
  return {"scale": require(weights, f"{name}.weight", (d,), folder),
          "bias": require(weights, f"{name}.bias", (d,), folder)}


def params_from(weights: Dict[str, np.ndarray], config: Dict[str, Any], vocab: VocabularyMap,
                max_length: int, folder: str) -> Dict[str, Any]:
  """The DecoderOnly parameter tree (loop layout) holding GPT-2's weights."""
  fields = model_fields(config, folder)
  p = _prefix(weights)
  d, heads, d_ff = fields["d_model"], fields["num_heads"], fields["d_ff"]
  hd = d // heads
  n = int(config["vocab_size"])
  if max_length > context_length(config):
    raise PretrainedError(f"the model needs {max_length} positions, but GPT-2 at {folder} has "
                          f"{context_length(config)} (n_positions): lower the data lengths")
  wte = require(weights, f"{p}wte.weight", (n, d), folder)
  eos = int(vocab.original[1])
  decoder: Dict[str, Any] = {
      "embed": {"embedding": vocab.rows(wte, {0: wte[eos]})},
      "positions": {"table": require(weights, f"{p}wpe.weight", (context_length(config), d),
                                     folder)[:max_length]},
      "final_norm": _norm(weights, f"{p}ln_f", d, folder),
  }
  if [i for i in never_predicted(vocab)] != [0, 2]:
    raise PretrainedError(f"{folder}: GPT-2's vocabulary has its own padding or unknown token; "
                          f"this import expects neither")
  for i in range(fields["num_decoder_layers"]):
    h = f"{p}h.{i}."
    qkv = require(weights, h + "attn.c_attn.weight", (d, 3 * d), folder)
    qkv_bias = require(weights, h + "attn.c_attn.bias", (3 * d,), folder)
    attention = {name: {"kernel": qkv[:, j * d:(j + 1) * d].reshape(d, heads, hd),
                        "bias": qkv_bias[j * d:(j + 1) * d].reshape(heads, hd)}
                 for j, name in enumerate(("query", "key", "value"))}
    attention["out"] = {
        "kernel": require(weights, h + "attn.c_proj.weight", (d, d), folder).reshape(heads, hd, d),
        "bias": require(weights, h + "attn.c_proj.bias", (d,), folder)}
    decoder[f"block_{i}"] = {
        "self_attention": attention,
        "self_attention_norm": _norm(weights, h + "ln_1", d, folder),
        "ffn_norm": _norm(weights, h + "ln_2", d, folder),
        "ffn": {"wi": {"kernel": require(weights, h + "mlp.c_fc.weight", (d, d_ff), folder),
                       "bias": require(weights, h + "mlp.c_fc.bias", (d_ff,), folder)},
                "wo": {"kernel": require(weights, h + "mlp.c_proj.weight", (d_ff, d), folder),
                       "bias": require(weights, h + "mlp.c_proj.bias", (d,), folder)}},
    }
  return {"decoder": decoder}


# ----------------------------------------------------------------------------- export


def start_symbol_drift(params: Dict[str, Any], vocab: VocabularyMap) -> float:
  """An imported model's start symbol (row 0) is <|endoftext|>'s embedding at import; the
  largest difference between the two rows now (0 unless fine-tuning moved them)."""
  if vocab.original[0] != NEW:
    return 0.0
  emb = np.asarray(params["decoder"]["embed"]["embedding"], np.float32)
  return float(np.max(np.abs(emb[0] - emb[1])))


def unsupported(model: Dict[str, Any]) -> Dict[str, Any]:
  """The config.model fields (name -> value) of a decoder-only model that GPT-2's
  architecture cannot express."""
  return unsupported_fields(model, FIXED, ("norm_placement", "norm", "positional_encoding",
                                           "qk_norm", "num_kv_heads", "tie_output",
                                           "scale_embeddings", "logits_bias"),
                            ACTIVATIONS.values())


def to_hf(params: Dict[str, Any], model: Dict[str, Any], vocab: VocabularyMap,
          eos_id: int) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
  """(safetensors arrays, config.json) of a GPT2LMHeadModel computing what `params` does.

  `vocab` maps our ids to the exported vocabulary's; a model trained here (not imported)
  keeps every row: its padding/start id becomes the last id of the export (a token named
  in the tokenizer files), because the start symbol's embedding is part of the model.
  """
  dec = params["decoder"]
  d = int(model["d_model"])
  heads = int(model["num_heads"])
  emb = np.asarray(dec["embed"]["embedding"], np.float32)
  wte = vocab.original_rows(emb)
  out = {"transformer.wte.weight": wte,
         "transformer.wpe.weight": np.asarray(dec["positions"]["table"], np.float32),
         "transformer.ln_f.weight": np.asarray(dec["final_norm"]["scale"]),
         "transformer.ln_f.bias": np.asarray(dec["final_norm"]["bias"])}
  layers = sorted(int(k[len("block_"):]) for k in dec if k.startswith("block_"))
  ffn_bias = lambda b, n: np.asarray(b["bias"]) if "bias" in b else np.zeros(n, np.float32)  # noqa: E731
  for i in layers:
    b, h = dec[f"block_{i}"], f"transformer.h.{i}."
    att = b["self_attention"]
    q, k, v = (np.asarray(att[n]["kernel"]).reshape(d, d) for n in ("query", "key", "value"))
    out[h + "attn.c_attn.weight"] = np.concatenate([q, k, v], axis=1)
    out[h + "attn.c_attn.bias"] = np.concatenate(
        [np.asarray(att[n]["bias"]).reshape(d) if "bias" in att[n] else np.zeros(d, np.float32)
         for n in ("query", "key", "value")])
    out[h + "attn.c_proj.weight"] = np.asarray(att["out"]["kernel"]).reshape(d, d)
    out[h + "attn.c_proj.bias"] = ffn_bias(att["out"], d)
    for ours, theirs in (("self_attention_norm", "ln_1"), ("ffn_norm", "ln_2")):
      out[h + theirs + ".weight"] = np.asarray(b[ours]["scale"])
      out[h + theirs + ".bias"] = ffn_bias(b[ours], d)
    wi, wo = b["ffn"]["wi"], b["ffn"]["wo"]
    out[h + "mlp.c_fc.weight"] = np.asarray(wi["kernel"])
    out[h + "mlp.c_fc.bias"] = ffn_bias(wi, wi["kernel"].shape[1])
    out[h + "mlp.c_proj.weight"] = np.asarray(wo["kernel"])
    out[h + "mlp.c_proj.bias"] = ffn_bias(wo, d)
  activation = {"gelu": "gelu_new", "gelu_exact": "gelu", "relu": "relu", "silu": "silu"}
  eos = int(vocab.original[eos_id])
  # The token before a text: our start symbol's id where the original has it (a model
  # trained here), else GPT-2's convention, <|endoftext|>.
  bos = int(vocab.original[0]) if vocab.original[0] != NEW else eos
  config = {
      "architectures": [ARCHITECTURE], "model_type": "gpt2", "vocab_size": int(wte.shape[0]),
      "n_positions": int(out["transformer.wpe.weight"].shape[0]), "n_embd": d,
      "n_layer": len(layers), "n_head": heads, "n_inner": int(model["d_ff"]),
      "activation_function": activation[model["activation"]],
      "layer_norm_epsilon": float(model["layer_norm_epsilon"]),
      "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
      "bos_token_id": bos, "eos_token_id": eos, "tie_word_embeddings": True,
  }
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}, config
