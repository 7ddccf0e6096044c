"""Text classification (encoder-only): cross-entropy over classes; accuracy, macro F1 and
the confusion matrix; class probabilities for --mode=predict.

On text the classes are those of tasks/sources/labeled_text.py (saved as
<workdir>/labels.json); on the synthetic digits a string is labelled by whether most of its
digits are >= 5.

`MaskedLMTask` (config.objective="mlm") trains the same model's encoder to recover masked
tokens of the same texts instead (tasks/masked_lm.py); a classifier then starts from it
with config.init_encoder_from.
"""

import math
from typing import Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from config_checks import Fields
from input_pipeline import normalize, tokenizers
from models import Classifier
from tasks import base, classification_metrics, masked_lm
from tasks.sources.labeled_text import LabeledText


# Folded into a step's dropout key for the random draws of the input corruption (token
# dropout, masking): independent of the model's dropout masks.
TOKEN_DROPOUT_STREAM = 1


class ClassificationTask(base.Task):
  name = "classification"
  model_class = Classifier
  text_source = LabeledText
  digits_kind = "classification"
  attention_fields = {"encoder": "inputs"}
  metrics = ("macro_f1",)
  compare_by = ("accuracy",)
  line_mode = "predict"
  tokenizers = ("sentencepiece", "bytes")
  identity_fields = ("data.text_normalization",)  # the text the vocabulary was built on

  @classmethod
  def check_config(cls, config) -> None:
    # A recurrent reading (model.encoder_lstm) is an encoder on its own: blocks optional.
    Fields(config, "model").integer("num_encoder_layers",
                                    0 if config.model.encoder_lstm is True else 1)
    optim = Fields(config, "optim")
    optim.rate("token_dropout")
    optim.number("mask_rate", lambda v: 0 < v < 1, "expected a number in (0, 1)")
    if not isinstance(config.init_encoder_from, str):
      Fields(config).fail("init_encoder_from", "expected the workdir of a classification run")
    data = Fields(config, "data")
    data.choice("text_normalization", tuple(normalize.NORMALIZATIONS))
    if data["dataset"] == "synthetic":
      if data["max_input_length"] < data["max_digits"]:
        data.fail("max_input_length", f"examples of max_digits={data['max_digits']} need "
                                      f"at least {data['max_digits']} tokens")
      return
    for field in ("text_feature", "label_feature"):
      data.text(field, "the name of a feature (tfds) or column (files)")
    if data["text_feature"] == data["label_feature"]:
      data.fail("label_feature", "it must differ from text_feature")
    data.integer("min_class_examples", 1)
    if data["pack_examples"]:
      data.fail("pack_examples", "classification examples are padded rows, one example "
                                 "each; set it to False")

  @property
  def label_names(self) -> List[str]:
    return self.data.label_names

  @property
  def num_classes(self) -> int:
    return len(self.label_names)

  @classmethod
  def batch_lengths(cls, config) -> Dict[str, int]:
    return {"inputs": config.data.max_input_length}

  def model_inputs(self, batch):
    return {"inputs": batch["inputs"]}

  def initial_params(self, rng):
    """Fresh parameters or config.init_from's; with config.init_encoder_from (when
    training), that run's encoder under a fresh head."""
    params = super().initial_params(rng)
    if not self.config.get("init_encoder_from") or not self.training:
      return params
    return {**params, "encoder": masked_lm.load_encoder(self.config, params, self)}

  def loss(self, params, batch, dropout_rng, train, head_mask=None, perturbations=None):
    """base.Task.loss; in training, config.optim.token_dropout of the tokens first become
    [MASK] (masked_lm.drop_tokens)."""
    rate = self.config.optim.token_dropout
    if train and rate > 0:
      rng = jax.random.fold_in(dropout_rng, TOKEN_DROPOUT_STREAM)
      batch = {**batch, "inputs": masked_lm.drop_tokens(rng, batch["inputs"], rate)}
    return super().loss(params, batch, dropout_rng, train, head_mask, perturbations)

  def loss_targets(self, batch):
    real = batch["inputs"].any(axis=-1).astype(jnp.float32)  # zero-filled examples weigh 0
    return batch["label"], real

  def predict(self, params, batch):
    """Class probabilities `[batch, num_classes]` float32; the prediction is their argmax."""
    logits = self.model.apply({"params": params}, batch["inputs"])
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

  # ---- scores
  def score(self, batch, predictions):
    real = batch["inputs"].any(axis=-1)
    return {"examples": float(np.sum(real))}

  def outputs(self, batch, predictions, split: str = "eval") -> List[dict]:
    """index, text, label and predicted class names and the class probabilities of each
    real example."""
    out = []
    names = self.label_names
    indices = batch["index"] if "index" in batch else np.full(len(predictions), -1)
    for x, index, y, p in zip(batch["inputs"], indices, batch["label"], predictions):
      if x.any():
        out.append({"index": int(index), "text": self.data.text_of(split, int(index), x),
                    "label": names[int(y)], "predicted": names[int(np.argmax(p))],
                    "probabilities": [float(v) for v in p]})
    return out

  def confusion(self, outputs: List[dict]) -> np.ndarray:
    ids = {name: i for i, name in enumerate(self.label_names)}
    return classification_metrics.confusion_matrix(
        [ids[o["label"]] for o in outputs], [ids[o["predicted"]] for o in outputs],
        self.num_classes)

  def summarize(self, sums, outputs: Optional[List[dict]] = None):
    out = super().summarize(sums, outputs)
    out.pop("perplexity", None)  # perplexity is a sequence-model metric
    if outputs:
      out["macro_f1"] = classification_metrics.scores(self.confusion(outputs))["macro_f1"]
    return out

  def summary_texts(self, outputs):
    if not outputs:
      return {}
    return {"confusion_matrix": classification_metrics.table(self.confusion(outputs),
                                                             self.label_names)}

  def summary_images(self, outputs):
    if not outputs:
      return {}
    return {"confusion_matrix": classification_metrics.image(self.confusion(outputs),
                                                             self.label_names)}

  def eval_report(self, outputs):
    if not outputs:
      return {}
    return {"labels": self.label_names,
            "confusion_matrix": self.confusion(outputs).tolist()}

  def prediction_file(self, outputs):
    """A TSV: index, label, predicted, one probability column per class, text."""
    if not self.data.has_text or not outputs:
      return None
    header = ["index", "label", "predicted"] + [f"p({n})" for n in self.label_names]
    lines = ["\t".join(header + ["text"])]
    for o in outputs:
      text = " ".join(o["text"].split())  # tabs and newlines would break the columns
      lines.append("\t".join([str(o["index"]), o["label"], o["predicted"]]
                             + [f"{p:.6f}" for p in o["probabilities"]] + [text]))
    return "predictions", ".predictions.tsv", "\n".join(lines) + "\n"

  def format_examples(self, batch, predictions, limit, split="eval") -> List[str]:
    lines = []
    for o in self.outputs(batch, predictions, split)[:limit]:
      mark = "ok" if o["label"] == o["predicted"] else "WRONG"
      confidence = max(o["probabilities"])
      lines.append(f"text: {o['text']!r}\n  label: {o['label']}  predicted: "
                   f"{o['predicted']} ({confidence:.2f})  [{mark}]")
    return lines

  # ---- predict mode (base.LineMapper)
  def encode_lines(self, lines: List[str]) -> list:
    """Examples for `--mode=predict`, cut to max_input_length tokens like the data."""
    tokens = self.data.encode_batch(lines)
    length = self.config.data.max_input_length
    return [{"inputs": x[:length] if len(x) else np.array([tokenizers.UNK_ID], np.int32),
             "label": np.int32(0), "index": np.int32(i)} for i, x in enumerate(tokens)]

  def render_line(self, probabilities) -> str:
    """`label<TAB>its probability<TAB>name=p name=p ...` (classes in id order)."""
    best = int(np.argmax(probabilities))
    return (f"{self.label_names[best]}\t{float(probabilities[best]):.4f}\t"
            + " ".join(f"{n}={float(p):.4f}"
                       for n, p in zip(self.label_names, probabilities)))

  def attention_example(self, text, reference=None):
    del reference
    if self.data.has_text:
      return {"inputs": self.encode_lines([text])[0]["inputs"]}
    example = {"inputs": self.data.encode(text)}
    self.check_example_lengths(example)
    return example


