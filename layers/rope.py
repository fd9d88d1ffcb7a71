"""Rotary position embeddings (RoPE) and the frequency-scaling family built on them.

Two steps, kept apart so that position-extension schemes (PI, NTK, YaRN, ...) only change
the first: :func:`rope_frequencies` gives the inverse frequencies of the rotated pairs (and the
factor by which the method scales cos and sin), and :func:`apply_rope` rotates each pair of a
head vector by ``position * inv_freq``.

Pair ``i`` (of ``rotary_dim // 2``) is rotated by the angle ``position * inv_freq[i]``. Which
two coordinates form pair ``i`` is the layout, within the first ``rotary_dim`` coordinates of
the head (the rest pass through unrotated: partial rotary, as GPT-NeoX, GPT-J, Phi):

* ``"half"``: coordinates ``i`` and ``i + rotary_dim // 2`` (rotate-half; GPT-NeoX, Llama);
* ``"interleaved"``: coordinates ``2 * i`` and ``2 * i + 1`` (GPT-J).

Frequency scaling follows the Hugging Face ``rope_scaling`` / ``rope_parameters`` convention
(``transformers.modeling_rope_utils``), so a converted checkpoint's dict carries over as it
is. With ``d = rotary_dim`` and ``e_i = 2 i / d`` (i in [0, d / 2)), plain RoPE is
``inv_freq_i = theta ** -e_i`` and:

* ``"linear"`` (Position Interpolation, Chen et al. 2023): ``inv_freq_i / factor``.
* ``"ntk"`` (static NTK-aware, bloc97): base ``theta * factor ** (d / (d - 2))``.
* ``"dynamic"`` (dynamic NTK, emozilla): with ``L = max(seq_len, max_position_embeddings)``,
  base ``theta * (factor * L / max_position_embeddings - (factor - 1)) ** (d / (d - 2))``;
  plain RoPE up to ``max_position_embeddings``.
* ``"yarn"`` (Peng et al. 2023): NTK-by-parts blend of ``inv_freq_i`` (extrapolation) and
  ``inv_freq_i / factor`` (interpolation) with a linear ramp over the pairs between the
  correction dimensions of ``beta_fast`` and ``beta_slow`` rotations in
  ``original_max_position_embeddings`` tokens; cos and sin scaled by ``0.1 ln(factor) + 1``
  (or DeepSeek's ``mscale`` / ``mscale_all_dim`` ratio, or ``attention_factor``).
* ``"longrope"`` (Ding et al. 2024; Phi-3): ``inv_freq_i / long_factor[i]`` when
  ``seq_len > original_max_position_embeddings``, else ``/ short_factor[i]``; cos and sin
  scaled by ``sqrt(1 + ln(factor) / ln(original_max_position_embeddings))``.
* ``"llama3"`` (Llama 3.1): wavelengths ``2 pi / inv_freq_i`` shorter than
  ``original / high_freq_factor`` kept, longer than ``original / low_freq_factor`` divided by
  ``factor``, linear interpolation in ``original / wavelength`` in between.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

LAYOUTS = ("half", "interleaved")
ROPE_TYPES = ("default", "linear", "ntk", "dynamic", "yarn", "longrope", "llama3")

# The keys of ``scaling`` each rope_type reads, besides "rope_type" (alias "type") and the
# "rope_theta" / "partial_rotary_factor" that Hugging Face's ``rope_parameters`` also carry.
_KEYS = {
    "default": (),
    "linear": ("factor",),
    "ntk": ("factor",),
    "dynamic": ("factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "attention_factor", "truncate"),
    "longrope": ("short_factor", "long_factor", "factor", "original_max_position_embeddings",
                 "attention_factor"),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor",
               "high_freq_factor"),
}
_COMMON_KEYS = ("rope_type", "type", "rope_theta", "partial_rotary_factor")


class RopeFrequencies(NamedTuple):
  """What :func:`rope_frequencies` returns; unpacks as ``inv_freq, attention_scaling``.

  Attributes:
    inv_freq: float32 [rotary_dim // 2] inverse frequencies.
    attention_scaling: factor by which the method scales cos and sin (so the logits of the
      rotated part by its square); 1.0 where the method has none.
  """
  inv_freq: jax.Array
  attention_scaling: float


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value) -> bool:
  return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def rope_frequencies(head_dim: int, theta: float = 10000.0, *,
                     scaling: Mapping[str, Any] | None = None,
                     partial_rotary_factor: float = 1.0,
                     max_position_embeddings: int | None = None,
                     seq_len: int | jax.Array | None = None) -> RopeFrequencies:
  """Inverse frequencies of the rotated pairs and the method's cos/sin scaling.

  Numbers are those of ``transformers.modeling_rope_utils`` (current ``rope_parameters``
  semantics), computed in float64 on the host and rounded once to float32. ``theta`` may be
  passed positionally (older call sites: ``rope_frequencies(head_dim, theta)``).

  Args:
    head_dim: size of each attention head.
    theta: RoPE base.
    scaling: None (plain RoPE) or a Hugging Face ``rope_scaling`` dict: ``"rope_type"`` (or
      ``"type"``) in :data:`ROPE_TYPES` and the keys that type reads (see the module
      docstring): ``factor``, ``original_max_position_embeddings``, ``beta_fast`` (32),
      ``beta_slow`` (1), ``mscale``, ``mscale_all_dim``, ``attention_factor``, ``truncate``
      (True), ``short_factor``, ``long_factor``, ``low_freq_factor``, ``high_freq_factor``.
      ``rope_theta`` / ``partial_rotary_factor`` entries (``rope_parameters``) must agree
      with the arguments.
    partial_rotary_factor: rotate the first ``rotary_dim = int(head_dim *
      partial_rotary_factor)`` coordinates of each head only.
    max_position_embeddings: Hugging Face's ``config.max_position_embeddings``: the length
      dynamic NTK starts scaling beyond (default: the dict's
      ``original_max_position_embeddings``); for yarn and longrope the extended length, whose
      ratio to ``original_max_position_embeddings`` is the factor when ``factor`` is absent,
      and the original length when that is absent; llama3's original length when absent.
    seq_len: the current sequence length (Hugging Face: ``max(position_ids) + 1``), read by
      "dynamic" and "longrope". A Python int, or an integer scalar array (e.g. traced under
      jit; the seq_len-dependent part is then computed in float32). None: the frequencies at
      the original length (plain RoPE for "dynamic", ``short_factor`` for "longrope").
      Stateless: Hugging Face's dynamic module caches the frequencies of the longest length
      seen until the length drops back to the original; here each call gets its seq_len's.

  Returns:
    ``RopeFrequencies(inv_freq, attention_scaling)``: float32 [rotary_dim // 2] and a
    Python float.

  Raises:
    ValueError: naming the argument or key and what it expects.
  """
  if not _is_int(head_dim) or head_dim <= 0:
    raise ValueError(f"rope_frequencies: head_dim must be a positive int, got {head_dim!r}.")
  if not _is_real(theta) or not theta > 0:
    raise ValueError(f"rope_frequencies: theta must be a positive number, got {theta!r}.")
  if not _is_real(partial_rotary_factor) or not 0 < partial_rotary_factor <= 1:
    raise ValueError("rope_frequencies: partial_rotary_factor must be in (0, 1], got "
                     f"{partial_rotary_factor!r}.")
  rotary_dim = int(head_dim * partial_rotary_factor)
  if rotary_dim <= 0 or rotary_dim % 2:
    raise ValueError(
        "rope_frequencies: rotary_dim = int(head_dim * partial_rotary_factor) must be positive "
        f"and even, got {rotary_dim} (head_dim {head_dim}, partial_rotary_factor "
        f"{partial_rotary_factor}).")
  if max_position_embeddings is not None and (
      not _is_int(max_position_embeddings) or max_position_embeddings <= 0):
    raise ValueError("rope_frequencies: max_position_embeddings must be None or a positive "
                     f"int, got {max_position_embeddings!r}.")
  seq_len = _check_seq_len(seq_len)

  rope_type, params = _normalize(scaling, theta, partial_rotary_factor)
  scaled = _Scaled(rope_type, params, float(theta), rotary_dim, max_position_embeddings)
  inv_freq, attention_scaling = getattr(scaled, rope_type)(seq_len)
  return RopeFrequencies(jnp.asarray(inv_freq, dtype=jnp.float32), float(attention_scaling))


def _check_seq_len(seq_len):
  if seq_len is None:
    return None
  if _is_int(seq_len):
    if seq_len < 0:
      raise ValueError(f"rope_frequencies: seq_len must be non-negative, got {seq_len}.")
    return int(seq_len)
  if isinstance(seq_len, (jax.Array, np.ndarray)) and seq_len.ndim == 0 and jnp.issubdtype(
      seq_len.dtype, jnp.integer):
    return seq_len
  raise ValueError("rope_frequencies: seq_len must be None, an int or an integer scalar array, "
                   f"got {seq_len!r}.")


def _normalize(scaling, theta, partial_rotary_factor) -> tuple[str, dict]:
  """Checks the dict's type and keys; returns (rope_type, params without the common keys)."""
  if scaling is None:
    return "default", {}
  if not isinstance(scaling, Mapping):
    raise ValueError("rope_frequencies: scaling must be None or a dict with a 'rope_type' key "
                     f"(Hugging Face rope_scaling), got {type(scaling).__name__}: {scaling!r}.")
  params = dict(scaling)
  if "rope_type" in params and "type" in params and params["rope_type"] != params["type"]:
    raise ValueError(
        f"rope_frequencies: scaling['rope_type'] = {params['rope_type']!r} and its alias "
        f"scaling['type'] = {params['type']!r} disagree.")
  rope_type = params.pop("rope_type", params.pop("type", None))
  params.pop("type", None)
  if rope_type not in ROPE_TYPES:
    raise ValueError(f"rope_frequencies: scaling['rope_type'] must be one of {ROPE_TYPES}, got "
                     f"{rope_type!r}.")
  for key, value in (("rope_theta", theta), ("partial_rotary_factor", partial_rotary_factor)):
    if key in params:
      given = params.pop(key)
      if not _is_real(given) or not math.isclose(given, value, rel_tol=1e-12):
        argument = key.replace("rope_", "")
        raise ValueError(
            f"rope_frequencies: scaling[{key!r}] = {given!r} disagrees with the argument "
            f"{argument} = {value!r}; pass the same value (or drop the key).")
  unknown = sorted(set(params) - set(_KEYS[rope_type]))
  if unknown:
    raise ValueError(
        f"rope_frequencies: scaling key(s) {unknown} are not read by rope_type {rope_type!r}, "
        f"which takes {sorted(_KEYS[rope_type])} (besides 'rope_type').")
  return rope_type, params


class _Scaled:
  """The per-type computations; each method takes seq_len and returns (inv_freq, scaling)."""

  def __init__(self, rope_type, params, theta, rotary_dim, max_position_embeddings):
    self.rope_type, self.params, self.theta, self.dim = rope_type, params, theta, rotary_dim
    self.max_position_embeddings = max_position_embeddings
    self.exponents = np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim
    self.plain = theta ** -self.exponents

  # Reading and checking the dict's values.

  def _error(self, key, expected, value):
    return ValueError(f"rope_frequencies: scaling[{key!r}] for rope_type {self.rope_type!r} "
                      f"must be {expected}, got {value!r}.")

  def _number(self, key, *, required=False, default=None, positive=True):
    value = self.params.get(key)
    if value is None:
      if required:
        raise ValueError(f"rope_frequencies: rope_type {self.rope_type!r} requires "
                         f"scaling[{key!r}] (a positive number), which is missing.")
      return default
    if not _is_real(value) or not math.isfinite(value) or (positive and value <= 0):
      raise self._error(key, "a positive number" if positive else "a finite number", value)
    return float(value)

  def _original_length(self, *, fallback):
    """original_max_position_embeddings from the dict, else max_position_embeddings."""
    original = self.params.get("original_max_position_embeddings")
    if original is not None:
      if not _is_real(original) or not original > 0:
        raise self._error("original_max_position_embeddings", "a positive int", original)
      return float(original)
    if fallback and self.max_position_embeddings is not None:
      return float(self.max_position_embeddings)
    raise ValueError(
        f"rope_frequencies: rope_type {self.rope_type!r} requires "
        "scaling['original_max_position_embeddings'] (the pretraining length) or the "
        "max_position_embeddings argument; got neither.")

  def _ntk_exponent(self):
    if self.dim <= 2:
      raise ValueError(f"rope_frequencies: rope_type {self.rope_type!r} needs rotary_dim > 2 "
                       f"(its base exponent is d / (d - 2)), got rotary_dim {self.dim}.")
    return self.dim / (self.dim - 2)

  # The methods.

  def default(self, seq_len):
    del seq_len
    return self.plain, 1.0

  def linear(self, seq_len):
    del seq_len
    return self.plain / self._number("factor", required=True), 1.0

  def ntk(self, seq_len):
    del seq_len
    factor = self._number("factor", required=True)
    base = self.theta * factor ** self._ntk_exponent()
    return base ** -self.exponents, 1.0

  def dynamic(self, seq_len):
    factor = self._number("factor", required=True)
    power = self._ntk_exponent()
    if self.max_position_embeddings is not None:
      max_len = float(self.max_position_embeddings)
    else:
      max_len = self._original_length(fallback=False)
    if seq_len is None:
      return self.plain, 1.0
    if isinstance(seq_len, int):
      length = max(float(seq_len), max_len)
      base = self.theta * (factor * length / max_len - (factor - 1.0)) ** power
      return base ** -self.exponents, 1.0
    # Traced seq_len: plain * ratio ** (-e_i * d / (d - 2)), only the ratio part in float32.
    length = jnp.maximum(seq_len.astype(jnp.float32), jnp.float32(max_len))
    ratio = factor * length / jnp.float32(max_len) - jnp.float32(factor - 1.0)
    exponents = jnp.asarray(-self.exponents * power, jnp.float32)
    return jnp.asarray(self.plain, jnp.float32) * jnp.exp(exponents * jnp.log(ratio)), 1.0

  def yarn(self, seq_len):
    del seq_len
    factor = self._number("factor")
    original = self._original_length(fallback=True)
    if factor is None:
      if self.max_position_embeddings is None or "original_max_position_embeddings" not in (
          self.params):
        raise ValueError(
            "rope_frequencies: rope_type 'yarn' requires scaling['factor'] (a positive number), "
            "or max_position_embeddings with scaling['original_max_position_embeddings'] to "
            "derive it as their ratio; got neither.")
      factor = self.max_position_embeddings / original
    attention_factor = self._number("attention_factor")
    if attention_factor is None:
      mscale, mscale_all_dim = (self._number(k, positive=False)
                                for k in ("mscale", "mscale_all_dim"))
      if mscale and mscale_all_dim:
        attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
      else:
        attention_factor = _yarn_mscale(factor)
    beta_fast = self._number("beta_fast", default=32.0)
    beta_slow = self._number("beta_slow", default=1.0)
    if beta_fast <= beta_slow:
      raise ValueError(
          "rope_frequencies: rope_type 'yarn' needs scaling['beta_fast'] > "
          f"scaling['beta_slow'] (defaults 32 and 1), got {beta_fast} and {beta_slow}.")
    if self.theta <= 1:
      raise ValueError(f"rope_frequencies: rope_type 'yarn' needs theta > 1 (its correction "
                       f"dimensions divide by ln theta), got {self.theta}.")
    truncate = self.params.get("truncate", True)
    if not isinstance(truncate, (bool, np.bool_)):
      raise self._error("truncate", "a bool", truncate)

    # The pair index at which a wavelength makes `rotations` turns in `original` tokens.
    def correction_dim(rotations):
      return self.dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(self.theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
      low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, self.dim - 1)
    if low == high:
      high += 0.001
    ramp = np.clip((np.arange(self.dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    # ramp 0: extrapolate (plain frequencies, fast pairs); ramp 1: interpolate (divide).
    inv_freq = self.plain / factor * ramp + self.plain * (1.0 - ramp)
    return inv_freq, attention_factor

  def longrope(self, seq_len):
    original = self._original_length(fallback=True)
    factors = {}
    for key in ("short_factor", "long_factor"):
      value = self.params.get(key)
      if value is None:
        raise ValueError(
            f"rope_frequencies: rope_type 'longrope' requires scaling[{key!r}] (a list of "
            f"rotary_dim // 2 = {self.dim // 2} positive numbers), which is missing.")
      try:
        array = np.asarray(value, dtype=np.float64)
      except (TypeError, ValueError):
        array = None
      if (array is None or array.shape != (self.dim // 2,) or not np.all(np.isfinite(array))
          or not np.all(array > 0) or isinstance(value, (str, bytes))):
        raise self._error(key, f"a list of rotary_dim // 2 = {self.dim // 2} positive numbers",
                          value)
      factors[key] = array
    attention_factor = self._number("attention_factor")
    factor = self._number("factor")
    if attention_factor is None:
      if factor is None:
        if self.max_position_embeddings is None:
          raise ValueError(
              "rope_frequencies: rope_type 'longrope' requires scaling['factor'] or "
              "scaling['attention_factor'], or max_position_embeddings (the extended length, "
              "over original_max_position_embeddings gives the factor); got none.")
        factor = self.max_position_embeddings / original
      if factor > 1.0 and original <= 1:
        raise self._error("original_max_position_embeddings", "greater than 1", original)
      attention_factor = (1.0 if factor <= 1.0 else
                          math.sqrt(1.0 + math.log(factor) / math.log(original)))
    short = self.plain / factors["short_factor"]
    long = self.plain / factors["long_factor"]
    if seq_len is None or isinstance(seq_len, int):
      return (long if seq_len is not None and seq_len > original else short), attention_factor
    return jnp.where(seq_len > original, jnp.asarray(long, jnp.float32),
                     jnp.asarray(short, jnp.float32)), attention_factor

  def llama3(self, seq_len):
    del seq_len
    factor = self._number("factor", required=True)
    low_freq_factor = self._number("low_freq_factor", required=True)
    high_freq_factor = self._number("high_freq_factor", required=True)
    if high_freq_factor <= low_freq_factor:
      raise ValueError(
          "rope_frequencies: rope_type 'llama3' needs scaling['high_freq_factor'] > "
          f"scaling['low_freq_factor'], got {high_freq_factor} and {low_freq_factor}.")
    original = self._original_length(fallback=True)
    wavelength = 2 * math.pi / self.plain
    # Fraction kept at the plain frequency: 1 for short wavelengths, 0 for long ones.
    smooth = (original / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1.0 - smooth) * self.plain / factor + smooth * self.plain
    inv_freq = np.where(wavelength > original / low_freq_factor, self.plain / factor, smoothed)
    inv_freq = np.where(wavelength < original / high_freq_factor, self.plain, inv_freq)
    return inv_freq, 1.0


def _yarn_mscale(scale, mscale=1.0):
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def apply_rope(x: jax.Array, position_ids: jax.Array, inv_freq: jax.Array | RopeFrequencies, *,
               layout: str = "half", attention_scaling: float | jax.Array | None = None
               ) -> jax.Array:
  """Rotates the head vectors of ``x`` by their positions.

  Args:
    x: [batch, seq, heads, head_dim], any float dtype.
    position_ids: [batch, seq] (or broadcastable to it) positions: integers (any, e.g.
      offsets in a cache or positions restarting at each packed segment), or floats for
      fractional positions (E²-LLM's interpolated ``i / g + delta``).
    inv_freq: [rotary_dim // 2] inverse frequencies shared by all heads, or
      [heads, rotary_dim // 2] one row per head (per-head bases, HARPE); rotary_dim <=
      head_dim: the first rotary_dim coordinates are rotated, the rest pass through. Or the
      :class:`RopeFrequencies` pair from :func:`rope_frequencies`, whose attention scaling is
      then applied.
    layout: "half" or "interleaved" (see the module docstring), within the rotated part.
    attention_scaling: multiplies cos and sin (Hugging Face's ``attention_scaling``; q and k
      both rotated this way scale the logits of the rotated part by its square, which is
      YaRN's temperature). Default 1.0, or the pair's when ``inv_freq`` is one; not both.

  Returns:
    [batch, seq, heads, head_dim] in x's dtype. Angles and the rotation are computed in
    float32.
  """
  if isinstance(inv_freq, RopeFrequencies):
    if attention_scaling is not None:
      raise ValueError("apply_rope: attention_scaling given twice: pass a bare inv_freq array "
                       "with attention_scaling, or the RopeFrequencies pair alone.")
    inv_freq, attention_scaling = inv_freq
  if attention_scaling is None:
    attention_scaling = 1.0
  inv_freq = jnp.asarray(inv_freq)
  _check_inputs(x, position_ids, inv_freq, layout, attention_scaling)
  rotary_dim = 2 * inv_freq.shape[-1]
  positions = position_ids.astype(jnp.float32)[..., None, None]  # [batch, seq, 1, 1]
  angles = positions * inv_freq.astype(jnp.float32)  # [batch, seq, 1 or heads, pairs]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  if not (_is_real(attention_scaling) and attention_scaling == 1):
    scale = jnp.asarray(attention_scaling, jnp.float32)
    cos, sin = cos * scale, sin * scale
  x32 = x.astype(jnp.float32)
  rot = x32[..., :rotary_dim]
  if layout == "half":
    x1, x2 = jnp.split(rot, 2, axis=-1)
    rot = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  else:
    x1, x2 = rot[..., 0::2], rot[..., 1::2]
    rot = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(rot.shape)
  out = rot if rotary_dim == x.shape[-1] else jnp.concatenate(
      [rot, x32[..., rotary_dim:]], axis=-1)
  return out.astype(x.dtype)


def _check_inputs(x, position_ids, inv_freq, layout, attention_scaling):
  if layout not in LAYOUTS:
    raise ValueError(f"apply_rope: layout must be one of {LAYOUTS}, got {layout!r}.")
  if x.ndim != 4:
    raise ValueError(
        f"apply_rope: x must be [batch, seq, heads, head_dim], got shape {x.shape}."
    )
  heads, head_dim = x.shape[2], x.shape[3]
  if (inv_freq.ndim not in (1, 2) or not 1 <= inv_freq.shape[-1] <= head_dim // 2
      or (inv_freq.ndim == 2 and inv_freq.shape[0] != heads)):
    raise ValueError(
        f"apply_rope: inv_freq must have shape (rotary_dim // 2,), or (heads, rotary_dim // 2) "
        f"= ({heads}, ...) for per-head frequencies, with 2 <= rotary_dim <= head_dim = "
        f"{head_dim}, i.e. 1 to {head_dim // 2} pairs; got shape {inv_freq.shape}."
    )
  if _is_real(attention_scaling) and not attention_scaling > 0:
    raise ValueError(
        f"apply_rope: attention_scaling must be positive, got {attention_scaling!r}.")
  if not (jnp.issubdtype(position_ids.dtype, jnp.integer)
          or jnp.issubdtype(position_ids.dtype, jnp.floating)):
    raise ValueError(
        f"apply_rope: position_ids must be integers (or floats for fractional positions), got "
        f"dtype {position_ids.dtype}."
    )
  try:
    ok = position_ids.ndim == 2 and (
        jnp.broadcast_shapes(position_ids.shape, x.shape[:2]) == x.shape[:2])
  except ValueError:
    ok = False
  if not ok:
    raise ValueError(
        f"apply_rope: position_ids must be [batch, seq] = {x.shape[:2]} (or broadcast to "
        f"it), got shape {position_ids.shape}."
    )
