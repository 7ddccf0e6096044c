"""Tiny run configs shared by the end-to-end tests (seconds per run on 2 CPU cores)."""

from configs import default


def tiny_config(task: str = "translation", **overrides):
  """A tiny model on short digit strings, with every loop interval small."""
  c = default.get_config(f"task={task}")
  c.update(dict(
      d_model=32, d_ff=64, num_heads=2, num_encoder_layers=1, num_decoder_layers=1,
      max_digits=5, max_input_length=8, max_target_length=12 if task == "generation" else 8,
      batch_size=16, eval_batch_size=32, num_eval_examples=64, num_train_steps=20,
      warmup_steps=5, log_every_steps=5, eval_every_steps=10, checkpoint_every_steps=10,
      num_print_examples=2))
  c.update(overrides)
  return c
