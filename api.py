"""The Python API: what the modes do, on a trained workdir, from Python.

    import api
    model = api.load("runs/m30k", checkpoint="best")     # config.json + a checkpoint
    model.translate(["Ein Mann fährt Fahrrad."])          # translation
    model.score(["Ein Mann."], references=["A man."])     # loss per token of each pair
    lm = api.load("runs/shakespeare", overrides={"decode.temperature": 0.8})
    lm.generate(["ROMEO:"])                               # [[sample, ...], ...]
    lm.score(["To be, or not to be"])                     # loss per token, perplexity
    api.load("runs/sst2").classify(["a warm film"])       # label and probabilities
    maps = model.attention("Ein Mann fährt Fahrrad.")     # every head's weights

`load` starts from the config the workdir was trained with (its config.json) and applies
`overrides` (dotted names, as sweeps write them: `{"decode.beam_size": 8}`) as main.py
applies --config.<group>.<field> flags there (modes/workdir_config.py): a model field must
stay as trained (unless {"train.allow_config_change": True}). The model
and tokenizer are opened once, the checkpoint is restored read-only (a live trainer in the
workdir is not disturbed), and each method runs the same code as its mode
(docs/python_api.md has a worked example that the tests run).
"""

import dataclasses
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

import jax
import ml_collections
import numpy as np

import tasks
from configs import default, sweeps
from errors import UserError
from inspection import attention_maps
from modes import generate as generate_mode
from modes import lines as line_modes
from modes import workdir_config
from modes.run import Run, open_run


