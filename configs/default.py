"""The default config: a synthetic task that trains in minutes on a CPU, nothing to download.

    python main.py --workdir=runs/demo                          # reverse digit strings
    python main.py --config=configs/default.py:task=generation --workdir=runs/lm
    python main.py --config=configs/default.py:size=small,accel=gpu --workdir=runs/x
    python main.py --workdir=runs/demo --config.train.num_train_steps=500

Variant keys: task (translation, generation, classification), size (tiny, small, base,
big), accel (cpu, gpu, tpu). The fields are grouped (config.model, .compute, .data,
.optim, .train, .eval, .decode), each with one comment; `--config.<group>.<field>=<value>`
overrides any of them after the presets are applied.
"""

from typing import Dict

import ml_collections

from configs import presets

TASKS = ("translation", "generation", "classification")
GROUPS = ("model", "compute", "data", "optim", "train", "eval", "decode")

# What each task learns from synthetic digit strings x (see input_pipeline/synthetic.py).
SYNTHETIC_DEFAULTS = {
    "translation": "reverse",  # inputs x, targets f(x)
    "generation": "reverse",  # one stream "x SEP f(x)", modelled left to right
    "classification": "majority",  # label: are most digits >= 5?
}


def get_config(arg=None) -> ml_collections.ConfigDict:
  """Returns the config for the variant string `arg` (see module docstring)."""
  variant = presets.parse_variant(arg, {"task": TASKS, "size": tuple(presets.SIZES),
                                        "accel": tuple(presets.ACCELERATORS)})
  task = variant.get("task", "translation")
  c = ml_collections.ConfigDict()
  c.task = task  # model family, loss and metrics: translation, generation, classification
  c.size = "tiny"  # the size preset applied (presets.SIZES: tiny, small, base, big)
  c.accel = "cpu"  # the accelerator preset applied (presets.ACCELERATORS: cpu, gpu, tpu)
  c.seed = 0  # parameter initialisation and dropout
  c.init_from = ""  # a Hugging Face folder (GPT-2, Marian): its model, weights and tokenizer
  c.objective = ""  # "" = the family's own; "mlm": masked-token pre-training (classification)
  c.init_encoder_from = ""  # classification: a workdir whose encoder and tokenizer start the run

  c.model = _model()
  c.compute = _compute()
  c.data = _data(task)
  c.optim = _optim(task)
  c.train = _loop()
  c.eval = _evaluation()
  c.decode = _decoding()

  presets.apply_presets(c, variant.get("size", "tiny"), variant.get("accel", "cpu"))
  return c


