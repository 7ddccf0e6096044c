"""Language modelling on real text: tiny Shakespeare from local files, or a
tensorflow-datasets text set by name.

    python main.py --config=configs/generation.py --workdir=runs/shakespeare
    python main.py --config=configs/generation.py --workdir=runs/shakespeare \\
        --mode=generate --prompt="ROMEO:" --config.temperature=0.8
    python main.py --config=configs/generation.py:dataset=lm1b,size=small,accel=gpu \\
        --workdir=runs/lm1b

Variant keys: dataset (shakespeare: ../shared/data/tinyshakespeare through config.data_dir;
tiny_shakespeare and lm1b: tfds names, which need TensorFlow to prepare once), tokenizer
(chars, bytes, sentencepiece), size (nanogpt, tiny, small, base, big), accel (cpu, gpu,
tpu). The shakespeare default is the CPU recipe BENCHMARKS.md compares with nanoGPT.
"""

import os

from configs import default, presets

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASETS = ("shakespeare", "tiny_shakespeare", "lm1b")
# nanoGPT's shakespeare_char CPU model shape: 4 layers, 4 heads, d=128, context 64, no
# dropout, GELU, learned positions, output tied to the embedding. nanoGPT puts layer norm
# before each sublayer; the paper's post-norm trained faster per step on this CPU and
# reached a lower loss in our runs (BENCHMARKS.md), so the recipe keeps the paper's.
NANOGPT = dict(num_decoder_layers=4, num_encoder_layers=0, d_model=128, d_ff=512,
               num_heads=4, dropout_rate=0.0, norm_placement="post", activation="gelu",
               positional_encoding="learned", tie_output=True, max_target_length=64)


def get_config(arg=None):
  variant = presets.parse_variant(arg, {"dataset": DATASETS,
                                        "tokenizer": ("chars", "bytes", "sentencepiece"),
                                        "size": ("nanogpt",) + tuple(presets.SIZES),
                                        "accel": tuple(presets.ACCELERATORS)})
  name = variant.get("dataset", "shakespeare")
  size = variant.get("size", "nanogpt")
  c = default.get_config(f"task=generation,size={'tiny' if size == 'nanogpt' else size},"
                         f"accel={variant.get('accel', 'cpu')}")
  if size == "nanogpt":
    c.update(NANOGPT)
    c.size = "tiny"  # the preset applied underneath; the fields above replace its shape
  else:
    c.num_encoder_layers = 0
    c.max_target_length = 256
  c.tokenizer = variant.get("tokenizer", "chars" if name != "lm1b" else "sentencepiece")
  c.vocab_size = {"chars": 1024, "bytes": 259, "sentencepiece": 8000}[c.tokenizer]
  c.label_smoothing = 0.0
  c.lm_batching = "windows"
  c.num_print_examples = 2
  c.num_decode_batches = 1
  c.eval_prompt_length = 16
  c.temperature = 0.8
  c.max_new_tokens = 500
  if name == "shakespeare":
    c.dataset = "files"
    c.data_dir = os.path.join(_REPO, "..", "shared", "data", "tinyshakespeare")
    c.file_splits = "train=input.txt"  # input.txt.gz is found too
    c.validation_fraction = 0.1  # the last 10% of the text, as nanoGPT splits it
    c.text_documents = "file"
    c.train_split, c.eval_split = "train", "validation"
  elif name == "tiny_shakespeare":
    c.dataset = "tiny_shakespeare"  # tfds: train/validation/test, one document each
    c.train_split, c.eval_split = "train", "validation"
  else:
    c.dataset = "lm1b"  # tfds: one sentence a document; it has train and test only
    c.train_split, c.eval_split = "train", "test"
    c.lm_batching = "documents"
    c.pack_examples = True
    c.max_target_length = 128 if size in ("nanogpt", "tiny") else 256
    c.num_train_steps = 100_000
    c.eval_every_steps = c.checkpoint_every_steps = 5000
    c.num_eval_batches = 20
    return c
  # The tiny Shakespeare recipe: about 80 s on a 2-core CPU, validation loss about 1.82
  # (BENCHMARKS.md). Small per-device batches run best on CPU: the batch of 16 is split
  # over two pmap devices, one per core.
  c.batch_size = 16
  c.learning_rate = 3e-3
  c.schedule = "cosine"
  c.warmup_steps = 100
  c.num_train_steps = 1000
  c.eval_every_steps = 200
  c.checkpoint_every_steps = 1000
  c.log_every_steps = 50
  c.eval_batch_size = 128
  c.adam_b2 = 0.99
  if c.accel == "cpu":
    c.cpu_devices = 2
  return c