@dataclasses.dataclass
class Model:
  """A workdir's model, tokenizer and restored parameters (host arrays)."""
  run: Run
  params: Any
  step: int
  checkpoint: str

  @property
  def config(self) -> ml_collections.ConfigDict:
    return self.run.config

  @property
  def task(self):
    return self.run.task

  def translate(self, texts: Sequence[str]) -> List[str]:
    """The translation of each text (beam search as config.decode says; "" for "")."""
    self._require("translate", lambda family: family.line_mode == "decode")
    return ["" if out is None else self.task.render_line(out)
            for out in self._lines.outputs(list(texts), "translating")]

  def classify(self, texts: Sequence[str]) -> List[Optional[Dict[str, Any]]]:
    """Per text, {"label": the predicted class, "probability": its probability,
    "probabilities": {class: probability}}; None for an empty text."""
    self._require("classify", lambda family: family.line_mode == "predict")
    names = self.task.label_names
    out = []
    for probabilities in self._lines.outputs(list(texts), "classifying"):
      if probabilities is None:
        out.append(None)
        continue
      best = int(np.argmax(probabilities))
      out.append({"label": names[best], "probability": float(probabilities[best]),
                  "probabilities": {n: float(p) for n, p in zip(names, probabilities)}})
    return out

  def generate(self, prompts: Sequence[str]) -> List[List[str]]:
    """Per prompt, config.decode.num_samples continuations (the prompt included), sampled
    as config.decode says (load with overrides such as {"decode.temperature": 0.8})."""
    self._require("generate", lambda family: issubclass(family, tasks.base.TextGenerator))
    return generate_mode.sample(self.run, self.params, list(prompts))

  def score(self, texts: Sequence[str], references: Optional[Sequence[str]] = None
            ) -> List[Dict[str, float]]:
    """How well the model predicts each text (a language model) or each reference given
    its source text (translation, `references`): {"loss": mean negative log-likelihood
    per target token (nats, no label smoothing), "perplexity", "tokens"}. A language
    model scores the first config.data.max_target_length tokens of a text (its context);
    "tokens" says how many were scored."""
    if "decoder" not in self.task.attention_fields:
      raise UserError(f"score needs a model that predicts tokens (translation or "
                      f"generation); config.task={self.config.task!r}")
    translation = "encoder" in self.task.attention_fields
    if translation != (references is not None) or (
        references is not None and len(references) != len(texts)):
      raise UserError("score: translation needs one reference per text "
                      "(score(sources, references=targets)); a language model takes texts "
                      "only")
    examples = [self.task.attention_example(text, None if references is None
                                            else references[i])
                for i, text in enumerate(texts)]
    for example in examples:
      self.task.check_example_lengths(example)
    sums = []
    size = self.config.eval.eval_batch_size
    for start in range(0, len(examples), size):
      sums += self._example_sums(examples[start:start + size])
    return [{"loss": s["nll"] / max(s["weight"], 1.0),
             "perplexity": float(np.exp(min(s["nll"] / max(s["weight"], 1.0), 700.0))),
             "tokens": int(s["weight"])} for s in sums]

  def attention(self, text: str, reference: Optional[str] = None
                ) -> attention_maps.AttentionMaps:
    """Every head's attention on `text` (for translation with the target `reference`, else
    the model's own translation): `.weights[kind]` is `[layers, heads, queries, keys]`,
    `.queries[kind]`/`.keys[kind]` the token pieces; `.stats()` the per-head statistics
    that --mode=attention prints."""
    example = self.task.attention_example(text, reference)
    return attention_maps.example_maps(self.task, self.params, [example])[0]

  # ---- internals
  @property
  def _lines(self) -> line_modes.LinePredictor:
    if not hasattr(self, "_predictor"):
      self._predictor = line_modes.LinePredictor(self.run, self.params)
    return self._predictor

  def _require(self, what: str, fits) -> None:
    family = tasks.TASKS[self.config.task]
    if not fits(family) or not self.task.data.has_text:
      raise UserError(f"{what} needs a model of that family trained on text; this one is "
                      f"config.task={self.config.task!r} on "
                      f"config.data.dataset={self.config.data.dataset!r}")

  def _example_sums(self, examples) -> List[Dict[str, float]]:
    """The summed loss metrics of each example, one padded batch (rows scored apart)."""
    fields = sorted(examples[0])
    batch = {}
    for field in fields:
      width = self.task.eval_lengths[field]
      rows = np.zeros((len(examples), width), np.int32)
      for r, example in enumerate(examples):
        rows[r, :len(example[field])] = example[field]
      batch[field] = rows
    if not hasattr(self, "_loss_rows"):
      task = self.task

      def one(params, row):
        return task.loss(params, jax.tree.map(lambda x: x[None], row), None, False)

      self._loss_rows = jax.jit(jax.vmap(one, in_axes=(None, 0)))
    sums = jax.device_get(self._loss_rows(self.params, batch))
    return [{k: float(v[r]) for k, v in sums.items()} for r in range(len(examples))]


def load(workdir: str, checkpoint: str = "latest", step: Optional[int] = None,
         overrides: Optional[Mapping[str, Any]] = None,
         devices: Optional[Sequence[jax.Device]] = None) -> Model:
  """The model of `workdir` with its `checkpoint` ("latest", "best" or "averaged"; `step`
  for a regular one), its config changed by `overrides` ({"decode.beam_size": 4})."""
  if not os.path.isfile(os.path.join(workdir, workdir_config.CONFIG_FILE)):
    raise UserError(f"{os.path.join(workdir, workdir_config.CONFIG_FILE)}: no such file; "
                    f"give the workdir of a training run")
  overrides = dict(overrides or {})
  fields = default.get_config()
  unknown = [name for name in overrides if not sweeps.has_field(fields, name)]
  if unknown:
    raise UserError(f"load: unknown config field(s) {', '.join(unknown)} (dotted names such "
                    f"as decode.beam_size)")
  config = workdir_config.resolve_config(workdir, None, overrides, explicit_file=False)
  run = open_run(config, workdir, devices or jax.local_devices()[:1])
  step, params = run.restore(checkpoint, step)
  return Model(run, params, step, checkpoint)