def _model() -> ml_collections.ConfigDict:
  """config.model: what defines the parameters, the vocabulary they index and the architecture.
  A checkpoint must match this group (and config.task); the model's TransformerConfig takes its
  architecture fields as they are."""
  model = ml_collections.ConfigDict()
  model.num_encoder_layers = 2  # N for the encoder (translation, classification)
  model.num_decoder_layers = 2  # N for the decoder (translation, generation)
  model.d_model = 64  # model width
  model.d_ff = 256  # feed-forward inner width
  model.num_heads = 4  # attention heads h
  model.head_dim = 0  # per-head size d_k = d_v; 0 = d_model // num_heads
  model.num_kv_heads = 0  # key/value heads: 1 multi-query, a divisor grouped-query; 0 = num_heads
  model.norm_placement = "post"  # "post" (paper: LN(x + f(x))) or "pre" (x + f(LN(x)))
  model.positional_encoding = "sinusoidal"  # sinusoidal, sinusoidal_halves, learned, rope, none
  model.fused_qkv = False  # one projection for q, k and v instead of three
  model.share_embeddings = True  # one embedding matrix for source and target
  model.tie_output = True  # output projection = target embedding transposed
  model.scale_embeddings = True  # multiply embeddings by sqrt(d_model) (paper; GPT-2 does not)
  model.logits_bias = False  # a learned bias per output id added to the logits (Marian)
  model.mask_special_logits = False  # ids 0 (padding), 2 (unknown) never predicted (GPT-2 import)
  model.activation = "relu"  # feed-forward: relu (paper), gelu, silu, relu2; gated swiglu, geglu
  model.norm = "layer"  # normalization: "layer" (paper) or "rms" (RMSNorm)
  model.qk_norm = False  # normalise each head's queries and keys (QK-norm) with model.norm
  model.biases = "ffn"  # dense-layer biases: "ffn" (paper), "all" (attention too), "none"
  model.pooling = "mean"  # classification pooling: "mean", learned "cls", "attention" or "max"
  model.conv_kernel = 0  # encoder blocks: a convolution sublayer this wide (odd) first; 0 = none
  model.encoder_lstm = False  # encoder: a bidirectional LSTM reads the embeddings before the blocks
  model.lstm_layers = 1  # encoder_lstm: bidirectional LSTMs stacked, each reading the last
  model.head_hidden = 0  # classifier: a tanh layer of this many units before the logits
  model.pool_hidden = 0  # pooling="attention": units of its tanh scoring layer; 0 = d_model
  model.embed_dim = 0  # classifier: embeddings this wide, projected to d_model; 0 = d_model
  model.embed_init_std = 0.0  # stddev of the initial embeddings; 0 = their width^-1/2
  model.layer_norm_epsilon = 1e-6  # added to the variance in layer norm (and RMSNorm)
  model.scan_layers = False  # identical layers as one nn.scan (one compiled layer; stacked)
  model.tokenizer = "sentencepiece"  # real text: "sentencepiece" (trained on the fly) or "bytes"
  model.vocab_size = 8000  # sentencepiece vocabulary size (per language unless shared_vocab)
  model.sentencepiece_type = "unigram"  # sentencepiece pieces: unigram, bpe, or whole "word"s
  model.shared_vocab = True  # translation: one tokenizer for source and target
  return model


def _compute() -> ml_collections.ConfigDict:
  """config.compute: how the model computes, not what: may change between runs of one workdir."""
  compute = ml_collections.ConfigDict()
  compute.dtype = "float32"  # compute dtype; params, softmax, norms, logits, loss stay float32
  compute.attention_impl = "reference"  # "reference" (ours), "fused" (jax/cuDNN), "blockwise"
  compute.attention_block_size = 512  # blockwise attention: query and key block length
  compute.remat = "none"  # recompute in backward: none, full (each block), matmuls (save dots)
  compute.grad_barrier = "auto"  # block inputs, gradients computed once: auto (on on CPU), on, off
  compute.flat_allreduce = True  # CPU: all-reduce gradients as one flat vector (psum_flat)
  compute.cpu_devices = 0  # CPU: main.py splits the host into this many pmap devices; 0 = one
  return compute


