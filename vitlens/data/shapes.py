"""The embedded procedural data set: patterned shapes on textured backgrounds.

Class = shape x pattern (6 shapes x 4 patterns, so up to 24 classes; the default
K = 20 uses the first five shapes). Every image is one bright, two-tone object on a
darker, smoothly textured background:

- object: one of `SHAPES`, filled with one of `PATTERNS` in two tones of a bright
  colour whose hue is the class's typical object hue (`typical_object_hue`, jittered by
  +-`OBJECT_HUE_JITTER`; saturation random) — object parts carry class evidence of their
  own, as object parts do in photos (tone A has HSV value >= 0.85, tone B = 0.55 x
  tone A), placed at a
  random position and scale (radius 0.24-0.4 of the image side) and slightly rotated
  (+-20 degrees; circles and rings are rotation-invariant anyway). The pattern's
  period scales with the image size so it stays visible inside one patch.
- background: a tint (HSV value <= 0.35, so every background channel is < 90 while
  every object pixel has a channel >= 119) modulated by smooth low-frequency noise.
- context correlation c in [0, 1]: with probability c the background tint has the
  class's *typical* hue (`class_index / num_classes` of the hue circle), otherwise a
  uniformly random hue. c = 0 makes the background uninformative; c = 1 makes it
  carry class evidence on its own (as context does in real photos).
- mask: exact per pixel (no anti-aliasing): `object_mask` is True exactly where the
  object's colour was painted.

Determinism: sample `i` of class `k` in a split is drawn from
`np.random.default_rng([seed, SPLIT_IDS[split], k, i])`, so any subset can be
regenerated without generating the rest. Rendering is vectorised numpy (thousands
of 64 px images per second on one core).
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from vitlens.errors import UserError

SPLIT_IDS: dict[str, int] = {"train": 0, "validation": 1, "test": 2}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "diamond")
PATTERNS: tuple[str, ...] = ("solid", "stripes", "checker", "dots")
MAX_CLASSES: int = len(SHAPES) * len(PATTERNS)
DEFAULT_NUM_CLASSES: int = 20

# Colour model (documented above; the tests check the mask against these bounds).
OBJECT_VALUE_RANGE: tuple[float, float] = (0.85, 1.0)
OBJECT_SECOND_TONE: float = 0.55
BACKGROUND_VALUE_RANGE: tuple[float, float] = (0.2, 0.35)
RADIUS_FRACTION_RANGE: tuple[float, float] = (0.24, 0.4)
MAX_ROTATION_RAD: float = np.deg2rad(20.0)
OBJECT_HUE_JITTER: float = 0.02


@dataclass(frozen=True)
class ShapesSample:
    """One generated sample; `key` follows `shapes-{split}-{class:03d}-{i:05d}`."""

    key: str
    image: np.ndarray  # [S, S, 3] uint8
    object_mask: np.ndarray  # [S, S] bool
    class_index: int
    class_name: str


def _check_num_classes(num_classes: int) -> None:
    if not 2 <= num_classes <= MAX_CLASSES:
        raise UserError(
            f"shapes: num_classes must be between 2 and {MAX_CLASSES}, got {num_classes}"
        )


def shapes_class_names(num_classes: int = DEFAULT_NUM_CLASSES) -> list[str]:
    """Class names `"{pattern}_{shape}"`; class k is shape k // 4 with pattern k % 4."""
    _check_num_classes(num_classes)
    return [
        f"{PATTERNS[k % len(PATTERNS)]}_{SHAPES[k // len(PATTERNS)]}"
        for k in range(num_classes)
    ]


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test in the object's frame (unit = radius). u, v: [S, S] -> [S, S] bool."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "ring":
        rho2 = u * u + v * v
        return (rho2 <= 1.0) & (rho2 >= 0.5 * 0.5)
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.1
    if shape == "cross":
        arm, length = 0.32, 0.95
        return ((np.abs(u) <= arm) & (np.abs(v) <= length)) | (
            (np.abs(v) <= arm) & (np.abs(u) <= length)
        )
    if shape == "triangle":
        # Equilateral, apex up (image y points down); inradius 0.6.
        inside = np.ones_like(u, dtype=bool)
        for angle in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3):
            inside &= u * np.cos(angle) + v * np.sin(angle) <= 0.6
        return inside
    raise ValueError(f"unknown shape {shape!r}")


def _pattern_second_tone(
    pattern: str, u_px: np.ndarray, v_px: np.ndarray, period: float
) -> np.ndarray:
    """Where the pattern uses the darker tone. u_px, v_px: [S, S] pixels -> [S, S] bool."""
    half = period / 2.0
    if pattern == "solid":
        return np.zeros_like(u_px, dtype=bool)
    if pattern == "stripes":
        return np.floor(v_px / half).astype(np.int64) % 2 == 1
    if pattern == "checker":
        cells = np.floor(u_px / half).astype(np.int64) + np.floor(v_px / half).astype(np.int64)
        return cells % 2 == 1
    if pattern == "dots":
        du = u_px - period * np.round(u_px / period)
        dv = v_px - period * np.round(v_px / period)
        return du * du + dv * dv <= (0.3 * period) ** 2
    raise ValueError(f"unknown pattern {pattern!r}")


