"""The default config: a synthetic task that trains in minutes on a CPU, nothing to download.

    python main.py --workdir=runs/demo                          # reverse digit strings
    python main.py --config=configs/default.py:task=generation --workdir=runs/lm
    python main.py --config=configs/default.py:size=small,accel=gpu --workdir=runs/x
    python main.py --workdir=runs/demo --config.num_train_steps=500

Variant keys: task (translation, generation, classification), size (tiny, small, base,
big), accel (cpu, gpu, tpu). Every field below has one comment; `--config.<field>=<value>`
overrides any of them after the presets are applied.
"""

import ml_collections

from configs import presets

TASKS = ("translation", "generation", "classification")

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

  # ---- Task and data
  c.task = task  # model family, loss and metrics: translation, generation, classification
  c.dataset = "synthetic"  # "synthetic" (generated), "files" (local files in data_dir) or a tfds name
  c.data_dir = ""  # directory of the local data files (dataset="files")
  c.tfds_data_dir = ""  # prepared tfds data; "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.language_pair = "de-en"  # translation: source-target language codes of the data
  c.file_splits = "train=train,validation=val,test=test_2016_flickr"  # split=file stem (files)
  c.train_split = "train"  # split trained on (real data)
  c.eval_split = "validation"  # split evaluated during training and by default in eval mode
  c.text_feature = "sentence"  # classification: the text feature (tfds) or column (files)
  c.label_feature = "label"  # classification: the class-label feature (tfds) or column (files)
  c.synthetic_task = SYNTHETIC_DEFAULTS[task]  # reverse, sort, copy (seq2seq/LM); majority
  c.min_digits = 1  # shortest synthetic digit string
  c.max_digits = 12  # longest synthetic digit string
  c.max_input_length = 16  # inputs are padded (and never truncated) to this many tokens
  c.max_target_length = 32 if task == "generation" else 16  # targets (LM: the whole stream)
  c.max_eval_length = 128  # eval/decode inputs are padded to this (longer ones truncated)
  c.num_eval_examples = 1000  # held-out examples scored at each evaluation (synthetic)
  c.tokenizer = "sentencepiece"  # real text: "sentencepiece" (trained on the fly) or "bytes"
  c.vocab_size = 8000  # sentencepiece vocabulary size (per language unless shared_vocab)
  c.shared_vocab = True  # translation: one tokenizer for source and target
  c.tokenizer_path = ""  # existing tokenizer model file(s), "src,tgt" if separate; "" = train
  c.tokenizer_max_sentences = 1_000_000  # sentences sampled to train sentencepiece
  c.pack_examples = False  # pack several examples per training row (segment ids, positions)
  c.validation_fraction = 0.0  # LM text files: hold out this last share of train as validation
  c.text_documents = "file"  # LM text files: a document is a whole "file" or each "line"
  c.lm_batching = "windows"  # LM real text: "windows" of one stream, or "documents" (own rows)
  c.shuffle_seed = 0  # order of training examples
  c.seed = 0  # parameter initialisation and dropout

  # ---- Model (sizes from presets.SIZES)
  c.size = "tiny"  # the size preset applied (tiny, small, base, big)
  c.num_encoder_layers = 2  # N for the encoder (translation, classification)
  c.num_decoder_layers = 2  # N for the decoder (translation, generation)
  c.d_model = 64  # model width
  c.d_ff = 256  # feed-forward inner width
  c.num_heads = 4  # attention heads h
  c.head_dim = 0  # per-head size d_k = d_v; 0 = d_model // num_heads
  c.dropout_rate = 0.0  # residual, embedding and feed-forward dropout
  c.attention_dropout_rate = 0.0  # dropout on attention weights (reference path only)
  c.dropout_rng = "hash"  # dropout masks: "hash" of the index (fast) or "threefry" (JAX's)
  c.norm_placement = "post"  # "post" (paper: LN(x + f(x))) or "pre" (x + f(LN(x)))
  c.positional_encoding = "sinusoidal"  # "sinusoidal" (paper) or "learned"
  c.fused_qkv = False  # one projection for q, k and v instead of three
  c.share_embeddings = True  # one embedding matrix for source and target
  c.tie_output = True  # output projection = target embedding transposed
  c.activation = "relu"  # feed-forward non-linearity: relu (paper) or gelu
  c.pooling = "mean"  # classification pooling: "mean" over tokens or a learned "cls"
  c.layer_norm_epsilon = 1e-6  # added to the variance in layer norm

  # ---- Accelerator (presets.ACCELERATORS)
  c.accel = "cpu"  # the accelerator preset applied (cpu, gpu, tpu)
  c.dtype = "float32"  # compute dtype; params, softmax, norms, logits, loss stay float32
  c.attention_impl = "reference"  # "reference" (written here), "fused" (jax/cuDNN) or "blockwise"
  c.attention_block_size = 512  # blockwise attention: query and key block length
  c.remat = "none"  # recompute in the backward pass: none, full (each block), matmuls (save dots)
  c.scan_layers = False  # run identical layers with nn.scan (one compiled layer; params stacked)
  c.cpu_devices = 0  # CPU: main.py splits the host into this many pmap devices; 0 = one

  # ---- Optimization
  c.optimizer = "adam"  # "adam" (paper) or "adamw" (decay skips biases and norms)
  c.learning_rate = 3e-3  # peak learning rate, reached at the end of warmup
  c.schedule = "cosine"  # rsqrt (paper), cosine, linear, constant; all with linear warmup
  c.warmup_steps = 200  # linear warmup length
  c.adam_b1 = 0.9  # Adam beta1
  c.adam_b2 = 0.98  # Adam beta2 (paper: 0.98)
  c.adam_eps = 1e-9  # Adam epsilon (paper: 1e-9)
  c.weight_decay = 0.0  # AdamW decoupled weight decay
  c.max_grad_norm = 1.0  # global-norm gradient clipping; 0 disables it
  c.label_smoothing = 0.1 if task == "translation" else 0.0  # paper: 0.1
  c.batch_size = 64  # global batch size, split over all devices
  c.grad_accum_steps = 1  # micro-batches accumulated per update
  c.num_train_steps = 3000  # total optimizer updates

  # ---- Evaluation, logging and checkpoints
  c.eval_batch_size = 128  # global batch size for evaluation and decoding
  c.log_every_steps = 100  # progress line and training metrics
  c.eval_every_steps = 1000  # held-out evaluation
  c.checkpoint_every_steps = 1000  # asynchronous checkpoint
  c.keep_checkpoints = 3  # checkpoints kept on disk (the newest ones)
  c.num_print_examples = 5  # decoded examples printed at the final evaluation
  c.num_decode_batches = 0  # eval batches decoded and scored during training; 0 = all
  c.num_eval_batches = 0  # eval batches whose loss is computed during training; 0 = all
  c.best_metric = ""  # keep the best checkpoint by this eval metric (bleu, accuracy); "" = off
  c.nonfinite_updates = "stop"  # NaN/inf loss or gradient: "stop" the run, or "skip" the update
  c.max_skipped_updates = 100  # nonfinite_updates="skip": stop once a run has skipped more
  c.allow_config_change = False  # load a checkpoint whose model fields differ from this config
  c.signal_check_every_steps = 10  # several processes: steps between agreeing to stop on a signal
  c.num_attention_images = 1  # eval examples whose attention maps each evaluation draws; 0 = off
  c.head_importance_batches = 0  # --mode=head_importance: eval batches scored per head; 0 = all

  # ---- Input pipeline and profiling (training batches; none of it changes what is trained)
  c.data_threads = 2  # grain threads making training batches ahead of the step; 0 = in the loop
  c.data_prefetch = 4  # training batches those threads keep ready in host memory
  c.device_prefetch = 2  # training batches copied to the devices ahead of the step; 0 = none
  c.profile_steps = 0  # trace this many steps after a run's first to workdir/profile; 0 = off

  # ---- Decoding (translation)
  c.beam_size = 1  # beam search width; 1 = greedy (paper: 4)
  c.length_penalty = 0.6  # beam score = log p / ((5 + length) / 6) ** alpha (paper: 0.6)
  c.decode_extra_length = 50  # decode at most input length + this many tokens (paper: 50)

  # ---- Generation (decoder-only LM: --mode=generate and the samples in the eval logs)
  c.greedy = False  # take the most likely token instead of sampling
  c.temperature = 1.0  # sampling: logits are divided by this (> 0; lower = safer text)
  c.top_k = 0  # sampling: keep only the k most likely tokens; 0 = all
  c.top_p = 1.0  # sampling: keep the most likely tokens holding this probability; 1 = all
  c.max_new_tokens = 256  # tokens generated after the prompt (at most the model's context)
  c.num_samples = 1  # samples generated per prompt
  c.sample_seed = 0  # the sampling seed: the same seed and prompt give the same text
  c.stop_text = ""  # generation also ends after this text (one token); "" = only at EOS
  c.eval_prompt_length = 16  # LM samples in eval logs continue this many tokens of eval rows

  presets.apply_presets(c, variant.get("size", "tiny"), variant.get("accel", "cpu"))
  return c