class MaskedLMTask(ClassificationTask):
  """config.objective="mlm": the classifier's encoder trained to recover masked tokens of
  the family's texts (labels unused), BERT's way (tasks/masked_lm.py). Evaluations score
  the masked tokens of the eval split, masked the same way every time: `accuracy` and
  `perplexity` are over those tokens. Its checkpoints start classifiers
  (config.init_encoder_from)."""

  line_mode = ""  # no --mode=predict: it predicts tokens, not classes
  scores_predictions = False

  def corrupt(self, batch, rng: Optional[jax.Array]):
    """(masked inputs, their original ids, weights: 1 where the loss scores); `rng` None
    (evaluation) masks with `masked_lm.eval_mask_key`."""
    inputs = batch["inputs"]
    rng = masked_lm.eval_mask_key(inputs) if rng is None else rng
    masked, weights = masked_lm.mask_tokens(rng, inputs, self.config.optim.mask_rate,
                                            self.vocab_size)
    return masked, inputs, weights

  def init_params(self, rng):
    """The classifier's parameters; with embeddings narrower or wider than d_model
    (model.embed_dim), also "token_proj", which takes the encoder's output back to their
    width before the tied vocabulary projection (Classifier with token_logits)."""
    params, model = super().init_params(rng), self.config.model
    if model.embed_dim in (0, model.d_model):
      return params
    token = self.model.init({"params": rng}, **self.dummy_inputs(), token_logits=True)
    return {**params, "token_proj": token["params"]["token_proj"]}

  def scored_positions(self, length: int) -> int:
    """How many positions of a row the loss projects onto the vocabulary: twice the
    expected masks of a full row. The vocabulary projection of the rest (padding, unmasked
    tokens) would be most of a step's work; a row masked more than that (under 1 in 1000
    full rows of 64 tokens at 15%) leaves its last masked positions unscored."""
    return min(length, max(1, math.ceil(2 * self.config.optim.mask_rate * length)))

  def loss(self, params, batch, dropout_rng, train, head_mask=None, perturbations=None):
    """Summed cross-entropy over the masked positions (tasks/losses.py)."""
    rng = jax.random.fold_in(dropout_rng, TOKEN_DROPOUT_STREAM) if train else None
    masked, targets, weights = self.corrupt(batch, rng)
    _, at = jax.lax.top_k(weights, self.scored_positions(weights.shape[-1]))  # masked first
    targets = jnp.take_along_axis(targets, at, axis=1)
    weights = jnp.take_along_axis(weights, at, axis=1)
    variables = self.variables(params, head_mask, perturbations)
    return self.cross_entropy_sums(
        lambda key: self.model.apply(variables, masked, token_logits=True, at=at,
                                     deterministic=not train,
                                     rngs={"dropout": key} if train else {}),
        targets, weights, dropout_rng, train)

  def predict(self, params, batch):
    """`[batch, length]` the most likely id at each masked position (evaluation's masks),
    -1 elsewhere."""
    masked, _, weights = self.corrupt(batch, None)
    logits = self.model.apply({"params": params}, masked, token_logits=True)
    return jnp.where(weights > 0, jnp.argmax(logits, axis=-1), -1)

  def score(self, batch, predictions):
    return {}

  def outputs(self, batch, predictions, split: str = "eval") -> List[dict]:
    return []

  def summarize(self, sums, outputs=None):
    return base.Task.summarize(self, sums, outputs)  # perplexity kept; no macro F1

  def format_examples(self, batch, predictions, limit, split="eval") -> List[str]:
    """The text, then each masked token as `was->guessed`."""
    lines = []
    indices = batch["index"] if "index" in batch else np.full(len(predictions), -1)
    for x, index, p in zip(batch["inputs"], indices, predictions):
      if len(lines) == limit or not x.any():
        continue
      at = np.flatnonzero(p >= 0)
      pieces = self.token_pieces(x[at], "inputs"), self.token_pieces(p[at], "inputs")
      lines.append(f"text: {self.data.text_of(split, int(index), x)!r}\n  masked: "
                   + " ".join(f"{a}->{b}" for a, b in zip(*pieces)))
    return lines

  def encode_lines(self, lines: List[str]) -> list:
    raise masked_lm.EncoderInitError(
        "this workdir holds masked-token pre-training (config.objective=mlm), not a "
        "classifier: fine-tune one with --config.init_encoder_from=<this workdir>")
