"""Language modelling on real text: tiny Shakespeare from local files, or a
tensorflow-datasets text set by name.

    python main.py --config=configs/generation.py --workdir=runs/shakespeare
    python main.py --config=configs/generation.py --workdir=runs/shakespeare \\
        --mode=generate --prompt="ROMEO:" --config.decode.temperature=0.8
    python main.py --config=configs/generation.py:dataset=lm1b,size=small,accel=gpu \\
        --workdir=runs/lm1b

Variant keys: dataset (shakespeare: ../shared/data/tinyshakespeare through config.data.data_dir;
tiny_shakespeare and lm1b: tfds names, which need TensorFlow to prepare once), tokenizer
(chars, bytes, sentencepiece), size (nanogpt, tiny, small, base, big), accel (cpu, gpu,
tpu), recipe (shakespeare only: nanogpt, the default, or fast, or gpu). The shakespeare
default is the CPU recipe BENCHMARKS.md compares with nanoGPT; `recipe=fast` trains the
same shape with rotary positions, SwiGLU and an untied output (docs/since_2017.md) for half
the steps; `recipe=gpu` is nanoGPT's GPU recipe (6 layers, d 384, context 256), on a GPU:

    python main.py --config=configs/generation.py:recipe=fast --workdir=runs/shakespeare_fast
    python main.py --config=configs/generation.py:recipe=gpu --workdir=runs/shakespeare_gpu
"""

import os

from configs import default, presets

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASETS = ("shakespeare", "tiny_shakespeare", "lm1b")
RECIPES = ("nanogpt", "fast", "gpu")
# The fast CPU recipe: the since-2017 components that gained most per step at this shape
# and cost little time (docs/since_2017.md: rotary positions -0.080, SwiGLU at equal
# parameters -0.034, untied output -0.011), then 500 steps instead of 1,000.
FAST = dict(model=dict(positional_encoding="rope", activation="swiglu", d_ff=341,
                       tie_output=False),
            train=dict(num_train_steps=500), optim=dict(warmup_steps=50),
            eval=dict(eval_every_steps=500))  # one evaluation, at the end
# nanoGPT's shakespeare_char CPU model shape: 4 layers, 4 heads, d=128, context 64, no
# dropout, GELU, learned positions, output tied to the embedding. nanoGPT puts layer norm
# before each sublayer; the paper's post-norm trained faster per step on this CPU and
# reached a lower loss in our runs (BENCHMARKS.md), so the recipe keeps the paper's.
NANOGPT = dict(model=dict(num_decoder_layers=4, num_encoder_layers=0, d_model=128, d_ff=512,
                          num_heads=4, norm_placement="post", activation="gelu",
                          positional_encoding="learned", tie_output=True),
               optim=dict(dropout_rate=0.0), data=dict(max_target_length=64))


# nanoGPT's GPU tiny-Shakespeare recipe (its config/train_shakespeare_char.py): 6 layers, 6
# heads, d 384, context 256, batch 64, dropout 0.2, AdamW (weight decay 0.1, beta2 0.99),
# learning rate 1e-3 after 100 warmup steps, cosine decay over 5,000 steps (nanoGPT's ends
# at 1e-4, ours at 0), pre-norm as nanoGPT, bfloat16 compute and the fused attention of
# the gpu preset (which has no attention dropout). Its best validation loss is about 1.47
# near step 1,500-2,000; then it overfits. Ten updates a dispatch: the step is short.
GPU = dict(model=dict(num_decoder_layers=6, num_encoder_layers=0, d_model=384, d_ff=1536,
                      num_heads=6, norm_placement="pre", activation="gelu",
                      positional_encoding="learned", tie_output=True),
           data=dict(max_target_length=256),
           optim=dict(optimizer="adamw", weight_decay=0.1, learning_rate=1e-3,
                      warmup_steps=100, schedule="cosine", adam_b2=0.99, dropout_rate=0.2,
                      attention_dropout_rate=0.0),
           train=dict(batch_size=64, num_train_steps=5000, steps_per_call=10,
                      log_every_steps=250, checkpoint_every_steps=1000),
           # Loss only (nanoGPT samples nothing while it trains): --mode=generate samples.
           eval=dict(eval_every_steps=250, eval_batch_size=512, num_decode_batches=0,
                     num_print_examples=0))


