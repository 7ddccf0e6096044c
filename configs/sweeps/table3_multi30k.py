"""The paper's Table 3 (variations on the Transformer), CPU-sized, on Multi30k de->en.

    python main.py --mode=sweep --sweep=configs/sweeps/table3_multi30k.py --workdir=runs/table3
    python main.py --mode=sweep --sweep=configs/sweeps/table3_multi30k.py \\
        --workdir=runs/table3_smoke --config.train.num_train_steps=20 \\
        --config.eval.final_decode_batches=1   # every variant, briefly: BLEU on one batch

The base is a post-norm Transformer a quarter of the paper's base width (d_model 128, 4
heads of 32, 2+2 layers, d_ff 512, dropout 0.1, label smoothing 0.1, sinusoidal positions)
on the Multi30k recipe of configs/translation.py (shared 8k sentencepiece vocabulary,
packed 64-token rows, batches of 64, cosine schedule), trained for STEPS updates. As in
Table 3, each row changes one thing and keeps the steps: (A) heads at fixed compute,
(B) a smaller key size, (C) depth and width, (D) regularization, (E) learned positions;
then pre-norm and the warmup length. The loss column is label-smoothed cross-entropy minus
its floor, so for label_smoothing=0 compare perplexity (unsmoothed) instead.
"""

import os

from configs import translation
from configs.sweeps import Sweep, Variant

# Updates per variant, the same for all. Measure the base's steps/s first (the progress
# line prints it) and pick this so that the whole sweep fits your time: the warmups,
# evaluations and checkpoints below scale with it. (A --config.train.num_train_steps flag
# overrides only the steps.)
STEPS = 200  # about 1.6 epochs of Multi30k's packed rows; ~6 min a variant on 2 CPU cores
DATA_DIR = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                         "..", "..", "..", "shared", "data", "multi30k"))


def get_sweep() -> Sweep:
  c = translation.get_config("dataset=multi30k")
  c.data.data_dir = DATA_DIR  # --config.data.data_dir=... for the data elsewhere
  c.model.num_encoder_layers = c.model.num_decoder_layers = 2
  c.model.d_model = 128
  c.model.num_heads = 4
  c.model.head_dim = 0  # d_model / num_heads
  c.model.d_ff = 512
  c.optim.dropout_rate = 0.1
  c.optim.label_smoothing = 0.1
  c.model.norm_placement = "post"
  c.model.positional_encoding = "sinusoidal"
  c.train.num_train_steps = STEPS
  c.optim.warmup_steps = STEPS // 4
  # Periodic BLEU on one batch (128 sentences) only; the final one on the whole split. An
  # untrained model decodes every sentence to its limit (input + 50 tokens): in a 20-step
  # smoke run the final evaluation took 60% of a variant's time, half of it decoding, so
  # the smoke command above bounds the decode with config.eval.final_decode_batches (the
  # final line then says "predictions on 1 of 8 batches"; the loss is still the split's).
  c.eval.num_decode_batches = 1
  c.train.checkpoint_every_steps = STEPS // 5  # what a stopped variant resumes from
  c.train.keep_checkpoints = 2
  c.eval.best_metric = ""  # no best-checkpoint copies: the comparison uses the final model
  c.decode.beam_size = 1  # greedy BLEU: the final whole-split decode of each variant stays short
  c.eval.num_attention_images = 0  # no attention images at each evaluation
  c.eval.eval_every_steps = STEPS // 5  # five points on the validation-loss curve
  return Sweep(c, [
      Variant("base", description="d_model 128, 4 heads of 32, 2+2 layers, d_ff 512"),
      Variant("heads_1", {"model.num_heads": 1}, "A", "1 head of 128"),
      Variant("heads_8", {"model.num_heads": 8}, "A", "8 heads of 16"),
      Variant("head_dim_16", {"model.head_dim": 16}, "B",
              "4 heads of 16: d_k halved (and d_v with it, unlike the paper)"),
      Variant("layers_1", {"model.num_encoder_layers": 1, "model.num_decoder_layers": 1}, "C",
              "1+1 layers"),
      Variant("d_model_64", {"model.d_model": 64, "model.d_ff": 256}, "C",
              "half width: d_model 64, d_ff 256, 4 heads of 16"),
      Variant("dropout_0", {"optim.dropout_rate": 0.0}, "D", "no dropout"),
      Variant("smoothing_0", {"optim.label_smoothing": 0.0}, "D",
              "no label smoothing (compare perplexity, not loss)"),
      Variant("learned_positions", {"model.positional_encoding": "learned"}, "E",
              "learned positional embeddings"),
      Variant("pre_norm", {"model.norm_placement": "pre"}, "norm", "pre-norm: x + f(LN(x))"),
      Variant("warmup_short", {"optim.warmup_steps": STEPS // 20}, "warmup",
              f"warmup {STEPS // 20} steps"),
      # More rows of Table 3, one line each, left out of the committed CPU run (about 6
      # minutes a variant at STEPS = 200) to fit its time; add them back for a longer run:
      # Variant("heads_16", {"model.num_heads": 16}, "A", "16 heads of 8"),
      # Variant("layers_3", {"model.num_encoder_layers": 3, "model.num_decoder_layers": 3},
      #         "C", "3+3 layers"),
      # Variant("d_model_256", {"model.d_model": 256, "model.d_ff": 1024}, "C",
      #         "d_model 256, d_ff 1024"),
      # Variant("d_ff_256", {"model.d_ff": 256}, "C", "d_ff 256"),
      # Variant("d_ff_1024", {"model.d_ff": 1024}, "C", "d_ff 1024"),
      # Variant("dropout_0.3", {"optim.dropout_rate": 0.3}, "D", "dropout 0.3"),
      # Variant("warmup_long", {"optim.warmup_steps": STEPS // 2}, "warmup",
      #         f"warmup {STEPS // 2} steps"),
  ])