def _data(task: str) -> ml_collections.ConfigDict:
  """config.data: data sources, tokenization limits and the input pipeline."""
  data = ml_collections.ConfigDict()
  data.dataset = "synthetic"  # "synthetic", "files" (local files in data_dir) or a tfds name
  data.data_dir = ""  # directory of the local data files (dataset="files")
  data.tfds_data_dir = ""  # prepared tfds data; "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
  data.language_pair = "de-en"  # translation: source-target language codes of the data
  data.file_splits = "train=train,validation=val,test=test_2016_flickr"  # split=file stem (files)
  data.train_split = "train"  # split trained on (real data)
  data.eval_split = "validation"  # split evaluated during training and by default in eval mode
  data.text_feature = "sentence"  # classification: the text feature (tfds) or column (files)
  data.label_feature = "label"  # classification: the class-label feature (tfds) or column (files)
  data.min_class_examples = 10  # classification files: a training label with fewer is refused
  data.text_normalization = "none"  # classification: none, lower, or ptb_lower (SST-2's form)
  data.synthetic_task = SYNTHETIC_DEFAULTS[task]  # reverse, sort, copy (seq2seq/LM); majority
  data.min_digits = 1  # shortest synthetic digit string
  data.max_digits = 12  # longest synthetic digit string
  data.max_input_length = 16  # inputs are padded (and never truncated) to this many tokens
  data.max_target_length = 32 if task == "generation" else 16  # targets (LM: the whole stream)
  data.max_eval_length = 128  # eval/decode inputs are padded to this (longer ones truncated)
  data.num_eval_examples = 1000  # held-out examples scored at each evaluation (synthetic)
  data.tokenizer_path = ""  # existing tokenizer model file(s), "src,tgt" if separate; "" = train
  data.tokenizer_max_sentences = 1_000_000  # sentences sampled to train sentencepiece
  data.pack_examples = False  # pack several examples per training row (segment ids, positions)
  data.length_bucket = 0  # padded rows: batch similar lengths, cut to a multiple of this; 0 = off
  data.validation_fraction = 0.0  # LM text files: hold out this last share of train as validation
  data.text_documents = "file"  # LM text files: a document is a whole "file" or each "line"
  data.lm_batching = "windows"  # LM real text: "windows" of one stream, or "documents" (own rows)
  data.shuffle_seed = 0  # order of training examples
  data.data_threads = 2  # grain threads making training batches ahead of the step; 0 = in the loop
  data.data_prefetch = 4  # training batches those threads keep ready in host memory
  data.device_prefetch = 2  # training batches copied to the devices ahead of the step; 0 = none
  return data


def _optim(task: str) -> ml_collections.ConfigDict:
  """config.optim: the optimizer, its schedule and regularisation."""
  optim = ml_collections.ConfigDict()
  optim.optimizer = "adam"  # "adam" (paper), "adamw" (decay skips biases, norms), "muon", "sgd"
  optim.learning_rate = 3e-3  # peak learning rate, reached at the end of warmup (muon: Adam's part)
  optim.muon_learning_rate = 0.02  # muon: peak rate of its orthogonalised matrix updates
  optim.schedule = "cosine"  # rsqrt (paper), cosine, linear, constant; all with linear warmup
  optim.warmup_steps = 200  # linear warmup length
  optim.adam_b1 = 0.9  # Adam beta1
  optim.adam_b2 = 0.98  # Adam beta2 (paper: 0.98)
  optim.adam_eps = 1e-9  # Adam epsilon (paper: 1e-9); not muon's Adam part (optax: 1e-8)
  optim.sgd_momentum = 0.9  # sgd: heavy-ball momentum (0 = plain gradient descent)
  optim.weight_decay = 0.0  # adamw, muon: decoupled weight decay; sgd: decay * w added to gradients
  optim.max_grad_norm = 1.0  # global-norm gradient clipping; 0 disables it
  optim.sam_rho = 0.0  # sharpness-aware minimisation's radius (two passes a step); 0 = off
  optim.adversarial_eps = 0.0  # adversarial training: its embedding perturbation norm; 0 = off
  optim.rdrop_alpha = 0.0  # R-drop: weight of two dropout passes' symmetric KL; 0 = off
  optim.label_smoothing = 0.1 if task == "translation" else 0.0  # paper: 0.1
  optim.z_loss = 0.0  # training loss += z_loss * (log softmax normaliser)^2 (PaLM: 1e-4)
  optim.dropout_rate = 0.0  # residual, embedding and feed-forward dropout
  optim.attention_dropout_rate = 0.0  # dropout on attention weights (reference path only)
  optim.token_dropout = 0.0  # classification training: share of input tokens set to [MASK]
  optim.mask_rate = 0.15  # objective=mlm: share of tokens predicted (80% [MASK], 10% random id)
  optim.dropout_rng = "hash"  # dropout masks: "hash" of the index (fast) or "threefry" (JAX's)
  return optim


