"""Float64 NumPy versions of the layers' math, written independently of ``layers/``."""

from __future__ import annotations

import numpy as np


def f64(x):
  return np.asarray(x).astype(np.float64)


def rms_norm(x, scale, eps=1e-6):
  """x [..., d], scale [d]."""
  x = f64(x)
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * f64(scale)


def inv_freq(head_dim, theta=10000.0):
  return 1.0 / theta ** (np.arange(head_dim // 2, dtype=np.float64) * 2.0 / head_dim)


def rope_pairs(head_dim, layout):
  """(first, second) coordinate of each rotated pair, in pair order."""
  half = head_dim // 2
  if layout == "half":
    return np.arange(half), np.arange(half) + half
  return np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)


def rope(x, position_ids, head_dim_freqs, layout="half"):
  """x [b, t, h, d], position_ids [b, t]; rotates pair i by position * freq[i]."""
  x = f64(x)
  angles = f64(position_ids)[:, :, None, None] * f64(head_dim_freqs)  # [b, t, 1, d/2]
  cos, sin = np.cos(angles), np.sin(angles)
  first, second = rope_pairs(x.shape[-1], layout)
  a, b = x[..., first], x[..., second]
  out = np.empty_like(x)
  out[..., first] = a * cos - b * sin
  out[..., second] = b * cos + a * sin
  return out


def silu(x):
  return x / (1.0 + np.exp(-x))


def gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def masked_attention(q, k, v, visible, scale=None):
  """Softmax attention with an explicit mask, float64.

  q [b, tq, h, d]; k, v [b, tk, hk, d] (query head i reads kv head i // (h // hk));
  visible bool [h, tq, tk]. A query that sees nothing gets zeros.
  """
  q, k, v = f64(q), f64(k), f64(v)
  h, hk = q.shape[2], k.shape[2]
  group = h // hk
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
  logits = np.where(visible[None], logits, -np.inf)
  row_max = np.max(logits, axis=-1, keepdims=True)
  row_max = np.where(np.isfinite(row_max), row_max, 0.0)
  weights = np.where(visible[None], np.exp(logits - row_max), 0.0)
  denom = weights.sum(-1, keepdims=True)
  probs = weights / np.where(denom == 0, 1.0, denom)
  return np.einsum("bhqk,bkhd->bqhd", probs, v)
