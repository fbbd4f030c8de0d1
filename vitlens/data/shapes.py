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

Harder settings (`SHAPES_DIFFICULTIES`; all off by default, which leaves the output
byte-identical to the standard set): `distractors` smaller shapes of *other* classes
painted under the object (context: mask False, id 0 in shards), an `occlusion` bar that
hides that fraction of the object's pixels (the hidden pixels show the bar and are
context, so the mask marks exactly the visible object), `contrast` < 1 that blends every
pixel towards the background texture, and Gaussian pixel `noise` (std, in units of the
0..255 range). The extra randomness comes from generators seeded by one number drawn
from `rng` AFTER every standard draw, and only when some knob is on, so a hard sample is
its standard sample plus perturbations. Details: docs/shapes.md.

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

# Harder settings. Each knob's "standard" value leaves the generator's output unchanged.
SHAPES_KNOBS: tuple[str, ...] = ("occlusion", "noise", "contrast", "distractors")
SHAPES_DIFFICULTIES: dict[str, dict[str, float]] = {
    "standard": {"occlusion": 0.0, "noise": 0.0, "contrast": 1.0, "distractors": 0},
    # Tuned so that each zoo model misclassifies 15-30 % of the demo's split (20 classes x
    # 10, size 64, validation, c = 0.5) at seeds 0 and 1; measured rates in docs/shapes.md.
    "hard": {"occlusion": 0.2, "noise": 0.36, "contrast": 0.9, "distractors": 0},
}
DEFAULT_DIFFICULTY: str = "standard"
MAX_DISTRACTORS: int = 8
# A distractor's radius as a fraction of the image side (the object's is 0.24-0.4).
DISTRACTOR_RADIUS_RANGE: tuple[float, float] = (0.12, 0.2)
# Independent streams of the perturbations (seeded by one draw after the standard ones).
_STREAM_DISTRACTORS, _STREAM_OCCLUSION, _STREAM_NOISE = 0, 1, 2


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


def shapes_difficulty(
    difficulty: str = DEFAULT_DIFFICULTY,
    occlusion: float | None = None,
    noise: float | None = None,
    contrast: float | None = None,
    distractors: int | None = None,
) -> dict[str, float]:
    """The knobs of preset `difficulty` with the given ones overriding it, validated.

    Returns `{"occlusion", "noise", "contrast", "distractors"}` (distractors an int).
    """
    if difficulty not in SHAPES_DIFFICULTIES:
        raise UserError(
            f"shapes: unknown difficulty {difficulty!r}; expected one of {sorted(SHAPES_DIFFICULTIES)}"
        )
    knobs = dict(SHAPES_DIFFICULTIES[difficulty])
    given = {"occlusion": occlusion, "noise": noise, "contrast": contrast, "distractors": distractors}
    knobs.update({key: value for key, value in given.items() if value is not None})
    _check_knobs(knobs)
    knobs["distractors"] = int(knobs["distractors"])
    return knobs


def _check_knobs(knobs: dict[str, float]) -> None:
    """Raise UserError for a knob outside its range."""
    if not 0.0 <= knobs["occlusion"] < 1.0:
        raise UserError(f"shapes: occlusion must be in [0, 1), got {knobs['occlusion']}")
    if not 0.0 <= knobs["noise"] <= 1.0:
        raise UserError(f"shapes: noise must be in [0, 1], got {knobs['noise']}")
    if not 0.0 < knobs["contrast"] <= 1.0:
        raise UserError(f"shapes: contrast must be in (0, 1], got {knobs['contrast']}")
    count = knobs["distractors"]
    if not (float(count).is_integer() and 0 <= count <= MAX_DISTRACTORS):
        raise UserError(
            f"shapes: distractors must be a whole number in 0..{MAX_DISTRACTORS}, got {count}"
        )


def is_standard(knobs: dict[str, float]) -> bool:
    """True when every knob has its standard value (the output is the standard set's)."""
    return all(knobs[key] == SHAPES_DIFFICULTIES["standard"][key] for key in SHAPES_KNOBS)


