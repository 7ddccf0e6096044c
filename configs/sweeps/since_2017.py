"""Since 2017: the components that replaced the paper's, one at a time, on tiny Shakespeare.

    python main.py --mode=sweep --sweep=configs/sweeps/since_2017.py --workdir=runs/since_2017
    python docs/since_2017.py runs/since_2017     # the table and plot of docs/since_2017.md

The base is the paper's Transformer as a decoder-only character model in nanoGPT's CPU shape
(configs/generation.py: 4 layers, 4 heads, d_model 128, d_ff 512, context 64, tied output,
no dropout) with the paper's own choices where the recipe makes others: post-norm, layer
norm, sinusoidal positions, ReLU, biases in the feed-forward layers only, Adam. Each row
changes one thing; "modern" changes nine of them at once (pre-norm, RMSNorm, rotary
positions, SwiGLU, QK-norm, no biases, untied output, 2 key/value heads, z-loss), and
"modern_muon" trains that with Muon. Every row trains STEPS updates on the same batches in
the same order, with seeds 0 and 1 of the parameter initialisation (rows `<name>` and
`<name>_s1`), so docs/since_2017.py can say which differences exceed the seed-to-seed
spread.

Parameter counts (the table prints each): the gated feed-forward layers use d_ff 341
(3 x 128 x 341 = 130,944 weights against 2 x 128 x 512 = 131,072), so they match the base
within 0.1%; grouped-query attention removes key/value weights (2 key/value heads: -8% of
the base's 0.80M; 1: -12%) and the untied output adds a 65 x 128 matrix (+1%); nothing
else changes the count by more than the biases and norm scales (under 0.5%).
"""

from configs import generation
from configs.sweeps import Sweep, Variant

STEPS = 1000  # the tiny Shakespeare recipe's length: about 80 s a row on 2 CPU cores
SEEDS = (0, 1)
GATED_D_FF = 341  # 2/3 of 512: the gated layers' three matrices hold what two did

MODERN = {"model.norm_placement": "pre", "model.norm": "rms",
          "model.positional_encoding": "rope", "model.activation": "swiglu",
          "model.d_ff": GATED_D_FF, "model.qk_norm": True, "model.biases": "none",
          "model.tie_output": False, "model.num_kv_heads": 2, "optim.z_loss": 1e-4}

ROWS = [  # name, overrides, group, description
    ("base", {}, "2017", "post-norm, layer norm, sinusoids, ReLU, FFN biases, Adam"),
    ("pre_norm", {"model.norm_placement": "pre"}, "norm", "x + f(LN(x)) (GPT-2, 2019)"),
    ("rms_norm", {"model.norm": "rms"}, "norm", "RMSNorm (Zhang & Sennrich, 2019)"),
    ("rope", {"model.positional_encoding": "rope"}, "positions",
     "rotary positions (Su et al., 2021)"),
    ("swiglu", {"model.activation": "swiglu", "model.d_ff": GATED_D_FF}, "ffn",
     "SwiGLU, d_ff 341 (Shazeer, 2020)"),
    ("geglu", {"model.activation": "geglu", "model.d_ff": GATED_D_FF}, "ffn",
     "GeGLU, d_ff 341 (Shazeer, 2020)"),
    ("relu2", {"model.activation": "relu2"}, "ffn", "ReLU^2 (So et al., 2021)"),
    ("qk_norm", {"model.qk_norm": True}, "attention", "QK-norm (Dehghani et al., 2023)"),
    ("gqa_2", {"model.num_kv_heads": 2}, "attention",
     "2 key/value heads (Ainslie et al., 2023)"),
    ("mqa", {"model.num_kv_heads": 1}, "attention", "1 key/value head (Shazeer, 2019)"),
    ("no_biases", {"model.biases": "none"}, "biases", "no biases anywhere (PaLM, 2022)"),
    ("untied_output", {"model.tie_output": False}, "output", "own output matrix"),
    ("z_loss", {"optim.z_loss": 1e-4}, "loss", "z-loss 1e-4 (PaLM, 2022)"),
    ("muon", {"optim.optimizer": "muon"}, "optimizer", "Muon (Jordan et al., 2024)"),
    ("modern", MODERN, "all",
     "pre-norm, RMSNorm, rope, SwiGLU, QK-norm, no biases, untied, 2 kv heads, z-loss"),
    ("modern_muon", {**MODERN, "optim.optimizer": "muon"}, "all", "modern, trained with Muon"),
]


def seeded(rows, seeds=SEEDS):
  """Each row once per seed: `<name>` for the first seed, `<name>_s<seed>` after it."""
  return [Variant(name if seed == seeds[0] else f"{name}_s{seed}",
                  {**overrides, "seed": seed}, group, description)
          for name, overrides, group, description in rows for seed in seeds]


def get_sweep() -> Sweep:
  c = generation.get_config("dataset=shakespeare")
  c.model.norm_placement = "post"
  c.model.positional_encoding = "sinusoidal"
  c.model.activation = "relu"
  c.train.num_train_steps = STEPS
  c.eval.eval_every_steps = STEPS // 5  # five points on the validation-loss curve
  c.train.checkpoint_every_steps = STEPS // 2
  c.train.keep_checkpoints = 1
  c.eval.best_metric = ""  # the comparison uses each row's final model
  c.eval.num_attention_images = 0
  c.eval.num_print_examples = 0
  return Sweep(c, seeded(ROWS))