def get_config(arg=None):
  variant = presets.parse_variant(arg, {"dataset": DATASETS,
                                        "tokenizer": ("chars", "bytes", "sentencepiece"),
                                        "size": ("nanogpt",) + tuple(presets.SIZES),
                                        "accel": tuple(presets.ACCELERATORS),
                                        "recipe": RECIPES})
  name = variant.get("dataset", "shakespeare")
  size = variant.get("size", "nanogpt")
  if "recipe" in variant and name != "shakespeare":
    raise ValueError(f"recipe={variant['recipe']} is a recipe of the shakespeare dataset, "
                     f"not of dataset={name}")
  recipe = variant.get("recipe", "nanogpt")
  accel = variant.get("accel", "gpu" if recipe == "gpu" else "cpu")
  c = default.get_config(f"task=generation,size={'tiny' if size == 'nanogpt' else size},"
                         f"accel={accel}")
  if size == "nanogpt":
    presets.update_groups(c, NANOGPT)
    c.size = "tiny"  # the preset applied underneath; the fields above replace its shape
  else:
    c.model.num_encoder_layers = 0
    c.data.max_target_length = 256
  c.model.tokenizer = variant.get("tokenizer", "chars" if name != "lm1b" else "sentencepiece")
  c.model.vocab_size = {"chars": 1024, "bytes": 259, "sentencepiece": 8000}[c.model.tokenizer]
  c.optim.label_smoothing = 0.0
  c.data.lm_batching = "windows"
  c.eval.num_print_examples = 2
  c.eval.num_decode_batches = 1
  c.decode.eval_prompt_length = 16
  c.decode.temperature = 0.8
  c.decode.max_new_tokens = 500
  if name == "shakespeare":
    c.data.dataset = "files"
    c.data.data_dir = os.path.join(_REPO, "..", "shared", "data", "tinyshakespeare")
    c.data.file_splits = "train=input.txt"  # input.txt.gz is found too
    c.data.validation_fraction = 0.1  # the last 10% of the text, as nanoGPT splits it
    c.data.text_documents = "file"
    c.data.train_split, c.data.eval_split = "train", "validation"
  elif name == "tiny_shakespeare":
    c.data.dataset = "tiny_shakespeare"  # tfds: train/validation/test, one document each
    c.data.train_split, c.data.eval_split = "train", "validation"
  else:
    c.data.dataset = "lm1b"  # tfds: one sentence a document; it has train and test only
    c.data.train_split, c.data.eval_split = "train", "test"
    c.data.lm_batching = "documents"
    c.data.pack_examples = True
    c.data.max_target_length = 128 if size in ("nanogpt", "tiny") else 256
    c.train.num_train_steps = 100_000
    c.eval.eval_every_steps = c.train.checkpoint_every_steps = 5000
    c.eval.num_eval_batches = 20
    return c
  # The tiny Shakespeare recipe: about 49 s on a 2-core CPU, validation loss about 1.82
  # (BENCHMARKS.md). Small per-device batches run best on CPU: the batch of 16 is split
  # over two pmap devices, one per core.
  c.train.batch_size = 16
  c.optim.learning_rate = 3e-3
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 100
  c.train.num_train_steps = 1000
  c.eval.eval_every_steps = 200
  c.train.checkpoint_every_steps = 1000
  c.train.log_every_steps = 50
  c.eval.eval_batch_size = 128
  c.optim.adam_b2 = 0.99
  # Ten updates a dispatch (one lax.scan): the same updates, and 34-36k tokens/s instead of
  # 24-33k for recipe=fast on the 2-core CPU (BENCHMARKS.md, "Training loop").
  c.train.steps_per_call = 10
  if c.accel == "cpu":
    c.compute.cpu_devices = 2
  if recipe == "fast":
    presets.update_groups(c, FAST)
  if recipe == "gpu":
    presets.update_groups(c, GPU)
    c.compute.cpu_devices = 0
  return c
