"""Pretrained weights in and out: Hugging Face folders of GPT-2 and Marian models.

A Hugging Face folder (as `huggingface-cli download` or `save_pretrained` writes it) holds
`config.json`, the weights in `model.safetensors` and the tokenizer files. This package
reads such a folder into this codebase's model (`load`: the config.model fields, the
parameters, the tokenizer) and writes this codebase's models back into one (`export_hf`).
Only safetensors are read: a pickle (`pytorch_model.bin`) can run code when loaded.

Ids. This codebase keeps id 0 for padding (and the decoder's start symbol), 1 for EOS and 2
for an unknown piece; a Hugging Face vocabulary puts them elsewhere (GPT-2 has no padding,
and its EOS, <|endoftext|>, is its last id; Marian's EOS is 0 and its padding, which is
also its decoder's start symbol, the last id). `VocabularyMap` is the permutation between
the two: ours = [padding, EOS, unknown, every other id in the original order], with a new
row where the original has no such token. Embedding rows and logit biases are permuted with
it, so the imported model computes the same function, and the tokenizer maps ids with it.

Architectures: `gpt2.py` (GPT2LMHeadModel -> the decoder-only model) and `marian.py`
(MarianMTModel -> the encoder-decoder model). The tests compare logits and greedy decodes
with `transformers` itself (tests/test_pretrained.py).
"""

import dataclasses
import json
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from errors import UserError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
NEW = -1  # a row of ours that the original vocabulary has no token for


class PretrainedError(UserError, ValueError):
  """A pretrained folder that cannot be read or a model that cannot be written as one."""


def download_hint(folder: str) -> str:
  return (f"download one first, e.g. `huggingface-cli download gpt2 --local-dir {folder}` "
          f"or `huggingface-cli download Helsinki-NLP/opus-mt-de-en --local-dir {folder}` "
          f"(nothing is fetched at run time)")


def read_config(folder: str) -> Dict[str, Any]:
  """The folder's config.json, checked to exist and to be a JSON object."""
  if not os.path.isdir(folder):
    raise PretrainedError(f"config.init_from={folder}: no such folder; "
                          f"{download_hint(folder)}")
  path = os.path.join(folder, CONFIG_FILE)
  try:
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
  except FileNotFoundError:
    raise PretrainedError(f"{path}: no such file; a Hugging Face model folder has one "
                          f"({download_hint(folder)})") from None
  except (OSError, ValueError) as e:
    raise PretrainedError(f"{path} cannot be read as JSON ({e}); download it again") from None
  if not isinstance(config, dict):
    raise PretrainedError(f"{path} holds a {type(config).__name__}, not a JSON object")
  return config


def architecture(config: Dict[str, Any], folder: str) -> str:
  """The one architecture name of config.json that this codebase reads."""
  from pretrained import gpt2, marian  # pylint: disable=g-import-not-at-top
  names = config.get("architectures") or [config.get("model_type", "?")]
  known = {m.ARCHITECTURE: m for m in (gpt2, marian)}
  for name in names:
    if name in known:
      return name
  if "task" in config and "model" in config:  # the config.json training writes here
    raise PretrainedError(
        f"{folder} is a workdir of this codebase, not a Hugging Face model folder: resume "
        f"it with --workdir={folder}, start an encoder from it with "
        f"--config.init_encoder_from={folder}, or export it (--mode=export) first")
  raise PretrainedError(f"{os.path.join(folder, CONFIG_FILE)}: architecture {names} is not "
                        f"one this codebase imports ({', '.join(known)})")


def read_weights(folder: str) -> Dict[str, np.ndarray]:
  """The arrays of model.safetensors, as float32 numpy arrays."""
  from safetensors import SafetensorError  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  path = os.path.join(folder, WEIGHTS_FILE)
  if not os.path.exists(path):
    pickles = [f for f in ("pytorch_model.bin", "tf_model.h5") if
               os.path.exists(os.path.join(folder, f))]
    also = (f" ({', '.join(pickles)} is there, but only safetensors are read: a pickle can "
            f"run code when loaded)" if pickles else "")
    raise PretrainedError(f"{path}: no such file{also}; download the model's "
                          f"model.safetensors ({download_hint(folder)})")
  try:
    arrays = load_file(path)
  except (SafetensorError, OSError, ValueError) as e:
    raise PretrainedError(f"{path} is damaged or not a safetensors file ({e}); download it "
                          f"again") from None
  return {k: np.asarray(v, np.float32) for k, v in arrays.items()}


def require(weights: Dict[str, np.ndarray], name: str, shape: Sequence[int],
            folder: str) -> np.ndarray:
  """weights[name], checked to exist with `shape`."""
  if name not in weights:
    raise PretrainedError(f"{os.path.join(folder, WEIGHTS_FILE)} has no array {name!r}; it is "
                          f"not a complete model of the architecture config.json names")
  value = weights[name]
  if tuple(value.shape) != tuple(shape):
    raise PretrainedError(f"{os.path.join(folder, WEIGHTS_FILE)}: {name!r} has shape "
                          f"{tuple(value.shape)}, but config.json implies {tuple(shape)}")
  return value


