"""RoPE as an attention layer applies it: base(s), scaling, partial rotary, layout.

:class:`RotaryEmbedding` gathers what :func:`layers.rope.rope_frequencies` and
:func:`layers.rope.apply_rope` need for one layer, validates it once at construction (so a bad
gin binding fails before anything compiles) and rotates the layer's queries and keys:

* one base ``theta`` for every head, or one per query head (HARPE-style head-adaptive bases;
  with GQA the query heads of a group share their key/value head's base);
* ``scaling``: a Hugging Face ``rope_scaling`` dict (linear/PI, ntk, dynamic, yarn, longrope,
  llama3); methods that depend on the current length (dynamic NTK, LongRoPE) read it from
  the positions, as Hugging Face does: ``seq_len = max(position_ids) + 1``;
* the method's attention scaling (YaRN's temperature) multiplies cos and sin of q and k, so
  the logits of the rotated part by its square, as in the reference implementations;
* partial rotary (the first ``int(head_dim * partial_rotary_factor)`` coordinates) and the
  "half" (GPT-NeoX, Llama) or "interleaved" (GPT-J) pair layout.

Angles are float32 whatever the model's dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from layers import rope as rope_lib

# Rope types whose frequencies depend on the current sequence length.
LENGTH_DEPENDENT = ("dynamic", "longrope")


def _is_real(value) -> bool:
  return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _freeze(value):
  """A hashable copy of a gin/JSON value: dicts become sorted item tuples, lists tuples."""
  if isinstance(value, Mapping):
    return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(v) for v in value)
  return value


@dataclasses.dataclass(frozen=True)
class RotaryEmbedding:
  """The rotary embedding of one attention layer (hashable: it is static layer config).

  Build it with :meth:`create`. Attributes: ``head_dim``; ``thetas`` (one base per query
  head); ``group`` (query heads per key/value head); ``scaling`` (the frozen dict, None for
  plain RoPE); ``partial_rotary_factor``; ``layout``; ``max_position_embeddings``.
  """
  head_dim: int
  thetas: tuple[float, ...]
  group: int
  scaling: tuple | None
  partial_rotary_factor: float
  layout: str
  max_position_embeddings: int | None

  @classmethod
  def create(cls, head_dim: int, theta: float | Sequence[float], *, num_heads: int,
             num_kv_heads: int, scaling: Mapping[str, Any] | None = None,
             partial_rotary_factor: float = 1.0, layout: str = "half",
             max_position_embeddings: int | None = None, owner: str = "Attention"
             ) -> "RotaryEmbedding":
    """Validates the options (ValueErrors prefixed with ``owner``) and builds the embedding.

    ``theta``: one base, or a list of ``num_heads`` bases that is constant within each group
    of ``num_heads // num_kv_heads`` query heads (they share a key/value head).
    """
    if isinstance(theta, (list, tuple)):
      thetas = tuple(theta)
      if len(thetas) != num_heads:
        raise ValueError(f"{owner}: a per-head rope_theta needs one base per query head "
                         f"(num_heads={num_heads}), got {len(thetas)}: {list(thetas)}.")
    elif _is_real(theta):
      thetas = (theta,) * num_heads
    else:
      raise ValueError(f"{owner}: rope_theta must be a positive number, a list of one per "
                       f"query head, or None (NoPE), got {theta!r}.")
    for t in thetas:
      if not _is_real(t) or not t > 0:
        raise ValueError(f"{owner}: every rope_theta must be a positive number, got {t!r}.")
    group = num_heads // num_kv_heads
    for kv_head in range(num_kv_heads):
      shared = set(thetas[kv_head * group:(kv_head + 1) * group])
      if len(shared) > 1:
        raise ValueError(
            f"{owner}: query heads {kv_head * group}..{(kv_head + 1) * group - 1} share key/value "
            f"head {kv_head} (GQA) and so must share one rope_theta, got {sorted(shared)}.")
    if layout not in rope_lib.LAYOUTS:
      raise ValueError(f"{owner}: rope_layout must be one of {rope_lib.LAYOUTS}, got {layout!r}.")
    if scaling is not None and not isinstance(scaling, Mapping):
      raise ValueError(f"{owner}: rope_scaling must be None or a Hugging Face rope_scaling dict "
                       f"(with 'rope_type'), got {scaling!r}.")
    embedding = cls(head_dim=int(head_dim), thetas=tuple(float(t) for t in thetas),
                    group=int(group), scaling=None if scaling is None else _freeze(scaling),
                    partial_rotary_factor=float(partial_rotary_factor), layout=layout,
                    max_position_embeddings=max_position_embeddings)
    try:  # Every base once, at the original length: checks the dict and the head size.
      for t in sorted(set(embedding.thetas)):
        embedding._frequencies(t, None)
    except ValueError as error:
      raise ValueError(f"{owner}: bad rope_scaling / rope_theta / partial_rotary_factor: "
                       f"{error}") from None
    return embedding

  @property
  def rope_type(self) -> str:
    """The scaling method ("default" for plain RoPE)."""
    scaling = self.scaling_dict()
    if scaling is None:
      return "default"
    return scaling.get("rope_type", scaling.get("type", "default"))

  @property
  def rotary_dim(self) -> int:
    return int(self.head_dim * self.partial_rotary_factor)

  def scaling_dict(self) -> dict | None:
    """The scaling as the dict it was given (lists as tuples)."""
    return None if self.scaling is None else {k: v for k, v in self.scaling}

  def _frequencies(self, theta, seq_len):
    return rope_lib.rope_frequencies(
        self.head_dim, theta, scaling=self.scaling_dict(),
        partial_rotary_factor=self.partial_rotary_factor,
        max_position_embeddings=self.max_position_embeddings, seq_len=seq_len)

  def frequencies(self, seq_len=None) -> tuple[rope_lib.RopeFrequencies,
                                               rope_lib.RopeFrequencies]:
    """(query, key) frequencies at ``seq_len`` (an int, a traced scalar or None).

    Each is a ``RopeFrequencies``: inv_freq [rotary_dim // 2] when every head shares one base,
    else [heads, rotary_dim // 2] (query heads, then key/value heads).
    """
    by_theta = {t: self._frequencies(t, seq_len) for t in sorted(set(self.thetas))}
    scaling = next(iter(by_theta.values())).attention_scaling  # Independent of the base.
    if len(by_theta) == 1:
      pair = next(iter(by_theta.values()))
      return pair, pair
    q_freq = jnp.stack([by_theta[t].inv_freq for t in self.thetas])
    k_freq = q_freq[::self.group]
    return (rope_lib.RopeFrequencies(q_freq, scaling),
            rope_lib.RopeFrequencies(k_freq, scaling))

  def seq_len_of(self, position_ids: jax.Array):
    """The current length for length-dependent methods: ``max(position_ids) + 1`` (traced),
    None for the others."""
    if self.rope_type not in LENGTH_DEPENDENT:
      return None
    last = jnp.max(position_ids)
    if jnp.issubdtype(last.dtype, jnp.floating):
      last = jnp.floor(last)
    return last.astype(jnp.int32) + 1

  def rotate(self, x: jax.Array, position_ids: jax.Array, freqs: rope_lib.RopeFrequencies
             ) -> jax.Array:
    """``x`` [batch, seq, heads, head_dim] rotated at ``position_ids`` with ``freqs``."""
    return rope_lib.apply_rope(x, position_ids, freqs, layout=self.layout)

  def rotate_qk(self, q: jax.Array, k: jax.Array, position_ids: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
    """Queries [batch, seq, heads, d] and keys [batch, seq, kv_heads, d] rotated at their
    ``position_ids`` [batch or 1, seq]."""
    q_freq, k_freq = self.frequencies(self.seq_len_of(position_ids))
    return self.rotate(q, position_ids, q_freq), self.rotate(k, position_ids, k_freq)
