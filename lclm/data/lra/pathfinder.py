"""Pathfinder (Long Range Arena): are the two dots of an image joined by one dashed curve?

A generator in the spirit of Linsley et al. (2018), drawn with numpy at LRA's small resolution
(32x32; LRA's Pathfinder-32 images are 1024 pixels). An image holds ``2 + num_distractors``
dashed curves and two dots (3x3 squares) on black; dots are white (1.0), curves
``curve_intensity`` (default 0.75) so that the dots stand out wherever a curve runs:

* label 1: one curve carries a dot at each end (ends at least ``separation`` apart); another
  curve and the distractors carry none;
* label 0: two curves carry one dot each (at one end); the distractors carry none.

So both classes show the same number of curves and dots. The label is drawn first (balanced),
then the image. A curve is a walk of ``path_length`` pixels, each pixel 8-adjacent to the one
before: a heading that turns by a uniform angle in ``[-max_turn, max_turn]`` every half-pixel
step, reflected at the image border. It is drawn dashed: ``dash_length`` pixels on,
``gap_length`` off. Distinct curves (with their dots and their gaps) keep at least
``separation`` pixels apart (Chebyshev distance); a curve that cannot be placed in
``max_tries`` tries is left out if it is a distractor, and the image is redrawn if it is one of
the two main curves. This makes the label a property of the image alone: dilating the bright
pixels by ``ceil(gap_length / 2)`` joins every curve (with its dots) into one 8-connected piece
and keeps distinct curves apart (``separation >= 2 * ceil(gap_length / 2) + 2`` is required).

Pixel intensities are quantised to ``num_levels`` levels; level ``k`` is the token
``FIRST_FREE_ID + k`` and class ``c`` the token ``label_base + c`` with ``label_base =
FIRST_FREE_ID + num_levels``. The sequence (``lclm.data.lra.loaders``' layout) is
``seq_len + 1`` tokens

  PAD ... PAD  BOS  pixel_1 ... pixel_{resolution**2}  ANSWER  label

(pixels row by row; no PAD at the default ``seq_len = resolution**2 + 2``), split into
``inputs = s[:-1]``, ``targets = s[1:]`` (int32 [seq_len]) with ``loss_mask`` (uint8 [seq_len])
1 only at the last position. Feature: ``label`` int32.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from lclm.data import token_layout
from lclm.data.lra import loaders

# Scalar features of every example (name -> dtype).
PATHFINDER_FEATURES = {"label": np.int32}

_MAX_IMAGE_TRIES = 100
_STEP = 0.5  # Walk step in pixels: consecutive rounded positions are then 8-adjacent.


@dataclasses.dataclass(frozen=True)
class PathfinderConfig:
  """Shape of a Pathfinder task.

  Attributes:
    resolution: the image is ``resolution x resolution`` pixels, >= 8.
    num_distractors: curves without dots drawn besides the two main ones (fewer when they do
      not fit), >= 0.
    path_length: pixels of every curve, >= 2.
    dash_length, gap_length: pixels on / off along a curve; dash_length >= 1, gap_length >= 0
      (0: solid curves).
    max_turn: largest turn of the heading per half-pixel step, in radians, in [0, pi].
    separation: least Chebyshev distance between pixels of distinct curves (dots included);
      >= ``2 * ceil(gap_length / 2) + 2``.
    num_levels: intensity levels, 2..256 (token ids ``FIRST_FREE_ID + level``).
    curve_intensity: brightness of the curves in (0, 1]; the dots are 1.
    max_tries: random curves tried for each curve before giving up on it.
    seq_len: length of ``inputs`` / ``targets``; None (default) is ``resolution**2 + 2``, the
      exact fit; a larger value left-pads.
  """
  resolution: int = 32
  num_distractors: int = 2
  path_length: int = 24
  dash_length: int = 3
  gap_length: int = 1
  max_turn: float = 0.25
  separation: int = 4
  num_levels: int = 256
  curve_intensity: float = 0.75
  max_tries: int = 20
  seq_len: int | None = None

  def __post_init__(self):
    if self.resolution < 8:
      raise ValueError(f"PathfinderConfig: resolution must be >= 8; got {self.resolution}.")
    if self.num_distractors < 0:
      raise ValueError(f"PathfinderConfig: num_distractors must be >= 0; got "
                       f"{self.num_distractors}.")
    if not 2 <= self.path_length <= self.resolution ** 2 // 4:
      raise ValueError(f"PathfinderConfig: path_length must be in [2, resolution**2 // 4 = "
                       f"{self.resolution ** 2 // 4}]; got {self.path_length}.")
    if self.dash_length < 1 or self.gap_length < 0:
      raise ValueError(f"PathfinderConfig: need dash_length >= 1 and gap_length >= 0; got "
                       f"dash_length={self.dash_length}, gap_length={self.gap_length}.")
    if not 0.0 <= self.max_turn <= math.pi:
      raise ValueError(f"PathfinderConfig: max_turn must be in [0, pi]; got {self.max_turn}.")
    if self.separation < self.min_separation:
      raise ValueError(f"PathfinderConfig: separation={self.separation} lets a dilation that "
                       f"bridges gaps of {self.gap_length} pixels also join distinct curves; use "
                       f"separation >= {self.min_separation}.")
    if not 2 <= self.num_levels <= 256:
      raise ValueError(f"PathfinderConfig: num_levels must be in [2, 256]; got "
                       f"{self.num_levels}.")
    if not 0.0 < self.curve_intensity <= 1.0:
      raise ValueError(f"PathfinderConfig: curve_intensity must be in (0, 1]; got "
                       f"{self.curve_intensity}.")
    if self.max_tries < 1:
      raise ValueError(f"PathfinderConfig: max_tries must be >= 1; got {self.max_tries}.")
    pixels = self.resolution ** 2
    if self.seq_len is None:
      object.__setattr__(self, "seq_len", pixels + 2)
    elif self.seq_len < pixels + 2:
      raise ValueError(f"PathfinderConfig: seq_len={self.seq_len} cannot hold {pixels} pixels "
                       f"plus BOS, ANSWER and the label; use seq_len >= {pixels + 2} (or None).")

  @property
  def min_separation(self) -> int:
    """The least ``separation`` that keeps curves apart under the gap-bridging dilation."""
    return 2 * self.bridge_radius + 2

  @property
  def bridge_radius(self) -> int:
    """``ceil(gap_length / 2)``: the dilation radius that joins the dashes of one curve."""
    return (self.gap_length + 1) // 2

  @property
  def label_base(self) -> int:
    return token_layout.FIRST_FREE_ID + self.num_levels

  @property
  def vocab_size(self) -> int:
    return self.label_base + 2


def _square(radius: int) -> np.ndarray:
  """int64 [(2r+1)^2, 2]: the offsets of a (2r+1)x(2r+1) square."""
  span = np.arange(-radius, radius + 1)
  return np.stack(np.meshgrid(span, span, indexing="ij"), -1).reshape(-1, 2)


def _reflect(x: np.ndarray, high: float) -> np.ndarray:
  """Folds ``x`` into [0, high] by reflection at both ends (1-Lipschitz)."""
  period = 2.0 * high
  x = np.mod(x, period)
  return np.where(x > high, period - x, x)


def _walk(rng: np.random.Generator, config: PathfinderConfig) -> np.ndarray | None:
  """int64 [path_length, 2] pixels (row, col) of a random curve, each 8-adjacent to the one
  before; None when the walk stalled (rare: a very tight turn)."""
  r = config.resolution
  steps = 4 * config.path_length + 8
  start = rng.uniform(1.0, r - 2.0, size=2)
  heading = rng.uniform(0.0, 2.0 * math.pi) + np.cumsum(
      rng.uniform(-config.max_turn, config.max_turn, size=steps))
  moves = _STEP * np.stack([np.sin(heading), np.cos(heading)], -1)
  points = start + np.concatenate([np.zeros((1, 2)), np.cumsum(moves, 0)])
  pixels = np.rint(_reflect(points, r - 1.0)).astype(np.int64)
  keep = np.concatenate([[True], np.any(pixels[1:] != pixels[:-1], axis=1)])
  pixels = pixels[keep]
  if len(pixels) < config.path_length:
    return None
  return pixels[:config.path_length]


def _footprint(pixels: np.ndarray, radius: int, r: int) -> tuple[np.ndarray, np.ndarray]:
  """(rows, cols) of the pixels within Chebyshev ``radius`` of ``pixels``, clipped to the image."""
  near = (pixels[:, None, :] + _square(radius)[None]).reshape(-1, 2)
  near = np.clip(near, 0, r - 1)
  return near[:, 0], near[:, 1]


def _draw(rng: np.random.Generator, config: PathfinderConfig, label: int) -> np.ndarray | None:
  """float32 [r, r] image in {0, curve_intensity, 1} for ``label``, or None when one of the
  two main curves did not fit."""
  r = config.resolution
  image = np.zeros((r, r), np.float32)
  taken = np.zeros((r, r), bool)  # Pixels within separation - 1 of a curve drawn so far.
  dash = np.arange(config.path_length) % (config.dash_length + config.gap_length)
  on = dash < config.dash_length
  # (dot at the start, dot at the end, required) for each curve.
  if label:
    curves = [(True, True, True), (False, False, True)]
  else:
    curves = [(True, False, True), (True, False, True)]
  curves += [(False, False, False)] * config.num_distractors
  for dot_start, dot_end, required in curves:
    for _ in range(config.max_tries):
      pixels = _walk(rng, config)
      if pixels is None or (dot_start and dot_end and np.abs(
          pixels[0] - pixels[-1]).max() < config.separation):
        continue
      ends = [pixels[0]] * dot_start + [pixels[-1]] * dot_end
      dots = _footprint(np.array(ends), 1, r) if ends else (np.zeros(0, int),) * 2
      body = np.concatenate([pixels, np.stack(dots, -1)]) if ends else pixels
      if taken[body[:, 0], body[:, 1]].any():
        continue
      image[pixels[on, 0], pixels[on, 1]] = config.curve_intensity
      image[dots] = 1.0
      taken[_footprint(body, config.separation - 1, r)] = True
      break
    else:
      if required:
        return None
  return image


def pathfinder_image(rng: np.random.Generator, config: PathfinderConfig, label: int
                     ) -> np.ndarray:
  """uint8 [resolution, resolution]: an image of class ``label`` (1: the dots are joined),
  quantised to ``config.num_levels`` levels and scaled back to 0..255."""
  if label not in (0, 1):
    raise ValueError(f"pathfinder_image: label must be 0 or 1; got {label}.")
  for _ in range(_MAX_IMAGE_TRIES):
    image = _draw(rng, config, int(label))
    if image is not None:
      levels = np.rint(image * (config.num_levels - 1))
      return np.rint(levels * 255.0 / (config.num_levels - 1)).astype(np.uint8)
  raise RuntimeError(f"Pathfinder: the two main curves did not fit in {_MAX_IMAGE_TRIES} images "
                     f"with {config}; shorten path_length, lower separation or raise "
                     "resolution.")


def _levels(image: np.ndarray, num_levels: int) -> np.ndarray:
  """int32 levels 0..num_levels-1 of a uint8 image."""
  return np.rint(image.astype(np.float64) * (num_levels - 1) / 255.0).astype(np.int32)


def make_pathfinder_example(rng: np.random.Generator, config: PathfinderConfig
                            ) -> dict[str, np.ndarray]:
  """One Pathfinder example: the label is drawn first (``rng.integers(2)``), then the image
  (:func:`pathfinder_image` with the same ``rng``).

  Returns:
    ``inputs``, ``targets`` int32 [seq_len] (``PAD.. BOS pixels ANSWER`` | ``.. label``),
    ``loss_mask`` uint8 [seq_len] (1 at the last position) and ``label`` int32 [].
  """
  label = int(rng.integers(2))
  image = pathfinder_image(rng, config, label)
  pixels = _levels(image, config.num_levels).reshape(-1) + token_layout.FIRST_FREE_ID
  example = loaders.classification_example(pixels, config.label_base + label, config.seq_len)
  return {**example, "label": np.int32(label)}


def render_pathfinder(example: dict[str, np.ndarray],
                      config: PathfinderConfig | None = None) -> np.ndarray:
  """uint8 [resolution, resolution]: the image of an example (its ``inputs``), levels scaled to
  0..255; equal to the :func:`pathfinder_image` it was made from. ``config``: the one that made
  it (default ``PathfinderConfig()``)."""
  config = config or PathfinderConfig()
  pixels = loaders.content_tokens(example["inputs"]) - token_layout.FIRST_FREE_ID
  r = config.resolution
  if pixels.shape != (r * r,) or pixels.min() < 0 or pixels.max() >= config.num_levels:
    raise ValueError(f"render_pathfinder: the example does not hold a {r}x{r} image of "
                     f"{config.num_levels} levels (content of {pixels.size} tokens); pass the "
                     "config that made it.")
  return np.rint(pixels.reshape(r, r) * 255.0 / (config.num_levels - 1)).astype(np.uint8)


__all__ = ["PATHFINDER_FEATURES", "PathfinderConfig", "make_pathfinder_example",
           "pathfinder_image", "render_pathfinder"]
