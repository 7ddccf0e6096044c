"""Text classification (encoder-only): cross-entropy over classes; accuracy, macro F1 and
the confusion matrix; class probabilities for --mode=predict.

On text the classes are those of tasks/sources/labeled_text.py (saved as
<workdir>/labels.json); on the synthetic digits a string is labelled by whether most of its
digits are >= 5.
"""

from typing import Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from config_checks import Fields
from input_pipeline import tokenizers
from models import Classifier
from tasks import base, classification_metrics
from tasks.sources.labeled_text import LabeledText


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

  @classmethod
  def check_config(cls, config) -> None:
    Fields(config, "model").integer("num_encoder_layers", 1)
    data = Fields(config, "data")
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
