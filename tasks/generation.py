"""Text generation (decoder-only): next-token cross-entropy, perplexity and bits per
character; generation through the key/value cache, greedy or sampled (temperature, top-k,
top-p).

Real text comes from a tfds dataset by name (a `text` feature: tiny_shakespeare, lm1b) or
from local text files (read through the tfds builder in input_pipeline/local_builders.py).
It is tokenized once (characters, bytes or SentencePiece, saved in the workdir) and batched
as windows of one contiguous stream (input_pipeline/windows.py) or as documents, each its
own row (cut at the context length), packed or padded. The synthetic default models
streams "x | f(x)": the prompt is "x |", and the continuation is scored by exact match.
"""

import math
from typing import Dict, List

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from input_pipeline import local_builders, sources, synthetic, tokenizers, windows
from models import DecoderOnly, decoding
from tasks import base, losses

DataError = local_builders.DataError
TOKENIZER_FILES = {"chars": "tokenizer.json", "sentencepiece": "tokenizer.model",
                   "bytes": "tokenizer.bytes"}  # bytes need no file; the name is unused


def prompt_of(tokens, sep_id: int):
  """Keeps tokens up to and including the first separator, zeros after: `[batch, length]`."""
  seen_sep = jnp.cumsum(tokens == sep_id, axis=-1) - (tokens == sep_id)
  return jnp.where(seen_sep > 0, 0, tokens)


