"""The seam between the generic train loop, the modes and what differs per task family.

A family (translation, generation, classification) owns its model, its loss targets, its
metrics, its predictions and its config checks; the data it reads comes from a data source
(tasks/sources: synthetic digits or the family's text source), chosen by
config.data.dataset. train.py and the modes only call the methods of `Task` and, where a
mode needs more, the small protocols at the end of this module.
"""

import math
from typing import Any, Dict, List, Mapping, Optional, Protocol, Tuple, runtime_checkable

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from config_checks import Fields, fail
from input_pipeline import batching, packing
from input_pipeline.local_builders import DataError
from models import TransformerConfig, attention, transformer
from models.transformer import InvalidField
import pretrained
from tasks import losses
from tasks.sources import open_source

Array = jax.Array
Batch = Mapping[str, Array]
DTYPES = ("float32", "bfloat16")
# The regularisation fields of config.optim that the model applies.
DROPOUT_FIELDS = ("dropout_rate", "dropout_rng", "attention_dropout_rate")
# Folded into a step's dropout key for R-drop's second pass (config.optim.rdrop_alpha):
# other dropout masks than the first pass's (tasks fold 1 in for their input corruption).
RDROP_STREAM = 2


def model_fields(config, absent_stacks: Optional[Dict[str, int]] = None) -> Dict[str, Any]:
  """What TransformerConfig takes from the run config: config.model (what the parameters
  are), config.compute (how it computes) and the dropout fields of config.optim, with the
  family's `absent_stacks` on top; `TransformerConfig.from_fields` keeps the names it
  declares."""
  return {**config.model, **config.compute, **{f: config.optim[f] for f in DROPOUT_FIELDS},
          **(absent_stacks or {})}


