"""Learning-rate schedules and the optax optimizer.

Every schedule ramps up linearly over `warmup_steps` to `peak`, then:
  rsqrt     peak * sqrt(warmup / step)       -- the paper's (section 5.3)
  cosine    cosine decay to 0 at num_train_steps
  linear    linear decay to 0 at num_train_steps
  constant  stays at peak

The paper writes its schedule as d_model^-0.5 * min(step^-0.5, step * warmup^-1.5);
with peak = d_model^-0.5 * warmup^-0.5 the two are the same function (tested).
Steps count from 1 inside the formulas, so the first update does not use a zero rate.
"""

import jax
import jax.numpy as jnp
import optax

from config_checks import Fields

SCHEDULES = ("rsqrt", "cosine", "linear", "constant")
OPTIMIZERS = ("adam", "adamw", "muon", "sgd")


def learning_rate_schedule(name: str, peak: float, warmup_steps: int,
                           total_steps: int) -> optax.Schedule:
  """Returns step (0-based count of updates done) -> learning rate."""
  if name not in SCHEDULES:
    raise ValueError(f"unknown schedule {name!r}; expected one of {SCHEDULES}")
  warmup = max(warmup_steps, 1)
  decay_steps = max(total_steps - warmup_steps, 1)

  def schedule(count):
    step = jnp.asarray(count, jnp.float32) + 1.0
    ramp = jnp.minimum(step / warmup, 1.0)
    after = jnp.clip(step - warmup_steps, 0.0, decay_steps) / decay_steps
    if name == "rsqrt":
      decay = jnp.sqrt(warmup / jnp.maximum(step, warmup))
    elif name == "cosine":
      decay = 0.5 * (1.0 + jnp.cos(jnp.pi * after))
    elif name == "linear":
      decay = 1.0 - after
    else:
      decay = 1.0
    return peak * ramp * decay

  return schedule


def length_change_note(config, saved_steps, step: int) -> str:
  """One line when a run resumed at `step` with config.train.num_train_steps changed from
  `saved_steps` (its checkpoint's) and a schedule whose decay spans num_train_steps
  (cosine, linear) and the rate at `step` changes with it (raised after the decay began:
  it jumps back up, from 0 at the old end). Else ""."""
  o, total = config.optim, config.train.num_train_steps
  if (o.schedule not in ("cosine", "linear") or not isinstance(saved_steps, int)
      or saved_steps == total or step >= total):
    return ""
  then, now = (float(learning_rate_schedule(o.schedule, o.learning_rate, o.warmup_steps,
                                            length)(step)) for length in (saved_steps, total))
  if abs(now - then) <= 1e-6 * abs(o.learning_rate):
    return ""  # still warming up: the decay has not begun, the longer one just follows
  return (f"config.train.num_train_steps {'raised' if total > saved_steps else 'lowered'} "
          f"from {saved_steps} to {total} on resume: the {o.schedule} schedule decays over "
          f"num_train_steps, so the learning rate at step {step} jumps from {then:.3g} to "
          f"{now:.3g} (to extend a run, see docs/faults.md, Resume)")


