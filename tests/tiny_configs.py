"""Tiny run configs shared by the end-to-end tests (seconds per run on 2 CPU cores)."""

from configs import default, presets


def tiny_config(task: str = "translation", **overrides):
  """A tiny model on short digit strings, with every loop interval small; `overrides` are
  grouped: `tiny_config(model=dict(d_model=16), train=dict(num_train_steps=5))`."""
  c = default.get_config(f"task={task}")
  presets.update_groups(c, dict(
      model=dict(d_model=32, d_ff=64, num_heads=2, num_encoder_layers=1, num_decoder_layers=1),
      data=dict(max_digits=5, max_input_length=8,
                max_target_length=12 if task == "generation" else 8, num_eval_examples=64),
      optim=dict(warmup_steps=5),
      train=dict(batch_size=16, num_train_steps=20, log_every_steps=5,
                 checkpoint_every_steps=10),
      eval=dict(eval_batch_size=32, eval_every_steps=10, num_print_examples=2)))
  presets.update_groups(c, overrides)
  return c