class Task:
  """Base class: the model, data sets, loss and evaluation shared by every family."""

  name: str = ""
  model_class: Any = None  # the models/ family (EncoderDecoder, DecoderOnly, Classifier)
  text_source: Any = None  # the tasks/sources class of this family's real text
  digits_kind: str = ""  # record layout of the synthetic digits for this family
  # The batch field each stack of the model reads: the encoder as is, the decoder shifted
  # right (the start symbol 0 in front). Attention maps and head importance read it.
  attention_fields: Dict[str, str] = {}
  # Metrics config.eval.best_metric may name besides the loss-based ones, and the metrics
  # a sweep compares variants by (the first the final evaluation reports).
  metrics: Tuple[str, ...] = ()
  text_metrics: Tuple[str, ...] = ()  # the same, reported only on text (not digits)
  compare_by: Tuple[str, ...] = ()
  # The --mode that maps lines of text to lines with this family on text ("" = none).
  line_mode: str = ""
  tokenizers: Tuple[str, ...] = ()  # the config.model.tokenizer kinds its text source takes
  # Fields outside config.model that a checkpoint must match too ("group.field").
  identity_fields: Tuple[str, ...] = ()
  # The layer counts of the stacks this family's model does not have (0), whatever
  # config.model says: its TransformerConfig then checks the model as it is built.
  absent_stacks: Dict[str, int] = {}

  def __init__(self, config, workdir: Optional[str] = None, training: bool = True):
    """`workdir` holds what the run learns from its data (e.g. a tokenizer); `training`
    False (eval, decode) means that must exist already rather than be built."""
    self.config = config
    self.workdir = workdir
    self.training = training
    self.data = open_source(config, type(self), workdir, training)
    self.vocab_size = self.data.vocab_size
    self.eos_id = self.data.eos_id
    self.model = self.build_model(decode=False)
    logging.info("%s on %s (%s): %d ids", self.name, config.data.dataset,
                 self.data.kind_label, self.vocab_size)

  @classmethod
  def check_config(cls, config) -> None:
    """Raises config_checks.ConfigError for a field value this family cannot use."""

  @classmethod
  def tokenizer_files(cls, config) -> int:
    """How many tokenizer model files config.data.tokenizer_path names."""
    del config
    return 1

  @classmethod
  def check_model(cls, config) -> None:
    """The model and compute fields, checked by building the model's TransformerConfig:
    a value it refuses is a ConfigError naming the field in its group."""
    Fields(config, "compute").choice("dtype", DTYPES)
    Fields(config, "compute").integer("cpu_devices", 0)
    try:
      # A classifier's head is part of its parameters (its size is the data's; any will do).
      classes = 2 if cls.model_class is transformer.Classifier else 0
      TransformerConfig.from_fields(model_fields(config, cls.absent_stacks), vocab_size=8,
                                    num_classes=classes)
    except InvalidField as e:
      group = next(g for g in ("model", "compute", "optim") if e.field in config[g])
      fail(f"{group}.{e.field}", e.value, e.allowed)

  # ---- model
  @property
  def num_classes(self) -> int:
    return 0

  def max_length(self) -> int:
    """The longest position the model must hold (learned table, decoding cache)."""
    return max(self.lengths.values()) + 1

  def model_config(self, decode: bool = False) -> TransformerConfig:
    """config.model as is, the sizes this task's data fixes, and how to compute."""
    c = self.config
    return TransformerConfig.from_fields(
        model_fields(c, self.absent_stacks), vocab_size=self.vocab_size,
        output_vocab_size=self.data.output_vocab_size, num_classes=self.num_classes,
        max_length=self.max_length(),
        # Decoding runs the blocks as a loop without remat: it takes no gradients, and
        # beam search reorders caches whose first axis is the batch (`decode_params`).
        remat="none" if decode else c.compute.remat,
        scan_layers=c.model.scan_layers and not decode,
        dtype=jnp.dtype(c.compute.dtype), decode=decode)

  def build_model(self, decode: bool = False):
    return self.model_class(self.model_config(decode))

  def decode_params(self, params: Any) -> Any:
    """`params` in the layout of `build_model(decode=True)` (blocks unscanned)."""
    return transformer.unstack_layers(params) if self.config.model.scan_layers else params

  def initial_params(self, rng: Array) -> Any:
    """Step 0's parameters: config.init_from's weights (checked against the model's
    shapes), or `init_params`."""
    if not self.config.get("init_from"):
      return jax.jit(self.init_params)(rng)
    expected = jax.eval_shape(self.init_params, rng)
    params = pretrained.load_params(self.config, self.max_length())
    if self.config.model.scan_layers:
      params = transformer.stack_layers(params)
    shapes = lambda tree: {jax.tree_util.keystr(p): tuple(x.shape)  # noqa: E731
                           for p, x in jax.tree_util.tree_leaves_with_path(tree)}
    got, want = shapes(params), shapes(expected)
    if got != want:
      diff = sorted(set(got.items()) ^ set(want.items()))[:3]
      raise pretrained.PretrainedError(
          f"the weights of config.init_from={self.config.init_from} do not fit this run's "
          f"model (first differences: {diff}); was a config.model field overridden?")
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)

  def init_params(self, rng: Array) -> Any:
    """Float32 parameters, initialised from shapes of one dummy example."""
    return self.model.init({"params": rng}, **self.dummy_inputs())["params"]

  def dummy_inputs(self) -> Dict[str, Array]:
    """The model's keyword arguments for one example of ones at the task's lengths."""
    return self.model_inputs({k: jnp.ones((1, n), jnp.int32) for k, n in self.lengths.items()})

  def model_inputs(self, batch: Batch) -> Dict[str, Array]:
    """The keyword arguments of the model's __call__ taken from a batch."""
    raise NotImplementedError

  def variables(self, params: Any, head_mask: Optional[Any] = None,
                perturbations: Optional[Any] = None) -> Dict[str, Any]:
    """The variables of a model call: the parameters and, to remove heads (head
    importance), the `head_mask` collection (models/attention.py), given per block
    (`block_{i}`) and stacked here when the model's layers are scanned; with
    `perturbations`, the collection of that name (`embedding_perturbations`)."""
    variables = {"params": params}
    if perturbations is not None:
      variables["perturbations"] = perturbations
    if head_mask is None:
      return variables
    if self.config.model.scan_layers:
      head_mask = transformer.stack_layers(head_mask)
    return {**variables, attention.HEAD_MASK: head_mask}

  def embedding_perturbations(self, params: Any, batch: Batch) -> Any:
    """Zeros shaped as the "perturbations" collection of a training call on `batch`:
    `{"encoder" and/or "decoder": {"embeddings": [batch, length, d_model]}}` (under the
    model's module names), one entry where each Encoder or Decoder embeds its tokens.
    The loss's gradient with respect to them is its gradient with respect to the
    embedded inputs (training/steps.adversarial_gradient). Only shapes are traced."""
    def collection():
      _, variables = self.model.apply({"params": params}, **self.model_inputs(batch),
                                      deterministic=False, mutable=["perturbations"],
                                      rngs={"dropout": jax.random.PRNGKey(0)})
      return variables["perturbations"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(collection))

  # ---- data
  @classmethod
  def batch_lengths(cls, config) -> Dict[str, int]:
    """Padded length of every sequence field of a training batch, from the config alone
    (train.py estimates a batch's memory from it before the task is opened)."""
    raise NotImplementedError

  @property
  def lengths(self) -> Dict[str, int]:
    """Padded length of every sequence field of a training batch."""
    return self.batch_lengths(self.config)

  @property
  def eval_lengths(self) -> Dict[str, int]:
    """Padded lengths of evaluation batches (real text may be longer than training rows)."""
    return self.data.eval_lengths(self.lengths)

  def data_source(self, split: str):
    """Random-access example dicts of `split` ("train", "eval" or a dataset split name)."""
    return self.data.examples(split)

  def train_dataset(self, batch_size: int, num_devices: int, process_index: int = 0,
                    process_count: int = 1) -> grain.MapDataset:
    """Endless training batches `[num_devices, batch/devices, length]`, packed or padded.

    `batch_size` is the global batch (rows); each process reads its own share.
    """
    d = self.config.data
    source = self.data_source("train")
    if d.pack_examples:
      return grain.MapDataset.source(packing.PackedBatches(
          source, self.lengths, batch_size=batch_size, num_devices=num_devices,
          seed=d.shuffle_seed, process_index=process_index, process_count=process_count))
    return batching.batched_dataset(
        source, batch_size=batch_size // process_count, num_devices=num_devices,
        lengths=self.lengths, shuffle=True, seed=d.shuffle_seed, repeat=True,
        process_index=process_index, process_count=process_count,
        bucket=d.get("length_bucket", 0))

  def eval_dataset(self, split: str, batch_size: int, num_devices: int,
                   process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """One pass over `split` in padded batches, the last one filled with empty examples."""
    return batching.batched_dataset(
        self.data.eval_examples(split), batch_size=batch_size // process_count,
        num_devices=num_devices, lengths=self.eval_lengths, shuffle=False,
        process_index=process_index, process_count=process_count)

  # ---- loss
  def loss_targets(self, batch: Batch) -> Tuple[Array, Array]:
    """(the ids the logits predict, their float weights: 0 for padding)."""
    raise NotImplementedError

  def loss(self, params: Any, batch: Batch, dropout_rng, train: bool,
           head_mask: Optional[Any] = None,
           perturbations: Optional[Any] = None) -> Dict[str, Array]:
    """Summed loss metrics (tasks/losses.py); `loss` is what training minimises.
    `head_mask`: heads to remove (head importance; see `variables`); `perturbations`:
    added to the embeddings in training (`embedding_perturbations`)."""
    variables = self.variables(params, head_mask, perturbations)
    targets, weights = self.loss_targets(batch)
    sums = self.cross_entropy_sums(
        lambda rng: self.model.apply(variables, **self.model_inputs(batch),
                                     deterministic=not train,
                                     rngs={"dropout": rng} if train else {}),
        targets, weights, dropout_rng, train)
    return {**sums, **self.extra_sums(targets, weights)}

  def cross_entropy_sums(self, logits_of, targets: Array, weights: Array, dropout_rng,
                         train: bool) -> Dict[str, Array]:
    """losses.cross_entropy_sums of `logits_of(dropout_rng)` (the model's logits under
    that dropout key) against `targets`. The z-loss (config.optim.z_loss) is a training
    regulariser; evaluations score the cross-entropy alone. With config.optim.rdrop_alpha
    in training, R-drop (losses.rdrop_sums): a second pass under another dropout key, the
    mean of the two cross-entropies and alpha / 2 times their symmetric KL."""
    optim = self.config.optim
    score = lambda logits: losses.cross_entropy_sums(  # noqa: E731
        logits, targets, weights, optim.label_smoothing, optim.z_loss if train else 0.0)
    logits = logits_of(dropout_rng)
    alpha = optim.get("rdrop_alpha", 0.0) if train else 0.0
    if not alpha:
      return score(logits)
    other = logits_of(jax.random.fold_in(dropout_rng, RDROP_STREAM))
    return losses.rdrop_sums(score(logits), score(other),
                             losses.symmetric_kl_sum(logits, other, weights), alpha)

  def extra_sums(self, targets: Array, weights: Array) -> Dict[str, Array]:
    """More summed metrics of a batch beside the loss (e.g. characters scored)."""
    del targets, weights
    return {}

  # ---- evaluation
  prints_samples: bool = False  # periodic evaluations also log a few predictions
  # Predictions are scored (BLEU, exact match): the final evaluation and eval mode then
  # predict the whole split. When False they are only shown, and num_decode_batches is
  # what is predicted everywhere.
  scores_predictions: bool = True

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
    del outputs
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
    """Pictures of an evaluation's `outputs`, `{name: [height, width, 3] uint8}`."""
    del outputs
    return {}

  def eval_report(self, outputs: List[dict]) -> Dict[str, Any]:
    """What eval mode saves in its JSON report from the `outputs` (a confusion matrix)."""
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

  # ---- inspection (inspection/attention_maps.py)
  def token_pieces(self, tokens, field: str) -> List[str]:
    """The piece each id of batch field `field` stands for (the axes of attention maps)."""
    return self.data.pieces(tokens, field)

  def attention_example(self, text: str, reference: Optional[str] = None
                        ) -> Dict[str, np.ndarray]:
    """The unpadded example of `text` (and of the target `reference`, where the model has a
    decoder over targets) that --mode=attention draws. Without a reference the target
    field is left out: the model's own output fills it."""
    raise NotImplementedError

  def check_example_lengths(self, example: Mapping[str, np.ndarray]) -> None:
    """DataError when a field of an attention example is empty or longer than the model
    reads."""
    for field, tokens in example.items():
      if len(tokens) > self.eval_lengths[field] or not len(tokens):
        raise DataError(
            f"{'--reference' if field == 'targets' else 'the input'} has {len(tokens)} tokens "
            f"here; this model reads 1 to {self.eval_lengths[field]}")


def exact_match_sums(inputs: np.ndarray, predictions: np.ndarray,
                     expected: np.ndarray) -> Dict[str, float]:
  """Counts predicted rows equal to `expected`, over real examples (non-empty inputs)."""
  real = inputs.any(axis=-1)
  exact = (predictions == expected).all(axis=-1)
  return {"exact_match": float(np.sum(exact & real)), "examples": float(np.sum(real))}


# ----------------------------------------------------------------------------- for modes


@runtime_checkable
class LineMapper(Protocol):
  """A family that maps lines of text to lines (--mode=decode, --mode=predict)."""

  def encode_lines(self, lines: List[str]) -> list:
    """An example dict per line (the batch fields `predict` reads, and "index")."""

  def render_line(self, output: np.ndarray) -> str:
    """One output line from `predict`'s output for one example."""


@runtime_checkable
class TextGenerator(Protocol):
  """A family that continues prompts (--mode=generate)."""

  def encode_prompts(self, prompts: List[str]) -> List[np.ndarray]:
    """The ids of each prompt."""

  def generate(self, params: Any, prompt: Array, rng: Array, limits=None,
               cached: bool = True, picker=None, stop_id: int = -1) -> Array:
    """`[batch, length]` ids: the prompts continued."""

  def stop_id(self) -> int:
    """The id that also ends generation (config.decode.stop_text), or -1."""

  def detokenize(self, tokens) -> str:
    """Text of ids."""
