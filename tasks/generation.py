"""Text generation (decoder-only): next-token cross-entropy, perplexity and bits per
character; generation through the key/value cache, greedy or sampled (temperature, top-k,
top-p).

On text (tasks/sources/text_corpus.py) the samples in the eval logs continue the first
config.decode.eval_prompt_length tokens of eval rows and are shown, not scored. On the
synthetic digits each row is "x | f(x)": the prompt "x |" is continued greedily and scored
by exact match.
"""

import math
from typing import Dict, List

import jax
import jax.numpy as jnp
import numpy as np

from config_checks import Fields
from input_pipeline import local_builders, synthetic
from input_pipeline.local_builders import DataError
from models import DecoderOnly, decoding
from tasks import base
from tasks.sources.text_corpus import TextCorpus

LM_BATCHING = ("windows", "documents")


def prompt_of(tokens, sep_id: int):
  """Keeps tokens up to and including the first separator, zeros after: `[batch, length]`."""
  seen_sep = jnp.cumsum(tokens == sep_id, axis=-1) - (tokens == sep_id)
  return jnp.where(seen_sep > 0, 0, tokens)


class GenerationTask(base.Task):
  name = "generation"
  model_class = DecoderOnly
  text_source = TextCorpus
  digits_kind = "lm"
  attention_fields = {"decoder": "inputs"}
  metrics = ("exact_match",)
  compare_by = ("bits_per_char", "bits_per_byte", "exact_match")
  tokenizers = ("chars", "bytes", "sentencepiece", "huggingface")
  absent_stacks = {"num_encoder_layers": 0}  # a language model has no encoder

  @staticmethod
  def check_sampling(config) -> None:
    """The sampling fields of config.decode (generate mode and the samples in the eval
    logs)."""
    decode = Fields(config, "decode")
    decode.boolean("greedy")
    if not decode["greedy"]:
      decode.number("temperature", lambda v: v > 0, "sampling needs a number > 0 (set "
                                                    "config.decode.greedy=True for the most "
                                                    "likely tokens)")
    decode.number("top_p", lambda v: 0 < v <= 1, "expected a number in (0, 1]")
    decode.integer("top_k", 0)
    decode.integer("max_new_tokens", 1)
    decode.integer("num_samples", 1)
    decode.integer("sample_seed", 0)
    decode.integer("eval_prompt_length", 0)
    if not isinstance(decode["stop_text"], str):
      decode.fail("stop_text", "expected a string")

  @classmethod
  def check_config(cls, config) -> None:
    Fields(config, "model").integer("num_decoder_layers", 1)
    data = Fields(config, "data")
    if data["dataset"] == "synthetic":
      need = 2 * data["max_digits"] + 2  # x SEP f(x) EOS
      if data["max_target_length"] < need:
        data.fail("max_target_length", f"examples of max_digits={data['max_digits']} need "
                                        f"at least {need} tokens")
      return
    data.choice("lm_batching", LM_BATCHING)
    data.choice("text_documents", local_builders.DOCUMENT_UNITS)
    if data["pack_examples"] and data["lm_batching"] == "windows":
      data.fail("pack_examples", "windows of one stream are full rows already; packing "
                                 "applies to lm_batching='documents'")
    data.integer("max_target_length", 2)
    if config.decode.eval_prompt_length >= data["max_target_length"]:
      Fields(config, "decode").fail(
          "eval_prompt_length",
          f"it must be shorter than max_target_length={data['max_target_length']}")

  @property
  def prints_samples(self) -> bool:
    return self.data.has_text  # samples of text show how training goes

  @property
  def scores_predictions(self) -> bool:
    return not self.data.has_text  # samples of text are shown, not scored

  # ---- data and model
  @classmethod
  def batch_lengths(cls, config) -> Dict[str, int]:
    return {"inputs": config.data.max_target_length}

  def train_dataset(self, batch_size, num_devices, process_index=0, process_count=1):
    batches = None
    if self.data.has_text:  # windows of the stream, unless lm_batching is "documents"
      batches = self.data.train_windows(batch_size, num_devices, process_index, process_count)
    return batches or super().train_dataset(batch_size, num_devices, process_index,
                                            process_count)

  def model_inputs(self, batch):
    return {name: batch[key] for key, name in (("inputs", "inputs"),
                                               ("inputs_position", "positions"),
                                               ("inputs_segmentation", "segmentation"))
            if key in batch}

  def loss_targets(self, batch):
    tokens = batch["inputs"]
    return tokens, (tokens > 0).astype(jnp.float32)

  def extra_sums(self, targets, weights):
    """The characters the scored tokens stand for, for bits per character (text only)."""
    if not self.data.has_text:
      return {}
    lengths = jnp.asarray(self.data.text_lengths(), jnp.float32)
    return {"characters": jnp.sum(lengths[targets] * weights)}

  # ---- generation (base.TextGenerator)
  def generate(self, params, prompt: jax.Array, rng: jax.Array, limits=None,
               cached: bool = True, picker=None, stop_id: int = -1) -> jax.Array:
    """Fills `[batch, length]` rows after their left-aligned, zero-padded prompts.

    `rng`: one key, or `[batch]` keys, one a row (see decoding.generate).
    `cached=False` recomputes the whole prefix at every position instead of reading the
    key/value cache (the reference the cache is tested against, and the slow baseline
    of benchmarks/generation.py). Rows longer than the model's context
    (config.data.max_target_length) slide a window over the text, keeping the last half
    of the context at each slide (decoding.generate). Returns `[batch, length]` tokens,
    prompts included.
    """
    batch_size, length = prompt.shape
    context = min(length, self.config.data.max_target_length)
    picker = picker or self.picker()
    if cached:
      step, cache = self._cached_step(params, prompt[:, :context])
    else:
      step, cache = self._uncached_step(params, batch_size, context)
    return decoding.generate(step, cache, batch_size, length, self.eos_id, prompt=prompt,
                             pick=picker, rng=rng, limits=limits, stop_id=stop_id,
                             context=context)

  def _cached_step(self, params, prompt):
    decoder = self.build_model(decode=True)
    decoder_params = self.decode_params(params)

    def step(cache, token):
      logits, state = decoder.apply({"params": decoder_params, "cache": cache}, token,
                                    mutable=["cache"])
      return logits[:, -1], state["cache"]
    return step, decoding.init_cache(decoder, prompt)

  def _uncached_step(self, params, batch_size, length):
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
    return step, (jnp.zeros((batch_size, length), jnp.int32), jnp.array(0))

  def picker(self):
    d = self.config.decode
    return decoding.sampling_picker(d.temperature, d.top_k, d.top_p, greedy=d.greedy,
                                    never=self.data.never_sampled())

  def predict(self, params, batch):
    """Digits: greedy continuation of each "x |" prompt. Text: the configured sampling
    continues the first config.decode.eval_prompt_length tokens of each row (the samples
    shown in the eval logs). `[batch, length]` tokens, prompt included."""
    tokens = batch["inputs"]
    if not self.data.has_text:
      return self.generate(params, prompt_of(tokens, synthetic.SEP), jax.random.PRNGKey(0),
                           picker=decoding.sampling_picker(greedy=True))
    prompt = jnp.where(jnp.arange(tokens.shape[1]) < self.config.decode.eval_prompt_length,
                       tokens, 0)
    return self.generate(params, prompt, jax.random.PRNGKey(self.config.decode.sample_seed))

  # ---- scores
  def score(self, batch, predictions):
    if self.data.has_text:
      return {}  # samples of text are shown, not scored
    return base.exact_match_sums(batch["inputs"], predictions, batch["inputs"])

  def summarize(self, sums, outputs=None):
    out = super().summarize(sums, outputs)
    if "characters" in sums:
      bits = sums["nll"] / math.log(2)
      out["bits_per_token"] = bits / max(sums["weight"], 1.0)
      unit = "byte" if self.data.tokenizer.kind == "bytes" else "char"
      out[f"bits_per_{unit}"] = bits / max(sums["characters"], 1.0)
    return out

  def detokenize(self, tokens) -> str:
    return self.data.decode(tokens)

  def format_examples(self, batch, predictions, limit, split="eval") -> List[str]:
    lines = []
    n = self.config.decode.eval_prompt_length
    for x, p in zip(batch["inputs"], predictions):
      if len(lines) == limit or not x.any():
        break
      if self.data.has_text:
        lines.append(f"prompt: {self.detokenize(x[:n])!r}\n  sample: "
                     f"{self.detokenize(p[n:])!r}\n  real:   {self.detokenize(x[n:])!r}")
      else:
        mark = "ok" if np.array_equal(x, p) else "WRONG"
        lines.append(f"text: {self.detokenize(x)}  generated: {self.detokenize(p)}  [{mark}]")
    return lines

  # ---- generate mode
  def encode_prompts(self, prompts: List[str]) -> List[np.ndarray]:
    """Token ids of each prompt; TokenizerError for characters outside the vocabulary,
    DataError for a prompt that does not leave room to generate within the context."""
    context = self.config.data.max_target_length
    out = []
    for number, prompt in enumerate(prompts, 1):
      tokens = self.data.encode(prompt) if prompt else np.zeros(0, np.int32)
      if len(tokens) >= context:
        raise DataError(f"prompt {number} has {len(tokens)} tokens, but the model's context "
                        f"is {context} tokens (config.data.max_target_length) and "
                        f"generation needs room after the prompt; shorten the prompt to at "
                        f"most {context - 1} tokens")
      out.append(tokens)
    return out

  def attention_example(self, text, reference=None):
    """The tokens of `text`, at most the model's context (no reference: a language model
    reads its own text)."""
    del reference
    tokens = self.data.encode(text)
    if self.data.has_text:
      return {"inputs": tokens[:self.config.data.max_target_length]}
    example = {"inputs": tokens}
    self.check_example_lengths(example)
    return example

  def stop_id(self) -> int:
    """The token of config.decode.stop_text, or -1."""
    text = self.config.decode.stop_text
    if not text:
      return -1
    tokens = self.data.encode(text)
    if len(tokens) != 1:
      raise DataError(f"config.decode.stop_text={text!r} is {len(tokens)} tokens for this "
                      f"tokenizer; it must be exactly one token")
    return int(tokens[0])
