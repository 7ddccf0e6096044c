"""Translation (encoder-decoder): teacher-forced, label-smoothed cross-entropy; beam search
(or greedy) through the key/value cache; BLEU and chrF with sacrebleu on detokenized text.

Real data comes from a tfds dataset by name or from local parallel files (read through the
tfds builder in input_pipeline/local_builders.py); it is tokenized once, filtered to the
configured lengths (what is dropped is counted) and, for training, packed. The synthetic
default "translates" a digit string into its reversal and is scored by exact match.
"""

import dataclasses
from typing import Dict, List, Optional

import jax.numpy as jnp
import numpy as np
from absl import logging

from input_pipeline import local_builders, sources, synthetic, tokenizers
from models import EncoderDecoder, decoding
from tasks import base, losses

DataError = local_builders.DataError


class TranslationTask(base.Task):
  name = "translation"
  synthetic_kind = "seq2seq"
  attention_fields = {"encoder": "inputs", "decoder": "targets"}

  # ---- data
  def setup_data(self) -> None:
    c = self.config
    self.real = c.data.dataset != "synthetic"
    if not self.real:
      return
    self.source_lang, self.target_lang = c.data.language_pair.split("-")
    self._builder = self._make_builder()
    self._raw: Dict[str, object] = {}
    self._examples: Dict[str, list] = {}
    self._texts: Dict[str, tuple] = {}
    self.source_tokenizer, self.target_tokenizer = self._tokenizers()
    self.vocab_size = self.source_tokenizer.vocab_size
    self.output_vocab_size = self.target_tokenizer.vocab_size
    self.eos_id = self.target_tokenizer.eos_id
    logging.info("%s -> %s: vocabularies of %d and %d pieces; scores: %s", self.source_lang,
                 self.target_lang, self.vocab_size, self.output_vocab_size,
                 "  ".join(f"{k} {v}" for k, v in sacrebleu_signatures().items()))

  def _make_builder(self):
    """The tfds builder of config.data.dataset (local parallel files or a tfds name)."""
    c = self.config
    languages = (self.source_lang, self.target_lang)
    if c.data.dataset == "files":
      file_splits = dict(sources.parse_mapping(c.data.file_splits, "file_splits"))
      return local_builders.parallel_text_builder(
          c.data.data_dir, languages, file_splits, sources.default_data_dir(c.data.tfds_data_dir))
    builder = sources.tfds_builder(c.data.dataset, c.data.tfds_data_dir)
    features = list(builder.info.features.keys())
    missing = [lang for lang in languages if lang not in features]
    if missing:
      raise DataError(f"config.data.language_pair={c.data.language_pair!r}: dataset {c.data.dataset} has "
                      f"no language {', '.join(missing)}; it has {', '.join(features)}")
    return builder

  def _split_source(self, split: str):
    """The raw (untokenized) random-access source of a split, prepared on first use."""
    if split not in self._raw:
      if self.config.data.dataset == "files" and split not in dict(self._builder.builder_config.splits):
        raise DataError(f"split {split!r} is not in config.data.file_splits="
                        f"{self.config.data.file_splits!r}")
      self._raw.update(sources.open_splits(self._builder, [split],
                                           needs_tensorflow=self.config.data.dataset != "files"))
    return self._raw[split]

  def texts(self, split: str):
    """(sources, references) of a split as lists of str, in dataset order."""
    if split not in self._texts:
      pairs = sources.read_all(
          self._split_source(split), lambda ex: (sources.as_text(ex[self.source_lang]),
                                                 sources.as_text(ex[self.target_lang])))
      self._texts[split] = ([p[0] for p in pairs], [p[1] for p in pairs])
    return self._texts[split]

  def _tokenizers(self):
    """(source, target) tokenizers: loaded from config.data.tokenizer_path or the workdir, or
    trained on the training split and saved in the workdir."""
    c = self.config
    kind = c.model.tokenizer
    names = (["tokenizer.model"] if c.model.shared_vocab else
             [f"tokenizer_{self.source_lang}.model", f"tokenizer_{self.target_lang}.model"])
    paths = base.tokenizer_paths(c, self.workdir, names, self.training)
    # The workdir is created by the tokenizer's write, after the data has been read and
    # checked: bad data leaves no trace in it.
    def corpus(which):
      def sentences():
        src, tgt = self.texts(c.data.train_split)
        texts = {"source": src, "target": tgt, "both": src + tgt}[which]
        # An evenly strided sample: large corpora are often concatenations of sources.
        stride = -(-len(texts) // c.data.tokenizer_max_sentences)
        return texts[::stride]
      return sentences

    if c.model.shared_vocab:
      shared = tokenizers.get_or_build(kind, paths[0], corpus("both"), c.model.vocab_size)
      return shared, shared
    return (tokenizers.get_or_build(kind, paths[0], corpus("source"), c.model.vocab_size),
            tokenizers.get_or_build(kind, paths[1], corpus("target"), c.model.vocab_size))

  def _tokenized(self, split: str) -> list:
    """Examples `{"inputs", "targets", "index"}` with EOS appended, unfiltered."""
    if split not in self._examples:
      src, tgt = self.texts(split)
      eos = np.array([self.eos_id], np.int32)
      inputs = self.source_tokenizer.encode_batch(src)
      targets = self.target_tokenizer.encode_batch(tgt)
      self._examples[split] = [
          {"inputs": np.concatenate([x, eos]), "targets": np.concatenate([y, eos]),
           "index": np.int32(i)} for i, (x, y) in enumerate(zip(inputs, targets))]
    return self._examples[split]

  def data_source(self, split: str):
    if not self.real:
      return super().data_source(split)
    c = self.config
    if split == "train":
      examples = self._tokenized(c.data.train_split)
      kept = [e for e in examples if len(e["inputs"]) <= c.data.max_input_length
              and len(e["targets"]) <= c.data.max_target_length]
      logging.info("training split %r: %d examples, %d dropped for being longer than "
                   "max_input_length=%d or max_target_length=%d tokens (EOS included)",
                   c.data.train_split, len(kept), len(examples) - len(kept), c.data.max_input_length,
                   c.data.max_target_length)
      if not kept:
        raise DataError(f"no training example fits max_input_length={c.data.max_input_length} "
                        f"and max_target_length={c.data.max_target_length}; raise them")
      return kept
    split = c.data.eval_split if split == "eval" else split
    # Evaluation keeps every example so scores cover the whole split; the rare input longer
    # than max_eval_length is cut (ending in EOS), its reference text stays whole.
    length = c.data.max_eval_length
    out, cut = [], 0
    for e in self._tokenized(split):
      if len(e["inputs"]) > length or len(e["targets"]) > length:
        cut += 1
        e = {"inputs": np.append(e["inputs"][:length - 1], self.eos_id),
             "targets": np.append(e["targets"][:length - 1], self.eos_id), "index": e["index"]}
      out.append(e)
    if cut:
      logging.warning("split %r: %d examples longer than max_eval_length=%d were truncated",
                      split, cut, length)
    return out

  @property
  def lengths(self) -> Dict[str, int]:
    return {"inputs": self.config.data.max_input_length, "targets": self.config.data.max_target_length}

  @property
  def eval_lengths(self) -> Dict[str, int]:
    if not self.real:
      return self.lengths
    return {"inputs": self.config.data.max_eval_length, "targets": self.config.data.max_eval_length}

  # ---- model
  def model_config(self, decode: bool = False):
    cfg = super().model_config(decode)
    length = max(max(self.lengths.values()), max(self.eval_lengths.values()),
                 self.decode_length) + 1
    return dataclasses.replace(cfg, output_vocab_size=getattr(self, "output_vocab_size", 0),
                               max_length=length)

  @property
  def decode_length(self) -> int:
    """Tokens decoded at most: the padded input length plus config.decode.decode_extra_length."""
    if not self.real:
      return self.config.data.max_target_length
    return self.config.data.max_eval_length + self.config.decode.decode_extra_length

  def build_model(self, decode: bool = False):
    return EncoderDecoder(self.model_config(decode))

  def model_inputs(self, batch):
    keys = ("inputs", "targets", "inputs_position", "targets_position",
            "inputs_segmentation", "targets_segmentation")
    names = ("inputs", "targets", "inputs_positions", "targets_positions",
             "inputs_segmentation", "targets_segmentation")
    return {name: batch[key] for key, name in zip(keys, names) if key in batch}

  def loss(self, params, batch, dropout_rng, train, head_mask=None):
    variables = base.variables(params, head_mask, self.config.model.scan_layers)
    logits = self.model.apply(variables, **self.model_inputs(batch),
                              deterministic=not train, rngs=base.rngs(dropout_rng, train))
    targets = batch["targets"]
    return losses.cross_entropy_sums(logits, targets, (targets > 0).astype(jnp.float32),
                                     self.config.optim.label_smoothing)

  # ---- decoding
  def predict(self, params, batch):
    """Beam search (greedy when beam_size is 1) through the key/value cache.

    Returns `[batch, decode_length]` tokens; example b stops at its input length plus
    config.decode.decode_extra_length (the paper's limit).
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

    if beam == 1 and not self.real:
      return decoding.greedy_decode(step, cache, batch_size, max_length, self.eos_id)
    limits = None
    if self.real:
      limits = jnp.minimum((batch["inputs"] > 0).sum(-1) + c.decode.decode_extra_length, max_length)
    tokens, _ = decoding.beam_search(step, cache, batch_size, beam, max_length, self.eos_id,
                                     alpha=c.decode.length_penalty, max_lengths=limits)
    return tokens[:, 0]

  # ---- scores
  def score(self, batch, predictions):
    if self.real:
      return {}
    return base.exact_match_sums(batch["inputs"], predictions, batch["targets"])

  def detokenize(self, tokens: np.ndarray) -> str:
    return self.target_tokenizer.decode(tokens)

  def outputs(self, batch, predictions, split: str = "eval") -> List[dict]:
    if not self.real:
      return []
    split_texts = self.texts(self.config.data.eval_split if split == "eval" else split)
    out = []
    for x, index, p in zip(batch["inputs"], batch["index"], predictions):
      if x.any():
        out.append({"index": int(index), "source": split_texts[0][index],
                    "reference": split_texts[1][index], "hypothesis": self.detokenize(p)})
    return out

  def summarize(self, sums, outputs: Optional[List[dict]] = None):
    out = super().summarize(sums, outputs)
    if outputs:
      out.update(corpus_scores([o["hypothesis"] for o in outputs],
                               [o["reference"] for o in outputs]))
    return out

  def score_details(self):
    return {"signatures": sacrebleu_signatures()} if self.real else {}

  def format_examples(self, batch, predictions, limit, split: str = "eval") -> List[str]:
    lines = []
    if self.real:
      for record in self.outputs(batch, predictions, split)[:limit]:
        lines.append(f"source: {record['source']}\n  reference: {record['reference']}\n"
                     f"  hypothesis: {record['hypothesis']}")
      return lines
    for x, y, p in zip(batch["inputs"], batch["targets"], predictions):
      if len(lines) == limit or not x.any():
        break
      mark = "ok" if np.array_equal(y, p) else "WRONG"
      lines.append(f"input: {synthetic.decode_tokens(x)}  target: {synthetic.decode_tokens(y)}"
                   f"  prediction: {synthetic.decode_tokens(p)}  [{mark}]")
    return lines

  # ---- decode mode
  def encode_sources(self, lines: List[str]) -> list:
    """Examples for `--mode=decode`: inputs cut to max_eval_length, EOS-terminated."""
    length = self.config.data.max_eval_length
    eos = np.array([self.eos_id], np.int32)
    return [{"inputs": np.concatenate([x[:length - 1], eos]),
             "targets": np.zeros(1, np.int32), "index": np.int32(i)}
            for i, x in enumerate(self.source_tokenizer.encode_batch(lines))]

  # ---- attention mode
  def token_pieces(self, tokens, field):
    if not self.real:
      return super().token_pieces(tokens, field)
    tokenizer = self.source_tokenizer if field == "inputs" else self.target_tokenizer
    return tokenizer.pieces(tokens)

  def attention_example(self, text, reference=None):
    if not self.real:
      return super().attention_example(text, reference)
    example = {"inputs": self.encode_sources([text])[0]["inputs"]}
    if reference is not None:
      tokens = self.target_tokenizer.encode(reference)[:self.decode_length - 1]
      example["targets"] = np.append(tokens, self.eos_id).astype(np.int32)
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
