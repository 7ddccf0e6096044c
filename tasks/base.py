"""The seam between the generic train loop and what differs per task family.

train.py only calls the methods of `Task`: it builds the model, gets the data sources,
computes summed loss metrics, runs a jittable `predict` under pmap and asks the task to
score and summarise. A task module implements these for one family.
"""

import math
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

import jax
import grain
import jax.numpy as jnp
import numpy as np

from input_pipeline import batching, local_builders, packing, synthetic, tokenizers
from models import TransformerConfig, attention, transformer

Array = jax.Array
Batch = Mapping[str, Array]


class Task:
  """Base class: the model config and data sources shared by every family."""

  name: str = ""
  synthetic_kind: str = ""  # record layout of input_pipeline.synthetic for this family
  prints_samples: bool = False  # periodic evaluations also log a few predictions
  # Predictions are scored (BLEU, exact match): the final evaluation and eval mode then
  # predict the whole split. When False they are only shown, and num_decode_batches is
  # what is predicted everywhere.
  scores_predictions: bool = True

  def __init__(self, config, workdir: Optional[str] = None, training: bool = True):
    """`workdir` holds what the run learns from its data (e.g. a tokenizer); `training`
    False (eval, decode) means that must exist already rather than be built."""
    self.config = config
    self.workdir = workdir
    self.training = training
    self.vocab_size = synthetic.VOCAB_SIZE
    self.eos_id = synthetic.EOS
    self.setup_data()
    self.model = self.build_model(decode=False)

  def setup_data(self) -> None:
    """Opens the data and builds what the model's shape depends on (the vocabulary)."""

  # ---- model
  def model_config(self, decode: bool = False) -> TransformerConfig:
    c = self.config
    return TransformerConfig(
        vocab_size=self.vocab_size, num_classes=self.num_classes, d_model=c.model.d_model,
        d_ff=c.model.d_ff, num_heads=c.model.num_heads, head_dim=c.model.head_dim or c.model.d_model // c.model.num_heads,
        num_encoder_layers=c.model.num_encoder_layers, num_decoder_layers=c.model.num_decoder_layers,
        dropout_rate=c.optim.dropout_rate, dropout_rng=c.optim.dropout_rng,
        attention_dropout_rate=c.optim.attention_dropout_rate,
        norm_placement=c.model.norm_placement, positional_encoding=c.model.positional_encoding,
        max_length=max(self.lengths.values()) + 1, fused_qkv=c.model.fused_qkv,
        share_embeddings=c.model.share_embeddings, tie_output=c.model.tie_output, pooling=c.model.pooling,
        activation=c.model.activation, layer_norm_epsilon=c.model.layer_norm_epsilon,
        attention_impl=c.compute.attention_impl, attention_block_size=c.compute.attention_block_size,
        # Decoding runs the blocks as a loop without remat: it takes no gradients, and
        # beam search reorders caches whose first axis is the batch (`decode_params`).
        remat="none" if decode else c.compute.remat, scan_layers=c.model.scan_layers and not decode,
        dtype=jnp.dtype(c.compute.dtype), decode=decode)

  def decode_params(self, params: Any) -> Any:
    """`params` in the layout of `build_model(decode=True)` (blocks unscanned)."""
    return transformer.unstack_layers(params) if self.config.model.scan_layers else params

  @property
  def num_classes(self) -> int:
    return 0

  def build_model(self, decode: bool = False):
    raise NotImplementedError

  def init_params(self, rng: Array) -> Any:
    """Float32 parameters, initialised from shapes of one dummy example."""
    dummy = {k: jnp.ones((1, n), jnp.int32) for k, n in self.lengths.items()}
    return self.model.init({"params": rng}, **self.model_inputs(dummy))["params"]

  def model_inputs(self, batch: Batch) -> Dict[str, Array]:
    """The keyword arguments of the model's __call__ taken from a batch."""
    raise NotImplementedError

  # ---- data
  @property
  def lengths(self) -> Dict[str, int]:
    """Padded length of every sequence field of a batch."""
    raise NotImplementedError

  @property
  def eval_lengths(self) -> Dict[str, int]:
    """Padded lengths of evaluation batches (real data may be longer than training rows)."""
    return self.lengths

  def data_source(self, split: str):
    """Random-access example dicts of `split` ("train", "eval" or a dataset split name)."""
    c = self.config
    size = synthetic.TRAIN_SIZE if split == "train" else c.data.num_eval_examples
    return synthetic.SyntheticDigits(self.synthetic_kind, c.data.synthetic_task,
                                     "train" if split == "train" else "eval", size,
                                     c.data.min_digits, c.data.max_digits, seed=c.data.shuffle_seed)

  def train_dataset(self, batch_size: int, num_devices: int, process_index: int = 0,
                    process_count: int = 1) -> grain.MapDataset:
    """Endless training batches `[num_devices, batch/devices, length]`, packed or padded.

    `batch_size` is the global batch (rows); each process reads its own share.
    """
    c = self.config
    source = self.data_source("train")
    if c.data.pack_examples:
      return grain.MapDataset.source(packing.PackedBatches(
          source, self.lengths, batch_size=batch_size, num_devices=num_devices,
          seed=c.data.shuffle_seed, process_index=process_index, process_count=process_count))
    return batching.batched_dataset(
        source, batch_size=batch_size // process_count, num_devices=num_devices,
        lengths=self.lengths, shuffle=True, seed=c.data.shuffle_seed, repeat=True,
        process_index=process_index, process_count=process_count)

  def eval_dataset(self, split: str, batch_size: int, num_devices: int,
                   process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """One pass over `split` in padded batches, the last one filled with empty examples."""
    return batching.batched_dataset(
        self.data_source(split), batch_size=batch_size // process_count,
        num_devices=num_devices, lengths=self.eval_lengths, shuffle=False,
        process_index=process_index, process_count=process_count)

  # ---- loss and evaluation
  def loss(self, params: Any, batch: Batch, dropout_rng, train: bool,
           head_mask: Optional[Any] = None) -> Dict[str, Array]:
    """Summed loss metrics (see tasks.losses); `loss` is what training minimises.
    `head_mask`: heads to remove (head importance; see `variables`)."""
    raise NotImplementedError

  def predict(self, params: Any, batch: Batch) -> Array:
    """Model outputs to score (decoded tokens or class ids); jittable, per device."""
    raise NotImplementedError

  def score(self, batch: Mapping[str, np.ndarray], predictions: np.ndarray) -> Dict[str, float]:
    """Sums over the real examples of a batch of predictions (host side)."""
    raise NotImplementedError

  def outputs(self, batch: Mapping[str, np.ndarray], predictions: np.ndarray,
              split: str = "eval") -> List[dict]:
    """Per real example of a batch of `split`, a record of what was predicted (written in
    eval mode; corpus-level metrics such as BLEU are computed from these)."""
    del batch, predictions, split
    return []

  def summarize(self, sums: Mapping[str, float],
                outputs: Optional[List[dict]] = None) -> Dict[str, float]:
    """Final metrics from summed loss metrics and scores (each divided exactly once) and
    from the collected `outputs`."""
    weight = max(sums["weight"], 1.0)
    out = {"loss": sums["loss"] / weight, "accuracy": sums["correct"] / weight}
    if "nll" in sums:
      nll = sums["nll"] / weight
      out["perplexity"] = math.exp(nll) if nll < 700 else math.inf  # exp overflows past ~709
    if "exact_match" in sums:
      out["exact_match"] = sums["exact_match"] / max(sums["examples"], 1.0)
    return out

  def score_details(self) -> Dict[str, Any]:
    """What eval mode saves beside the scores (e.g. the sacrebleu signatures)."""
    return {}

  def summary_texts(self, outputs: List[dict]) -> Dict[str, str]:
    """Readable tables of an evaluation's `outputs` (e.g. a confusion matrix), logged and
    written to TensorBoard as text under their names."""
    del outputs
    return {}

  def summary_images(self, outputs: List[dict]) -> Dict[str, np.ndarray]:
    """Pictures of an evaluation's `outputs`, `{name: [height, width, 3] uint8}`, written
    to TensorBoard."""
    del outputs
    return {}

  def eval_report(self, outputs: List[dict]) -> Dict[str, Any]:
    """What eval mode saves in its JSON report from the `outputs` (e.g. a confusion
    matrix)."""
    del outputs
    return {}

  def prediction_file(self, outputs: List[dict]) -> Optional[Tuple[str, str, str]]:
    """(report key, file suffix, text) of the predictions file eval mode writes from the
    `outputs` (sorted by index), or None: hypotheses one a line for tasks that produce
    text."""
    if not outputs or "hypothesis" not in outputs[0]:
      return None
    return "hypotheses", ".hyp.txt", "".join(o["hypothesis"] + "\n" for o in outputs)

  def format_examples(self, batch: Mapping[str, np.ndarray], predictions: np.ndarray,
                      limit: int, split: str = "eval") -> List[str]:
    """Readable lines for a few examples of a batch."""
    raise NotImplementedError

  # ---- attention maps (tasks/attention_maps.py)
  # The batch field each stack of the model reads: the encoder as is, the decoder shifted
  # right (the start symbol 0 in front).
  attention_fields: Dict[str, str] = {}

  def token_pieces(self, tokens, field: str) -> List[str]:
    """The piece each id of batch field `field` stands for (the axes of attention maps);
    synthetic data: its digits, "|" and "</s>"."""
    del field
    names = {synthetic.PAD: "<pad>", synthetic.EOS: "</s>", synthetic.SEP: "|",
             **{synthetic.FIRST_DIGIT + d: str(d) for d in range(10)}}
    return [names.get(t, f"<{t}>") for t in np.asarray(tokens).tolist()]

  def attention_example(self, text: str, reference: Optional[str] = None
                        ) -> Dict[str, np.ndarray]:
    """The unpadded example of `text` (and of the target `reference`, where the model has a
    decoder over targets) that --mode=attention draws. Without a reference the target
    field is left out: the model's own output fills it. Synthetic data: digits and "|"."""
    def digits(line: str) -> np.ndarray:
      bad = sorted(set(line) - set("0123456789| \t"))
      if bad:
        raise local_builders.DataError(
            f"{line!r}: synthetic data is written as digits (and '|'), not {''.join(bad)!r}")
      return np.array([synthetic.SEP if ch == "|" else synthetic.FIRST_DIGIT + int(ch)
                       for ch in line if not ch.isspace()], np.int32)
    with_eos = lambda x: np.append(x, synthetic.EOS).astype(np.int32)  # noqa: E731
    if self.attention_fields.get("decoder") != "targets":
      example = {"inputs": digits(text)}
    else:
      example = {"inputs": with_eos(digits(text))}
      if reference is not None:
        example["targets"] = with_eos(digits(reference))
    for field, tokens in example.items():
      if len(tokens) > self.eval_lengths[field] or not len(tokens):
        raise local_builders.DataError(
            f"{'--reference' if field == 'targets' else 'the input'} has {len(tokens)} tokens "
            f"here; this model reads 1 to {self.eval_lengths[field]}")
    return example


def exact_match_sums(inputs: np.ndarray, predictions: np.ndarray,
                     expected: np.ndarray) -> Dict[str, float]:
  """Counts predicted rows equal to `expected`, over real examples (non-empty inputs)."""
  real = inputs.any(axis=-1)
  exact = (predictions == expected).all(axis=-1)
  return {"exact_match": float(np.sum(exact & real)), "examples": float(np.sum(real))}


def tokenizer_paths(config, workdir: Optional[str], names: List[str],
                    training: bool) -> List[Optional[str]]:
  """The tokenizer files of a run: those of config.data.tokenizer_path, else `names` in the
  workdir (None each when training without a workdir: built in memory). Outside training
  (eval, decode, generate) they must exist already; bytes need no file."""
  given = [p for p in config.data.tokenizer_path.split(",") if p] if config.data.tokenizer_path else []
  if given and not all(os.path.exists(p) for p in given):
    raise tokenizers.TokenizerError(f"config.data.tokenizer_path={config.data.tokenizer_path!r}: no "
                                    f"such file")
  if not given and not workdir and training:
    return [None] * len(names)  # no run directory: built in memory, nothing written
  paths = given or [os.path.join(workdir or "", n) for n in names]
  if config.model.tokenizer != "bytes" and not training and not all(os.path.exists(p)
                                                               for p in paths):
    raise tokenizers.TokenizerError(
        f"no tokenizer at {', '.join(paths)}: train first with --mode=train in this "
        f"workdir (it saves the tokenizer there) or set config.data.tokenizer_path")
  return paths


def variables(params: Any, head_mask: Optional[Any] = None,
              scanned: bool = False) -> Dict[str, Any]:
  """The variables of a model call: the parameters and, to remove heads (head
  importance), the `head_mask` collection (see models/attention.py), given per block
  (`block_{i}`) and stacked here when the model's layers are `scanned`."""
  if head_mask is None:
    return {"params": params}
  if scanned:
    head_mask = transformer.stack_layers(head_mask)
  return {"params": params, attention.HEAD_MASK: head_mask}


def rngs(dropout_rng, train: bool) -> Dict[str, Array]:
  return {"dropout": dropout_rng} if train else {}
