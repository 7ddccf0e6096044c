"""Losses and metrics as token-weighted *sums*.

Every function returns sums and a `weight` (the number of real tokens or examples). The
train step adds them across micro-batches and devices and divides once, so a batch's loss
is normalised by the global token count, never a mean of per-device means.
"""

from typing import Dict

import jax
import jax.numpy as jnp

Array = jax.Array


def cross_entropy_sums(logits: Array, targets: Array, weights: Array,
                       label_smoothing: float = 0.0, z_loss: float = 0.0) -> Dict[str, Array]:
  """Label-smoothed cross-entropy (section 5.4), summed over weighted positions.

  Args:
    logits: `[..., vocab]` (computed in float32 here whatever their dtype).
    targets: `[...]` int class ids.
    weights: `[...]` float, 0 for padding.
    label_smoothing: epsilon_ls; the target distribution puts 1 - eps on the true class
      and eps / (vocab - 1) on each other class.
    z_loss: adds z_loss * (log Z)^2 per token to `loss`, Z the softmax normaliser
      sum_j exp(z_j) (PaLM, Chowdhery et al. 2022): it pulls log Z towards 0 so the logits
      cannot drift to large values, which in 16-bit arithmetic makes softmax lose precision.

  Returns:
    dict of scalars: `loss` (smoothed cross-entropy minus the entropy of the smoothed
    target, so a perfect model scores 0, plus the z-loss term), `nll` (unsmoothed negative
    log-likelihood, for perplexity), `correct` (argmax hits), `weight`, and with z_loss
    `log_z_squared` (the sum of (log Z)^2, unscaled).
  """
  # Written with logsumexp and a fused one-hot select rather than log_softmax and a gather:
  # no [tokens, vocab] log-probability array is materialised, and the backward pass is
  # elementwise instead of a scatter (1.45 s -> 0.90 s at 2048 tokens x 32k vocab on CPU).
  #   -sum_j q_j log p_j = lse - conf * z_t - low * (sum_j z_j - z_t)   (sum_j q_j = 1)
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  lse = jax.nn.logsumexp(logits, axis=-1)
  is_target = targets[..., None] == jnp.arange(vocab, dtype=targets.dtype)
  target_logit = jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1)
  nll = lse - target_logit
  if label_smoothing > 0.0:
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab - 1)
    # Entropy of the smoothed target: the lowest loss reachable.
    floor = -(confidence * jnp.log(confidence) + (vocab - 1) * low * jnp.log(low + 1e-20))
    smoothed = lse - confidence * target_logit - low * (jnp.sum(logits, axis=-1) - target_logit)
    loss = smoothed - floor
  else:
    loss = nll
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  sums = {"nll": jnp.sum(nll * weights), "correct": jnp.sum(correct * weights),
          "weight": jnp.sum(weights)}
  if z_loss > 0.0:
    sums["log_z_squared"] = jnp.sum(jnp.square(lse) * weights)
    loss = loss + z_loss * jnp.square(lse)
  return {"loss": jnp.sum(loss * weights), **sums}


def symmetric_kl_sum(logits_a: Array, logits_b: Array, weights: Array) -> Array:
  """sum over weighted positions of (KL(p_a || p_b) + KL(p_b || p_a)) / 2, p = softmax of
  `[..., vocab]` logits (float32 here); R-drop's consistency term (Liang et al., 2021).

  Per position, KL(p_a||p_b) + KL(p_b||p_a) = sum_j (p_a,j - p_b,j)(log p_a,j - log p_b,j):
  one pass over the vocabulary for both directions.
  """
  log_a = jax.nn.log_softmax(logits_a.astype(jnp.float32), axis=-1)
  log_b = jax.nn.log_softmax(logits_b.astype(jnp.float32), axis=-1)
  both = jnp.sum((jnp.exp(log_a) - jnp.exp(log_b)) * (log_a - log_b), axis=-1)
  return jnp.sum(0.5 * both * weights)


def rdrop_sums(sums_a: Dict[str, Array], sums_b: Dict[str, Array], kl_sum: Array,
               alpha: float) -> Dict[str, Array]:
  """R-drop's training sums from two dropout passes over the same batch: each metric the
  mean of the two passes' (`weight` is the same in both), and `loss` the mean of their
  losses plus alpha / 2 times `kl_sum` (`symmetric_kl_sum`), reported as `rdrop_kl`.

  Liang et al. minimise NLL_a + NLL_b + alpha * KL_sym; this is half of it, so the
  gradient's scale, and the learning rate that suits it, stay those of one pass.
  """
  out = {k: (sums_a[k] + sums_b[k]) / 2 for k in sums_a if k != "weight"}
  out["loss"] = out["loss"] + 0.5 * alpha * kl_sum
  return {**out, "weight": sums_a["weight"], "rdrop_kl": kl_sum}