def decay_mask(params):
  """True for weight matrices (decayed); False for biases, norm scales and other vectors."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


# Muon's matrices, by the name of the parameter's module: (reduction axes, output axes),
# counted from the end so that a scanned stack's leading layer axis is a batch axis (each
# layer's matrix is orthogonalised on its own, as are fused q/k/v's three).
MUON_AXES = {"query": (-3, (-2, -1)), "key": (-3, (-2, -1)), "value": (-3, (-2, -1)),
             "qkv": (-4, (-2, -1)), "kv": (-4, (-2, -1)), "out": ((-3, -2), -1),
             "wi": (-2, -1), "wi_gate": (-2, -1), "wo": (-2, -1)}


def muon_dimension_numbers(params):
  """Per parameter: Muon's dimension numbers for the hidden weight matrices (attention and
  feed-forward kernels); None (AdamW) for embeddings, position tables, output and
  classifier heads, norms and biases, as Jordan et al. (2024) prescribe."""
  def spec(path, leaf):
    names = [getattr(k, "key", str(k)) for k in path]
    if names[-1] != "kernel" or len(names) < 2 or names[-2] not in MUON_AXES:
      return None
    return optax.contrib.MuonDimensionNumbers(*MUON_AXES[names[-2]])
  return jax.tree_util.tree_map_with_path(spec, params)


def make_optimizer(config) -> optax.GradientTransformation:
  """Clipping + Adam/AdamW/Muon/SGD with the configured schedule (paper: Adam 0.9/0.98/1e-9).

  Muon (Jordan et al., 2024) updates each hidden weight matrix by the orthogonalised
  (Newton-Schulz) Nesterov momentum of its gradient, at `muon_learning_rate`; every other
  parameter takes AdamW at `learning_rate` (optax.contrib.muon). Both follow the schedule.
  `adam_eps` is not passed to it: optax.contrib.muon has one `eps` (1e-8) for its
  Newton-Schulz normalisation and its Adam part alike, and the since-2017 results were
  measured with it. SGD: heavy-ball momentum `sgd_momentum`, with `weight_decay * w` added
  to the gradient (L2, biases and norms included, after clipping).
  """
  o = config.optim
  if o.optimizer not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer {o.optimizer!r}; expected one of {OPTIMIZERS}")
  schedule = learning_rate_schedule(o.schedule, o.learning_rate, o.warmup_steps,
                                    config.train.num_train_steps)
  if o.optimizer == "muon":
    muon_schedule = learning_rate_schedule(o.schedule, o.muon_learning_rate, o.warmup_steps,
                                           config.train.num_train_steps)
    opt = optax.contrib.muon(
        muon_schedule, weight_decay=o.weight_decay, weight_decay_mask=decay_mask,
        adam_b1=o.adam_b1, adam_b2=o.adam_b2, adam_learning_rate=schedule,
        adam_weight_decay=o.weight_decay, muon_weight_dimension_numbers=muon_dimension_numbers)
  elif o.optimizer == "adamw":
    opt = optax.adamw(schedule, b1=o.adam_b1, b2=o.adam_b2, eps=o.adam_eps,
                      weight_decay=o.weight_decay, mask=decay_mask)
  elif o.optimizer == "sgd":
    opt = optax.chain(optax.add_decayed_weights(o.weight_decay),
                      optax.sgd(schedule, momentum=o.sgd_momentum or None))
  else:
    opt = optax.adam(schedule, b1=o.adam_b1, b2=o.adam_b2, eps=o.adam_eps)
  if o.max_grad_norm > 0:
    return optax.chain(optax.clip_by_global_norm(o.max_grad_norm), opt)
  return opt


def check_config(config) -> None:
  """Raises config_checks.ConfigError for the first config.optim field that cannot work
  (the dropout fields are checked with the model, which reads them)."""
  optim = Fields(config, "optim")
  optim.choice("optimizer", OPTIMIZERS)
  optim.choice("schedule", SCHEDULES)
  for field in ("label_smoothing", "adam_b1", "adam_b2", "weight_decay", "sgd_momentum"):
    optim.rate(field)
  for field in ("learning_rate", "adam_eps", "muon_learning_rate"):
    optim.positive(field)
  optim.number("z_loss", lambda v: v >= 0, "expected a number >= 0 (0 = no z-loss)")
  optim.integer("warmup_steps", 0)
  optim.number("max_grad_norm", lambda v: v >= 0, "expected a number >= 0 (0 = no clipping)")
  optim.number("sam_rho", lambda v: v >= 0, "expected a number >= 0 (0 = no SAM)")
  optim.number("adversarial_eps", lambda v: v >= 0,
               "expected a number >= 0 (0 = no adversarial training)")
  optim.number("rdrop_alpha", lambda v: v >= 0, "expected a number >= 0 (0 = no R-drop)")
  if optim["sam_rho"] > 0 and optim["adversarial_eps"] > 0:
    optim.fail("adversarial_eps", "SAM (sam_rho) and adversarial training each take a "
               "second pass of their own; set one of them to 0")
  if optim["optimizer"] == "adam" and optim["weight_decay"] > 0:
    optim.fail("weight_decay", "weight decay needs optimizer='adamw' or 'muon'")