@dataclasses.dataclass(frozen=True)
class VocabularyMap:
  """Our id -> the original id (NEW where the original has no such token)."""
  original: np.ndarray  # [our vocabulary] int64

  @classmethod
  def build(cls, size: int, pad: Optional[int], eos: int, unk: Optional[int]):
    """Ours = [pad, eos, unk, every other original id in order] (pad/unk NEW if None)."""
    special = [NEW if i is None else i for i in (pad, eos, unk)]
    rest = [i for i in range(size) if i not in special]
    return cls(np.asarray(special + rest, np.int64))

  @property
  def size(self) -> int:
    return len(self.original)

  def to_ours(self) -> np.ndarray:
    """[original vocabulary] -> our id."""
    n = int(self.original.max()) + 1
    out = np.full(n, -1, np.int64)
    for ours, theirs in enumerate(self.original):
      if theirs != NEW:
        out[theirs] = ours
    return out

  def rows(self, table: np.ndarray, new_rows: Dict[int, np.ndarray]) -> np.ndarray:
    """`table` `[original vocabulary, ...]` in our order; row i of ours that is NEW takes
    new_rows[i] (or zeros)."""
    out = np.zeros((self.size,) + table.shape[1:], table.dtype)
    known = self.original != NEW
    out[known] = table[self.original[known]]
    for i, row in new_rows.items():
      out[i] = row
    return out

  def original_rows(self, table: np.ndarray) -> np.ndarray:
    """The inverse of `rows`: our `table` in the original order, NEW rows dropped."""
    known = self.original != NEW
    out = np.zeros((int(self.original.max()) + 1,) + table.shape[1:], table.dtype)
    out[self.original[known]] = table[known]
    return out


def never_predicted(vocab: VocabularyMap) -> List[int]:
  """Our ids that stand for no token of the original (padding, and an unknown id the
  original lacks): an imported GPT-2 never predicts them (mask_special_logits)."""
  return [i for i in range(vocab.size) if vocab.original[i] == NEW]


def unsupported_fields(model: Dict[str, Any], fixed: Dict[str, Any], names: Sequence[str],
                       activations) -> Dict[str, Any]:
  """The config.model fields (name -> value) among `names` whose value differs from what
  an architecture fixes (`fixed`), an activation it lacks, and a head size that does not
  split d_model (Hugging Face models have d_model = heads x head size)."""
  wrong = {k: model[k] for k in names if k in model and model[k] != fixed[k]}
  if model.get("activation") not in activations:
    wrong["activation"] = model.get("activation")
  if model.get("head_dim") and model["head_dim"] * model["num_heads"] != model["d_model"]:
    wrong["head_dim"] = model["head_dim"]
  return wrong


def save_json(path: str, value: Any) -> None:
  import files  # pylint: disable=g-import-not-at-top
  files.write_atomically(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------- runs


def module_of(folder: str):
  """(config.json, the architecture module: pretrained.gpt2 or pretrained.marian)."""
  from pretrained import gpt2, marian  # pylint: disable=g-import-not-at-top
  config = read_config(folder)
  name = architecture(config, folder)
  return config, {gpt2.ARCHITECTURE: gpt2, marian.ARCHITECTURE: marian}[name]


FAMILY = {"GPT2LMHeadModel": "generation", "MarianMTModel": "translation"}


def apply_to_config(config) -> None:
  """A run with config.init_from set takes its model from the folder: the config.model
  fields of its architecture (they replace what the config had), the vocabulary size and
  tokenizer kind. Raises PretrainedError for a folder that cannot be read or a task
  that is not the architecture's family."""
  folder = config.get("init_from", "")
  if not folder:
    return
  hf_config, module = module_of(folder)
  family = FAMILY[module.ARCHITECTURE]
  if config.task != family:
    raise PretrainedError(f"config.init_from={folder} holds a {module.ARCHITECTURE}, a "
                          f"{family} model; use a {family} config (e.g. "
                          f"--config=configs/{family}.py), not config.task={config.task!r}")
  fields = module.model_fields(hf_config, os.path.join(folder, CONFIG_FILE))
  with config.unlocked():
    for name, value in fields.items():
      config.model[name] = value
    config.model.tokenizer = "huggingface"
    config.model.vocab_size = module.vocabulary(hf_config).size
    config.model.shared_vocab = True


def tokenizer(config, side: str = "source"):
  """The tokenizer of config.init_from (Marian: of `side`, "source" or "target")."""
  from pretrained import tokenizer_files  # pylint: disable=g-import-not-at-top
  hf_config, module = module_of(config.init_from)
  vocab = module.vocabulary(hf_config)
  if module.ARCHITECTURE == "MarianMTModel":
    return tokenizer_files.MarianPieces(vocab, config.init_from, side)
  return tokenizer_files.ByteLevelBPE(vocab, config.init_from)


def load_params(config, max_length: int) -> Dict[str, Any]:
  """The parameters of config.init_from in the layout of this run's model (loop layout;
  the caller stacks them for scanned layers)."""
  folder = config.init_from
  hf_config, module = module_of(folder)
  return module.params_from(read_weights(folder), hf_config, module.vocabulary(hf_config),
                            max_length, folder)