def _hsv_to_rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    """One HSV colour (all in [0, 1]) -> RGB float array [3] in [0, 255]."""
    return 255.0 * np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value))


def _smooth_noise(size: int, rng: np.random.Generator, cells: int) -> np.ndarray:
    """Bilinearly upsampled uniform noise on a (cells+1)^2 grid -> [S, S] in [0, 1]."""
    grid = rng.random((cells + 1, cells + 1))
    t = (np.arange(size) + 0.5) / size * cells
    i0 = np.minimum(np.floor(t).astype(np.int64), cells - 1)
    frac = t - i0
    rows = grid[i0] * (1 - frac)[:, None] + grid[i0 + 1] * frac[:, None]  # [S, cells+1]
    return rows[:, i0] * (1 - frac)[None, :] + rows[:, i0 + 1] * frac[None, :]


def typical_context_hue(class_index: int, num_classes: int) -> float:
    """The background hue that class `class_index` gets with probability c."""
    return class_index / num_classes


def typical_object_hue(class_index: int) -> float:
    """The object hue of class `class_index` (golden-ratio spacing keeps neighbours apart)."""
    return (class_index * 0.6180339887) % 1.0


def render_shapes_sample(
    class_index: int,
    num_classes: int,
    size: int,
    rng: np.random.Generator,
    context_correlation: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one sample of class `class_index`; returns (image [S,S,3] uint8, mask [S,S] bool)."""
    _check_num_classes(num_classes)
    if not 0 <= class_index < num_classes:
        raise UserError(f"shapes: class_index {class_index} outside 0..{num_classes - 1}")
    if not 0.0 <= context_correlation <= 1.0:
        raise UserError(f"shapes: context_correlation must be in [0, 1], got {context_correlation}")
    if size < 16:
        raise UserError(f"shapes: size must be at least 16 pixels, got {size}")
    shape = SHAPES[class_index // len(PATTERNS)]
    pattern = PATTERNS[class_index % len(PATTERNS)]

    # Background: tinted smooth texture.
    typical = rng.random() < context_correlation
    bg_hue = typical_context_hue(class_index, num_classes) if typical else rng.random()
    bg_colour = _hsv_to_rgb(bg_hue, rng.uniform(0.5, 0.9), rng.uniform(*BACKGROUND_VALUE_RANGE))
    texture = 0.55 + 0.45 * _smooth_noise(size, rng, cells=max(2, size // 12))
    background = texture[:, :, None] * bg_colour[None, None, :]  # [S, S, 3]

    # Object geometry in its own rotated frame.
    radius = rng.uniform(*RADIUS_FRACTION_RANGE) * size
    margin = 0.9 * radius
    cx, cy = rng.uniform(margin, size - margin, size=2)
    theta = rng.uniform(-MAX_ROTATION_RAD, MAX_ROTATION_RAD)
    coords = np.arange(size) + 0.5
    dx = coords[None, :] - cx
    dy = coords[:, None] - cy
    u_px = dx * np.cos(theta) + dy * np.sin(theta)
    v_px = -dx * np.sin(theta) + dy * np.cos(theta)
    object_mask = _shape_mask(shape, u_px / radius, v_px / radius)

    # Object colour: two tones of one bright colour.
    object_hue = typical_object_hue(class_index) + rng.uniform(-OBJECT_HUE_JITTER, OBJECT_HUE_JITTER)
    tone_a = _hsv_to_rgb(object_hue, rng.uniform(0.45, 0.9), rng.uniform(*OBJECT_VALUE_RANGE))
    tone_b = OBJECT_SECOND_TONE * tone_a
    period = max(4.0, size / 8.0)
    phase_u, phase_v = rng.uniform(0, period, size=2)
    second = _pattern_second_tone(pattern, u_px + phase_u, v_px + phase_v, period)
    foreground = np.where(second[:, :, None], tone_b, tone_a)  # [S, S, 3]

    image = np.where(object_mask[:, :, None], foreground, background)
    return np.round(image).astype(np.uint8), object_mask


def iter_shapes_samples(
    num_classes: int,
    per_class: int,
    size: int,
    seed: int,
    split: str,
    context_correlation: float = 0.5,
) -> Iterator[ShapesSample]:
    """Yield `per_class` samples of every class, interleaved (sample i of class 0..K-1, then i+1)."""
    if split not in SPLIT_IDS:
        raise UserError(f"shapes: unknown split {split!r}; expected one of {sorted(SPLIT_IDS)}")
    if per_class < 0:
        raise UserError(f"shapes: per_class must be >= 0, got {per_class}")
    names = shapes_class_names(num_classes)
    for i in range(per_class):
        for class_index in range(num_classes):
            rng = np.random.default_rng([seed, SPLIT_IDS[split], class_index, i])
            image, mask = render_shapes_sample(
                class_index, num_classes, size, rng, context_correlation
            )
            yield ShapesSample(
                key=f"shapes-{split}-{class_index:03d}-{i:05d}",
                image=image,
                object_mask=mask,
                class_index=class_index,
                class_name=names[class_index],
            )