def _loop() -> ml_collections.ConfigDict:
  """config.train: the training loop: batch, length, logging, checkpoints, faults."""
  train = ml_collections.ConfigDict()
  train.batch_size = 64  # global batch size, split over all devices
  train.grad_accum_steps = 1  # micro-batches accumulated per update
  train.steps_per_call = 1  # updates per dispatch (lax.scan over their batches); >1 for short steps
  train.num_train_steps = 3000  # total optimizer updates
  train.log_every_steps = 100  # progress line and training metrics
  train.checkpoint_every_steps = 1000  # asynchronous checkpoint
  train.keep_checkpoints = 3  # checkpoints kept on disk (the newest ones)
  train.nonfinite_updates = "stop"  # NaN/inf loss or gradient: "stop" the run, or "skip" the update
  train.max_skipped_updates = 100  # nonfinite_updates="skip": stop once a run has skipped more
  train.max_skipped_fraction = 0.1  # "skip": stop once 10+ skips exceed this share of the run
  train.allow_config_change = False  # load a checkpoint whose model fields differ from this config
  train.signal_check_every_steps = 10  # several processes: steps between agreeing on a signal
  train.profile_steps = 0  # trace this many steps after a run's first to workdir/profile; 0 = off
  return train


def _evaluation() -> ml_collections.ConfigDict:
  """config.eval: evaluation during training and in eval mode."""
  ev = ml_collections.ConfigDict()
  ev.eval_batch_size = 128  # global batch size for evaluation and decoding
  ev.eval_every_steps = 1000  # held-out evaluation
  ev.num_print_examples = 5  # decoded examples printed at the final evaluation
  ev.num_decode_batches = 0  # eval batches decoded and scored during training; 0 = all
  ev.num_eval_batches = 0  # eval batches whose loss is computed during training; 0 = all
  ev.final_decode_batches = 0  # eval batches the final evaluation (and eval mode) decodes; 0 = all
  ev.best_metric = ""  # keep the best checkpoint by this eval metric (bleu, accuracy); "" = off
  ev.num_attention_images = 1  # eval examples whose attention maps each evaluation draws; 0 = off
  ev.head_importance_batches = 0  # --mode=head_importance: eval batches scored per head; 0 = all
  return ev


def _decoding() -> ml_collections.ConfigDict:
  """config.decode: decoding: beam search (translation) and sampling (generation)."""
  decode = ml_collections.ConfigDict()
  decode.beam_size = 1  # beam search width; 1 = greedy (paper: 4)
  decode.length_penalty = 0.6  # beam score = log p / ((5 + length) / 6) ** alpha (paper: 0.6)
  decode.decode_extra_length = 50  # decode at most input length + this many tokens (paper: 50)
  decode.greedy = False  # take the most likely token instead of sampling
  decode.temperature = 1.0  # sampling: logits are divided by this (> 0; lower = safer text)
  decode.top_k = 0  # sampling: keep only the k most likely tokens; 0 = all
  decode.top_p = 1.0  # sampling: keep the most likely tokens holding this probability; 1 = all
  decode.max_new_tokens = 256  # new tokens after the prompt; past the context, the window slides
  decode.num_samples = 1  # samples generated per prompt
  decode.sample_seed = 0  # the sampling seed: the same seed and prompt give the same text
  decode.stop_text = ""  # generation also ends after this text (one token); "" = only at EOS
  decode.eval_prompt_length = 16  # LM samples in eval logs continue this many tokens of eval rows
  return decode


def field_groups() -> Dict[str, str]:
  """{field: "group.field"} of every grouped field: where each field of the flat config
  that came before the groups lives now (main.py names it for an old flag; checkpoints
  written with a flat config are read through `group_flat_config`)."""
  c = get_config()
  return {field: f"{group}.{field}" for group in GROUPS for field in c[group]}


def group_flat_config(saved: dict) -> dict:
  """A config dict as saved before the fields were grouped (flat), regrouped; a grouped one
  is returned as it is."""
  if all(isinstance(saved.get(g), dict) for g in GROUPS):
    return saved
  where = field_groups()
  out: dict = {}
  for key, value in saved.items():
    if key in where:
      group, field = where[key].split(".")
      out.setdefault(group, {})[field] = value
    else:
      out[key] = value
  return out
