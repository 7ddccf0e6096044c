"""Translation (encoder-decoder): teacher-forced, label-smoothed cross-entropy; beam search
(or greedy) through the key/value cache; BLEU and chrF with sacrebleu on detokenized text,
or exact match of the tokens where the data has no text (synthetic digits, whose "target"
is a function of the input: its reversal by default).
"""

from typing import Dict, List

import jax.numpy as jnp
import numpy as np
from absl import logging

from config_checks import Fields
from models import EncoderDecoder, decoding
from tasks import base
from tasks.sources import MAX_LENGTH
from tasks.sources.parallel_text import ParallelText


class TranslationTask(base.Task):
  name = "translation"
  model_class = EncoderDecoder
  text_source = ParallelText
  digits_kind = "seq2seq"
  attention_fields = {"encoder": "inputs", "decoder": "targets"}
  metrics = ("exact_match",)
  text_metrics = ("bleu", "chrf")
  compare_by = ("bleu", "exact_match")
  line_mode = "decode"
  tokenizers = ("sentencepiece", "bytes", "huggingface")
  identity_fields = ("data.language_pair",)  # the direction the parameters translate

  def __init__(self, config, workdir=None, training=True):
    super().__init__(config, workdir, training)
    if self.data.has_text:  # sacrebleu is imported here: a missing one stops the run now
      logging.info("%s: vocabularies of %d and %d pieces; scores: %s", self.data.kind_label,
                   self.vocab_size, self.data.output_vocab_size,
                   "  ".join(f"{k} {v}" for k, v in sacrebleu_signatures().items()))

  @classmethod
  def tokenizer_files(cls, config) -> int:
    """One shared model, or source and target models ("source,target")."""
    return 1 if config.model.shared_vocab else 2

  @classmethod
  def check_beam_search(cls, config) -> None:
    """The beam search fields of config.decode (`predict`)."""
    decode = Fields(config, "decode")
    decode.integer("beam_size", 1)
    decode.integer("decode_extra_length", 0)
    if decode["decode_extra_length"] > MAX_LENGTH:
      decode.fail("decode_extra_length", f"expected at most {MAX_LENGTH} tokens")
    decode.number("length_penalty", lambda v: v >= 0,
                  "expected a number >= 0 (0 = no length normalisation)")

  @classmethod
  def check_config(cls, config) -> None:
    Fields(config, "model").integer("num_encoder_layers", 1)
    Fields(config, "model").integer("num_decoder_layers", 1)
    data = Fields(config, "data")
    if data["dataset"] == "synthetic":
      need = data["max_digits"] + 1  # x EOS and f(x) EOS
      for field in ("max_input_length", "max_target_length"):
        if data[field] < need:
          data.fail(field, f"examples of max_digits={data['max_digits']} need at least "
                           f"{need} tokens")
      return
    pair = str(data["language_pair"]).split("-")
    if len(pair) != 2 or not all(pair) or pair[0] == pair[1]:
      data.fail("language_pair",
                "expected two different language codes as source-target, e.g. 'de-en'")
    model = Fields(config, "model")
    if model["shared_vocab"] is False and model["share_embeddings"]:
      model.fail("share_embeddings", "separate source and target vocabularies "
                                     "(shared_vocab=False) need share_embeddings=False")

  # ---- data and model
  @classmethod
  def batch_lengths(cls, config) -> Dict[str, int]:
    d = config.data
    return {"inputs": d.max_input_length, "targets": d.max_target_length}

  @property
  def decode_length(self) -> int:
    """Tokens decoded at most: for text, the padded input length plus
    config.decode.decode_extra_length (the paper's limit); for digits, the target length."""
    if not self.data.has_text:
      return self.config.data.max_target_length
    return self.config.data.max_eval_length + self.config.decode.decode_extra_length

  def max_length(self) -> int:
    return max(max(self.lengths.values()), max(self.eval_lengths.values()),
               self.decode_length) + 1

  def model_inputs(self, batch):
    keys = ("inputs", "targets", "inputs_position", "targets_position",
            "inputs_segmentation", "targets_segmentation")
    names = ("inputs", "targets", "inputs_positions", "targets_positions",
             "inputs_segmentation", "targets_segmentation")
    return {name: batch[key] for key, name in zip(keys, names) if key in batch}

  def loss_targets(self, batch):
    targets = batch["targets"]
    return targets, (targets > 0).astype(jnp.float32)

  # ---- decoding
  def predict(self, params, batch):
    """Beam search (greedy when beam_size is 1 and outputs have no per-example limit)
    through the key/value cache.

    Returns `[batch, decode_length]` tokens; on text, example b stops at its input length
    plus config.decode.decode_extra_length (the paper's limit).
    """
    c = self.config
    inputs = batch["inputs"]
    batch_size, max_length = inputs.shape[0], self.decode_length
    encoded = self.model.apply({"params": params}, inputs, method="encode")
    decoder = self.build_model(decode=True)
    beam = c.decode.beam_size
    if beam > 1:
      encoded = decoding.expand_to_beams(encoded, beam)
      inputs = decoding.expand_to_beams(inputs, beam)
    cache = decoding.init_cache(decoder, inputs,
                                jnp.zeros((inputs.shape[0], max_length), jnp.int32))
    decoder_params = self.decode_params(params)

    def step(cache, tokens):
      logits, state = decoder.apply({"params": decoder_params, "cache": cache}, encoded,
                                    inputs, tokens, method="decode", mutable=["cache"])
      return logits[:, -1], state["cache"]

    limits = None
    if self.data.has_text:
      limits = jnp.minimum((batch["inputs"] > 0).sum(-1) + c.decode.decode_extra_length,
                           max_length)
    elif beam == 1:
      return decoding.greedy_decode(step, cache, batch_size, max_length, self.eos_id)
    tokens, _ = decoding.beam_search(step, cache, batch_size, beam, max_length, self.eos_id,
                                     alpha=c.decode.length_penalty, max_lengths=limits)
    return tokens[:, 0]

  # ---- scores
  def score(self, batch, predictions):
    if self.data.has_text:
      return {}  # text is scored as a corpus, from `outputs`
    return base.exact_match_sums(batch["inputs"], predictions, batch["targets"])

  def detokenize(self, tokens: np.ndarray) -> str:
    return self.data.decode(tokens)

  def outputs(self, batch, predictions, split: str = "eval") -> List[dict]:
    if not self.data.has_text:
      return []
    sources, references = self.data.texts(self.data.split_name(split))
    return [{"index": int(index), "source": sources[index], "reference": references[index],
             "hypothesis": self.detokenize(p)}
            for x, index, p in zip(batch["inputs"], batch["index"], predictions) if x.any()]

  def summarize(self, sums, outputs=None):
    out = super().summarize(sums, outputs)
    if outputs:
      out.update(corpus_scores([o["hypothesis"] for o in outputs],
                               [o["reference"] for o in outputs]))
    return out

  def score_details(self):
    return {"signatures": sacrebleu_signatures()} if self.data.has_text else {}

  def format_examples(self, batch, predictions, limit, split: str = "eval") -> List[str]:
    if self.data.has_text:
      return [f"source: {r['source']}\n  reference: {r['reference']}\n"
              f"  hypothesis: {r['hypothesis']}"
              for r in self.outputs(batch, predictions, split)[:limit]]
    lines = []
    for x, y, p in zip(batch["inputs"], batch["targets"], predictions):
      if len(lines) == limit or not x.any():
        break
      mark = "ok" if np.array_equal(y, p) else "WRONG"
      lines.append(f"input: {self.data.decode(x)}  target: {self.data.decode(y)}"
                   f"  prediction: {self.data.decode(p)}  [{mark}]")
    return lines

  # ---- decode mode (base.LineMapper)
  def encode_lines(self, lines: List[str]) -> list:
    """Examples for `--mode=decode`: inputs cut to max_eval_length, EOS-terminated."""
    return [{"inputs": x, "targets": np.zeros(1, np.int32), "index": np.int32(i)}
            for i, x in enumerate(self.data.encode_sources(lines))]

  def render_line(self, output: np.ndarray) -> str:
    return self.detokenize(output)

  # ---- attention mode
  def attention_example(self, text, reference=None):
    if self.data.has_text:
      example = {"inputs": self.data.encode_sources([text])[0]}
      if reference is not None:
        tokens = self.data.encode(reference, "targets")[:self.decode_length - 1]
        example["targets"] = np.append(tokens, self.eos_id).astype(np.int32)
      return example
    with_eos = lambda x: np.append(x, self.eos_id).astype(np.int32)  # noqa: E731
    example = {"inputs": with_eos(self.data.encode(text))}
    if reference is not None:
      example["targets"] = with_eos(self.data.encode(reference))
    self.check_example_lengths(example)
    return example


def corpus_scores(hypotheses: List[str], references: List[str]) -> Dict[str, float]:
  """sacreBLEU BLEU (13a, cased) and chrF of detokenized text against one reference each."""
  import sacrebleu  # pylint: disable=g-import-not-at-top  # only real-data runs need it
  bleu = sacrebleu.metrics.BLEU()
  chrf = sacrebleu.metrics.CHRF()
  return {"bleu": bleu.corpus_score(hypotheses, [references]).score,
          "chrf": chrf.corpus_score(hypotheses, [references]).score}


def sacrebleu_signatures() -> Dict[str, str]:
  """The signatures of the metrics `corpus_scores` computes (one reference each)."""
  import sacrebleu  # pylint: disable=g-import-not-at-top
  out = {}
  for name, metric in (("bleu", sacrebleu.metrics.BLEU()), ("chrf", sacrebleu.metrics.CHRF())):
    # sacrebleu 2.x knows the reference count (part of the signature) only after scoring.
    metric.corpus_score(["a"], [["a"]])
    out[name] = str(metric.get_signature())
  return out