def _object_frame(
    size: int, cx: float, cy: float, theta: float
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in a frame centred at (cx, cy), rotated by theta -> (u, v) [S, S]."""
    coords = np.arange(size) + 0.5
    dx = coords[None, :] - cx
    dy = coords[:, None] - cy
    return dx * np.cos(theta) + dy * np.sin(theta), -dx * np.sin(theta) + dy * np.cos(theta)


def _paint_distractors(
    background: np.ndarray,
    class_index: int,
    num_classes: int,
    count: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Paint `count` smaller shapes of other classes (their colour model) onto `background`."""
    size = background.shape[0]
    period = max(4.0, size / 8.0)
    canvas = background
    for _ in range(count):
        other = int(rng.integers(num_classes - 1))
        other += other >= class_index  # any class but the object's
        radius = rng.uniform(*DISTRACTOR_RADIUS_RANGE) * size
        cx, cy = rng.uniform(0.9 * radius, size - 0.9 * radius, size=2)
        u_px, v_px = _object_frame(size, cx, cy, rng.uniform(-MAX_ROTATION_RAD, MAX_ROTATION_RAD))
        inside = _shape_mask(SHAPES[other // len(PATTERNS)], u_px / radius, v_px / radius)
        hue = typical_object_hue(other) + rng.uniform(-OBJECT_HUE_JITTER, OBJECT_HUE_JITTER)
        tone_a = _hsv_to_rgb(hue, rng.uniform(0.45, 0.9), rng.uniform(*OBJECT_VALUE_RANGE))
        phase_u, phase_v = rng.uniform(0, period, size=2)
        second = _pattern_second_tone(
            PATTERNS[other % len(PATTERNS)], u_px + phase_u, v_px + phase_v, period
        )
        colour = np.where(second[:, :, None], OBJECT_SECOND_TONE * tone_a, tone_a)
        canvas = np.where(inside[:, :, None], colour, canvas)
    return canvas


def _occluder_band(
    object_mask: np.ndarray, fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """A straight bar across the image that covers `fraction` of the object's pixels -> [S, S] bool.

    The bar has a random direction; its two edges are quantiles of the object pixels'
    positions across it, at a random offset, so it hides (up to pixel rounding) exactly
    that share of the object.
    """
    size = object_mask.shape[0]
    phi = rng.uniform(0.0, np.pi)
    coords = np.arange(size) + 0.5
    across = coords[None, :] * np.cos(phi) + coords[:, None] * np.sin(phi)  # [S, S]
    start = rng.uniform(0.0, 1.0 - fraction)
    lo, hi = np.quantile(across[object_mask], [start, start + fraction])
    return (across >= lo) & (across <= hi)


def _occluder_colour(rng: np.random.Generator) -> np.ndarray:
    """A flat, dark colour in the background's value range (every channel < 90) -> [3]."""
    return _hsv_to_rgb(rng.random(), rng.uniform(0.2, 0.6), rng.uniform(*BACKGROUND_VALUE_RANGE))


def _perturb(
    background: np.ndarray,
    object_mask: np.ndarray,
    foreground: np.ndarray,
    class_index: int,
    num_classes: int,
    knobs: dict[str, float],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Compose a harder sample: distractors, object, occluder, contrast, noise -> (float image, mask).

    One number drawn from `rng` seeds an independent stream per perturbation, so e.g.
    the distractors of a sample do not change when only `noise` changes.
    """
    base = int(rng.integers(2**63))
    streams = [np.random.default_rng([base, stream]) for stream in range(3)]
    count = int(knobs["distractors"])
    scene = _paint_distractors(background, class_index, num_classes, count, streams[_STREAM_DISTRACTORS])
    image = np.where(object_mask[:, :, None], foreground, scene)
    if knobs["occlusion"] > 0:
        band = _occluder_band(object_mask, knobs["occlusion"], streams[_STREAM_OCCLUSION])
        image = np.where(band[:, :, None], _occluder_colour(streams[_STREAM_OCCLUSION]), image)
        object_mask = object_mask & ~band
    if knobs["contrast"] < 1:
        image = background + knobs["contrast"] * (image - background)
    if knobs["noise"] > 0:
        image = image + 255.0 * knobs["noise"] * streams[_STREAM_NOISE].standard_normal(image.shape)
    return np.clip(image, 0.0, 255.0), object_mask


def render_shapes_sample(
    class_index: int,
    num_classes: int,
    size: int,
    rng: np.random.Generator,
    context_correlation: float,
    *,
    occlusion: float = 0.0,
    noise: float = 0.0,
    contrast: float = 1.0,
    distractors: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one sample of class `class_index`; returns (image [S,S,3] uint8, mask [S,S] bool).

    With every knob at its standard value (`SHAPES_DIFFICULTIES["standard"]`) no random
    number beyond the standard ones is drawn and the output is the standard set's.
    """
    _check_num_classes(num_classes)
    if not 0 <= class_index < num_classes:
        raise UserError(f"shapes: class_index {class_index} outside 0..{num_classes - 1}")
    if not 0.0 <= context_correlation <= 1.0:
        raise UserError(f"shapes: context_correlation must be in [0, 1], got {context_correlation}")
    if size < 16:
        raise UserError(f"shapes: size must be at least 16 pixels, got {size}")
    knobs = {"occlusion": occlusion, "noise": noise, "contrast": contrast, "distractors": distractors}
    _check_knobs(knobs)
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
    u_px, v_px = _object_frame(size, cx, cy, theta)
    object_mask = _shape_mask(shape, u_px / radius, v_px / radius)

    # Object colour: two tones of one bright colour.
    object_hue = typical_object_hue(class_index) + rng.uniform(-OBJECT_HUE_JITTER, OBJECT_HUE_JITTER)
    tone_a = _hsv_to_rgb(object_hue, rng.uniform(0.45, 0.9), rng.uniform(*OBJECT_VALUE_RANGE))
    tone_b = OBJECT_SECOND_TONE * tone_a
    period = max(4.0, size / 8.0)
    phase_u, phase_v = rng.uniform(0, period, size=2)
    second = _pattern_second_tone(pattern, u_px + phase_u, v_px + phase_v, period)
    foreground = np.where(second[:, :, None], tone_b, tone_a)  # [S, S, 3]

    if is_standard(knobs):
        image = np.where(object_mask[:, :, None], foreground, background)
    else:
        image, object_mask = _perturb(
            background, object_mask, foreground, class_index, num_classes, knobs, rng
        )
    return np.round(image).astype(np.uint8), object_mask


def iter_shapes_samples(
    num_classes: int,
    per_class: int,
    size: int,
    seed: int,
    split: str,
    context_correlation: float = 0.5,
    difficulty: str = DEFAULT_DIFFICULTY,
    *,
    occlusion: float | None = None,
    noise: float | None = None,
    contrast: float | None = None,
    distractors: int | None = None,
) -> Iterator[ShapesSample]:
    """Yield `per_class` samples of every class, interleaved (sample i of class 0..K-1, then i+1).

    `difficulty` names a preset of `SHAPES_DIFFICULTIES`; a knob given explicitly
    overrides the preset's value (see `shapes_difficulty`).
    """
    if split not in SPLIT_IDS:
        raise UserError(f"shapes: unknown split {split!r}; expected one of {sorted(SPLIT_IDS)}")
    if per_class < 0:
        raise UserError(f"shapes: per_class must be >= 0, got {per_class}")
    knobs = shapes_difficulty(difficulty, occlusion, noise, contrast, distractors)
    names = shapes_class_names(num_classes)
    for i in range(per_class):
        for class_index in range(num_classes):
            rng = np.random.default_rng([seed, SPLIT_IDS[split], class_index, i])
            image, mask = render_shapes_sample(
                class_index, num_classes, size, rng, context_correlation, **knobs
            )
            yield ShapesSample(
                key=f"shapes-{split}-{class_index:03d}-{i:05d}",
                image=image,
                object_mask=mask,
                class_index=class_index,
                class_name=names[class_index],
            )