class GenerationTask(base.Task):
  name = "generation"
  synthetic_kind = "lm"
  attention_fields = {"decoder": "inputs"}

  @property
  def prints_samples(self) -> bool:
    return self.real  # samples of real text show how training goes

  @property
  def scores_predictions(self) -> bool:
    return not self.real  # samples of real text are shown, not scored

  # ---- data
  def setup_data(self) -> None:
    c = self.config
    self.real = c.data.dataset != "synthetic"
    if not self.real:
      return
    self._builder = self._make_builder()
    self._raw: Dict[str, object] = {}
    self._documents: Dict[str, List[str]] = {}
    self._tokens: Dict[str, list] = {}
    paths = base.tokenizer_paths(c, self.workdir, [TOKENIZER_FILES[c.model.tokenizer]],
                                 self.training)
    self.tokenizer = tokenizers.get_or_build(
        c.model.tokenizer, paths[0], self._tokenizer_texts, c.model.vocab_size, keep_whitespace=True)
    self.vocab_size = self.tokenizer.vocab_size
    self.eos_id = self.tokenizer.eos_id
    logging.info("language model on %s: %s tokenizer with %d ids", c.data.dataset,
                 self.tokenizer.kind, self.vocab_size)

  def _make_builder(self):
    """The tfds builder of config.data.dataset (local text files or a tfds name)."""
    c = self.config
    if c.data.dataset == "files":
      splits = {split: [name for name in names.split("+") if name]
                for split, names in sources.parse_mapping(c.data.file_splits, "file_splits").items()}
      return local_builders.text_files_builder(
          c.data.data_dir, splits, c.data.text_documents, c.data.validation_fraction,
          sources.default_data_dir(c.data.tfds_data_dir))
    builder = sources.tfds_builder(c.data.dataset, c.data.tfds_data_dir)
    features = list(builder.info.features.keys())
    if "text" not in features:
      raise DataError(f"config.data.dataset={c.data.dataset!r} has no 'text' feature to model (it has "
                      f"{', '.join(features)}); language models read a 'text' feature")
    return builder

  def documents(self, split: str) -> List[str]:
    """The non-empty texts of a split, in dataset order."""
    if split not in self._documents:
      c = self.config
      if c.data.dataset == "files":
        known = [name for name, _ in self._builder.builder_config.splits]
        known += ["validation"] if c.data.validation_fraction > 0 else []
        if split not in known:
          raise DataError(f"split {split!r} is not one of the text files' splits "
                          f"({', '.join(known)}; see config.data.file_splits and "
                          f"config.data.validation_fraction)")
      if split not in self._raw:
        self._raw.update(sources.open_splits(self._builder, [split],
                                             needs_tensorflow=c.data.dataset != "files"))
      texts = [t for t in sources.read_all(self._raw[split],
                                           lambda ex: sources.as_text(ex["text"])) if t]
      if not texts:
        raise DataError(f"split {split!r} of {c.data.dataset} has no text")
      self._documents[split] = texts
    return self._documents[split]

  def _tokenizer_texts(self) -> List[str]:
    """Lines of the training split (sentencepiece skips texts over 4 KB, so whole books
    are fed a line at a time), an evenly strided sample of at most
    config.data.tokenizer_max_sentences."""
    documents = self.documents(self.config.data.train_split)
    if self.config.model.tokenizer == "chars":
      return documents
    lines = [line for doc in documents for line in doc.split("\n") if line.strip()]
    stride = -(-len(lines) // self.config.data.tokenizer_max_sentences)
    return lines[::stride]

  def tokenized(self, split: str) -> list:
    """The documents of a split as int32 token arrays (no EOS)."""
    if split not in self._tokens:
      self._tokens[split] = self.tokenizer.encode_batch(self.documents(split))
    return self._tokens[split]

  def stream(self, split: str) -> np.ndarray:
    """The split as one token stream, each document followed by EOS."""
    return windows.concatenate(self.tokenized(split), self.eos_id)

  def _document_rows(self, split: str) -> list:
    """Each document + EOS as examples of at most the context length (long ones cut)."""
    length = self.config.data.max_target_length
    rows = []
    for tokens in self.tokenized(split):
      tokens = np.append(tokens, self.eos_id).astype(np.int32)
      rows += [{"inputs": tokens[i:i + length]} for i in range(0, len(tokens), length)]
    return rows

  def data_source(self, split: str):
    if not self.real:
      return super().data_source(split)
    c = self.config
    split = {"train": c.data.train_split, "eval": c.data.eval_split}.get(split, split)
    if c.data.lm_batching == "windows":
      return windows.cut_windows(self.stream(split), c.data.max_target_length)
    return self._document_rows(split)

  def train_dataset(self, batch_size, num_devices, process_index=0, process_count=1):
    c = self.config
    if not self.real or c.data.lm_batching == "documents":
      return super().train_dataset(batch_size, num_devices, process_index, process_count)
    try:
      source = windows.WindowBatches(
          self.stream(c.data.train_split), c.data.max_target_length, batch_size=batch_size,
          num_devices=num_devices, seed=c.data.shuffle_seed, process_index=process_index,
          process_count=process_count)
    except ValueError as e:  # the fields to change, by name
      raise DataError(f"{e} (config.train.batch_size={batch_size}, config.data.max_target_length="
                      f"{c.data.max_target_length})") from None
    logging.info("training stream: %d tokens, %d windows of %d a epoch (%d batches)",
                 len(source.stream), len(source.stream) // c.data.max_target_length,
                 c.data.max_target_length, source.batches_per_epoch)
    return grain.MapDataset.source(source)

  @property
  def lengths(self) -> Dict[str, int]:
    return {"inputs": self.config.data.max_target_length}

  # ---- model and loss
  def build_model(self, decode: bool = False):
    return DecoderOnly(self.model_config(decode))

  def model_inputs(self, batch):
    return {name: batch[key] for key, name in (("inputs", "inputs"),
                                               ("inputs_position", "positions"),
                                               ("inputs_segmentation", "segmentation"))
            if key in batch}

  def loss(self, params, batch, dropout_rng, train, head_mask=None):
    variables = base.variables(params, head_mask, self.config.model.scan_layers)
    logits = self.model.apply(variables, **self.model_inputs(batch),
                              deterministic=not train, rngs=base.rngs(dropout_rng, train))
    tokens = batch["inputs"]
    weights = (tokens > 0).astype(jnp.float32)
    sums = losses.cross_entropy_sums(logits, tokens, weights, self.config.optim.label_smoothing)
    if self.real:  # the text the scored tokens stand for, for bits per character
      lengths = jnp.asarray(self.tokenizer.text_lengths(), jnp.float32)
      sums["characters"] = jnp.sum(lengths[tokens] * weights)
    return sums

  # ---- generation
  def generate(self, params, prompt: jax.Array, rng: jax.Array, limits=None,
               cached: bool = True, picker=None, stop_id: int = -1) -> jax.Array:
    """Fills `[batch, length]` rows after their left-aligned, zero-padded prompts.

    `rng`: one key, or `[batch]` keys, one a row (see decoding.generate).
    `cached=False` recomputes the whole prefix at every position instead of reading the
    key/value cache (the reference the cache is tested against, and the slow baseline
    of benchmarks/generation.py). Returns `[batch, length]` tokens, prompts included.
    """
    batch_size, length = prompt.shape
    picker = picker or self.picker()
    if cached:
      decoder = self.build_model(decode=True)
      cache = decoding.init_cache(decoder, prompt)
      decoder_params = self.decode_params(params)

      def step(cache, token):
        logits, state = decoder.apply({"params": decoder_params, "cache": cache}, token,
                                      mutable=["cache"])
        return logits[:, -1], state["cache"]
    else:
      cache = (jnp.zeros((batch_size, length), jnp.int32), jnp.array(0))

      def step(cache, token):
        tokens, index = cache
        # Position `index` of the model's input is the token fed now (shifted right by the
        # model, so its logits there predict position `index`).
        # (At index 0 the start token 0 lands on position 0, which is still 0.)
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, token[:, 0],
                                                     jnp.maximum(index - 1, 0), axis=1)
        # Positions from `index` on are not generated yet: causality hides them from
        # position `index`, but a 0 there would mark that query as padding.
        logits = self.model.apply({"params": params},
                                  jnp.where(jnp.arange(length) < index, tokens, 1))
        return jax.lax.dynamic_index_in_dim(logits, index, axis=1, keepdims=False), (
            tokens, index + 1)

    return decoding.generate(step, cache, batch_size, length, self.eos_id, prompt=prompt,
                             pick=picker, rng=rng, limits=limits, stop_id=stop_id)

  def picker(self):
    c = self.config
    # Characters and bytes reserve id 2 (sentencepiece's unknown piece) and never encode
    # to it; an undertrained model sampled hot could still pick it.
    reserved = self.real and self.tokenizer.kind != "sentencepiece"
    never = (0, tokenizers.UNK_ID) if reserved else (0,)
    return decoding.sampling_picker(c.decode.temperature, c.decode.top_k, c.decode.top_p, greedy=c.decode.greedy,
                                    never=never)

  def predict(self, params, batch):
    """Synthetic: greedy continuation of each "x |" prompt. Real text: the configured
    sampling continues the first config.decode.eval_prompt_length tokens of each row (the
    samples shown in the eval logs). `[batch, length]` tokens, prompt included."""
    tokens = batch["inputs"]
    if not self.real:
      return self.generate(params, prompt_of(tokens, synthetic.SEP), jax.random.PRNGKey(0),
                           picker=decoding.sampling_picker(greedy=True))
    prompt = jnp.where(jnp.arange(tokens.shape[1]) < self.config.decode.eval_prompt_length,
                       tokens, 0)
    return self.generate(params, prompt, jax.random.PRNGKey(self.config.decode.sample_seed))

  # ---- scores
  def score(self, batch, predictions):
    if self.real:
      return {}
    return base.exact_match_sums(batch["inputs"], predictions, batch["inputs"])

  def summarize(self, sums, outputs=None):
    out = super().summarize(sums, outputs)
    if self.real and "nll" in sums:
      bits = sums["nll"] / math.log(2)
      out["bits_per_token"] = bits / max(sums["weight"], 1.0)
      unit = "byte" if self.tokenizer.kind == "bytes" else "char"
      out[f"bits_per_{unit}"] = bits / max(sums["characters"], 1.0)
    return out

  def detokenize(self, tokens) -> str:
    return self.tokenizer.decode(tokens)

  def format_examples(self, batch, predictions, limit, split="eval") -> List[str]:
    lines = []
    for x, p in zip(batch["inputs"], predictions):
      if len(lines) == limit or not x.any():
        break
      if self.real:
        n = self.config.decode.eval_prompt_length
        lines.append(f"prompt: {self.detokenize(x[:n])!r}\n  sample: "
                     f"{self.detokenize(p[n:])!r}\n  real:   {self.detokenize(x[n:])!r}")
        continue
      mark = "ok" if np.array_equal(x, p) else "WRONG"
      lines.append(f"text: {synthetic.decode_tokens(x)}  generated: "
                   f"{synthetic.decode_tokens(p)}  [{mark}]")
    return lines

  # ---- generate mode
  def encode_prompts(self, prompts: List[str]) -> List[np.ndarray]:
    """Token ids of each prompt; TokenizerError for characters outside the vocabulary,
    DataError for a prompt that does not leave room to generate within the context."""
    context = self.config.data.max_target_length
    out = []
    for number, prompt in enumerate(prompts, 1):
      tokens = self.tokenizer.encode(prompt) if prompt else np.zeros(0, np.int32)
      if len(tokens) >= context:
        raise DataError(f"prompt {number} has {len(tokens)} tokens, but the model's context "
                        f"is {context} tokens (config.data.max_target_length) and generation "
                        f"needs room after the prompt; shorten the prompt to at most "
                        f"{context - 1} tokens")
      out.append(tokens)
    return out

  def token_pieces(self, tokens, field):
    return self.tokenizer.pieces(tokens) if self.real else super().token_pieces(tokens, field)

  def attention_example(self, text, reference=None):
    """The tokens of `text`, at most the model's context (no reference: a language model
    reads its own text)."""
    if not self.real:
      return super().attention_example(text, reference)
    return {"inputs": self.tokenizer.encode(text)[:self.config.data.max_target_length]}

  def stop_id(self) -> int:
    """The token of config.decode.stop_text, or -1."""
    text = self.config.decode.stop_text
    if not text:
      return -1
    tokens = self.tokenizer.encode(text)
    if len(tokens) != 1:
      raise DataError(f"config.decode.stop_text={text!r} is {len(tokens)} tokens for this "
                      f"tokenizer; it must be exactly one token")
    return int(tokens[0])
