"""The optimizer: AdamW with linear warmup, cosine decay and global-norm gradient clipping."""

from __future__ import annotations

import gin
import optax


@gin.configurable(denylist=["total_steps"])
def learning_rate_schedule(total_steps: int, *, peak_learning_rate: float = 1e-3,
                           warmup_steps: int = 100, final_fraction: float = 0.1):
  """Linear warmup from 0 to ``peak_learning_rate``, then cosine decay to
  ``peak_learning_rate * final_fraction`` at ``total_steps``."""
  if total_steps <= 0:
    raise ValueError(f"learning_rate_schedule: total_steps must be positive, got {total_steps}.")
  warmup_steps = min(warmup_steps, total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_learning_rate, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1),
      end_value=peak_learning_rate * final_fraction)


@gin.configurable(denylist=["total_steps"])
def make_optimizer(total_steps: int, *, weight_decay: float = 0.1, b1: float = 0.9,
                   b2: float = 0.95, eps: float = 1e-8, clip_norm: float | None = 1.0):
  """AdamW (decoupled weight decay) on the schedule above, after global-norm clipping."""
  schedule = learning_rate_schedule(total_steps)
  adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  if clip_norm is None:
    return adamw
  return optax.chain(optax.clip_by_global_norm(clip_norm), adamw)
