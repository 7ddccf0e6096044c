"""--mode=export: a checkpoint of the workdir as a folder other tools load.

    python main.py --workdir=runs/lm --mode=export --format=hf --output=runs/lm_hf
    python main.py --workdir=runs/lm --mode=export --format=safetensors --output=runs/lm_raw

`--format=hf`: a Hugging Face folder (config.json, model.safetensors, tokenizer files). A
decoder-only model in GPT-2's architecture loads with `GPT2LMHeadModel.from_pretrained`; an
encoder-decoder in Marian's with `MarianMTModel.from_pretrained`. What the architecture
cannot express (a config.model field with another value) is refused with one line naming
the fields (pretrained/gpt2.py, pretrained/marian.py `unsupported`). Ids: a model imported
with config.init_from is written in the original vocabulary, with its tokenizer files; a
model trained here keeps its own ids (0 padding and the decoder's start symbol, 1 EOS), and
the folder holds its own tokenizer file, which `transformers` does not read.

`--format=safetensors`: any model. `model.safetensors` holds every parameter under its path
in the parameter tree joined with "/" (`decoder/block_0/self_attention/query/kernel`, shape
`[d_model, heads, head_dim]`; docs/architecture.md lists every name and shape), in the
loop layout (`block_{i}`, also for scanned runs); `config.json` is the run's config and
`parameters.json` lists each name with its shape.

The folder is written beside its final name and renamed into place: a stopped export
leaves no half-written folder.
"""

import json
import os
import shutil
from typing import Any, Dict

import numpy as np

import files
import pretrained
from models import transformer
from modes.run import open_run
from pretrained import gpt2, marian

FORMATS = ("hf", "safetensors")
ARCHITECTURE_OF = {"generation": gpt2, "translation": marian}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "source.spm", "target.spm",
                   "generation_config.json")


def flatten(tree: Any, prefix: str = "") -> Dict[str, np.ndarray]:
  """{"a/b/c": array} of a nested parameter dict."""
  out = {}
  for name, child in tree.items():
    path = f"{prefix}{name}"
    if isinstance(child, dict) or hasattr(child, "items"):
      out.update(flatten(child, path + "/"))
    else:
      out[path] = np.ascontiguousarray(np.asarray(child, np.float32))
  return out


def hf_arrays(config, params) -> tuple:
  """(arrays, config.json) of the Hugging Face model equivalent to `params`, or
  PretrainedError naming the config.model fields it cannot express."""
  module = ARCHITECTURE_OF.get(config.task)
  if module is None:
    raise pretrained.PretrainedError(
        f"--format=hf writes GPT-2 (generation) and Marian (translation) models; "
        f"config.task={config.task!r} has no such architecture here: use "
        f"--format=safetensors")
  model = config.model.to_dict()
  wrong = module.unsupported(model)
  if module is gpt2 and model.get("mask_special_logits") and not config.get("init_from"):
    wrong["mask_special_logits"] = True
  if wrong:
    names = ", ".join(f"config.model.{k}={v!r}" for k, v in sorted(wrong.items()))
    raise pretrained.PretrainedError(
        f"{module.ARCHITECTURE} has no equivalent of {names}; export with "
        f"--format=safetensors, or train with {module.ARCHITECTURE}'s options "
        f"({module.__name__.replace('.', '/')}.py, FIXED)")
  if config.get("init_from"):
    hf_config, _ = pretrained.module_of(config.init_from)
    vocab = module.vocabulary(hf_config)
  else:  # ids as they are
    size = params["decoder"]["embed"]["embedding"].shape[0] if module is gpt2 else (
        params["shared_embed"]["embedding"].shape[0])
    vocab = pretrained.VocabularyMap(np.arange(size, dtype=np.int64))
  if module is gpt2:
    return gpt2.to_hf(params, model, vocab, eos_id=1)
  return marian.to_hf(params, model, vocab, max_length=max(
      config.data.max_input_length, config.data.max_target_length, 512))


def export(config, workdir: str, output: str, fmt: str, checkpoint: str = "latest",
           step=None) -> str:
  """Writes the folder; returns a one-line summary."""
  if fmt not in FORMATS:
    raise pretrained.PretrainedError(f"--format={fmt!r}: expected one of {', '.join(FORMATS)}")
  if not output:
    raise pretrained.PretrainedError("--mode=export needs --output=<folder> (created; it "
                                     "must not exist yet)")
  if os.path.lexists(output):
    raise pretrained.PretrainedError(f"--output={output} exists already; give a new folder "
                                     f"(nothing is overwritten)")
  run = open_run(config, workdir)
  restored_step, params = run.restore(checkpoint, step)
  params = transformer.unstack_layers(jax_to_numpy(params))
  note = ""
  if fmt == "hf":
    arrays, hf_config = hf_arrays(config, params)
    if config.task == "generation" and config.get("init_from"):
      drift = gpt2.start_symbol_drift(params, gpt2.vocabulary(
          pretrained.module_of(config.init_from)[0]))
      if drift > 0:
        note = (f"; note: GPT-2 starts a text with <|endoftext|>, whose embedding now differs "
                f"from this model's start symbol by up to {drift:.3g} (fine-tuning moved them)")
  else:
    arrays = flatten(params)
    hf_config = json.loads(config.to_json())
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  staging = f"{output}.partial"
  shutil.rmtree(staging, ignore_errors=True)
  with files.checked(staging, "the workdir and its checkpoints are untouched"):
    os.makedirs(staging)
    save_file(arrays, os.path.join(staging, "model.safetensors"))
    pretrained.save_json(os.path.join(staging, "config.json"), hf_config)
    if fmt == "safetensors":
      pretrained.save_json(os.path.join(staging, "parameters.json"),
                           {k: list(v.shape) for k, v in sorted(arrays.items())})
    copied = _copy_tokenizer(config, workdir, staging)
    os.replace(staging, output)
  return (f"exported step {restored_step} ({checkpoint}) as {fmt} to {output}: "
          f"{len(arrays)} arrays, {sum(a.size for a in arrays.values()):,} parameters"
          + (f"; tokenizer files {', '.join(copied)}" if copied else "") + note)


def jax_to_numpy(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda x: np.asarray(x, np.float32), tree)


def _copy_tokenizer(config, workdir: str, staging: str):
  """The tokenizer files of the run: the pretrained folder's, or the workdir's own."""
  copied = []
  if config.get("init_from"):
    for name in TOKENIZER_FILES:
      source = os.path.join(config.init_from, name)
      if os.path.exists(source) and not os.path.exists(os.path.join(staging, name)):
        shutil.copyfile(source, os.path.join(staging, name))
        copied.append(name)
    return copied
  for name in sorted(os.listdir(workdir)):
    if name.startswith("tokenizer") and os.path.isfile(os.path.join(workdir, name)):
      shutil.copyfile(os.path.join(workdir, name), os.path.join(staging, name))
      copied.append(name)
  return copied
